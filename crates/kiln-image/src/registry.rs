//! A client for the OCI distribution API: manifests and blobs, anonymous, basic and bearer
//! token auth, HTTPS or plain HTTP per registry.
//!
//! Written on reqwest rather than oci-client so that blobs stream straight into the verifying
//! blob cache (digest and size checked while bytes arrive, nothing buffered in memory) and
//! so that layer downloads run in parallel under the store's own limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde::Deserialize;

use crate::blobs::{BlobError, BlobStore};
use crate::config::StoreConfig;
use crate::digest::Digest;
use crate::manifest::{MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use crate::reference::RegistryRef;

/// A failed registry request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request could not be sent or its body could not be read.
    #[error("request to {url} failed")]
    Http {
        /// The URL requested.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("{url} returned {status}: {body}")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the response body (registries put an error code there).
        body: String,
    },
    /// The registry rejected the credentials, or none were configured for it.
    #[error(
        "{url} requires authentication (status {status}): set username and password for registry {registry} in the agent config"
    )]
    Unauthorized {
        /// The URL requested.
        url: String,
        /// The registry host.
        registry: String,
        /// The HTTP status.
        status: StatusCode,
    },
    /// The token endpoint's answer cannot be used.
    #[error("token endpoint {realm} returned no usable token")]
    Token {
        /// The token endpoint.
        realm: String,
    },
    /// A manifest is larger than this crate accepts.
    #[error("manifest at {url} is larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge {
        /// The URL requested.
        url: String,
    },
    /// A manifest fetched by digest does not match it.
    #[error("manifest at {url} failed verification: expected {expected}, got {actual}")]
    ManifestDigest {
        /// The URL requested.
        url: String,
        /// The digest in the reference.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// A blob failed verification or could not be stored.
    #[error("failed to download blob from {url}")]
    Blob {
        /// The URL requested.
        url: String,
        /// The verification or storage error.
        #[source]
        source: BlobError,
    },
}

/// A fetched manifest: its bytes, digest and the `Content-Type` it was served with.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The raw bytes, which are what the digest covers.
    pub bytes: Vec<u8>,
    /// The digest of `bytes`.
    pub digest: Digest,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
}

/// The distribution API client of a store.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: StoreConfig,
    /// Bearer tokens by (registry, repository).
    tokens: Mutex<HashMap<(String, String), String>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

impl RegistryClient {
    /// Creates a client for `config`'s registries.
    pub fn new(config: StoreConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln-image/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(config.request_timeout_secs))
            .read_timeout(Duration::from_secs(config.request_timeout_secs))
            .build()?;
        Ok(Self {
            http,
            config,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    fn base_url(&self, reference: &RegistryRef) -> String {
        let scheme = if self.config.plain_http(&reference.registry) {
            "http"
        } else {
            "https"
        };
        format!(
            "{scheme}://{}/v2/{}",
            reference.api_host(),
            reference.repository
        )
    }

    /// Fetches the manifest `target` (a tag or digest) of `reference`'s repository; a
    /// manifest requested by digest is verified against it.
    pub async fn manifest(
        &self,
        reference: &RegistryRef,
        target: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = format!("{}/manifests/{target}", self.base_url(reference));
        let response = self.get(reference, &url, Some(MANIFEST_ACCEPT)).await?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        if response
            .content_length()
            .is_some_and(|length| length > MAX_MANIFEST_BYTES)
        {
            return Err(RegistryError::ManifestTooLarge { url });
        }

        let mut bytes = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| RegistryError::Http {
                url: url.clone(),
                source,
            })?;
            if bytes.len() as u64 + chunk.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(RegistryError::ManifestTooLarge { url });
            }
            bytes.extend_from_slice(&chunk);
        }

        let digest = Digest::of(&bytes);
        if let Ok(expected) = target.parse::<Digest>()
            && expected != digest
        {
            return Err(RegistryError::ManifestDigest {
                url,
                expected,
                actual: digest,
            });
        }
        Ok(FetchedManifest {
            bytes,
            digest,
            content_type,
        })
    }

    /// Downloads blob `digest` of `size` bytes into `blobs`, unless it is cached already.
    pub async fn blob(
        &self,
        reference: &RegistryRef,
        digest: &Digest,
        size: u64,
        blobs: &BlobStore,
    ) -> Result<(), RegistryError> {
        if blobs.contains(digest, Some(size)) {
            return Ok(());
        }
        let url = format!("{}/blobs/{digest}", self.base_url(reference));
        let response = self.get(reference, &url, None).await?;
        let blob_error = |source| RegistryError::Blob {
            url: url.clone(),
            source,
        };

        let mut writer = blobs.writer(digest, Some(size)).map_err(blob_error)?;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(source) => {
                    drop(writer.abort(std::io::Error::other("download interrupted")));
                    return Err(RegistryError::Http {
                        url: url.clone(),
                        source,
                    });
                }
            };
            writer.write(&chunk).map_err(blob_error)?;
        }
        writer.finish().map_err(blob_error)?;
        Ok(())
    }

    /// Sends a GET, authenticating and retrying once when the registry answers 401.
    async fn get(
        &self,
        reference: &RegistryRef,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, RegistryError> {
        let key = (reference.registry.clone(), reference.repository.clone());
        let cached_token = self
            .tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .cloned();
        let response = self.send(url, accept, cached_token.as_deref()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return check_status(url, reference, response).await;
        }

        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let authorization = self.authorize(reference, &challenge).await?;
        let Some(authorization) = authorization else {
            return Err(RegistryError::Unauthorized {
                url: url.to_owned(),
                registry: reference.registry.clone(),
                status: StatusCode::UNAUTHORIZED,
            });
        };
        self.tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key, authorization.clone());
        let response = self.send(url, accept, Some(&authorization)).await?;
        check_status(url, reference, response).await
    }

    async fn send(
        &self,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut request = self.http.get(url);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request.send().await.map_err(|source| RegistryError::Http {
            url: url.to_owned(),
            source,
        })
    }

    /// Answers a `WWW-Authenticate` challenge: returns the `Authorization` header value, or
    /// `None` when the challenge is basic auth and no credentials are configured.
    async fn authorize(
        &self,
        reference: &RegistryRef,
        challenge: &str,
    ) -> Result<Option<String>, RegistryError> {
        let credentials = self.config.credentials(&reference.registry);
        let basic = credentials.as_ref().map(|credentials| {
            let pair = format!("{}:{}", credentials.username, credentials.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });

        let Some(parameters) = challenge
            .strip_prefix("Bearer ")
            .or_else(|| challenge.strip_prefix("bearer "))
        else {
            return Ok(basic);
        };
        let parameters = parse_challenge(parameters);
        let Some(realm) = parameters.get("realm") else {
            return Err(RegistryError::Token {
                realm: String::new(),
            });
        };
        let scope = parameters
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", reference.repository));

        let mut request = self.http.get(realm).query(&[("scope", scope.as_str())]);
        if let Some(service) = parameters.get("service") {
            request = request.query(&[("service", service.as_str())]);
        }
        if let Some(basic) = &basic {
            request = request.header(AUTHORIZATION, basic);
        }
        let response = request.send().await.map_err(|source| RegistryError::Http {
            url: realm.clone(),
            source,
        })?;
        if matches!(
            response.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            return Err(RegistryError::Unauthorized {
                url: realm.clone(),
                registry: reference.registry.clone(),
                status: response.status(),
            });
        }
        let response = check_status(realm, reference, response).await?;
        let body: TokenResponse = response
            .json()
            .await
            .map_err(|source| RegistryError::Http {
                url: realm.clone(),
                source,
            })?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| RegistryError::Token {
                realm: realm.clone(),
            })?;
        Ok(Some(format!("Bearer {token}")))
    }
}

async fn check_status(
    url: &str,
    reference: &RegistryRef,
    response: reqwest::Response,
) -> Result<reqwest::Response, RegistryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return Err(RegistryError::Unauthorized {
            url: url.to_owned(),
            registry: reference.registry.clone(),
            status,
        });
    }
    let mut body = response.text().await.unwrap_or_default();
    body.truncate(body.floor_char_boundary(512));
    Err(RegistryError::Status {
        url: url.to_owned(),
        status,
        body: body.trim().to_owned(),
    })
}

/// Parses `key="value",key=value` challenge parameters.
fn parse_challenge(parameters: &str) -> HashMap<String, String> {
    let mut parsed = HashMap::new();
    let mut rest = parameters.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((value, after)) => (value, after),
                None => (quoted, ""),
            },
            None => after
                .split_once(',')
                .map_or((after, ""), |(value, after)| (value, after)),
        };
        parsed.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = after.trim_start_matches([',', ' ']);
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parameters_parse() {
        let parsed = parse_challenge(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        );
        assert_eq!(parsed["realm"], "https://auth.docker.io/token");
        assert_eq!(parsed["service"], "registry.docker.io");
        assert_eq!(parsed["scope"], "repository:library/debian:pull");

        let parsed = parse_challenge("realm=https://r/token,service=r");
        assert_eq!(parsed["realm"], "https://r/token");
        assert_eq!(parsed["service"], "r");
    }
}
