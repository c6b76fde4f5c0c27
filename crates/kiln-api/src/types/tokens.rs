//! API tokens. A token is shown once at creation; the server keeps only its SHA-256 hash.
//!
//! The secret text is `kiln_<token id>_<43 base64url characters>`: the token id lets the
//! server find the row without searching by hash, and the 32 random bytes are compared in
//! constant time against the stored hash.

use kiln_core::{HostId, OrgId, TokenId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What a token may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A user API token scoped to one org.
    Org,
    /// A cluster operator token: creates orgs, hosts and ingress tokens, cordons and drains
    /// hosts. It reaches no org's apps.
    Operator,
    /// A host agent's token: only its own host's assignments, the secrets of instances placed
    /// on it, state reports and log batches.
    Host,
    /// An ingress token: reads the route table only.
    Ingress,
}

impl TokenKind {
    /// Returns the kind as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Org => "org",
            Self::Operator => "operator",
            Self::Host => "host",
            Self::Ingress => "ingress",
        }
    }
}

/// Metadata of a token; never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Token {
    /// Id of the token.
    pub id: TokenId,
    /// What the token may reach.
    pub kind: TokenKind,
    /// The org of an org token.
    #[serde(default)]
    pub org_id: Option<OrgId>,
    /// The host of a host token.
    #[serde(default)]
    pub host_id: Option<HostId>,
    /// Label chosen by the creator, such as `ci` or `alice-laptop`.
    pub name: String,
    /// When the token was created.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
    /// When the token stops working; `null` for never.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// When the token was revoked; `null` while it is active.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub revoked_at: Option<OffsetDateTime>,
}

/// Body of `POST /v1/orgs/{org}/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Label for the token, 1 to 100 printable characters.
    pub name: String,
    /// Lifetime in seconds; absent for a token that does not expire.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// Body of `POST /v1/ingress-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateIngressToken {
    /// Label for the token, such as the ingress host's name.
    pub name: String,
}

/// A newly created token with its secret, returned exactly once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreatedToken {
    /// The token's metadata.
    pub token: Token,
    /// The secret to put in `Authorization: Bearer ...`. The server cannot show it again.
    pub secret: String,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("token", &self.token)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The caller's own identity, returned by `GET /v1/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WhoAmI {
    /// The token used for the call.
    pub token: Token,
    /// Name of the token's org, for org tokens.
    #[serde(default)]
    pub org_name: Option<String>,
}
