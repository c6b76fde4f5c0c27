//! Apps: named services owned by an org.

use kiln_core::{AppId, AppName, OrgId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// An app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct App {
    /// Id of the app.
    pub id: AppId,
    /// The owning org.
    pub org_id: OrgId,
    /// Name, unique within the org.
    pub name: AppName,
    /// When the app was created.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
}

/// Body of `POST /v1/orgs/{org}/apps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    /// Name of the new app.
    pub name: AppName,
}
