//! Token authentication.
//!
//! A token's secret is 32 random bytes. Its text form is `kiln_<token id>_<base64url>`: the
//! id finds the row without a lookup by secret, and the SHA-256 of the 32 bytes is compared in
//! constant time with the stored hash. The secret itself is never stored or logged.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kiln_api::ErrorCode;
use kiln_api::types::{Token, TokenKind};
use kiln_core::{HostId, OrgId, OrgName, TokenId};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::api::error::ApiError;

/// Prefix of every token's text form.
const TOKEN_PREFIX: &str = "kiln_";

/// Length of a token id's text form, `tok_` plus 32 hex characters.
const TOKEN_ID_LEN: usize = 36;

/// Length of the base64url encoding of 32 bytes without padding.
const SECRET_LEN: usize = 43;

/// A newly generated token secret.
pub struct GeneratedToken {
    /// The text the client sends.
    pub text: String,
    /// SHA-256 of the random bytes, stored in `token_hashes`.
    pub hash: [u8; 32],
}

/// Generates the secret of token `id`.
pub fn generate(id: TokenId) -> GeneratedToken {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let text = format!("{TOKEN_PREFIX}{id}_{}", URL_SAFE_NO_PAD.encode(secret));
    GeneratedToken {
        text,
        hash: Sha256::digest(secret).into(),
    }
}

/// Splits a token's text into its id and secret bytes; `None` when it is malformed.
pub fn parse(text: &str) -> Option<(TokenId, [u8; 32])> {
    let rest = text.strip_prefix(TOKEN_PREFIX)?;
    if rest.len() != TOKEN_ID_LEN + 1 + SECRET_LEN || !rest.is_char_boundary(TOKEN_ID_LEN) {
        return None;
    }
    let (id, secret) = rest.split_at(TOKEN_ID_LEN);
    let id: TokenId = id.parse().ok()?;
    let secret = secret.strip_prefix('_')?;
    let bytes = URL_SAFE_NO_PAD.decode(secret).ok()?;
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    Some((id, bytes))
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token used.
    pub token: Token,
    /// The org and its name, for org tokens.
    pub org: Option<(OrgId, OrgName)>,
}

impl Caller {
    /// Returns the actor recorded in events caused by this caller.
    pub fn actor(&self) -> String {
        match (self.token.kind, self.token.host_id) {
            (TokenKind::Host, Some(host_id)) => format!("host:{host_id}"),
            _ => format!("token:{}", self.token.id),
        }
    }

    /// Returns the host of a host token.
    pub fn host_id(&self) -> Option<HostId> {
        match self.token.kind {
            TokenKind::Host => self.token.host_id,
            _ => None,
        }
    }
}

/// Authenticates the `Authorization` header value.
pub async fn authenticate(pool: &PgPool, header: Option<&str>) -> Result<Caller, ApiError> {
    let unauthenticated = |message: &str| ApiError::new(ErrorCode::Unauthenticated, message);

    let Some(header) = header else {
        return Err(unauthenticated(
            "missing Authorization header; send `Authorization: Bearer <token>`",
        ));
    };
    let Some(text) = header.strip_prefix("Bearer ") else {
        return Err(unauthenticated(
            "invalid Authorization header; expected `Bearer <token>`",
        ));
    };
    let Some((id, secret)) = parse(text.trim()) else {
        return Err(unauthenticated(
            "invalid token format; expected kiln_tok_<id>_<secret> as printed at creation",
        ));
    };

    let row = sqlx::query(
        "SELECT t.kind, t.org_id, t.host_id, t.name, t.created_at, t.expires_at, t.revoked_at,
                h.hash, o.name AS org_name
         FROM tokens t
         JOIN token_hashes h ON h.token_id = t.id
         LEFT JOIN orgs o ON o.id = t.org_id
         WHERE t.id = $1",
    )
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("look up token"))?;

    // Hash even when the row is missing, so both paths cost the same.
    let presented: [u8; 32] = Sha256::digest(secret).into();
    let stored: Vec<u8> = row
        .as_ref()
        .map(|row| row.get("hash"))
        .unwrap_or_else(|| vec![0u8; 32]);
    let hash_matches: bool = presented.as_slice().ct_eq(stored.as_slice()).into();
    let (Some(row), true) = (row, hash_matches) else {
        return Err(unauthenticated("unknown token; create a new one"));
    };

    let kind: String = row.get("kind");
    let kind: TokenKind = serde_json::from_value(serde_json::Value::String(kind))
        .map_err(|_| ApiError::internal("token row has an unknown kind"))?;
    let token = Token {
        id,
        kind,
        org_id: row
            .get::<Option<uuid::Uuid>, _>("org_id")
            .map(OrgId::from_uuid),
        host_id: row
            .get::<Option<uuid::Uuid>, _>("host_id")
            .map(HostId::from_uuid),
        name: row.get("name"),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        revoked_at: row.get("revoked_at"),
    };

    if token.revoked_at.is_some() {
        return Err(ApiError::new(
            ErrorCode::TokenRevoked,
            format!("token {id} was revoked; create a new one"),
        ));
    }
    if token
        .expires_at
        .is_some_and(|expiry| expiry <= OffsetDateTime::now_utc())
    {
        return Err(ApiError::new(
            ErrorCode::TokenExpired,
            format!("token {id} has expired; create a new one"),
        ));
    }

    let org = match (token.org_id, row.get::<Option<String>, _>("org_name")) {
        (Some(org_id), Some(name)) => {
            let name =
                OrgName::new(name).map_err(|_| ApiError::internal("stored org name is invalid"))?;
            Some((org_id, name))
        }
        _ => None,
    };
    Ok(Caller { token, org })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_token_parses_back() {
        let id = TokenId::new();
        let token = generate(id);
        let (parsed_id, secret) = parse(&token.text).unwrap();
        assert_eq!(parsed_id, id);
        let hash: [u8; 32] = Sha256::digest(secret).into();
        assert_eq!(hash, token.hash);
    }

    #[test]
    fn parse_rejects_malformed_tokens() {
        let good = generate(TokenId::new()).text;
        let cases = [
            String::new(),
            "kiln_".to_owned(),
            good.replacen("kiln_", "klin_", 1),
            good[..good.len() - 1].to_owned(),
            format!("{good}A"),
            good.replace("tok_", "app_"),
            format!("{}é", &good[..good.len() - 2]),
        ];
        for case in cases {
            assert!(parse(&case).is_none(), "{case:?}");
        }
    }
}
