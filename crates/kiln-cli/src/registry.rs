//! Image references and their resolution to a manifest digest through the OCI distribution API.
//!
//! A release names its image by digest, so `kiln deploy --image web:1.4` asks the registry
//! which manifest `web:1.4` is right now (`HEAD /v2/<name>/manifests/<tag>`, reading
//! `Docker-Content-Digest`, or the SHA-256 of the body from a `GET` when a registry omits the
//! header) and deploys exactly that. A reference that names a digest is used as it is, with
//! no request. Registries on a loopback address are spoken to over plain
//! HTTP, as the local registries of development and tests serve; every other registry over
//! HTTPS. Anonymous bearer tokens (the `WWW-Authenticate: Bearer` challenge) are fetched when
//! a registry asks for one.

use std::fmt;
use std::net::IpAddr;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderMap, WWW_AUTHENTICATE};
use sha2::{Digest, Sha256};

use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;

/// Registry host used for references without one, as Docker resolves them.
const DEFAULT_REGISTRY: &str = "docker.io";

/// Host actually serving `docker.io`'s distribution API.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Manifest media types kiln accepts, image indexes first so a multi-platform tag resolves
/// to its index.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// A parsed image reference: `[registry/]repository[:tag][@sha256:hex]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageRef {
    /// Registry host with optional port, such as `127.0.0.1:5000`.
    pub(crate) registry: String,
    /// Repository path, such as `library/nginx`.
    pub(crate) repository: String,
    /// Tag, when the reference has one.
    pub(crate) tag: Option<String>,
    /// Digest (`sha256:` and 64 hex digits), when the reference has one.
    pub(crate) digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RefError {
    /// The reference is empty.
    #[error("the image reference is empty")]
    Empty,
    /// The digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest {0:?}: expected sha256: followed by 64 lowercase hex digits")]
    Digest(String),
    /// The repository path has a character or shape the distribution spec does not allow.
    #[error(
        "invalid repository {0:?}: use lowercase letters, digits and the separators '.', '_', '-' \
         and '/'"
    )]
    Repository(String),
    /// The tag is empty, too long or has a character the spec does not allow.
    #[error(
        "invalid tag {0:?}: use up to 128 of A-Z, a-z, 0-9, '_', '.' and '-', not starting with '.' or '-'"
    )]
    Tag(String),
}

impl ImageRef {
    /// Parses a reference as `docker pull` does: a first path component with a `.` or `:`, or
    /// `localhost`, is a registry; otherwise the registry is `docker.io` and one-component
    /// names get `library/`. Without a tag or digest the tag is `latest`.
    pub(crate) fn parse(text: &str) -> Result<Self, RefError> {
        if text.is_empty() {
            return Err(RefError::Empty);
        }

        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                if !is_sha256_digest(digest) {
                    return Err(RefError::Digest(digest.to_owned()));
                }
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };

        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), rest.to_owned()),
        };

        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(colon) => {
                let split = last_slash + colon;
                (path[..split].to_owned(), Some(path[split + 1..].to_owned()))
            }
            None => (path, None),
        };

        if let Some(tag) = &tag
            && !is_valid_tag(tag)
        {
            return Err(RefError::Tag(tag.clone()));
        }
        if !is_valid_repository(&repository) {
            return Err(RefError::Repository(repository));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            _ => tag,
        };

        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Returns `registry/repository@digest` for a resolved digest.
    pub(crate) fn with_digest(&self, digest: &str) -> String {
        format!("{}/{}@{digest}", self.registry, self.repository)
    }

    /// The tag or digest to ask the registry for.
    fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// Base URL of the registry's API: plain HTTP for loopback hosts, HTTPS otherwise.
    fn base_url(&self) -> String {
        let host = if self.registry == DEFAULT_REGISTRY {
            DOCKER_HUB_API
        } else {
            &self.registry
        };
        let scheme = if is_loopback_host(host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}")
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Whether `host` (with an optional port) is `localhost` or a loopback IP address.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(bracketed) = host.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn is_valid_repository(repository: &str) -> bool {
    !repository.is_empty()
        && repository.split('/').all(|component| {
            !component.is_empty()
                && component.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && component.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && component
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

/// Resolves `image` to `registry/repository@sha256:...` by asking its registry.
///
/// A reference with a digest is returned without any request: the digest pins the image by
/// itself, so deploying it needs neither a reachable registry nor credentials for it.
pub(crate) async fn resolve(http: &reqwest::Client, image: &ImageRef) -> CliResult<String> {
    if let Some(digest) = &image.digest {
        return Ok(image.with_digest(digest));
    }
    let url = format!(
        "{}/v2/{}/manifests/{}",
        image.base_url(),
        image.repository,
        image.reference()
    );
    let failed = |error: reqwest::Error| {
        CliError::failure(format!(
            "cannot resolve image {image}: request to {url} failed"
        ))
        .with_source(error)
        .with_hint("check the registry address, or pass --image with an @sha256: digest")
    };

    let mut bearer: Option<String> = None;
    let mut response = manifest_request(http, reqwest::Method::HEAD, &url, None)
        .await
        .map_err(failed)?;
    if response.status() == StatusCode::UNAUTHORIZED
        && let Some(token) = anonymous_token(http, response.headers()).await
    {
        response = manifest_request(http, reqwest::Method::HEAD, &url, Some(&token))
            .await
            .map_err(failed)?;
        bearer = Some(token);
    }
    check_status(image, response.status())?;

    if let Some(digest) = header_digest(response.headers()) {
        return Ok(image.with_digest(&digest));
    }

    // Some registries omit Docker-Content-Digest: the digest is the SHA-256 of the exact
    // manifest bytes they serve.
    let response = manifest_request(http, reqwest::Method::GET, &url, bearer.as_deref())
        .await
        .map_err(failed)?;
    check_status(image, response.status())?;
    let body = response.bytes().await.map_err(failed)?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    Ok(image.with_digest(&digest))
}

async fn manifest_request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    bearer: Option<&str>,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut request = http.request(method, url).header(ACCEPT, MANIFEST_ACCEPT);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await
}

fn check_status(image: &ImageRef, status: StatusCode) -> CliResult {
    if status.is_success() {
        return Ok(());
    }
    let (kind, hint) = match status {
        StatusCode::NOT_FOUND => (
            ExitKind::NotFound,
            "check the repository and tag, and that the image was pushed",
        ),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (
            ExitKind::Auth,
            "the registry requires credentials kiln does not have; pass --image with an \
             @sha256: digest instead",
        ),
        _ => (ExitKind::Failure, "check the registry, then retry"),
    };
    Err(CliError::new(
        kind,
        format!("cannot resolve image {image}: the registry answered {status}"),
    )
    .with_hint(hint))
}

fn header_digest(headers: &HeaderMap) -> Option<String> {
    headers
        .get("docker-content-digest")
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_sha256_digest(value))
        .map(str::to_owned)
}

/// Fetches an anonymous token for the `Bearer` challenge in `headers`, if there is one.
async fn anonymous_token(http: &reqwest::Client, headers: &HeaderMap) -> Option<String> {
    let challenge = headers.get(WWW_AUTHENTICATE)?.to_str().ok()?;
    let params = challenge.strip_prefix("Bearer ")?;
    let mut realm = None;
    let mut query = Vec::new();
    for part in split_challenge(params) {
        let (key, value) = part.split_once('=')?;
        let value = value.trim_matches('"').to_owned();
        match key.trim() {
            "realm" => realm = Some(value),
            "service" | "scope" => query.push((key.trim().to_owned(), value)),
            _ => {}
        }
    }

    let response = http.get(realm?).query(&query).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body.get("token")
        .or_else(|| body.get("access_token"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
}

/// Splits challenge parameters on commas outside quotes (scopes contain commas).
fn split_challenge(params: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in params.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(params[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(params[start..].trim());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parsed(text: &str) -> (String, String, Option<String>, Option<String>) {
        let image = ImageRef::parse(text).unwrap();
        (image.registry, image.repository, image.tag, image.digest)
    }

    #[test]
    fn parse_docker_hub_short_name() {
        assert_eq!(
            parsed("nginx"),
            (
                "docker.io".into(),
                "library/nginx".into(),
                Some("latest".into()),
                None
            )
        );
    }

    #[test]
    fn parse_registry_with_port_and_tag() {
        assert_eq!(
            parsed("127.0.0.1:5000/team/web:1.4"),
            (
                "127.0.0.1:5000".into(),
                "team/web".into(),
                Some("1.4".into()),
                None
            )
        );
    }

    #[test]
    fn parse_digest_without_tag() {
        let (_, repository, tag, digest) = parsed(&format!("localhost/web@{DIGEST}"));

        assert_eq!(repository, "web");
        assert_eq!(tag, None);
        assert_eq!(digest.as_deref(), Some(DIGEST));
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert_eq!(ImageRef::parse(""), Err(RefError::Empty));
        assert_eq!(
            ImageRef::parse("web@sha256:abc"),
            Err(RefError::Digest("sha256:abc".into()))
        );
        assert_eq!(
            ImageRef::parse("Web:1"),
            Err(RefError::Repository("Web".into()))
        );
        assert_eq!(ImageRef::parse("web:-x"), Err(RefError::Tag("-x".into())));
        assert_eq!(
            ImageRef::parse("team//web"),
            Err(RefError::Repository("team//web".into()))
        );
    }

    #[test]
    fn loopback_hosts_use_http() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(is_loopback_host("localhost"));
        assert!(!is_loopback_host("registry.example.com"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
    }

    #[test]
    fn challenge_split_keeps_quoted_commas() {
        let parts = split_challenge(
            r#"realm="https://auth.example/token",service="registry",scope="repository:a:pull,push""#,
        );

        assert_eq!(parts.len(), 3);
        assert_eq!(parts[2], r#"scope="repository:a:pull,push""#);
    }
}
