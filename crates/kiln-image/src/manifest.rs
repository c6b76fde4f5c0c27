//! The JSON documents of an image: indexes, manifests and the image config, in both the OCI
//! and the Docker schema 2 media types.
//!
//! Only the fields Kiln reads are declared, and unknown fields are ignored: registries and
//! build tools add annotations and vendor fields freely, and rejecting them would reject
//! ordinary images.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker schema 2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The `Accept` header value for manifest requests: every type this crate reads.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest or index accepted, in bytes (the distribution spec suggests
/// registries accept at least 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// The largest image config accepted, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 8 * 1024 * 1024;

/// A reference to a blob or manifest: media type, digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// The digest of the referenced content.
    pub digest: Digest,
    /// The size of the referenced content in bytes.
    pub size: u64,
    /// The platform, in an index entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations, in an index entry (`org.opencontainers.image.ref.name` names a tag).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture in Go's naming (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v8`), when the architecture has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index or a manifest, distinguished by media type or, without one, by its fields.
#[derive(Debug, Clone)]
pub enum ManifestDocument {
    /// An index (manifest list) of per-platform manifests.
    Index(Index),
    /// A single-platform manifest.
    Manifest(Manifest),
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// The schema version; 2 for every type read here.
    pub schema_version: u32,
    /// The per-platform manifests.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest: one config and an ordered list of layers.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// The schema version; 2 for every type read here.
    pub schema_version: u32,
    /// The image config blob.
    pub config: Descriptor,
    /// The layers, lowest first.
    pub layers: Vec<Descriptor>,
}

/// A manifest document that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not JSON of the expected shape.
    #[error("invalid {kind} JSON")]
    Json {
        /// The kind of document parsed.
        kind: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The media type is one this crate does not read.
    #[error(
        "unsupported manifest media type {media_type:?}: expected an OCI or Docker schema 2 manifest or index"
    )]
    MediaType {
        /// The media type given.
        media_type: String,
    },
    /// The schema version is not 2.
    #[error(
        "unsupported manifest schemaVersion {version}: only schema 2 is read (Docker schema 1 is deprecated)"
    )]
    SchemaVersion {
        /// The version given.
        version: u32,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

impl ManifestDocument {
    /// Parses a manifest or index, using the `Content-Type` header when the document itself
    /// has no `mediaType` field.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self, ManifestError> {
        let probe: Probe = serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
            kind: "manifest",
            source,
        })?;
        let media_type = probe
            .media_type
            .or_else(|| {
                content_type.map(|value| value.split(';').next().unwrap_or(value).trim().to_owned())
            })
            .filter(|value| {
                !value.is_empty()
                    && value != "application/json"
                    && value != "application/octet-stream"
            });

        let is_index = match media_type.as_deref() {
            Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            Some(other) => {
                return Err(ManifestError::MediaType {
                    media_type: other.to_owned(),
                });
            }
            None => probe.manifests.is_some(),
        };

        let document = if is_index {
            let index: Index =
                serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                    kind: "index",
                    source,
                })?;
            check_schema(index.schema_version)?;
            Self::Index(index)
        } else {
            let manifest: Manifest =
                serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                    kind: "manifest",
                    source,
                })?;
            check_schema(manifest.schema_version)?;
            Self::Manifest(manifest)
        };
        Ok(document)
    }
}

fn check_schema(version: u32) -> Result<(), ManifestError> {
    if version == 2 {
        Ok(())
    } else {
        Err(ManifestError::SchemaVersion { version })
    }
}

impl Index {
    /// Picks the manifest for `os`/`architecture`; among several, the first one listed.
    pub fn select(&self, os: &str, architecture: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|descriptor| {
            descriptor
                .platform
                .as_ref()
                .is_some_and(|platform| platform.os == os && platform.architecture == architecture)
        })
    }

    /// Lists the platforms as `os/architecture[/variant]`, for error messages.
    pub fn platforms(&self) -> Vec<String> {
        self.manifests
            .iter()
            .filter_map(|descriptor| descriptor.platform.as_ref())
            .map(|platform| match &platform.variant {
                Some(variant) => format!("{}/{}/{variant}", platform.os, platform.architecture),
                None => format!("{}/{}", platform.os, platform.architecture),
            })
            .collect()
    }
}

/// The compression of a layer blob, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Reads the compression from a layer media type, or `None` for a type that is not a layer.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// The image config blob (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfigBlob {
    /// CPU architecture the image is built for.
    #[serde(default)]
    pub architecture: String,
    /// Operating system the image is built for.
    #[serde(default)]
    pub os: String,
    /// The runtime defaults.
    #[serde(default)]
    pub config: Option<RuntimeConfig>,
}

/// The `config` object of an image config: the defaults a container starts with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    /// `USER`: a name or uid, optionally with `:group`.
    #[serde(default)]
    pub user: Option<String>,
    /// `EXPOSE`: keys like `8080/tcp`.
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// `ENV`: `NAME=value` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `ENTRYPOINT`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `WORKDIR`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `STOPSIGNAL`.
    #[serde(default)]
    pub stop_signal: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> String {
        format!("sha256:{}", "1".repeat(64))
    }

    #[test]
    fn manifest_parsed_without_media_type() {
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{0}","size":2}},"layers":[]}}"#,
            digest()
        );
        let document = ManifestDocument::parse(json.as_bytes(), Some(DOCKER_MANIFEST)).unwrap();
        assert!(matches!(document, ManifestDocument::Manifest(_)));
    }

    #[test]
    fn index_selects_platform() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{0}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{0}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            digest()
        );
        let ManifestDocument::Index(index) =
            ManifestDocument::parse(json.as_bytes(), None).unwrap()
        else {
            panic!("not an index");
        };
        assert_eq!(index.select("linux", "amd64").unwrap().size, 2);
        assert!(index.select("linux", "s390x").is_none());
        assert_eq!(index.platforms(), ["linux/arm64/v8", "linux/amd64"]);
    }

    #[test]
    fn schema_one_rejected() {
        let json = r#"{"schemaVersion":1,"config":{"digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(ManifestDocument::parse(json.as_bytes(), None).is_err());
        let json = r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        let error = ManifestDocument::parse(
            json.as_bytes(),
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
        )
        .unwrap_err();
        assert!(
            matches!(error, ManifestError::MediaType { .. }),
            "{error:?}"
        );
    }
}
