//! Image references: registry references (`registry/repo:tag@digest`) and the local sources
//! `oci-layout:DIR[:TAG]` and `oci-archive:FILE[:TAG]` for air-gapped hosts and tests.
//!
//! Registry references follow the grammar Docker and the distribution project use, so users
//! can paste the reference they already push to: a first component with a dot, a colon or
//! `localhost` is the registry host; otherwise the image is on Docker Hub.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::digest::Digest;

/// Docker Hub's name in references.
const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's distribution API.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image in an OCI distribution registry.
    Registry(RegistryRef),
    /// An image in an `oci-layout` directory.
    OciLayout {
        /// The layout directory (it holds `oci-layout`, `index.json` and `blobs/`).
        dir: PathBuf,
        /// The `org.opencontainers.image.ref.name` annotation to select, if any.
        tag: Option<String>,
    },
    /// An image in an `oci-archive` tar file (an `oci-layout` directory as a tar).
    OciArchive {
        /// The tar file.
        file: PathBuf,
        /// The `org.opencontainers.image.ref.name` annotation to select, if any.
        tag: Option<String>,
    },
}

/// A reference to an image in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// Registry host and optional port as written in references (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path inside the registry (`library/debian`).
    pub repository: String,
    /// Tag, when given; `latest` when neither a tag nor a digest is given.
    pub tag: Option<String>,
    /// Digest, when given; it then wins over the tag.
    pub digest: Option<Digest>,
}

/// A reference that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {value:?}: {reason}")]
pub struct ReferenceError {
    /// The rejected text.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl RegistryRef {
    /// The host to contact for this registry (Docker Hub's API host for `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The digest when given, otherwise the tag, as it goes into `/v2/<name>/manifests/<ref>`.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = value.strip_prefix("oci-layout:") {
            let (path, tag) = split_local(value, rest)?;
            return Ok(Self::OciLayout { dir: path, tag });
        }
        if let Some(rest) = value.strip_prefix("oci-archive:") {
            let (path, tag) = split_local(value, rest)?;
            return Ok(Self::OciArchive { file: path, tag });
        }
        parse_registry_ref(value).map(Self::Registry)
    }
}

/// Splits `PATH[:TAG]`: the text after the last colon is a tag only when it has no slash.
fn split_local(value: &str, rest: &str) -> Result<(PathBuf, Option<String>), ReferenceError> {
    let error = |reason| ReferenceError {
        value: value.to_owned(),
        reason,
    };
    let (path, tag) = match rest.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') => (path, Some(tag.to_owned())),
        _ => (rest, None),
    };
    if path.is_empty() {
        return Err(error(
            "the path is empty (write oci-layout:DIR[:TAG] or oci-archive:FILE[:TAG])",
        ));
    }
    if tag.as_deref() == Some("") {
        return Err(error("the tag after the last colon is empty"));
    }
    Ok((PathBuf::from(path), tag))
}

fn parse_registry_ref(value: &str) -> Result<RegistryRef, ReferenceError> {
    let error = |reason| ReferenceError {
        value: value.to_owned(),
        reason,
    };

    let (name_and_tag, digest) = match value.split_once('@') {
        Some((rest, digest)) => {
            let digest = digest
                .parse()
                .map_err(|_| error("the part after @ is not a sha256: digest"))?;
            (rest, Some(digest))
        }
        None => (value, None),
    };

    let last_slash = name_and_tag.rfind('/').map_or(0, |index| index + 1);
    let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
        Some(colon) => {
            let split = last_slash + colon;
            (
                &name_and_tag[..split],
                Some(name_and_tag[split + 1..].to_owned()),
            )
        }
        None => (name_and_tag, None),
    };
    if let Some(tag) = &tag
        && !valid_tag(tag)
    {
        return Err(error(
            "the tag must be 1 to 128 of [A-Za-z0-9_.-] and not start with . or -",
        ));
    }

    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_owned(), rest.to_owned())
        }
        Some(_) => (DOCKER_HUB.to_owned(), name.to_owned()),
        None => (DOCKER_HUB.to_owned(), format!("library/{name}")),
    };
    if !valid_registry(&registry) {
        return Err(error(
            "the registry host has characters outside [A-Za-z0-9.-] or a bad port",
        ));
    }
    if !valid_repository(&repository) {
        return Err(error(
            "the repository must be lowercase components of [a-z0-9] joined by . _ - or __, separated by /",
        ));
    }

    let tag = if tag.is_none() && digest.is_none() {
        Some("latest".to_owned())
    } else {
        tag
    };
    Ok(RegistryRef {
        registry,
        repository,
        tag,
        digest,
    })
}

fn valid_tag(tag: &str) -> bool {
    let first_ok = tag
        .bytes()
        .next()
        .is_some_and(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
    first_ok
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

fn valid_registry(registry: &str) -> bool {
    let (host, port) = match registry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-'));
    let port_ok = port.is_none_or(|port| port.parse::<u16>().is_ok());
    host_ok && port_ok
}

fn valid_repository(repository: &str) -> bool {
    !repository.is_empty()
        && repository.len() <= 255
        && repository.split('/').all(|component| {
            let bytes = component.as_bytes();
            let edge_ok = |byte: Option<&u8>| {
                byte.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            };
            edge_ok(bytes.first())
                && edge_ok(bytes.last())
                && bytes.iter().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && !component.contains("..")
                && !component.contains("___")
        })
}

impl fmt::Display for RegistryRef {
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

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, path, tag) = match self {
            Self::Registry(reference) => return reference.fmt(f),
            Self::OciLayout { dir, tag } => ("oci-layout", dir, tag),
            Self::OciArchive { file, tag } => ("oci-archive", file, tag),
        };
        write!(f, "{kind}:{}", path.display())?;
        if let Some(tag) = tag {
            write!(f, ":{tag}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(value: &str) -> RegistryRef {
        match value.parse::<ImageRef>().unwrap() {
            ImageRef::Registry(reference) => reference,
            other => panic!("{value} parsed as {other:?}"),
        }
    }

    #[test]
    fn docker_hub_short_names() {
        let reference = registry("debian");
        assert_eq!(reference.registry, "docker.io");
        assert_eq!(reference.repository, "library/debian");
        assert_eq!(reference.tag.as_deref(), Some("latest"));
        assert_eq!(reference.api_host(), "registry-1.docker.io");

        let reference = registry("grafana/grafana:10.1");
        assert_eq!(reference.repository, "grafana/grafana");
        assert_eq!(reference.tag.as_deref(), Some("10.1"));
    }

    #[test]
    fn registry_with_port_and_digest() {
        let digest = format!("sha256:{}", "0f".repeat(32));
        let reference = registry(&format!("127.0.0.1:5000/team/app:v1@{digest}"));
        assert_eq!(reference.registry, "127.0.0.1:5000");
        assert_eq!(reference.repository, "team/app");
        assert_eq!(reference.tag.as_deref(), Some("v1"));
        assert_eq!(reference.manifest_reference(), digest);
        assert_eq!(
            reference.to_string(),
            format!("127.0.0.1:5000/team/app:v1@{digest}")
        );
    }

    #[test]
    fn localhost_is_a_registry() {
        let reference = registry("localhost/app");
        assert_eq!(reference.registry, "localhost");
        assert_eq!(reference.repository, "app");
    }

    #[test]
    fn local_sources() {
        assert_eq!(
            "oci-layout:/tmp/img:v2".parse::<ImageRef>().unwrap(),
            ImageRef::OciLayout {
                dir: "/tmp/img".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            "oci-archive:./img.tar".parse::<ImageRef>().unwrap(),
            ImageRef::OciArchive {
                file: "./img.tar".into(),
                tag: None
            }
        );
    }

    #[test]
    fn malformed_references_rejected() {
        for bad in [
            "",
            "UPPER/case",
            "app:",
            "app:-bad",
            "app@sha256:short",
            "host:notaport/app",
            "a//b",
            "oci-layout:",
            "oci-archive::tag",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} was accepted");
        }
    }
}
