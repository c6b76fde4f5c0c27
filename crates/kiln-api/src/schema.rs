//! JSON schemas of the request, query and response types, for the OpenAPI document (feature
//! `schema`).
//!
//! [`ApiSchemas`] maps each type name used in [`crate::routes::ROUTES`] to a schema reference
//! and collects the schemas of every type reachable from them. A new type needs two lines:
//! `#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]` on the type and one line in
//! the list at the end of this file.

use std::collections::BTreeMap;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Map, Value};

use crate::events::{EventPage, EventQuery};
use crate::types::*;

/// JSON pointer to the schemas in an OpenAPI document.
const COMPONENTS_POINTER: &str = "/components/schemas";

/// Schemas of the API types, for an OpenAPI 3.1 document.
#[derive(Debug)]
pub struct ApiSchemas {
    generator: SchemaGenerator,
    references: BTreeMap<&'static str, Value>,
}

impl ApiSchemas {
    /// Generates the schemas of every type in the list at the end of this file.
    pub fn generate() -> Self {
        let settings = SchemaSettings::draft2020_12().with(|settings| {
            settings.definitions_path = COMPONENTS_POINTER.into();
        });
        let mut schemas = Self {
            generator: settings.into_generator(),
            references: BTreeMap::new(),
        };
        register_all(&mut schemas);
        schemas
    }

    /// Returns the schema (usually a `$ref`) of the type that [`crate::routes::ROUTES`] calls
    /// `name`, or `None` when the type is not in the list.
    pub fn reference(&self, name: &str) -> Option<&Value> {
        self.references.get(name)
    }

    /// Returns the schemas to put under `components.schemas`, by component name.
    pub fn into_components(mut self) -> Map<String, Value> {
        self.generator.take_definitions(true)
    }

    fn register<T: JsonSchema>(&mut self, name: &'static str) {
        let schema = self.generator.subschema_for::<T>();
        self.references.insert(name, schema.to_value());
    }
}

/// Schema of a time as the API writes it: RFC 3339.
pub fn timestamp(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time"})
}

/// Schema of an optional RFC 3339 time.
pub fn optional_timestamp(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": ["string", "null"], "format": "date-time"})
}

/// Every type the routes name, as `"name in ROUTES" => Rust type`.
macro_rules! api_types {
    ($($name:literal => $type:ty,)*) => {
        fn register_all(schemas: &mut ApiSchemas) {
            $(schemas.register::<$type>($name);)*
        }
    };
}

api_types! {
    "Address" => Address,
    "AllocateIp" => AllocateIp,
    "App" => App,
    "ApplyPlan" => ApplyPlan,
    "AssignmentsQuery" => AssignmentsQuery,
    "ConfigVars" => ConfigVars,
    "CreateApp" => CreateApp,
    "CreateDeploy" => CreateDeploy,
    "CreateEnv" => CreateEnv,
    "CreateHost" => CreateHost,
    "CreateIngressToken" => CreateIngressToken,
    "CreateOrg" => CreateOrg,
    "CreatePlan" => CreatePlan,
    "CreateRelease" => CreateRelease,
    "CreateToken" => CreateToken,
    "CreatedDeploy" => CreatedDeploy,
    "CreatedHost" => CreatedHost,
    "CreatedToken" => CreatedToken,
    "DedicatedIp" => DedicatedIp,
    "Deploy" => Deploy,
    "Env" => Env,
    "EventPage" => EventPage,
    "EventQuery" => EventQuery,
    "Heartbeat" => Heartbeat,
    "Host" => Host,
    "HostAssignments" => HostAssignments,
    "HostLease" => HostLease,
    "Instance" => Instance,
    "InstanceSecrets" => InstanceSecrets,
    "List<Address>" => List<Address>,
    "List<App>" => List<App>,
    "List<DedicatedIp>" => List<DedicatedIp>,
    "List<Deploy>" => List<Deploy>,
    "List<Env>" => List<Env>,
    "List<Host>" => List<Host>,
    "List<Instance>" => List<Instance>,
    "List<Org>" => List<Org>,
    "List<Release>" => List<Release>,
    "List<Route>" => List<Route>,
    "List<SecretMeta>" => List<SecretMeta>,
    "List<Token>" => List<Token>,
    "LogBatch" => LogBatch,
    "LogPage" => LogPage,
    "LogQuery" => LogQuery,
    "OpenApi" => Map<String, Value>,
    "Org" => Org,
    "Plan" => Plan,
    "RegisterHost" => RegisterHost,
    "Release" => Release,
    "ReportInstanceState" => ReportInstanceState,
    "ReportInstanceStates" => ReportInstanceStates,
    "ReportedInstanceStates" => ReportedInstanceStates,
    "RestartEnv" => RestartEnv,
    "RouteTable" => RouteTable,
    "ScaleEnv" => ScaleEnv,
    "SecretMeta" => SecretMeta,
    "SetSecret" => SetSecret,
    "Token" => Token,
    "UpdateConfig" => UpdateConfig,
    "WatchQuery" => WatchQuery,
    "WhoAmI" => WhoAmI,
    "ErrorBody" => crate::ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::ROUTES;

    #[test]
    fn every_route_type_has_a_schema() {
        let schemas = ApiSchemas::generate();
        for route in ROUTES {
            for name in [route.request, route.query, route.response]
                .into_iter()
                .flatten()
            {
                assert!(
                    schemas.reference(name).is_some(),
                    "{} {} names type {name}, which is missing from the list in schema.rs",
                    route.method,
                    route.path
                );
            }
        }
    }

    #[test]
    fn references_point_at_components() {
        let schemas = ApiSchemas::generate();
        let reference = schemas.reference("CreateApp").cloned();
        let components = schemas.into_components();
        assert_eq!(
            reference,
            Some(serde_json::json!({"$ref": "#/components/schemas/CreateApp"}))
        );
        let create_app = &components["CreateApp"];
        assert_eq!(create_app["type"], "object");
        assert_eq!(
            create_app["properties"]["name"]["$ref"],
            "#/components/schemas/AppName"
        );
        assert_eq!(components["AppName"]["type"], "string");
    }

    #[test]
    fn events_are_tagged_with_type_and_data() {
        let components = ApiSchemas::generate().into_components();
        let variants = components["EventEnvelope"]["oneOf"]
            .as_array()
            .expect("an event envelope is a oneOf of the event variants");
        let org_created = variants
            .iter()
            .find(|variant| variant["properties"]["type"]["const"] == "OrgCreated")
            .expect("OrgCreated is a variant");
        assert_eq!(org_created["required"], serde_json::json!(["type", "data"]));
        // The envelope's own fields sit beside the flattened tag.
        assert_eq!(
            components["EventEnvelope"]["properties"]["seq"]["type"],
            "integer"
        );
    }

    #[test]
    fn lists_are_named_after_their_item() {
        let schemas = ApiSchemas::generate();
        assert_eq!(
            schemas.reference("List<Org>"),
            Some(&serde_json::json!({"$ref": "#/components/schemas/List_Org"}))
        );
        let components = schemas.into_components();
        assert_eq!(
            components["List_Org"]["properties"]["items"]["items"]["$ref"],
            "#/components/schemas/Org"
        );
        for name in components.keys() {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
                "component name {name:?} is not allowed by OpenAPI"
            );
        }
    }
}
