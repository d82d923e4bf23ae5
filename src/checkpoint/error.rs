//! Management API errors and the one function that classifies them for retries.

use std::time::Duration;

/// What went wrong talking to a management server. Never contains a secret: session ids travel
/// in a header and credentials in request bodies, neither of which is ever formatted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No HTTP answer: connection, TLS, or timeout.
    #[error("{server}: cannot reach the management API: {detail}")]
    Transport {
        server: String,
        detail: String,
        /// The request timed out (worth retrying).
        timeout: bool,
        /// TLS refused the server's certificate (a configuration matter, not worth retrying).
        tls: bool,
        /// The request may have reached the server (it was sent, or the answer was lost): an
        /// action it carried may have been carried out.
        maybe_delivered: bool,
    },
    /// An HTTP answer that is not JSON: something in front of (or instead of) the API answered.
    #[error("{server}: `{command}` got HTTP {status} with a non-JSON body: {hint}")]
    NotJson {
        server: String,
        command: String,
        status: u16,
        hint: &'static str,
    },
    /// A JSON error answer: `{"code": …, "message": …}`.
    #[error("{server}: `{command}` failed with HTTP {status} {code}: {message}")]
    Api {
        server: String,
        command: String,
        status: u16,
        code: String,
        message: String,
    },
    /// samgate's own login budget (logins per minute) is spent.
    #[error(
        "{server}: login limit of {per_minute} per minute reached; next login in {retry_after:?}"
    )]
    LoginLimited {
        server: String,
        per_minute: u32,
        retry_after: Duration,
    },
    /// A task did not reach a terminal status before the deadline.
    #[error("{server}: task {task_id} still in progress after {waited:?}")]
    TaskTimeout {
        server: String,
        task_id: String,
        waited: Duration,
    },
    /// A JSON answer without the fields the protocol promises.
    #[error("{server}: `{command}` answered without {missing}")]
    Protocol {
        server: String,
        command: String,
        missing: &'static str,
    },
}

impl ApiError {
    /// The error `code` of a JSON error answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The session is gone (expired, logged out, or never known): log in again and retry once.
    pub fn is_session_lost(&self) -> bool {
        match self {
            Self::Api { status, code, .. } => {
                *status == 401
                    || code == "generic_err_wrong_session_id"
                    || code == "generic_err_session_expired"
                    || code == "generic_err_missing_session_id"
            }
            _ => false,
        }
    }

    /// The server (or a proxy in front of it, answering in HTML) said too many requests.
    /// The server does not know the object asked about (a task id it forgot, for one).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { status: 404, .. })
            || matches!(self, Self::Api { code, .. } if code == "generic_err_object_not_found")
    }

    pub fn is_too_many_requests(&self) -> bool {
        match self {
            Self::Api { status, code, .. } => code == "err_too_many_requests" || *status == 429,
            Self::NotJson { status, .. } => *status == 429,
            _ => false,
        }
    }

    /// Every value [`kind`](Self::kind) takes.
    pub const KINDS: [&'static str; 6] = [
        "transport",
        "not_json",
        "api",
        "login_limited",
        "task_timeout",
        "protocol",
    ];

    /// A bounded label for metrics (`transport`, `not_json`, `api`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Transport { .. } => "transport",
            Self::NotJson { .. } => "not_json",
            Self::Api { .. } => "api",
            Self::LoginLimited { .. } => "login_limited",
            Self::TaskTimeout { .. } => "task_timeout",
            Self::Protocol { .. } => "protocol",
        }
    }
}

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again after a backoff.
    Retryable,
    /// Try again, but not before this delay.
    RateLimited(Duration),
    /// Credentials or permissions are wrong: retrying will not help; an operator must act.
    Auth,
    /// The request itself is wrong (or the configuration is): do not retry.
    Permanent,
}

/// How long to wait after the server's own login limit said no: the limit is per minute, and
/// Check Point recommends backing off; a third of a minute lets one login through.
pub const SERVER_RATE_LIMIT_DELAY: Duration = Duration::from_secs(20);

/// The one classification the pipeline's retries use.
pub fn classify(error: &ApiError) -> ErrorClass {
    match error {
        ApiError::Transport { tls: true, .. } => ErrorClass::Permanent,
        ApiError::Transport { .. } => ErrorClass::Retryable,
        ApiError::NotJson { status, .. } => match status {
            429 => ErrorClass::RateLimited(SERVER_RATE_LIMIT_DELAY),
            502..=504 => ErrorClass::Retryable,
            500 | 501 | 505..=599 => ErrorClass::Retryable,
            _ => ErrorClass::Permanent,
        },
        ApiError::LoginLimited { retry_after, .. } => ErrorClass::RateLimited(*retry_after),
        ApiError::TaskTimeout { .. } => ErrorClass::Retryable,
        ApiError::Protocol { .. } => ErrorClass::Permanent,
        e if e.is_too_many_requests() => ErrorClass::RateLimited(SERVER_RATE_LIMIT_DELAY),
        e if e.is_session_lost() => ErrorClass::Retryable,
        ApiError::Api { status, code, .. } => match code.as_str() {
            c if c.starts_with("err_login_failed") => ErrorClass::Auth,
            "generic_err_no_permissions" | "err_forbidden" | "err_already_connected" => {
                ErrorClass::Auth
            }
            "generic_server_initializing"
            | "generic_internal_error"
            | "generic_server_error"
            | "generic_err_object_locked"
            | "generic_err_session_in_use" => ErrorClass::Retryable,
            _ => match status {
                409 | 500 | 502..=504 => ErrorClass::Retryable,
                _ => ErrorClass::Permanent,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn api(status: u16, code: &str) -> ApiError {
        ApiError::Api {
            server: "mgmt".into(),
            command: "run-script".into(),
            status,
            code: code.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn an_object_the_server_does_not_know_is_not_found() {
        assert!(api(404, "generic_err_object_not_found").is_not_found());
        assert!(api(400, "generic_err_object_not_found").is_not_found());
        assert!(!api(500, "generic_error").is_not_found());
        assert!(!api(401, "generic_err_wrong_session_id").is_not_found());
    }

    #[test]
    fn every_error_shape_has_a_class() {
        let transport = |timeout, tls| ApiError::Transport {
            server: "mgmt".into(),
            detail: "x".into(),
            timeout,
            tls,
            maybe_delivered: !tls,
        };
        let not_json = |status| ApiError::NotJson {
            server: "mgmt".into(),
            command: "login".into(),
            status,
            hint: "h",
        };
        let cases = [
            (transport(true, false), ErrorClass::Retryable),
            (transport(false, false), ErrorClass::Retryable),
            (transport(false, true), ErrorClass::Permanent),
            (not_json(502), ErrorClass::Retryable),
            (not_json(503), ErrorClass::Retryable),
            (not_json(403), ErrorClass::Permanent),
            (
                not_json(429),
                ErrorClass::RateLimited(SERVER_RATE_LIMIT_DELAY),
            ),
            (not_json(200), ErrorClass::Permanent),
            (
                api(400, "err_too_many_requests"),
                ErrorClass::RateLimited(SERVER_RATE_LIMIT_DELAY),
            ),
            (
                api(429, "whatever"),
                ErrorClass::RateLimited(SERVER_RATE_LIMIT_DELAY),
            ),
            (api(400, "err_login_failed"), ErrorClass::Auth),
            (
                api(400, "err_login_failed_wrong_username_or_password"),
                ErrorClass::Auth,
            ),
            (api(403, "generic_err_no_permissions"), ErrorClass::Auth),
            (
                api(401, "generic_err_wrong_session_id"),
                ErrorClass::Retryable,
            ),
            (api(500, "generic_internal_error"), ErrorClass::Retryable),
            (
                api(503, "generic_server_initializing"),
                ErrorClass::Retryable,
            ),
            (
                api(409, "err_policy_installation_failed"),
                ErrorClass::Retryable,
            ),
            (
                api(404, "generic_err_object_not_found"),
                ErrorClass::Permanent,
            ),
            (api(400, "err_validation_failed"), ErrorClass::Permanent),
            (
                api(400, "generic_err_invalid_parameter"),
                ErrorClass::Permanent,
            ),
            (
                ApiError::LoginLimited {
                    server: "mgmt".into(),
                    per_minute: 3,
                    retry_after: Duration::from_secs(7),
                },
                ErrorClass::RateLimited(Duration::from_secs(7)),
            ),
            (
                ApiError::TaskTimeout {
                    server: "mgmt".into(),
                    task_id: "t".into(),
                    waited: Duration::from_secs(1),
                },
                ErrorClass::Retryable,
            ),
            (
                ApiError::Protocol {
                    server: "mgmt".into(),
                    command: "login".into(),
                    missing: "sid",
                },
                ErrorClass::Permanent,
            ),
        ];
        let mut kinds = BTreeSet::new();
        for (error, class) in cases {
            assert_eq!(classify(&error), class, "{error}");
            kinds.insert(error.kind());
        }
        assert_eq!(
            kinds,
            BTreeSet::from(ApiError::KINDS),
            "KINDS lists every kind"
        );
    }
}
