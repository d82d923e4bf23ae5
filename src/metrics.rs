//! The one catalogue of samgate's Prometheus metrics. Names follow
//! `samgate_<noun>_<unit>[_total]`; label values are bounded (configured sites and servers,
//! outcomes, commands), never an IP, an event id or a key.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use strum::IntoEnumIterator;

use crate::checkpoint::ApiError;
use crate::event::DeadLetterStage;
use crate::flowmon::InputFormat;
use crate::pipeline::report::Outcome;

pub struct Metrics {
    registry: Registry,
    /// Events taken from the events topic, by site and input format.
    pub events_consumed: IntCounterVec,
    /// Decisions (result messages), by outcome.
    pub decisions: IntCounterVec,
    /// Dead-letter messages written, by stage.
    pub dead_letters: IntCounterVec,
    pub dead_letters_refused: IntCounterVec,
    /// Management API requests, by server, command and status (`ok` or an error kind).
    pub api_requests: IntCounterVec,
    /// Management API request latency, by server and command.
    pub api_latency: HistogramVec,
    /// Successful logins, by server.
    pub logins: IntCounterVec,
    /// Rules per run-script batch.
    pub batch_rules: Histogram,
    /// Where a batch's time goes, by server and stage (`slot`: waiting for a server slot;
    /// `fill`: gathering rules; `write_ahead`: pending state records; `firewall`: the enforcer
    /// calls; `report`: state records and results).
    pub batch_stage: HistogramVec,
    /// Batches a server may have at once now (adaptive), by server.
    pub server_concurrency: IntGaugeVec,
    /// Rules a batch may carry now (adaptive), by server.
    pub server_batch_rules: IntGaugeVec,
    /// From detection (ADS time, else shim receipt) to the rule being confirmed on the gateways.
    pub detection_to_enforcement: Histogram,
    /// Blocks active now (in this replica's partitions).
    pub active_blocks: IntGauge,
    /// Events consumed whose result is not yet acknowledged.
    pub in_flight: IntGauge,
    /// Messages behind the end of the events topic, over this replica's partitions.
    pub consumer_lag: IntGauge,
    /// Always 1, labelled with the version: present while samgate runs (for "samgate down").
    pub build_info: IntGaugeVec,
    /// Work of a revoked partition dropped before it reached a firewall or the results topic.
    pub fenced: IntCounter,
    /// Partitions owned whose block state is still being read (not consumed meanwhile).
    pub state_loading: IntGauge,
    /// Failed attempts to read a partition's block state (each is retried).
    pub state_load_failures: IntCounter,
    /// Keys tracked in memory (active, in-flight, unconfirmed blocks and recent history).
    pub tracked_blocks: IntGauge,
    /// New blocks refused because `run.max_tracked_blocks` active blocks are tracked.
    pub state_full: IntCounter,
    /// Messages Kafka refused for good (too large, not authorised), by topic.
    pub kafka_write_failures: IntCounterVec,
    /// Partitions this replica stopped working on because another replica claimed them.
    pub fenced_partitions: IntCounter,
    /// Operator commands consumed, by action (never by actor).
    pub commands: IntCounterVec,
    /// Rules out of step at the last reconcile, by target and kind (`missing`, `orphaned`).
    pub drift_rules: IntGaugeVec,
    /// Rules re-asserted or removed by reconcile, by target.
    pub reconcile_repairs: IntCounterVec,
    /// Reconcile runs, by target and status (`ok`, `failed`).
    pub reconciles: IntCounterVec,
    /// `samgate feed`: addresses a feed lists now, by feed.
    pub feed_entries: IntGaugeVec,
    /// `samgate feed`: a feed's size in bytes, by feed and format (`text`, `csv`).
    pub feed_bytes: IntGaugeVec,
    /// `samgate feed`: requests, by feed and HTTP status (`200`, `304`, `401`, `503`).
    pub feed_requests: IntCounterVec,
    /// `samgate feed`: when a feed's content last changed (unix seconds), by feed.
    pub feed_last_change: IntGaugeVec,
    /// `samgate feed`: when a configured poller last fetched a feed (unix seconds), by feed and
    /// poller (a configured gateway's name, or `other`).
    pub feed_last_poll: IntGaugeVec,
    /// `samgate feed`: records of the state topic not read yet, at the last check, by topic.
    pub feed_state_lag: IntGaugeVec,
    /// `samgate feed`: when the state reader last reached Kafka and measured its lag (unix
    /// seconds), by topic: a feed server cut off from Kafka serves what it last read.
    pub feed_state_checked: IntGaugeVec,
    /// `samgate feed`: state records read, by topic (behind and not reading is stuck).
    pub feed_state_records: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let seconds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        let events_consumed = counter(
            "samgate_events_consumed_total",
            "Events taken from the events topic.",
            &["site", "format"],
        );
        let decisions = counter(
            "samgate_decisions_total",
            "Decisions (one result message each), by outcome.",
            &["outcome"],
        );
        let dead_letters = counter(
            "samgate_dead_letters_total",
            "Messages written to the dead-letter topic, by stage.",
            &["stage"],
        );
        let dead_letters_refused = counter(
            "samgate_dead_letters_refused_total",
            "Dead letters the dead-letter topic refused for good (their input was skipped), by stage.",
            &["stage"],
        );
        let api_requests = counter(
            "samgate_firewall_api_requests_total",
            "Check Point Management API requests.",
            &["server", "command", "status"],
        );
        let logins = counter(
            "samgate_firewall_logins_total",
            "Successful logins to a management server.",
            &["server"],
        );
        let api_latency = HistogramVec::new(
            HistogramOpts::new(
                "samgate_firewall_api_request_duration_seconds",
                "Management API request latency.",
            )
            .buckets(seconds.clone()),
            &["server", "command"],
        )
        .expect("metric");
        registry
            .register(Box::new(api_latency.clone()))
            .expect("unique metric");
        let batch_rules = Histogram::with_opts(
            HistogramOpts::new("samgate_batch_rules", "Rules per run-script batch.").buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
            ]),
        )
        .expect("metric");
        registry
            .register(Box::new(batch_rules.clone()))
            .expect("unique metric");
        let batch_stage = HistogramVec::new(
            HistogramOpts::new(
                "samgate_batch_stage_seconds",
                "Where a batch's time goes, by server and stage (slot, fill, write_ahead, firewall, report).",
            )
            .buckets(seconds.clone()),
            &["server", "stage"],
        )
        .expect("metric");
        registry
            .register(Box::new(batch_stage.clone()))
            .expect("unique metric");
        let detection_to_enforcement = Histogram::with_opts(
            HistogramOpts::new(
                "samgate_detection_to_enforcement_seconds",
                "From detection to the rule confirmed on the gateways.",
            )
            .buckets(seconds),
        )
        .expect("metric");
        registry
            .register(Box::new(detection_to_enforcement.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "samgate_build_info",
                "Always 1 while samgate runs; the version as a label.",
            ),
            &["version"],
        )
        .expect("metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Self {
            build_info,
            events_consumed,
            decisions,
            dead_letters,
            dead_letters_refused,
            api_requests,
            api_latency,
            logins,
            batch_rules,
            batch_stage,
            server_concurrency: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "samgate_server_concurrency",
                        "Batches a server may have at once now (run.adaptive moves it within run.server_concurrency).",
                    ),
                    &["server"],
                )
                .expect("metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            server_batch_rules: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "samgate_server_batch_rules",
                        "Rules a batch to a server may carry now (run.adaptive moves it within run.batch_max_rules).",
                    ),
                    &["server"],
                )
                .expect("metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            detection_to_enforcement,
            active_blocks: gauge(
                "samgate_active_blocks",
                "Blocks active now in this replica's partitions.",
            ),
            in_flight: gauge(
                "samgate_enforcement_queue_depth",
                "Events consumed whose result is not yet acknowledged.",
            ),
            consumer_lag: gauge(
                "samgate_consumer_lag_messages",
                "Messages behind the end of the events topic.",
            ),
            fenced: plain_counter(
                "samgate_fenced_work_total",
                "Rules and results of a revoked partition dropped before a firewall or the results topic.",
            ),
            state_loading: gauge(
                "samgate_state_loading_partitions",
                "Owned partitions whose block state is still being read (not consumed meanwhile).",
            ),
            state_load_failures: plain_counter(
                "samgate_state_load_failures_total",
                "Failed attempts to read a partition's block state (each is retried).",
            ),
            tracked_blocks: gauge(
                "samgate_tracked_blocks",
                "Keys tracked in memory: active, in-flight and unconfirmed blocks, recent history.",
            ),
            state_full: plain_counter(
                "samgate_state_full_total",
                "New blocks refused because run.max_tracked_blocks active blocks are tracked.",
            ),
            fenced_partitions: plain_counter(
                "samgate_fenced_partitions_total",
                "Partitions this replica stopped working on because another replica claimed them.",
            ),
            kafka_write_failures: counter(
                "samgate_kafka_write_failures_total",
                "Messages Kafka refused for good (too large, not authorised), by topic.",
                &["topic"],
            ),
            commands: counter(
                "samgate_operator_commands_total",
                "Operator commands consumed (block, unblock, exempt, unexempt, reconcile).",
                &["action"],
            ),
            drift_rules: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "samgate_drift_rules",
                        "Rules out of step at the last reconcile: missing (an active block the gateways lost) or orphaned (samgate's tag, no block).",
                    ),
                    &["target", "kind"],
                )
                .expect("metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            reconcile_repairs: counter(
                "samgate_reconcile_repairs_total",
                "Rules re-asserted (or orphans removed) by reconcile.",
                &["target"],
            ),
            reconciles: counter(
                "samgate_reconcile_runs_total",
                "Reconcile runs, by target and status (ok, failed).",
                &["target", "status"],
            ),
            feed_entries: gauge_vec(
                "samgate_feed_entries",
                "Addresses a feed lists now.",
                &["feed"],
            ),
            feed_bytes: gauge_vec(
                "samgate_feed_bytes",
                "A feed's size in bytes, by format (text, csv).",
                &["feed", "format"],
            ),
            feed_requests: counter(
                "samgate_feed_requests_total",
                "Requests for a feed, by HTTP status.",
                &["feed", "status"],
            ),
            feed_last_change: gauge_vec(
                "samgate_feed_last_change_timestamp_seconds",
                "When a feed's content last changed (unix seconds).",
                &["feed"],
            ),
            feed_last_poll: gauge_vec(
                "samgate_feed_last_poll_timestamp_seconds",
                "When a configured gateway (or any other client: poller=\"other\") last fetched a feed (unix seconds).",
                &["feed", "poller"],
            ),
            feed_state_lag: gauge_vec(
                "samgate_feed_state_lag_records",
                "Records of the state topic the feed server has not read yet (at the last check).",
                &["topic"],
            ),
            feed_state_checked: gauge_vec(
                "samgate_feed_state_checked_timestamp_seconds",
                "When the feed server last reached Kafka and measured how far behind the state topic it is (unix seconds).",
                &["topic"],
            ),
            feed_state_records: counter(
                "samgate_feed_state_records_total",
                "State records the feed server has read.",
                &["topic"],
            ),
            registry,
        }
    }

    /// Every metric's name, including those with no sample yet (the exposition omits them).
    pub fn names(&self) -> Vec<String> {
        self.catalogue().into_iter().map(|(name, _)| name).collect()
    }

    /// Every metric's name with its label names: what a dashboard or an alert may select on.
    pub fn catalogue(&self) -> Vec<(String, Vec<String>)> {
        use prometheus::core::Collector;
        let collectors: [&dyn Collector; 35] = [
            &self.build_info,
            &self.events_consumed,
            &self.decisions,
            &self.dead_letters,
            &self.dead_letters_refused,
            &self.api_requests,
            &self.api_latency,
            &self.logins,
            &self.batch_rules,
            &self.batch_stage,
            &self.server_concurrency,
            &self.server_batch_rules,
            &self.detection_to_enforcement,
            &self.active_blocks,
            &self.in_flight,
            &self.consumer_lag,
            &self.fenced,
            &self.state_loading,
            &self.state_load_failures,
            &self.tracked_blocks,
            &self.state_full,
            &self.kafka_write_failures,
            &self.fenced_partitions,
            &self.commands,
            &self.drift_rules,
            &self.reconcile_repairs,
            &self.reconciles,
            &self.feed_entries,
            &self.feed_bytes,
            &self.feed_requests,
            &self.feed_last_change,
            &self.feed_last_poll,
            &self.feed_state_lag,
            &self.feed_state_checked,
            &self.feed_state_records,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc())
            .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
            .collect()
    }

    /// Creates at zero every series whose labels are known before anything happens: each
    /// outcome, each pipeline dead-letter stage, each configured site by input format, and each
    /// server's logins and refused logins. A counter that first appears at 1 has no increase
    /// for `rate()` and `increase()` to see, so the first failure after a start would escape
    /// the alerts built on them.
    pub fn zero_known_series<'a>(
        &self,
        sites: impl IntoIterator<Item = &'a str>,
        servers: impl IntoIterator<Item = &'a str>,
        targets: impl IntoIterator<Item = &'a str>,
    ) {
        for action in crate::command::Action::iter() {
            self.commands.with_label_values(&[action.as_str()]);
        }
        for target in targets {
            for kind in ["missing", "orphaned"] {
                self.drift_rules.with_label_values(&[target, kind]);
            }
            self.reconcile_repairs.with_label_values(&[target]);
            for status in ["ok", "failed"] {
                self.reconciles.with_label_values(&[target, status]);
            }
        }
        for outcome in Outcome::iter() {
            self.decisions.with_label_values(&[outcome.as_str()]);
        }
        for stage in [DeadLetterStage::Decode, DeadLetterStage::Enforce] {
            self.dead_letters.with_label_values(&[stage.as_str()]);
            self.dead_letters_refused
                .with_label_values(&[stage.as_str()]);
        }
        for site in sites {
            for format in InputFormat::iter() {
                self.events_consumed
                    .with_label_values(&[site, format.as_str()]);
            }
        }
        for server in servers {
            self.logins.with_label_values(&[server]);
            for status in ApiError::KINDS {
                self.api_requests
                    .with_label_values(&[server, "login", status]);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("UTF-8 metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_start_at_zero_so_their_first_increase_shows() {
        let metrics = Metrics::new();
        let before = metrics.render();
        assert!(before.contains(&format!(
            "samgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(
            !before.contains("samgate_decisions_total"),
            "no samples yet"
        );

        metrics.zero_known_series(["prague"], ["hq"], ["edge"]);
        let after = metrics.render();
        for series in [
            r#"samgate_decisions_total{outcome="failed"} 0"#,
            r#"samgate_decisions_total{outcome="dry_run"} 0"#,
            r#"samgate_dead_letters_total{stage="decode"} 0"#,
            r#"samgate_dead_letters_total{stage="enforce"} 0"#,
            r#"samgate_dead_letters_refused_total{stage="decode"} 0"#,
            r#"samgate_events_consumed_total{format="ads_standard",site="prague"} 0"#,
            r#"samgate_events_consumed_total{format="ids_json",site="prague"} 0"#,
            r#"samgate_firewall_logins_total{server="hq"} 0"#,
            r#"samgate_firewall_api_requests_total{command="login",server="hq",status="login_limited"} 0"#,
        ] {
            assert!(after.contains(series), "no {series} in\n{after}");
        }
        assert!(
            !after.contains(r#"stage="shim""#),
            "the shim is not this process"
        );
    }
}
