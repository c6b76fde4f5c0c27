//! `kiln-control bootstrap`: first-time setup of a cluster. Chooses the cluster's ULA /48
//! and apps domain, creates the first org with an admin token, and an operator token.

use std::net::Ipv6Addr;

use kiln_api::types::{CreatedToken, Org, TokenKind};
use kiln_core::OrgName;
use rand::RngCore;
use serde::Serialize;

use crate::api::ClusterSettings;
use crate::api::error::ApiError;
use crate::store::{Store, StoreError, streams};

/// Settings key of the cluster's ULA /48.
pub const ULA_PREFIX_KEY: &str = "ula_prefix";
/// Settings key of the apps domain.
pub const APPS_DOMAIN_KEY: &str = "apps_domain";

/// What bootstrap created; the tokens are shown only here.
#[derive(Debug, Serialize)]
pub struct BootstrapOutput {
    /// The cluster's ULA /48.
    pub cluster_prefix: String,
    /// The apps domain.
    pub apps_domain: String,
    /// The first org.
    pub org: Org,
    /// An org token of the first org.
    pub org_token: CreatedToken,
    /// An operator token.
    pub operator_token: CreatedToken,
}

/// Errors of bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The cluster was bootstrapped before.
    #[error(
        "the cluster is already bootstrapped (prefix {prefix}); create more orgs with POST /v1/orgs and their first admin token with POST /v1/orgs/{{org}}/tokens, both with the operator token"
    )]
    AlreadyBootstrapped {
        /// Its prefix.
        prefix: String,
    },
    /// The given prefix is not a ULA /48.
    #[error(
        "invalid cluster prefix {value:?}: expected a /48 inside fd00::/8, such as fd12:3456:789a::/48"
    )]
    InvalidPrefix {
        /// The value.
        value: String,
    },
    /// The apps domain is not a hostname.
    #[error("invalid apps domain {value:?}")]
    InvalidDomain {
        /// The value.
        value: String,
        /// Cause.
        #[source]
        source: kiln_core::NameError,
    },
    /// A store operation failed.
    #[error("store operation failed")]
    Store(#[from] StoreError),
    /// Creating the org or tokens failed.
    #[error("failed to create the first org or tokens: {0:?}")]
    Api(ApiError),
}

impl From<ApiError> for BootstrapError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

/// Parses a ULA /48 such as `fd12:3456:789a::/48`.
pub fn parse_prefix(value: &str) -> Result<Ipv6Addr, BootstrapError> {
    let invalid = || BootstrapError::InvalidPrefix {
        value: value.to_owned(),
    };
    let (address, length) = value.split_once('/').ok_or_else(invalid)?;
    let address: Ipv6Addr = address.parse().map_err(|_| invalid())?;
    let bits = u128::from(address);
    if length != "48" || bits >> 120 != 0xfd || bits & ((1u128 << 80) - 1) != 0 {
        return Err(invalid());
    }
    Ok(address)
}

/// Bootstraps the cluster. `prefix` defaults to a random ULA /48 (RFC 4193).
pub async fn bootstrap(
    store: &Store,
    org_name: &OrgName,
    apps_domain: &str,
    prefix: Option<&str>,
) -> Result<BootstrapOutput, BootstrapError> {
    kiln_core::Hostname::new(apps_domain).map_err(|source| BootstrapError::InvalidDomain {
        value: apps_domain.to_owned(),
        source,
    })?;
    let prefix = match prefix {
        Some(text) => parse_prefix(text)?,
        None => random_ula(),
    };

    let mut tx = store.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO cluster_settings (key, value) VALUES ($1, $2), ($3, $4) ON CONFLICT (key) DO NOTHING",
    )
    .bind(ULA_PREFIX_KEY)
    .bind(prefix.to_string())
    .bind(APPS_DOMAIN_KEY)
    .bind(apps_domain)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::database("store cluster settings"))?;
    if inserted.rows_affected() != 2 {
        let existing: String =
            sqlx::query_scalar("SELECT value FROM cluster_settings WHERE key = $1")
                .bind(ULA_PREFIX_KEY)
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::database("read cluster settings"))?;
        return Err(BootstrapError::AlreadyBootstrapped {
            prefix: format!("{existing}/48"),
        });
    }
    tx.commit()
        .await
        .map_err(StoreError::database("commit cluster settings"))?;

    let actor = "system:bootstrap";
    let org = crate::api::orgs::create_org(store, org_name, actor).await?;
    let mut tx = store.begin().await?;
    let org_token = crate::api::tokens::issue(
        &mut tx,
        &streams::org(org.id),
        TokenKind::Org,
        Some(org.id),
        None,
        "bootstrap-admin",
        None,
        actor,
    )
    .await?;
    let operator_token = crate::api::tokens::issue(
        &mut tx,
        streams::CLUSTER,
        TokenKind::Operator,
        None,
        None,
        "bootstrap-operator",
        None,
        actor,
    )
    .await?;
    tx.commit()
        .await
        .map_err(StoreError::database("commit bootstrap tokens"))?;

    Ok(BootstrapOutput {
        cluster_prefix: format!("{prefix}/48"),
        apps_domain: apps_domain.to_owned(),
        org,
        org_token,
        operator_token,
    })
}

/// Loads the settings stored by bootstrap.
pub async fn load_settings(store: &Store) -> Result<Option<ClusterSettings>, StoreError> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT key, value FROM cluster_settings")
        .fetch_all(store.pool())
        .await
        .map_err(StoreError::database("read cluster settings"))?;
    let get = |key: &str| {
        rows.iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
    };
    let (Some(prefix), Some(apps_domain)) = (get(ULA_PREFIX_KEY), get(APPS_DOMAIN_KEY)) else {
        return Ok(None);
    };
    let Ok(ula_prefix) = prefix.parse() else {
        return Ok(None);
    };
    Ok(Some(ClusterSettings {
        ula_prefix,
        apps_domain,
    }))
}

fn random_ula() -> Ipv6Addr {
    let mut global_id = [0u8; 5];
    rand::rngs::OsRng.fill_bytes(&mut global_id);
    let mut bits = 0xfdu128 << 120;
    for (index, byte) in global_id.iter().enumerate() {
        bits |= u128::from(*byte) << (112 - 8 * index);
    }
    Ipv6Addr::from(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ula_is_a_valid_prefix() {
        let prefix = random_ula();
        assert!(parse_prefix(&format!("{prefix}/48")).is_ok(), "{prefix}");
    }

    #[test]
    fn prefix_parser_rejects_non_ula() {
        for value in [
            "2001:db8::/48",
            "fd12:3456:789a::/64",
            "fd12:3456:789a:1::/48",
            "fd12::",
            "nonsense/48",
        ] {
            assert!(parse_prefix(value).is_err(), "{value}");
        }
    }
}
