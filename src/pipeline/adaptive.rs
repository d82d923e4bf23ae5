//! Adaptive batching and concurrency per server: how many batches may be at a server at once,
//! and how many rules a batch may carry, follow what the server and its gateways sustain.
//!
//! The controller is AIMD on each enforcer call's answer, after vector's adaptive request
//! concurrency for HTTP sinks, with one change for batches: a call's time grows with its size
//! on its own (a gateway's task is a base plus a cost per rule), so "slower" is judged against
//! a fit of call time on batch size, not against one average.
//!
//! - **Back-pressure** (rate limited, server errors, timeouts, tasks that never end) halves the
//!   concurrency and the batch size.
//! - **A slow call** (more than [`SLOW`] times what the fit expects for its size, and half a
//!   second more) cuts the concurrency by a quarter: the gateways are queueing scripts.
//! - **A healthy call while the server was busy** (a batch waited for a slot, or went out full)
//!   raises the concurrency: doubling until the first cut (a slow start), then by one, at most
//!   once per expected call time. A healthy call also grows the batch size back by a quarter.
//!
//! Everything here is pure: time comes in as an argument, and the table tests drive it.

use std::time::Duration;

/// A call slower than this many times its expected time (plus [`SLACK`]) means congestion.
pub const SLOW: f64 = 1.5;
/// Noise a call's time may have without counting as slow.
pub const SLACK: Duration = Duration::from_millis(500);
/// Calls seen before a call can count as slow (the fit needs a few points).
const WARM_UP: u32 = 8;

/// What a call's answer says about the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Answered (rule by rule, whatever each rule's verdict).
    Healthy,
    /// Back-pressure: rate limited, a server error, a timeout.
    Overloaded,
    /// Says nothing about load: failed for another reason (a refused login, a bad request), or
    /// answered a call whose time does not compare with the fit's (a verify, an unblock).
    Other,
}

/// One enforcer call, as the controller sees it.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub rules: usize,
    pub took: Duration,
    pub answer: Answer,
    /// A batch waited for a slot, or went out full, since the last call: more load than room.
    pub busy: bool,
}

/// The bounds a controller keeps to (from `run.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_concurrency: usize,
    pub min_batch: usize,
    pub max_batch: usize,
}

/// The current limits, and what the last call changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub concurrency: usize,
    pub batch: usize,
}

/// Call time against batch size: exponentially weighted least squares of `took = a + b·rules`.
#[derive(Debug, Clone, Copy, Default)]
struct Fit {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl Fit {
    /// Weight kept of the past at each new point.
    const DECAY: f64 = 0.95;

    fn add(&mut self, rules: f64, seconds: f64, weight: f64) {
        let d = Self::DECAY;
        self.w = self.w * d + weight;
        self.x = self.x * d + weight * rules;
        self.y = self.y * d + weight * seconds;
        self.xx = self.xx * d + weight * rules * rules;
        self.xy = self.xy * d + weight * rules * seconds;
    }

    /// The expected time of a call with `rules`, in seconds (the mean when sizes barely vary,
    /// never below zero).
    fn expect(&self, rules: f64) -> f64 {
        if self.w == 0.0 {
            return 0.0;
        }
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        let slope = match var > 1.0 {
            true => ((self.xy / self.w - mx * my) / var).max(0.0),
            false => 0.0,
        };
        (my + slope * (rules - mx)).max(0.0)
    }
}

/// The controller of one server.
#[derive(Debug, Clone)]
pub struct Controller {
    bounds: Bounds,
    limits: Limits,
    fit: Fit,
    calls: u32,
    /// Doubling until the first cut.
    slow_start: bool,
    /// When the concurrency last rose (an increase waits an expected call time).
    raised_at: Duration,
}

impl Controller {
    /// Starts at `initial` batches at once (within the bounds) and the largest batch.
    pub fn new(bounds: Bounds, initial: usize) -> Self {
        let bounds = Bounds {
            max_concurrency: bounds.max_concurrency.max(1),
            min_batch: bounds.min_batch.clamp(1, bounds.max_batch.max(1)),
            max_batch: bounds.max_batch.max(1),
        };
        Self {
            limits: Limits {
                concurrency: initial.clamp(1, bounds.max_concurrency),
                batch: bounds.max_batch,
            },
            bounds,
            fit: Fit::default(),
            calls: 0,
            slow_start: true,
            raised_at: Duration::ZERO,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The expected time of a call carrying `rules` (zero before any call).
    pub fn expected(&self, rules: usize) -> Duration {
        Duration::from_secs_f64(self.fit.expect(rules as f64))
    }

    /// A call ended at `now` (time since the controller began): the new limits.
    pub fn observe(&mut self, now: Duration, call: Call) -> Limits {
        let Bounds {
            max_concurrency,
            min_batch,
            max_batch,
        } = self.bounds;
        let expected = self.expected(call.rules);
        let slow = self.calls >= WARM_UP && call.took > expected.mul_f64(SLOW) + SLACK;
        let limits = &mut self.limits;
        match call.answer {
            Answer::Overloaded => {
                limits.concurrency = (limits.concurrency / 2).max(1);
                limits.batch = (limits.batch / 2).max(min_batch);
                self.slow_start = false;
            }
            Answer::Other => {}
            Answer::Healthy if slow => {
                limits.concurrency = (limits.concurrency * 3 / 4).max(1);
                self.slow_start = false;
            }
            Answer::Healthy => {
                limits.batch = (limits.batch + limits.batch.div_ceil(4)).min(max_batch);
                let waited = now.saturating_sub(self.raised_at) >= expected;
                if call.busy && waited && limits.concurrency < max_concurrency {
                    limits.concurrency = match self.slow_start {
                        true => limits.concurrency * 2,
                        false => limits.concurrency + 1,
                    }
                    .min(max_concurrency);
                    self.raised_at = now;
                }
            }
        }
        if call.answer == Answer::Healthy {
            // A slow call says the gateways queue: it teaches the fit little, so a gateway
            // that stays slower is learned, slowly, while a passing queue is not.
            let weight = if slow { 0.1 } else { 1.0 };
            self.fit
                .add(call.rules as f64, call.took.as_secs_f64(), weight);
            self.calls += 1;
        }
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        max_concurrency: 16,
        min_batch: 10,
        max_batch: 500,
    };

    fn call(rules: usize, ms: u64, answer: Answer, busy: bool) -> Call {
        Call {
            rules,
            took: Duration::from_millis(ms),
            answer,
            busy,
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// A gateway whose task is 1 s plus 1 ms per rule.
    fn task_ms(rules: usize) -> u64 {
        1000 + rules as u64
    }

    /// A controller that has seen `n` healthy calls of varied sizes, without load.
    fn warmed(n: u32) -> Controller {
        let mut c = Controller::new(BOUNDS, 4);
        for i in 0..n {
            let rules = 50 + (i as usize * 37) % 400;
            c.observe(s(0), call(rules, task_ms(rules), Answer::Healthy, false));
        }
        c
    }

    #[test]
    fn the_fit_learns_base_and_cost_per_rule() {
        let c = warmed(20);
        for rules in [10, 250, 1000] {
            let expected = c.expected(rules).as_millis() as i64;
            assert!(
                (expected - task_ms(rules) as i64).abs() <= 2,
                "{rules} rules: expected {expected} ms"
            );
        }
        // Sizes that never vary: the mean.
        let mut same = Controller::new(BOUNDS, 4);
        for _ in 0..5 {
            same.observe(s(0), call(100, 1200, Answer::Healthy, false));
        }
        assert_eq!(same.expected(400), Duration::from_millis(1200));
    }

    #[test]
    fn each_answer_moves_the_limits_as_the_table_says() {
        // (limits before: concurrency, batch; slow start; the call; limits after)
        let cases = [
            // Busy and healthy: slow start doubles, then one at a time; the batch grows back.
            (
                (4, 400),
                true,
                call(300, task_ms(300), Answer::Healthy, true),
                (8, 500),
            ),
            (
                (4, 400),
                false,
                call(300, task_ms(300), Answer::Healthy, true),
                (5, 500),
            ),
            // Not busy: no more concurrency is needed.
            (
                (4, 500),
                true,
                call(300, task_ms(300), Answer::Healthy, false),
                (4, 500),
            ),
            // At the bound: stays there.
            (
                (16, 500),
                true,
                call(300, task_ms(300), Answer::Healthy, true),
                (16, 500),
            ),
            // Slow (the gateways queue): a quarter less concurrency, the batch kept.
            (
                (8, 500),
                true,
                call(300, 4 * task_ms(300), Answer::Healthy, true),
                (6, 500),
            ),
            (
                (1, 500),
                false,
                call(300, 4 * task_ms(300), Answer::Healthy, true),
                (1, 500),
            ),
            // Back-pressure: both halved, within the bounds.
            (
                (8, 400),
                true,
                call(300, 200, Answer::Overloaded, true),
                (4, 200),
            ),
            (
                (1, 15),
                true,
                call(15, 200, Answer::Overloaded, true),
                (1, 10),
            ),
            // A failure that says nothing about load changes nothing.
            (
                (8, 400),
                true,
                call(300, 200, Answer::Other, true),
                (8, 400),
            ),
        ];
        for (i, ((concurrency, batch), slow_start, call, (want_c, want_b))) in
            cases.into_iter().enumerate()
        {
            let mut c = warmed(WARM_UP);
            c.limits = Limits { concurrency, batch };
            c.slow_start = slow_start;
            let got = c.observe(s(100), call);
            assert_eq!(
                (got.concurrency, got.batch),
                (want_c, want_b),
                "case {i}: {call:?}"
            );
        }
    }

    #[test]
    fn concurrency_rises_at_most_once_per_expected_call_time() {
        let mut c = warmed(WARM_UP);
        c.slow_start = false;
        let busy = call(300, task_ms(300), Answer::Healthy, true);
        assert_eq!(c.observe(s(10), busy).concurrency, 5);
        // Calls that end within the next 1.3 s were under way at 4: no second raise.
        assert_eq!(
            c.observe(s(10) + Duration::from_millis(500), busy)
                .concurrency,
            5
        );
        assert_eq!(c.observe(s(12), busy).concurrency, 6);
    }

    #[test]
    fn a_cut_ends_slow_start_and_a_slow_gateway_is_learned_slowly() {
        let mut c = warmed(WARM_UP);
        let slow = call(300, 4 * task_ms(300), Answer::Healthy, true);
        assert_eq!(c.observe(s(10), slow).concurrency, 3);
        assert_eq!(
            c.observe(s(20), call(300, task_ms(300), Answer::Healthy, true))
                .concurrency,
            4,
            "one more, not twice as many"
        );
        // A gateway that stays four times slower: cut to one, and in time no longer slow.
        let mut at = s(30);
        let mut cuts = 0;
        for _ in 0..200 {
            let before = c.limits().concurrency;
            if c.observe(at, slow).concurrency < before {
                cuts += 1;
            }
            at += s(5);
        }
        assert!(cuts >= 2, "cut while the fit still expected the old time");
        let after = c.limits().concurrency;
        c.observe(at, slow);
        assert!(c.limits().concurrency >= after, "learned: no longer slow");
    }

    #[test]
    fn starts_within_the_bounds() {
        let c = Controller::new(BOUNDS, 64);
        assert_eq!(
            c.limits(),
            Limits {
                concurrency: 16,
                batch: 500
            }
        );
        let c = Controller::new(BOUNDS, 0);
        assert_eq!(c.limits().concurrency, 1);
    }
}
