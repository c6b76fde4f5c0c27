//! Validated names: orgs, apps, environments, process types and hostnames.
//!
//! Org, app, env and process names appear in platform hostnames, TAP device names and file
//! paths. So they are restricted to DNS labels: 1 to 63 characters of `a-z`, `0-9` and `-`,
//! starting with a letter and not ending with `-`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Maximum length of one DNS label (RFC 1035, section 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Maximum length of a hostname in text form (RFC 1035, section 2.3.4, without the root dot).
pub const MAX_HOSTNAME_LEN: usize = 253;

/// Error returned when a name or hostname is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("invalid {kind} name: it is empty; use 1 to 63 characters of a-z, 0-9 and '-'")]
    Empty {
        /// Kind of the named resource (`app`, `environment`, ...).
        kind: &'static str,
    },
    /// The name is longer than a DNS label allows.
    #[error("invalid {kind} name {value:?}: it has {len} characters, the maximum is 63")]
    TooLong {
        /// Kind of the named resource.
        kind: &'static str,
        /// The rejected name.
        value: String,
        /// Its length in characters.
        len: usize,
    },
    /// The name is not a DNS label.
    #[error(
        "invalid {kind} name {value:?}: {reason}; use lowercase letters, digits and '-', \
         starting with a letter and not ending with '-'"
    )]
    NotDnsLabel {
        /// Kind of the named resource.
        kind: &'static str,
        /// The rejected name.
        value: String,
        /// Rule the value breaks.
        reason: &'static str,
    },
    /// The hostname is not a valid DNS name.
    #[error("invalid hostname {value:?}: {reason}")]
    InvalidHostname {
        /// The rejected hostname.
        value: String,
        /// Rule the value breaks.
        reason: String,
    },
}

/// Checks that `value` is a DNS label as Kiln restricts it (see the module documentation).
pub fn validate_label(kind: &'static str, value: &str) -> Result<(), NameError> {
    let not_label = |reason| NameError::NotDnsLabel {
        kind,
        value: value.to_owned(),
        reason,
    };

    if value.is_empty() {
        return Err(NameError::Empty { kind });
    }
    let len = value.chars().count();
    if len > MAX_LABEL_LEN {
        return Err(NameError::TooLong {
            kind,
            value: value.to_owned(),
            len,
        });
    }

    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(not_label(if c.is_ascii_uppercase() {
            "it contains an uppercase letter"
        } else {
            "it contains a character other than a-z, 0-9 and '-'"
        }));
    }
    if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(not_label("it does not start with a letter"));
    }
    if value.ends_with('-') {
        return Err(not_label("it ends with '-'"));
    }
    Ok(())
}

macro_rules! label_name {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate_label($kind, &value)?;
                Ok(Self(value))
            }

            /// Returns the name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_name!(
    /// Name of an org, unique across the cluster.
    OrgName, "org"
);
label_name!(
    /// Name of an app, unique within its org.
    AppName, "app"
);
label_name!(
    /// Name of an environment (`prod`, `staging`), unique within its app.
    EnvName, "environment"
);
label_name!(
    /// Name of a process type (`web`, `worker`), unique within a release.
    ProcessName, "process"
);

/// A DNS hostname, lowercase, optionally a wildcard (`*.example.com`) covering one label.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(String);

impl Hostname {
    /// Validates and normalizes (lowercases, strips one trailing dot) a hostname.
    pub fn new(value: impl AsRef<str>) -> Result<Self, NameError> {
        let raw = value.as_ref();
        let invalid = |reason: &str| NameError::InvalidHostname {
            value: raw.to_owned(),
            reason: reason.to_owned(),
        };

        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() > MAX_HOSTNAME_LEN {
            return Err(invalid("it is longer than 253 characters"));
        }

        let rest = name.strip_prefix("*.").unwrap_or(&name);
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() < 2 {
            return Err(invalid(
                "it needs at least two labels, such as app.example.com",
            ));
        }
        for label in &labels {
            if label.is_empty() {
                return Err(invalid("it contains an empty label (two dots in a row)"));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(invalid("a label is longer than 63 characters"));
            }
            if label.contains('*') {
                return Err(invalid(
                    "'*' is allowed only as the whole first label, as in *.example.com",
                ));
            }
            if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(invalid(
                    "labels may contain only letters, digits and '-' (use punycode for IDNs)",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("a label starts or ends with '-'"));
            }
        }
        if labels
            .last()
            .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(invalid(
                "the last label is numeric, which looks like an IP address",
            ));
        }

        Ok(Self(name))
    }

    /// Returns true for a wildcard hostname such as `*.example.com`.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// Returns true when this hostname is `name` or, as a wildcard, covers it (one label deep).
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self.0.strip_prefix("*.") {
            Some(suffix) => name.split_once('.').is_some_and(|(first, rest)| {
                !first.is_empty() && rest.eq_ignore_ascii_case(suffix)
            }),
            None => self.0.eq_ignore_ascii_case(name),
        }
    }

    /// Returns the hostname as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for Hostname {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for Hostname {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Hostname {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_accepts_typical_names() {
        for name in ["web", "my-app", "a", "app2", &"a".repeat(63)] {
            assert!(AppName::new(name).is_ok(), "{name} should be valid");
        }
    }

    #[test]
    fn label_rejects_each_rule() {
        let cases = [
            ("", "empty"),
            ("My-App", "uppercase"),
            ("my_app", "character other than"),
            ("-app", "does not start with a letter"),
            ("1app", "does not start with a letter"),
            ("app-", "ends with '-'"),
        ];
        for (input, expected) in cases {
            let message = AppName::new(input).unwrap_err().to_string();
            assert!(message.contains(expected), "{input:?}: {message}");
        }
        let long = "a".repeat(64);
        assert!(matches!(
            AppName::new(long),
            Err(NameError::TooLong { len: 64, .. })
        ));
    }

    #[test]
    fn hostname_normalizes_case_and_dot() {
        let host = Hostname::new("API.Example.COM.").unwrap();
        assert_eq!(host.as_str(), "api.example.com");
    }

    #[test]
    fn hostname_rejects_malformed() {
        for input in [
            "",
            "localhost",
            "a..b.com",
            "-a.example.com",
            "a_b.example.com",
            "a.*.example.com",
            "*a.example.com",
            "10.0.0.1",
        ] {
            assert!(Hostname::new(input).is_err(), "{input:?} should be invalid");
        }
    }

    #[test]
    fn wildcard_matches_one_label() {
        let host = Hostname::new("*.example.com").unwrap();
        assert!(host.is_wildcard());
        assert!(host.matches("api.example.com"));
        assert!(host.matches("API.example.com."));
        assert!(!host.matches("example.com"));
        assert!(!host.matches("a.b.example.com"));
    }
}
