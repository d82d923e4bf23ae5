//! FortiGate: the FortiOS REST API client, its error classes, and the enforcer that quarantines
//! through it (`../shared/reference/flowmon-ads-and-fortigate.md` §3, `docs/fortigate.md`).
//!
//! - [`client`]: one device (REST API administrator token, optional VDOM, TLS verified or
//!   pinned): the banned-IP list (`add_users`, `clear_users`, list) and the automation-stitch
//!   webhook. The token travels only in `Authorization: Bearer`, never in the URL (FortiOS 7.4.5+
//!   refuses `?access_token=` by default, and URLs end up in logs).
//! - [`enforcer`]: the [`Enforcer`](crate::enforcer::Enforcer) of a FortiGate target.
//! - [`FortiError`] and [`classify`], the retry classification of FortiOS answers.

pub mod client;
pub mod enforcer;

use std::time::Duration;

pub use client::FortiClient;

use crate::checkpoint::ErrorClass;
use crate::pipeline::rule::Delivery;

/// What went wrong talking to a FortiGate. Never contains the token: it travels in a header,
/// which is never formatted, and answer texts are scrubbed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FortiError {
    /// No HTTP answer: connection, TLS, or timeout.
    #[error("{device}: cannot reach the FortiOS REST API: {detail}")]
    Transport {
        device: String,
        detail: String,
        timeout: bool,
        /// TLS refused the device's certificate (a configuration matter).
        tls: bool,
        /// The request may have reached the device (sent, or its answer lost).
        maybe_delivered: bool,
    },
    /// An HTTP error status, or FortiOS's envelope saying `"status": "error"`.
    #[error("{device}: `{call}` failed with HTTP {status}: {message}")]
    Status {
        device: String,
        call: &'static str,
        status: u16,
        message: String,
    },
    /// A success status without the envelope the API promises (something else answered).
    #[error("{device}: `{call}` answered HTTP {status} without FortiOS's JSON envelope")]
    Protocol {
        device: String,
        call: &'static str,
        status: u16,
    },
    /// The banned list answered, with an entry samgate cannot read: the list proves nothing
    /// this time (asked again, as after any passing failure).
    #[error("{device}: the banned list has an entry samgate cannot read: {detail}")]
    Unreadable { device: String, detail: String },
}

/// How long to wait after a FortiGate's 429: FortiOS rate-limits repeated failures (bad
/// credentials, say) for a while; its exact window is not documented.
pub const RATE_LIMIT_DELAY: Duration = Duration::from_secs(10);

/// The one classification the retries use for FortiOS answers (status codes per the FortiOS
/// REST reference: 401 bad token or untrusted host, 403 missing permission, 404 no such
/// endpoint or VDOM, 424 a bad or missing parameter, 429 rate limited).
pub fn classify(error: &FortiError) -> ErrorClass {
    match error {
        FortiError::Transport { tls: true, .. } => ErrorClass::Permanent,
        FortiError::Transport { .. } => ErrorClass::Retryable,
        FortiError::Status { status, .. } => match status {
            401 | 403 => ErrorClass::Auth,
            429 => ErrorClass::RateLimited(RATE_LIMIT_DELAY),
            408 | 500 | 502..=504 => ErrorClass::Retryable,
            _ => ErrorClass::Permanent,
        },
        FortiError::Protocol { .. } => ErrorClass::Permanent,
        FortiError::Unreadable { .. } => ErrorClass::Retryable,
    }
}

/// Whether a failed FortiOS call may have been carried out: an answer of 4xx refused it; a 5xx
/// (a proxy's, or the API's after acting) or a lost answer may have come after it acted.
pub fn delivery(error: &FortiError) -> Delivery {
    match error {
        FortiError::Transport {
            maybe_delivered, ..
        } => match maybe_delivered {
            true => Delivery::MaybeSent,
            false => Delivery::NotSent,
        },
        FortiError::Status { status, .. } if *status < 500 => Delivery::NotSent,
        FortiError::Status { .. } | FortiError::Protocol { .. } => Delivery::MaybeSent,
        // Only a listing reads entries: it changed nothing.
        FortiError::Unreadable { .. } => Delivery::NotSent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> FortiError {
        FortiError::Status {
            device: "branch".into(),
            call: "add_users",
            status: code,
            message: "m".into(),
        }
    }

    fn transport(tls: bool, maybe_delivered: bool) -> FortiError {
        FortiError::Transport {
            device: "branch".into(),
            detail: "x".into(),
            timeout: false,
            tls,
            maybe_delivered,
        }
    }

    #[test]
    fn every_answer_has_a_class_and_a_delivery() {
        let protocol = FortiError::Protocol {
            device: "branch".into(),
            call: "add_users",
            status: 200,
        };
        let rate_limited = ErrorClass::RateLimited(RATE_LIMIT_DELAY);
        let table: Vec<(FortiError, ErrorClass, Delivery)> = vec![
            (status(400), ErrorClass::Permanent, Delivery::NotSent),
            (status(401), ErrorClass::Auth, Delivery::NotSent),
            (status(403), ErrorClass::Auth, Delivery::NotSent),
            (status(404), ErrorClass::Permanent, Delivery::NotSent),
            (status(405), ErrorClass::Permanent, Delivery::NotSent),
            (status(413), ErrorClass::Permanent, Delivery::NotSent),
            (status(424), ErrorClass::Permanent, Delivery::NotSent),
            (status(429), rate_limited, Delivery::NotSent),
            (status(500), ErrorClass::Retryable, Delivery::MaybeSent),
            (status(502), ErrorClass::Retryable, Delivery::MaybeSent),
            (status(503), ErrorClass::Retryable, Delivery::MaybeSent),
            (status(501), ErrorClass::Permanent, Delivery::MaybeSent),
            (
                transport(false, false),
                ErrorClass::Retryable,
                Delivery::NotSent,
            ),
            (
                transport(false, true),
                ErrorClass::Retryable,
                Delivery::MaybeSent,
            ),
            (
                transport(true, false),
                ErrorClass::Permanent,
                Delivery::NotSent,
            ),
            (protocol, ErrorClass::Permanent, Delivery::MaybeSent),
            (
                FortiError::Unreadable {
                    device: "branch".into(),
                    detail: "x".into(),
                },
                ErrorClass::Retryable,
                Delivery::NotSent,
            ),
        ];
        for (error, class, sent) in table {
            assert_eq!(classify(&error), class, "{error}");
            assert_eq!(delivery(&error), sent, "{error}");
        }
    }
}
