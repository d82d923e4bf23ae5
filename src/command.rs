//! Operator commands: `samgate.command.v1` messages on the events topic (schema:
//! `docs/schemas/samgate.command.v1.json`). A command is keyed by its address like an event, so
//! the replica that owns the address executes it, in order with the detections of that address,
//! through the same decisions and safety checks. `samgate reconcile` sends one `reconcile`
//! command to every partition instead (key `reconcile`), so every owner hears it.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Schema id of command messages.
pub const COMMAND_SCHEMA: &str = "samgate.command.v1";

/// Longest `reason` or `actor` kept (they go into results and logs, never to a gateway).
pub const TEXT_LIMIT: usize = 512;

/// What an operator asks for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Action {
    /// Block the address at every target of the site (the never-block checks apply).
    Block,
    /// Remove the address's rules from every gateway of every target of the site; optionally
    /// exempt it for `exempt_for_s`.
    Unblock,
    /// Exempt the address at the site for `exempt_for_s`: no automatic block until it ends.
    Exempt,
    /// End the address's exemption at the site.
    Unexempt,
    /// Compare the gateways of the partition owner's targets with the blocks it holds, now.
    Reconcile,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// One operator command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Always [`COMMAND_SCHEMA`].
    pub schema: String,
    /// Random, 32 hex digits: the results answering the command carry it in `event_ids`.
    pub id: String,
    pub action: Action,
    /// The site (not for `reconcile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The address (not for `reconcile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// `block`: how long (default: the policy's first duration step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u64>,
    /// `unblock`, `exempt`: how long the address stays exempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exempt_for_s: Option<u64>,
    /// `reconcile`: only this target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Why (free text, for results and logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who (free text, for results and logs; never a metric label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(with = "crate::event::rfc3339_millis")]
    pub issued_at: DateTime<Utc>,
}

/// Why a command message cannot be carried out as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("`{0}` needs `site` and `ip`")]
    NeedsAddress(&'static str),
    #[error("`{0}` needs a positive `{1}`")]
    NeedsDuration(&'static str, &'static str),
    #[error("`id` must be 32 hex digits")]
    BadId,
    #[error("`{0}` is longer than a rule's timeout can safely be (68 years)")]
    TooLong(&'static str),
}

/// The longest duration a rule may have: `i32` seconds (68 years). `fw samp` shows a rule
/// without expiry as 2147483647, and a firewall reading seconds as a signed number would take
/// more as negative (FortiOS: 0 or less is *forever*).
pub const MAX_SECONDS: u64 = i32::MAX as u64;

impl Command {
    /// A new command with a random id, issued now.
    pub fn new(action: Action) -> Self {
        let id: [u8; 16] = rand::random();
        Self {
            schema: COMMAND_SCHEMA.into(),
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            action,
            site: None,
            ip: None,
            duration_s: None,
            exempt_for_s: None,
            target: None,
            reason: None,
            actor: None,
            issued_at: crate::event::now_millis(),
        }
    }

    /// Checks the fields the action needs; cuts `reason` and `actor` to [`TEXT_LIMIT`] and makes
    /// the address canonical.
    pub fn checked(mut self) -> Result<Self, Invalid> {
        let action = self.action.as_str();
        if self.id.len() != 32 || !self.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Invalid::BadId);
        }
        if self.action != Action::Reconcile && (self.site.is_none() || self.ip.is_none()) {
            return Err(Invalid::NeedsAddress(action));
        }
        if self.action == Action::Exempt && self.exempt_for_s.is_none() {
            return Err(Invalid::NeedsDuration(action, "exempt_for_s"));
        }
        for (field, value) in [
            ("duration_s", self.duration_s),
            ("exempt_for_s", self.exempt_for_s),
        ] {
            match value {
                Some(0) => return Err(Invalid::NeedsDuration(action, field)),
                Some(s) if s > MAX_SECONDS => return Err(Invalid::TooLong(field)),
                _ => {}
            }
        }
        self.ip = self.ip.map(|ip| ip.to_canonical());
        for text in [&mut self.reason, &mut self.actor].into_iter().flatten() {
            if text.len() > TEXT_LIMIT {
                let mut end = TEXT_LIMIT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
        }
        Ok(self)
    }

    /// The Kafka key: the address, like an event's ([`crate::event::event_key`]), so the
    /// address's owner executes it; `reconcile` goes to each partition explicitly.
    pub fn key(&self) -> String {
        match self.ip {
            Some(ip) => crate::event::event_key(ip),
            None => RECONCILE_KEY.into(),
        }
    }
}

/// Key of `reconcile` commands (sent to every partition explicitly).
pub const RECONCILE_KEY: &str = "reconcile";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_are_checked() {
        let mut c = Command::new(Action::Unblock);
        c.site = Some("brno".into());
        c.ip = Some("::ffff:10.1.2.3".parse().unwrap());
        c.exempt_for_s = Some(3600);
        c.reason = Some("é".repeat(TEXT_LIMIT));
        let c = c.checked().unwrap();
        assert_eq!(c.ip, Some("10.1.2.3".parse().unwrap()), "canonical");
        assert!(c.reason.as_ref().unwrap().len() <= TEXT_LIMIT);
        assert_eq!(c.key(), "10.1.2.3");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), c);

        let cases: Vec<(Command, Invalid)> = vec![
            (Command::new(Action::Block), Invalid::NeedsAddress("block")),
            (
                Command {
                    site: Some("s".into()),
                    ip: Some("192.0.2.1".parse().unwrap()),
                    ..Command::new(Action::Exempt)
                },
                Invalid::NeedsDuration("exempt", "exempt_for_s"),
            ),
            (
                Command {
                    site: Some("s".into()),
                    ip: Some("192.0.2.1".parse().unwrap()),
                    exempt_for_s: Some(0),
                    ..Command::new(Action::Unblock)
                },
                Invalid::NeedsDuration("unblock", "exempt_for_s"),
            ),
            (
                Command {
                    site: Some("s".into()),
                    ip: Some("192.0.2.1".parse().unwrap()),
                    duration_s: Some(MAX_SECONDS + 1),
                    ..Command::new(Action::Block)
                },
                Invalid::TooLong("duration_s"),
            ),
            (
                Command {
                    id: "x".into(),
                    ..Command::new(Action::Reconcile)
                },
                Invalid::BadId,
            ),
        ];
        for (command, expected) in cases {
            assert_eq!(command.checked().unwrap_err(), expected);
        }
        assert!(Command::new(Action::Reconcile).checked().is_ok());
    }
}
