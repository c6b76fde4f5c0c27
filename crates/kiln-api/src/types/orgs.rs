//! Orgs: the tenants. Only an operator token creates orgs; an org token sees its own org.

use kiln_core::{OrgId, OrgName};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// An org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Org {
    /// Id of the org.
    pub id: OrgId,
    /// Unique name of the org.
    pub name: OrgName,
    /// When the org was created.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
}

/// Body of `POST /v1/orgs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    /// Name of the new org.
    pub name: OrgName,
}
