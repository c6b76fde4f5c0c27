//! Builds OCI test images in Rust (no Docker on the build machines) and publishes them to a
//! registry over the distribution API, to an `oci-layout` directory or an `oci-archive` tar.
//!
//! Layers are written with raw tar headers, so a test can build exactly the hostile entries
//! a malicious image would carry (`../` names, absolute names, links that escape), which
//! the `tar` crate's own path setters refuse to write.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The OCI manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The OCI index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// A blob with its digest and media type.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The media type that descriptors of this blob carry.
    pub media_type: String,
    /// The content.
    pub bytes: Vec<u8>,
}

impl Blob {
    /// Wraps `bytes`, computing the digest.
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Self {
            digest: sha256(&bytes),
            media_type: media_type.to_owned(),
            bytes,
        }
    }

    /// Returns the OCI descriptor of this blob.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Owner, mode and mtime of an entry.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    /// Owner uid.
    pub uid: u64,
    /// Owner gid.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

impl Meta {
    /// Root-owned with `mode` and a fixed mtime.
    pub fn mode(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
        }
    }

    /// Owned by `uid:gid` with `mode`.
    pub fn owned(mode: u32, uid: u64, gid: u64) -> Self {
        Self {
            mode,
            uid,
            gid,
            mtime: 1_700_000_000,
        }
    }
}

/// A layer tar under construction.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// Starts an empty layer.
    pub fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry with a raw (unchecked) name and link name.
    pub fn raw(
        mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: Option<&[u8]>,
        data: &[u8],
        meta: Meta,
    ) -> Self {
        self.append_raw(kind, name, link, data, meta);
        self
    }

    fn append_raw(
        &mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: Option<&[u8]>,
        data: &[u8],
        meta: Meta,
    ) {
        if name.len() >= 100 {
            self.long_name(tar::EntryType::GNULongName, name);
        }
        if let Some(link) = link.filter(|link| link.len() >= 100) {
            self.long_name(tar::EntryType::GNULongLink, link);
        }
        let mut header = tar::Header::new_gnu();
        let old = header.as_old_mut();
        let name_len = name.len().min(99);
        old.name[..name_len].copy_from_slice(&name[..name_len]);
        if let Some(link) = link {
            let link_len = link.len().min(99);
            old.linkname[..link_len].copy_from_slice(&link[..link_len]);
        }
        header.set_entry_type(kind);
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.tar
            .append(&header, data)
            .expect("appending to an in-memory tar cannot fail");
    }

    fn long_name(&mut self, kind: tar::EntryType, name: &[u8]) {
        let mut data = name.to_vec();
        data.push(0);
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.tar
            .append(&header, &data[..])
            .expect("appending to an in-memory tar cannot fail");
    }

    /// Appends a directory.
    pub fn dir(self, path: &str, meta: Meta) -> Self {
        self.raw(tar::EntryType::Directory, path.as_bytes(), None, &[], meta)
    }

    /// Appends a regular file.
    pub fn file(self, path: &str, contents: &[u8], meta: Meta) -> Self {
        self.raw(
            tar::EntryType::Regular,
            path.as_bytes(),
            None,
            contents,
            meta,
        )
    }

    /// Appends a regular file with extended attributes (PAX `SCHILY.xattr.*` records).
    pub fn file_with_xattrs(
        mut self,
        path: &str,
        contents: &[u8],
        meta: Meta,
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(name, value)| (format!("SCHILY.xattr.{name}"), *value))
            .collect();
        self.tar
            .append_pax_extensions(records.iter().map(|(key, value)| (key.as_str(), *value)))
            .expect("appending to an in-memory tar cannot fail");
        self.raw(
            tar::EntryType::Regular,
            path.as_bytes(),
            None,
            contents,
            meta,
        )
    }

    /// Appends a symlink to `target` (stored verbatim).
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(
            tar::EntryType::Symlink,
            path.as_bytes(),
            Some(target.as_bytes()),
            &[],
            Meta::mode(0o777),
        )
    }

    /// Appends a hardlink to `target` (a path in the image).
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(
            tar::EntryType::Link,
            path.as_bytes(),
            Some(target.as_bytes()),
            &[],
            Meta::mode(0o644),
        )
    }

    /// Appends a whiteout that deletes `path` from lower layers.
    pub fn whiteout(self, path: &str) -> Self {
        let (parent, name) = path
            .rsplit_once('/')
            .map_or(("", path), |(parent, name)| (parent, name));
        let whiteout = if parent.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{parent}/.wh.{name}")
        };
        self.file(&whiteout, &[], Meta::mode(0o644))
    }

    /// Appends an opaque marker, so `dir` hides everything lower layers put in it.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), &[], Meta::mode(0o644))
    }

    /// Finishes the tar and compresses it.
    pub fn finish(self, compression: Compression) -> (Vec<u8>, Compression) {
        let tar = self
            .tar
            .into_inner()
            .expect("finishing an in-memory tar cannot fail");
        let bytes = match compression {
            Compression::None => tar,
            Compression::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder
                    .write_all(&tar)
                    .expect("gzip into memory cannot fail");
                encoder.finish().expect("gzip into memory cannot fail")
            }
            Compression::Zstd => {
                zstd::encode_all(&tar[..], 3).expect("zstd into memory cannot fail")
            }
        };
        (bytes, compression)
    }
}

/// An image under construction: layers plus the config's runtime defaults.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    os: String,
    architecture: String,
    docker_media_types: bool,
    layers: Vec<(Vec<u8>, Compression)>,
    runtime: serde_json::Map<String, Value>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// Starts an empty linux/amd64 image with OCI media types.
    pub fn new() -> Self {
        Self {
            os: "linux".to_owned(),
            architecture: "amd64".to_owned(),
            docker_media_types: false,
            layers: Vec::new(),
            runtime: serde_json::Map::new(),
        }
    }

    /// Sets the platform.
    pub fn platform(mut self, os: &str, architecture: &str) -> Self {
        self.os = os.to_owned();
        self.architecture = architecture.to_owned();
        self
    }

    /// Uses Docker schema 2 media types (manifest and gzip layers) instead of OCI ones.
    pub fn docker_media_types(mut self) -> Self {
        self.docker_media_types = true;
        self
    }

    /// Appends a layer.
    pub fn layer(mut self, layer: LayerBuilder, compression: Compression) -> Self {
        self.layers.push(layer.finish(compression));
        self
    }

    /// Sets a runtime config field (`User`, `Entrypoint`, `Cmd`, `Env`, `WorkingDir`,
    /// `ExposedPorts`, `StopSignal`).
    pub fn config(mut self, key: &str, value: Value) -> Self {
        self.runtime.insert(key.to_owned(), value);
        self
    }

    /// Builds the blobs and the manifest.
    pub fn build(self) -> BuiltImage {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (bytes, compression) in self.layers {
            let media_type = match (self.docker_media_types, compression) {
                (true, Compression::Gzip) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
                (_, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
                (_, Compression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
                (_, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            diff_ids.push(sha256(&decompress(&bytes, compression)));
            layers.push(Blob::new(media_type, bytes));
        }

        let config_type = if self.docker_media_types {
            "application/vnd.docker.container.image.v1+json"
        } else {
            "application/vnd.oci.image.config.v1+json"
        };
        let config = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": self.runtime,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = Blob::new(
            config_type,
            serde_json::to_vec(&config).expect("JSON values serialize"),
        );

        let manifest_type = if self.docker_media_types {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(
            manifest_type,
            serde_json::to_vec(&manifest).expect("JSON values serialize"),
        );
        BuiltImage {
            os: self.os,
            architecture: self.architecture,
            manifest,
            config,
            layers,
        }
    }
}

fn decompress(bytes: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => bytes.to_vec(),
        Compression::Gzip => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)
                .expect("own gzip decodes");
            out
        }
        Compression::Zstd => zstd::decode_all(bytes).expect("own zstd decodes"),
    }
}

/// A built single-platform image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Operating system.
    pub os: String,
    /// Architecture.
    pub architecture: String,
    /// The manifest blob; its digest is the image digest.
    pub manifest: Blob,
    /// The config blob.
    pub config: Blob,
    /// The layer blobs, lowest first.
    pub layers: Vec<Blob>,
}

/// A publishable artifact: one image, or an index of several.
#[derive(Debug, Clone)]
pub enum Artifact {
    /// One image.
    Image(BuiltImage),
    /// An index over images of different platforms.
    Index {
        /// The index blob.
        index: Blob,
        /// The images it lists.
        images: Vec<BuiltImage>,
    },
}

impl Artifact {
    /// Builds an index over `images`, each listed with its platform.
    pub fn index(images: Vec<BuiltImage>) -> Self {
        let manifests: Vec<Value> = images
            .iter()
            .map(|image| {
                let mut descriptor = image.manifest.descriptor();
                descriptor["platform"] =
                    json!({"os": image.os, "architecture": image.architecture});
                descriptor
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        let index = Blob::new(
            OCI_INDEX,
            serde_json::to_vec(&index).expect("JSON values serialize"),
        );
        Self::Index { index, images }
    }

    /// Returns the top manifest or index.
    pub fn top(&self) -> &Blob {
        match self {
            Self::Image(image) => &image.manifest,
            Self::Index { index, .. } => index,
        }
    }

    fn images(&self) -> Vec<&BuiltImage> {
        match self {
            Self::Image(image) => vec![image],
            Self::Index { images, .. } => images.iter().collect(),
        }
    }

    /// Returns every blob including manifests, deduplicated, top last.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut seen = BTreeMap::new();
        for image in self.images() {
            for blob in std::iter::once(&image.config)
                .chain(&image.layers)
                .chain(std::iter::once(&image.manifest))
            {
                seen.entry(blob.digest.clone()).or_insert(blob);
            }
        }
        let mut blobs: Vec<&Blob> = seen.into_values().collect();
        if let Self::Index { index, .. } = self {
            blobs.push(index);
        }
        blobs
    }

    /// Pushes the artifact to `registry` (`host:port`, plain HTTP) as `repository:tag`.
    pub async fn push(&self, registry: &str, repository: &str, tag: &str) -> anyhow::Result<()> {
        self.push_as(registry, repository, tag, None).await
    }

    /// Pushes like [`Self::push`], sending basic auth `credentials` (user, password) with
    /// every request.
    pub async fn push_as(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        credentials: Option<(&str, &str)>,
    ) -> anyhow::Result<()> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some((username, password)) = credentials {
            use base64::Engine as _;
            let pair =
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Basic {pair}").parse()?,
            );
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()?;
        let base = format!("http://{registry}/v2/{repository}");
        for image in self.images() {
            for blob in std::iter::once(&image.config).chain(&image.layers) {
                push_blob(&client, registry, &base, blob).await?;
            }
            if matches!(self, Self::Index { .. }) {
                push_manifest(&client, &base, &image.manifest.digest, &image.manifest).await?;
            }
        }
        push_manifest(&client, &base, tag, self.top()).await
    }

    /// Writes the artifact as an `oci-layout` directory at `dir`, tagged `tag`.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) -> anyhow::Result<()> {
        let blobs_dir = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs_dir)
            .with_context(|| format!("failed to create {}", blobs_dir.display()))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        for blob in self.blobs() {
            std::fs::write(blobs_dir.join(hex_of(&blob.digest)), &blob.bytes)?;
        }
        std::fs::write(dir.join("index.json"), self.layout_index(tag))?;
        Ok(())
    }

    /// Writes the artifact as an `oci-archive` tar at `file`, tagged `tag`.
    pub fn write_oci_archive(&self, file: &Path, tag: &str) -> anyhow::Result<()> {
        let output = std::fs::File::create(file)
            .with_context(|| format!("failed to create {}", file.display()))?;
        let mut tar = tar::Builder::new(output);
        let mut append = |path: &str, data: &[u8]| -> anyhow::Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, path, data)?;
            Ok(())
        };
        append("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        append("index.json", &self.layout_index(tag))?;
        for blob in self.blobs() {
            append(
                &format!("blobs/sha256/{}", hex_of(&blob.digest)),
                &blob.bytes,
            )?;
        }
        tar.into_inner()?.sync_all()?;
        Ok(())
    }

    fn layout_index(&self, tag: &str) -> Vec<u8> {
        let mut descriptor = self.top().descriptor();
        descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]});
        serde_json::to_vec(&index).expect("JSON values serialize")
    }
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

async fn push_blob(
    client: &reqwest::Client,
    registry: &str,
    base: &str,
    blob: &Blob,
) -> anyhow::Result<()> {
    let exists = client
        .head(format!("{base}/blobs/{}", blob.digest))
        .send()
        .await?;
    if exists.status().is_success() {
        return Ok(());
    }
    let started = client.post(format!("{base}/blobs/uploads/")).send().await?;
    if started.status() != reqwest::StatusCode::ACCEPTED {
        bail!(
            "starting blob upload to {base} returned {}",
            started.status()
        );
    }
    let location = started
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .context("blob upload response has no Location")?
        .to_owned();
    let location = if location.starts_with("http") {
        location
    } else {
        format!("http://{registry}{location}")
    };
    let separator = if location.contains('?') { '&' } else { '?' };
    let finished = client
        .put(format!("{location}{separator}digest={}", blob.digest))
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(blob.bytes.clone())
        .send()
        .await?;
    if finished.status() != reqwest::StatusCode::CREATED {
        bail!(
            "uploading blob {} returned {}: {}",
            blob.digest,
            finished.status(),
            finished.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

async fn push_manifest(
    client: &reqwest::Client,
    base: &str,
    reference: &str,
    manifest: &Blob,
) -> anyhow::Result<()> {
    let response = client
        .put(format!("{base}/manifests/{reference}"))
        .header(reqwest::header::CONTENT_TYPE, &manifest.media_type)
        .body(manifest.bytes.clone())
        .send()
        .await?;
    if response.status() != reqwest::StatusCode::CREATED {
        bail!(
            "pushing manifest {reference} returned {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    Ok(())
}
