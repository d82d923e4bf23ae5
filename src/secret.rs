//! Secrets (passwords, API keys, session ids): a type that cannot be printed by accident.
//! `Debug`, `Display`-free, and serialized as `***`; only [`Secret::expose`] reveals the value.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The value, for the one place that must send it (a login body, a session header).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A secret is a string whatever it looks like: `123456` or `true` from a file or the environment
/// is taken as that text. Anything else is refused without showing the value.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a secret (a string)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
        }
        d.deserialize_any(Text)
    }
}

/// Text from a firewall or a management server, with anything that looks like a session id, an
/// API key or a token replaced by `***`, before it reaches a log, a result, a dead letter or a
/// metric: a run of 24 or more characters of the base64 alphabets (`-`, `_`, `+`, `/`, `=`
/// included) that mixes upper case, lower case and digits. Names, addresses, UUIDs and codes
/// (one case, or short) are kept.
pub fn scrub(text: &str) -> String {
    let token = |c: char| c.is_ascii_alphanumeric() || "-_+/=".contains(c);
    let looks_secret = |run: &str| {
        run.len() >= 24
            && run.chars().any(|c| c.is_ascii_digit())
            && run.chars().any(|c| c.is_ascii_uppercase())
            && run.chars().any(|c| c.is_ascii_lowercase())
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(token) {
        out.push_str(&rest[..start]);
        let run = &rest[start..];
        let end = run.find(|c: char| !token(c)).unwrap_or(run.len());
        match looks_secret(&run[..end]) {
            true => out.push_str("***"),
            false => out.push_str(&run[..end]),
        }
        rest = &run[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
        let back: Secret = serde_json::from_str("\"pw\"").unwrap();
        assert_eq!(back.expose(), "pw");
    }

    #[test]
    fn a_secret_that_looks_like_a_number_is_its_text_and_a_bad_one_is_not_shown() {
        for (json, text) in [("123456", "123456"), ("true", "true"), ("\"007\"", "007")] {
            let s: Secret = serde_json::from_str(json).unwrap();
            assert_eq!(s.expose(), text);
        }
        let error = serde_json::from_str::<Secret>("[\"hunter2\"]").unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn scrub_hides_session_ids_and_keys_but_keeps_names() {
        let sid = "Nf3kQ9x_Zt7Lm2Pw8Rv4Hs6Jd1Bc5Yg0Ae";
        for (text, scrubbed) in [
            (
                format!("Wrong session id [{sid}]. Session may be expired."),
                "Wrong session id [***]. Session may be expired.".to_owned(),
            ),
            (format!("x-chkp-sid: {sid}"), "x-chkp-sid: ***".to_owned()),
            (
                "gateway gw-prague-edge-01 (192.0.2.1) task 01234567-89ab-cdef-0123-456789abcdef"
                    .to_owned(),
                "gateway gw-prague-edge-01 (192.0.2.1) task 01234567-89ab-cdef-0123-456789abcdef"
                    .to_owned(),
            ),
            (
                "err_too_many_requests: More than 3 logins per minute".to_owned(),
                "err_too_many_requests: More than 3 logins per minute".to_owned(),
            ),
            (
                "api key 9fJ2kL8mN3pQ7rS1tU5vW0xY".to_owned(),
                "api key ***".to_owned(),
            ),
        ] {
            assert_eq!(scrub(&text), scrubbed);
        }
    }
}
