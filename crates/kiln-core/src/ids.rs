//! Typed ids, one per resource, so an `AppId` can never be passed where an `EnvId` is expected.
//!
//! Ids are UUIDv7 (time-ordered, so new rows append to the end of an index) and print with
//! a short resource prefix (`app_…`), which makes ids in logs and CLI output self-describing.
//! The prefix is accepted but optional when parsing.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Error returned when a string is not a valid id of the expected kind.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} id {value:?}: expected `{prefix}_` followed by a UUID")]
pub struct IdError {
    /// The resource kind, such as `app`.
    pub kind: &'static str,
    /// The expected prefix.
    pub prefix: &'static str,
    /// The rejected input.
    pub value: String,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// The prefix printed before the UUID.
            pub const PREFIX: &'static str = $prefix;

            /// Creates a new, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID, for example one read from the database.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// Returns the UUID inside.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, self.0.simple())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let raw = s
                    .strip_prefix(concat!($prefix, "_"))
                    .unwrap_or(s);
                Uuid::parse_str(raw).map(Self).map_err(|_| IdError {
                    kind: $kind,
                    prefix: $prefix,
                    value: s.to_owned(),
                })
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// Id of an org, the tenant that owns apps, members and tokens.
    OrgId, "org", "org"
);
typed_id!(
    /// Id of an app, a named service owned by an org.
    AppId, "app", "app"
);
typed_id!(
    /// Id of an environment, a deployable instance of an app.
    EnvId, "environment", "env"
);
typed_id!(
    /// Id of a release: an image digest, a manifest and a config version.
    ReleaseId, "release", "rel"
);
typed_id!(
    /// Id of a deploy, the rollout of an environment to a release.
    DeployId, "deploy", "dep"
);
typed_id!(
    /// Id of an instance, one replica of one process type in exactly one microVM.
    InstanceId, "instance", "inst"
);
typed_id!(
    /// Id of a host, a machine running `kiln-agent`.
    HostId, "host", "host"
);
typed_id!(
    /// Id of an API token (never the token's secret).
    TokenId, "token", "tok"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_display() {
        let id = AppId::new();
        let text = id.to_string();
        assert!(text.starts_with("app_"));
        assert_eq!(text.parse::<AppId>().unwrap(), id);
    }

    #[test]
    fn id_parses_bare_uuid() {
        let uuid = Uuid::now_v7();
        assert_eq!(uuid.to_string().parse::<EnvId>().unwrap().as_uuid(), uuid);
    }

    #[test]
    fn id_rejects_garbage_with_kind() {
        let err = "app_nope".parse::<AppId>().unwrap_err();
        assert_eq!(err.kind, "app");
        assert!(err.to_string().contains("\"app_nope\""));
    }

    #[test]
    fn id_serializes_as_prefixed_string() {
        let id = HostId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<HostId>(&json).unwrap(), id);
    }
}
