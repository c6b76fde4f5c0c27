//! JSON schemas of the ids and names, so the API's OpenAPI document describes them as the
//! strings they serialize to. Built with the `schema` feature.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::ids::{AppId, DeployId, EnvId, HostId, InstanceId, OrgId, ReleaseId, TokenId};
use crate::names::{
    AppName, EnvName, Hostname, MAX_HOSTNAME_LEN, MAX_LABEL_LEN, OrgName, ProcessName,
};

/// A DNS label as Kiln restricts it: lowercase letters, digits and `-`, starting with a letter
/// and not ending with `-`.
const LABEL_PATTERN: &str = "^[a-z]([a-z0-9-]*[a-z0-9])?$";

/// A hostname as `Hostname::new` accepts it: two or more dot-separated labels, optionally
/// after one `*` label, in any case and with an optional trailing dot.
const HOSTNAME_PATTERN: &str = r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\.?$";

macro_rules! id_schema {
    ($($name:ident),* $(,)?) => {$(
        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": format!(
                        "`{}_` and a UUID in simple form; the prefix is optional on input.",
                        $name::PREFIX,
                    ),
                    "examples": [format!("{}_0193a1b2c3d47e8f9a0b1c2d3e4f5a6b", $name::PREFIX)],
                })
            }
        }
    )*};
}

id_schema!(
    OrgId, AppId, EnvId, ReleaseId, DeployId, InstanceId, HostId, TokenId
);

macro_rules! label_schema {
    ($($name:ident),* $(,)?) => {$(
        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": "A DNS label: lowercase letters, digits and `-`, starting with a letter.",
                    "pattern": LABEL_PATTERN,
                    "minLength": 1,
                    "maxLength": MAX_LABEL_LEN,
                })
            }
        }
    )*};
}

label_schema!(OrgName, AppName, EnvName, ProcessName);

impl JsonSchema for Hostname {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("Hostname")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A DNS hostname, stored and returned in lowercase without a trailing dot. A leading `*.` makes a wildcard covering one label.",
            "pattern": HOSTNAME_PATTERN,
            "maxLength": MAX_HOSTNAME_LEN,
        })
    }
}
