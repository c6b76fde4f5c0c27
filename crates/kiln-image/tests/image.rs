//! Integration tests of kiln-image against a real registry (`docker-registry` on loopback),
//! real `mkfs.ext4`, and `debugfs` to read the built images without mounting them.

// Test helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_image::store::StoreError;
use kiln_image::unpack::UnpackError;
use kiln_image::{Digest, ImageRef, ImageStore, StoreConfig};
use kiln_testkit::oci::{Artifact, Compression, ImageBuilder, LayerBuilder, Meta};
use kiln_testkit::registry::Registry;
use serde_json::json;

/// What `debugfs` reports about one inode.
#[derive(Debug)]
struct Inode {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    links: u32,
    inode: u64,
    text: String,
}

fn debugfs(image: &Path, request: &str) -> String {
    let output = Command::new("/usr/sbin/debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("debugfs runs");
    assert!(
        output.status.success(),
        "debugfs -R {request:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        + name.len();
    text[start..].split_whitespace().next().unwrap()
}

fn stat(image: &Path, path: &str) -> Inode {
    let text = debugfs(image, &format!("stat {path}"));
    assert!(
        text.contains("Inode:"),
        "{path} not found in {}: {text}",
        image.display()
    );
    Inode {
        kind: field(&text, "Type:").to_owned(),
        mode: u32::from_str_radix(field(&text, "Mode:"), 8).unwrap(),
        uid: field(&text, "User:").parse().unwrap(),
        gid: field(&text, "Group:").parse().unwrap(),
        size: field(&text, "Size:").parse().unwrap(),
        links: field(&text, "Links:").parse().unwrap(),
        inode: field(&text, "Inode:").parse().unwrap(),
        text,
    }
}

fn exists(image: &Path, path: &str) -> bool {
    let output = Command::new("/usr/sbin/debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).contains("Inode:")
}

fn cat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("cat {path}"))
}

struct Fixture {
    _temp: tempfile::TempDir,
    store: ImageStore,
    registry: Registry,
    work: PathBuf,
}

fn fixture() -> Fixture {
    let temp = tempfile::Builder::new()
        .prefix("kiln-image-test-")
        .tempdir()
        .unwrap();
    let store = ImageStore::open(&temp.path().join("store"), StoreConfig::default()).unwrap();
    let work = temp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    Fixture {
        _temp: temp,
        store,
        registry: Registry::start().unwrap(),
        work,
    }
}

impl Fixture {
    async fn push(&self, name: &str, artifact: &Artifact) -> ImageRef {
        let repository = self.registry.unique_repository(name);
        artifact
            .push(self.registry.address(), &repository, "v1")
            .await
            .unwrap();
        format!("{}/{repository}:v1", self.registry.address())
            .parse()
            .unwrap()
    }
}

fn base_layer() -> LayerBuilder {
    LayerBuilder::new()
        .dir("etc", Meta::mode(0o755))
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
            Meta::mode(0o644),
        )
        .file(
            "etc/group",
            b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
            Meta::mode(0o644),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_image_becomes_ext4_tree() {
    let fixture = fixture();
    let layer1 = base_layer()
        .dir("usr", Meta::mode(0o755))
        .dir("usr/bin", Meta::mode(0o755))
        .file(
            "usr/bin/tool",
            b"#!/bin/sh\necho tool\n",
            Meta::mode(0o4755),
        )
        .file("usr/bin/group-tool", b"g", Meta::owned(0o2750, 0, 50))
        .symlink("bin", "usr/bin")
        .symlink("absolute-link", "/usr/bin/tool")
        .dir("gone", Meta::mode(0o755))
        .file("gone/file", b"deleted later", Meta::mode(0o644))
        .dir("opaque", Meta::mode(0o755))
        .file("opaque/lower", b"hidden by opaque", Meta::mode(0o644))
        .dir("opaque/lowerdir", Meta::mode(0o755))
        .file("opaque/lowerdir/deep", b"hidden too", Meta::mode(0o644))
        .file(
            "data/shared",
            b"shared content",
            Meta::owned(0o640, 1000, 1000),
        )
        .dir("home", Meta::mode(0o755))
        .dir("home/app", Meta::owned(0o700, 1000, 1000))
        .file_with_xattrs(
            "usr/bin/capable",
            b"cap",
            Meta::mode(0o755),
            &[("user.kiln", b"marked")],
        );
    let layer2 = LayerBuilder::new()
        .whiteout("gone")
        .opaque("opaque")
        .file("opaque/upper", b"visible", Meta::mode(0o600))
        // A hardlink to a lower-layer file whose own parent directory has no entry here.
        .hardlink("links/deep/hard", "data/shared")
        .file(
            "bin/through-symlink",
            b"written via bin -> usr/bin",
            Meta::mode(0o755),
        );
    let layer3 = LayerBuilder::new()
        .file(
            "zstd-file",
            b"from a zstd layer",
            Meta::owned(0o644, 1000, 50),
        )
        .raw(
            tar::EntryType::Fifo,
            b"run/fifo",
            None,
            b"",
            Meta::mode(0o600),
        )
        .raw(
            tar::EntryType::Char,
            b"dev/console",
            None,
            b"",
            Meta::mode(0o620),
        );
    let image = ImageBuilder::new()
        .layer(layer1, Compression::Gzip)
        .layer(layer2, Compression::None)
        .layer(layer3, Compression::Zstd)
        .config("User", json!("app"))
        .config("Entrypoint", json!(["/usr/bin/tool"]))
        .config("Cmd", json!(["serve"]))
        .config("Env", json!(["PATH=/usr/bin", "MODE=test"]))
        .config("WorkingDir", json!("/home/app"))
        .config("ExposedPorts", json!({"8080/tcp": {}}))
        .config("StopSignal", json!("SIGQUIT"))
        .build();
    let expected_digest: Digest = image.manifest.digest.parse().unwrap();
    let reference = fixture.push("tree", &Artifact::Image(image)).await;

    let pulled = fixture.store.pull(&reference).await.unwrap();
    assert_eq!(pulled.digest, expected_digest);
    let rootfs = fixture.store.rootfs(&pulled).await.unwrap();
    let ext4 = &rootfs.path;

    let tool = stat(ext4, "/usr/bin/tool");
    assert_eq!(
        (tool.kind.as_str(), tool.mode, tool.uid, tool.gid),
        ("regular", 0o4755, 0, 0)
    );
    let group_tool = stat(ext4, "/usr/bin/group-tool");
    assert_eq!((group_tool.mode, group_tool.gid), (0o2750, 50));
    assert_eq!(cat(ext4, "/usr/bin/tool"), "#!/bin/sh\necho tool\n");

    assert!(!exists(ext4, "/gone"), "whiteout removes the directory");
    assert!(
        !exists(ext4, "/opaque/lower"),
        "opaque marker hides lower files"
    );
    assert!(
        !exists(ext4, "/opaque/lowerdir"),
        "opaque marker hides lower directories"
    );
    assert_eq!(cat(ext4, "/opaque/upper"), "visible");

    let shared = stat(ext4, "/data/shared");
    let hard = stat(ext4, "/links/deep/hard");
    assert_eq!(
        shared.inode, hard.inode,
        "hardlink across layers shares the inode"
    );
    assert_eq!(shared.links, 2);
    assert_eq!((shared.uid, shared.gid, shared.mode), (1000, 1000, 0o640));
    let implied = stat(ext4, "/links/deep");
    assert_eq!(
        (implied.kind.as_str(), implied.mode, implied.uid),
        ("directory", 0o755, 0)
    );

    let bin = stat(ext4, "/bin");
    assert_eq!(bin.kind, "symlink");
    assert!(bin.text.contains("usr/bin"), "{}", bin.text);
    assert!(stat(ext4, "/absolute-link").text.contains("/usr/bin/tool"));
    assert_eq!(
        cat(ext4, "/usr/bin/through-symlink"),
        "written via bin -> usr/bin"
    );

    let home = stat(ext4, "/home/app");
    assert_eq!((home.mode, home.uid, home.gid), (0o700, 1000, 1000));
    let zstd_file = stat(ext4, "/zstd-file");
    assert_eq!(
        (zstd_file.size, zstd_file.uid, zstd_file.gid),
        (17, 1000, 50)
    );
    assert_eq!(stat(ext4, "/run/fifo").kind, "FIFO");
    let console = stat(ext4, "/dev/console");
    assert_eq!((console.kind.as_str(), console.mode), ("character", 0o620));
    // 1_700_000_000 seconds, as the builder stamps every entry; directories keep theirs too
    // although later entries were created inside them.
    assert!(tool.text.contains("mtime: 0x6553f100"), "{}", tool.text);
    assert!(home.text.contains("mtime: 0x6553f100"), "{}", home.text);
    assert!(stat(ext4, "/usr/bin").text.contains("mtime: 0x6553f100"));
    let xattrs = debugfs(ext4, "ea_list /usr/bin/capable");
    assert!(
        xattrs.contains("user.kiln") && xattrs.contains("marked"),
        "{xattrs}"
    );

    let config = &rootfs.image_config;
    assert_eq!((config.user.uid, config.user.gid), (1000, 1000));
    assert_eq!(config.user.additional_gids, [50]);
    assert_eq!(config.entrypoint, ["/usr/bin/tool"]);
    assert_eq!(config.cmd, ["serve"]);
    assert_eq!(config.env, ["PATH=/usr/bin", "MODE=test"]);
    assert_eq!(config.working_dir, "/home/app");
    assert_eq!(config.exposed_ports[0].port, 8080);
    assert_eq!(config.stop_signal.as_deref(), Some("SIGQUIT"));

    let metadata = std::fs::metadata(ext4).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o777,
        0o444
    );
    let fsck = Command::new("/usr/sbin/e2fsck")
        .args(["-fn"])
        .arg(ext4)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_rootfs_is_reused_and_built_once() {
    let fixture = fixture();
    let image = ImageBuilder::new()
        .layer(
            base_layer().file("app", b"x", Meta::mode(0o755)),
            Compression::Gzip,
        )
        .config("Cmd", json!(["/app"]))
        .build();
    let reference = fixture.push("cache", &Artifact::Image(image)).await;
    let pulled = fixture.store.pull(&reference).await.unwrap();

    // Without the per-digest lock the second build would fail renaming onto the first one's
    // non-empty cache directory, so both succeeding with one inode means one build.
    let (first, second) =
        tokio::join!(fixture.store.rootfs(&pulled), fixture.store.rootfs(&pulled));
    let (first, second) = (first.unwrap(), second.unwrap());
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &Path| std::fs::metadata(path).unwrap().ino();
    assert_eq!(first.path, second.path);
    assert_eq!(inode(&first.path), inode(&second.path));

    let again = fixture.store.rootfs(&pulled).await.unwrap();
    assert_eq!(
        inode(&again.path),
        inode(&first.path),
        "a cached digest is not rebuilt"
    );
    let leftovers: Vec<_> = std::fs::read_dir(fixture.store.root().join("tmp"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "build left {leftovers:?} in tmp");

    let cached = fixture
        .store
        .cached_rootfs(&pulled.digest)
        .unwrap()
        .unwrap();
    assert_eq!(cached.path, first.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_selects_host_platform() {
    let fixture = fixture();
    let amd64 = ImageBuilder::new().layer(
        LayerBuilder::new().file("arch", b"amd64", Meta::mode(0o644)),
        Compression::Gzip,
    );
    let arm64 = ImageBuilder::new().platform("linux", "arm64").layer(
        LayerBuilder::new().file("arch", b"arm64", Meta::mode(0o644)),
        Compression::Gzip,
    );
    let amd64 = amd64.build();
    let amd64_digest: Digest = amd64.manifest.digest.parse().unwrap();
    let index = Artifact::index(vec![arm64.clone().build(), amd64]);
    let index_digest: Digest = index.top().digest.parse().unwrap();
    let reference = fixture.push("index", &index).await;

    let pulled = fixture.store.pull(&reference).await.unwrap();
    assert_eq!(pulled.digest, amd64_digest);
    assert_eq!(pulled.index_digest, Some(index_digest));
    let rootfs = fixture.store.rootfs(&pulled).await.unwrap();
    assert_eq!(cat(&rootfs.path, "/arch"), "amd64");

    let arm_only = Artifact::index(vec![arm64.build()]);
    let reference = fixture.push("arm-only", &arm_only).await;
    let error = fixture.store.pull(&reference).await.unwrap_err();
    assert!(
        matches!(error, StoreError::PlatformMissing { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("linux/arm64"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_and_tiny_image() {
    let fixture = fixture();
    let image = ImageBuilder::new()
        .docker_media_types()
        .layer(
            LayerBuilder::new().file("a", b"1", Meta::mode(0o644)),
            Compression::Gzip,
        )
        .build();
    let reference = fixture.push("docker", &Artifact::Image(image)).await;
    let rootfs = fixture.store.pull_rootfs(&reference).await.unwrap();
    assert_eq!(cat(&rootfs.path, "/a"), "1");
    assert_eq!(rootfs.image_config.user.uid, 0, "no USER means root");
    assert_eq!(rootfs.image_config.working_dir, "/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_layout_and_archive_sources() {
    let fixture = fixture();
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new().file("local", b"air-gapped", Meta::mode(0o644)),
            Compression::Zstd,
        )
        .build();
    let artifact = Artifact::Image(image);

    let layout = fixture.work.join("layout");
    artifact.write_oci_layout(&layout, "v3").unwrap();
    let reference: ImageRef = format!("oci-layout:{}:v3", layout.display())
        .parse()
        .unwrap();
    let rootfs = fixture.store.pull_rootfs(&reference).await.unwrap();
    assert_eq!(cat(&rootfs.path, "/local"), "air-gapped");

    let missing_tag: ImageRef = format!("oci-layout:{}:nope", layout.display())
        .parse()
        .unwrap();
    let error = fixture.store.pull(&missing_tag).await.unwrap_err();
    assert!(
        error.to_string().contains("nope") || format!("{:?}", error).contains("TagNotFound"),
        "{error:?}"
    );

    let archive = fixture.work.join("image.tar");
    artifact.write_oci_archive(&archive, "v3").unwrap();
    let other_store =
        ImageStore::open(&fixture.work.join("store2"), StoreConfig::default()).unwrap();
    let reference: ImageRef = format!("oci-archive:{}", archive.display())
        .parse()
        .unwrap();
    let rootfs = other_store.pull_rootfs(&reference).await.unwrap();
    assert_eq!(cat(&rootfs.path, "/local"), "air-gapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_never_enters_cache() {
    let fixture = fixture();
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new().file("f", b"good", Meta::mode(0o644)),
            Compression::None,
        )
        .build();
    let layer_digest = image.layers[0].digest.clone();
    let layout = fixture.work.join("corrupt");
    Artifact::Image(image)
        .write_oci_layout(&layout, "v1")
        .unwrap();
    let blob_path = layout
        .join("blobs/sha256")
        .join(layer_digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob_path).unwrap();
    let last = bytes.len() - 600;
    bytes[last] ^= 0xff;
    std::fs::write(&blob_path, bytes).unwrap();

    let reference: ImageRef = format!("oci-layout:{}", layout.display()).parse().unwrap();
    let error = fixture.store.pull(&reference).await.unwrap_err();
    let chain = format!("{:?}", error);
    assert!(chain.contains("DigestMismatch"), "{chain}");
    let digest: Digest = layer_digest.parse().unwrap();
    assert!(
        !fixture.store.blobs().contains(&digest, None),
        "the corrupt blob is not cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_fails_rootfs() {
    let fixture = fixture();
    let image = ImageBuilder::new()
        .layer(base_layer(), Compression::Gzip)
        .config("User", json!("ghost"))
        .build();
    let reference = fixture.push("ghost", &Artifact::Image(image)).await;
    let error = fixture.store.pull_rootfs(&reference).await.unwrap_err();
    let message = format!("{:#}", anyhow_chain(&error));
    assert!(
        message.contains("\"ghost\" is not in the image's /etc/passwd"),
        "{message}"
    );
}

fn anyhow_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Builds `layers` into an oci-layout, unpacks it into `work/root`, and returns the result
/// and the path of a sentinel directory beside the root that no entry may touch.
async fn unpack_hostile(
    fixture: &Fixture,
    name: &str,
    layers: Vec<LayerBuilder>,
) -> (Result<(), StoreError>, PathBuf, Vec<String>) {
    let mut builder = ImageBuilder::new();
    for layer in layers {
        builder = builder.layer(layer, Compression::None);
    }
    let image = builder.build();
    let digests = image
        .layers
        .iter()
        .map(|layer| layer.digest.clone())
        .collect();
    let case = fixture.work.join(name);
    let outside = case.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"original").unwrap();
    let layout = case.join("layout");
    Artifact::Image(image)
        .write_oci_layout(&layout, "v1")
        .unwrap();
    let root = case.join("a/b/root");
    std::fs::create_dir_all(&root).unwrap();

    let reference: ImageRef = format!("oci-layout:{}", layout.display()).parse().unwrap();
    let pulled = fixture.store.pull(&reference).await.unwrap();
    let result = fixture.store.unpack(&pulled, &root).await.map(drop);
    (result, outside, digests)
}

fn assert_rejected(result: Result<(), StoreError>, layer: &str, entry: &str) {
    let error = result.expect_err("hostile image was accepted");
    let StoreError::Unpack { source, .. } = &error else {
        panic!("unexpected error {error:?}")
    };
    match source {
        UnpackError::Unsafe {
            layer: found_layer,
            entry: found_entry,
            ..
        } => {
            assert_eq!(found_layer.to_string(), layer);
            assert_eq!(found_entry, entry);
        }
        other => panic!("expected an unsafe-entry error for {entry}, got {other:?}"),
    }
    let message = anyhow_chain(&error);
    assert!(
        message.contains(layer) && message.contains(entry),
        "{message}"
    );
}

fn assert_outside_untouched(outside: &Path) {
    let names: Vec<_> = std::fs::read_dir(outside)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, ["victim"], "something was written beside the root");
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"original");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_are_rejected() {
    let fixture = fixture();
    let file = tar::EntryType::Regular;
    let link = tar::EntryType::Link;
    let data = b"pwned";
    let meta = Meta::mode(0o644);

    let cases: Vec<(&str, Vec<LayerBuilder>, usize, &str)> = vec![
        (
            "dotdot",
            vec![LayerBuilder::new().raw(file, b"../../../outside/new", None, data, meta)],
            0,
            "../../../outside/new",
        ),
        (
            "absolute",
            vec![LayerBuilder::new().raw(file, b"/tmp/kiln-absolute", None, data, meta)],
            0,
            "/tmp/kiln-absolute",
        ),
        (
            "relative-symlink",
            vec![
                LayerBuilder::new()
                    .symlink("up", "../../../outside")
                    .raw(file, b"up/new", None, data, meta),
            ],
            0,
            "up/new",
        ),
        (
            "absolute-symlink",
            vec![LayerBuilder::new().symlink("abs", "/").raw(
                file,
                b"abs/tmp/kiln-abs",
                None,
                data,
                meta,
            )],
            0,
            "abs/tmp/kiln-abs",
        ),
        (
            "symlink-from-lower-layer",
            vec![
                LayerBuilder::new()
                    .dir("d", Meta::mode(0o755))
                    .symlink("d/up", "../../../../outside"),
                LayerBuilder::new().raw(file, b"d/up/victim", None, data, meta),
            ],
            1,
            "d/up/victim",
        ),
        (
            "hardlink-dotdot",
            vec![LayerBuilder::new().raw(
                link,
                b"stolen",
                Some(b"../../../outside/victim"),
                b"",
                meta,
            )],
            0,
            "stolen",
        ),
        (
            "hardlink-through-symlink",
            vec![
                LayerBuilder::new().symlink("out", "../../../outside"),
                LayerBuilder::new().raw(link, b"stolen", Some(b"out/victim"), b"", meta),
            ],
            1,
            "stolen",
        ),
        (
            "hardlink-to-directory",
            vec![
                LayerBuilder::new()
                    .dir("d", Meta::mode(0o755))
                    .hardlink("d2", "d"),
            ],
            0,
            "d2",
        ),
        (
            "hardlink-to-missing",
            vec![LayerBuilder::new().hardlink("dangling", "no/such/file")],
            0,
            "dangling",
        ),
        (
            "whiteout-through-symlink",
            vec![
                LayerBuilder::new().symlink("out", "../../../outside"),
                LayerBuilder::new().whiteout("out/victim"),
            ],
            1,
            "out/.wh.victim",
        ),
    ];

    for (name, layers, bad_layer, entry) in cases {
        let (result, outside, digests) = unpack_hostile(&fixture, name, layers).await;
        assert_rejected(result, &digests[bad_layer], entry);
        assert_outside_untouched(&outside);
    }
    assert!(!Path::new("/tmp/kiln-absolute").exists());
    assert!(!Path::new("/tmp/kiln-abs").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_symlink_is_replaced_not_followed() {
    let fixture = fixture();
    let layers = vec![
        LayerBuilder::new().symlink("f", "../../../outside/victim"),
        LayerBuilder::new().file("f", b"replaced", Meta::mode(0o644)),
    ];
    let (result, outside, _) = unpack_hostile(&fixture, "final-symlink", layers).await;
    result.unwrap();
    assert_outside_untouched(&outside);
    let root = outside.parent().unwrap().join("a/b/root");
    assert_eq!(std::fs::read(root.join("f")).unwrap(), b"replaced");
    assert!(
        !std::fs::symlink_metadata(root.join("f"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_pinned_images() {
    let fixture = fixture();
    let mut pulled = Vec::new();
    for name in ["one", "two"] {
        let image = ImageBuilder::new()
            .layer(
                LayerBuilder::new().file(name, name.as_bytes(), Meta::mode(0o644)),
                Compression::Gzip,
            )
            .build();
        let reference = fixture.push(name, &Artifact::Image(image)).await;
        let image = fixture.store.pull(&reference).await.unwrap();
        fixture.store.rootfs(&image).await.unwrap();
        pulled.push(image);
    }
    let instance = kiln_core::InstanceId::new();
    fixture.store.pin(&pulled[1].digest, instance).unwrap();

    let report = fixture.store.gc(0).unwrap();
    assert_eq!(report.removed_images, [pulled[0].digest.clone()]);
    assert_eq!(report.pinned_images, [pulled[1].digest.clone()]);
    assert!(
        fixture
            .store
            .cached_rootfs(&pulled[0].digest)
            .unwrap()
            .is_none()
    );
    assert!(
        !fixture
            .store
            .blobs()
            .contains(&pulled[0].layers[0].digest, None),
        "unused layer removed"
    );
    assert!(
        fixture
            .store
            .cached_rootfs(&pulled[1].digest)
            .unwrap()
            .is_some()
    );
    assert!(
        fixture
            .store
            .blobs()
            .contains(&pulled[1].layers[0].digest, None)
    );

    fixture.store.unpin(&pulled[1].digest, instance).unwrap();
    let report = fixture.store.gc(0).unwrap();
    assert_eq!(report.removed_images, [pulled[1].digest.clone()]);
    assert_eq!(report.bytes_after, 0);
    assert!(fixture.store.images().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_multi_layer_image() {
    let fixture = fixture();
    // Several hundred MB over four layers: pseudo-random data (incompressible, like binaries
    // and media) in files of varied sizes, plus many small files.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |length: usize| -> Vec<u8> {
        let mut bytes = Vec::with_capacity(length);
        while bytes.len() < length {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        bytes.truncate(length);
        bytes
    };
    let mut builder = ImageBuilder::new();
    let mut expected_bytes = 0;
    for layer_index in 0..4 {
        let mut layer = LayerBuilder::new().dir(&format!("layer{layer_index}"), Meta::mode(0o755));
        for file_index in 0..8 {
            let size = 9 * 1024 * 1024 + file_index * 4097;
            expected_bytes += size;
            layer = layer.file(
                &format!("layer{layer_index}/big{file_index}"),
                &noise(size),
                Meta::mode(0o644),
            );
        }
        for small in 0..500 {
            layer = layer.file(
                &format!("layer{layer_index}/small/{small}"),
                &noise(300),
                Meta::mode(0o644),
            );
            expected_bytes += 300;
        }
        builder = builder.layer(layer, Compression::None);
    }
    let reference = fixture
        .push("large", &Artifact::Image(builder.build()))
        .await;

    let image = fixture.store.pull(&reference).await.unwrap();
    assert!(
        image.layers_size() > 290 * 1024 * 1024,
        "{}",
        image.layers_size()
    );
    let rootfs = fixture.store.rootfs(&image).await.unwrap();
    assert_eq!(
        stat(&rootfs.path, "/layer3/big7").size,
        9 * 1024 * 1024 + 7 * 4097
    );
    assert!(rootfs.size_bytes as usize > expected_bytes);
    assert!(
        (rootfs.size_bytes as usize) < expected_bytes + expected_bytes / 5 + 64 * 1024 * 1024,
        "sized from content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry() {
    let temp = tempfile::Builder::new()
        .prefix("kiln-image-test-")
        .tempdir()
        .unwrap();
    let registry = Registry::start_with_basic_auth("deployer", "s3cret").unwrap();
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new().file("private", b"members only", Meta::mode(0o644)),
            Compression::Gzip,
        )
        .build();
    let repository = registry.unique_repository("auth");
    Artifact::Image(image)
        .push_as(
            registry.address(),
            &repository,
            "v1",
            Some(("deployer", "s3cret")),
        )
        .await
        .unwrap();
    let reference: ImageRef = format!("{}/{repository}:v1", registry.address())
        .parse()
        .unwrap();

    let anonymous =
        ImageStore::open(&temp.path().join("anonymous"), StoreConfig::default()).unwrap();
    let error = anonymous.pull(&reference).await.unwrap_err();
    let message = anyhow_chain(&error);
    assert!(message.contains("requires authentication"), "{message}");
    assert!(
        message.contains(&format!("registry {}", registry.address())),
        "{message}"
    );

    let with_password = |password: &str| {
        let settings = json!({"registries": [{"host": registry.address(), "username": "deployer", "password": password}]});
        let mut config: StoreConfig = serde_json::from_value(settings).unwrap();
        config.validate().unwrap();
        config
    };
    let wrong = ImageStore::open(&temp.path().join("wrong"), with_password("guess")).unwrap();
    let error = wrong.pull(&reference).await.unwrap_err();
    assert!(
        anyhow_chain(&error).contains("requires authentication"),
        "{error:?}"
    );
    assert!(
        !format!("{error:?}").contains("guess"),
        "the password never appears in errors"
    );

    let store = ImageStore::open(&temp.path().join("store"), with_password("s3cret")).unwrap();
    let rootfs = store.pull_rootfs(&reference).await.unwrap();
    assert_eq!(cat(&rootfs.path, "/private"), "members only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_digest_reference() {
    let fixture = fixture();
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new().file("pinned", b"by digest", Meta::mode(0o644)),
            Compression::Gzip,
        )
        .build();
    let digest = image.manifest.digest.clone();
    let repository = fixture.registry.unique_repository("digest");
    Artifact::Image(image)
        .push(fixture.registry.address(), &repository, "v1")
        .await
        .unwrap();

    let reference: ImageRef = format!("{}/{repository}@{digest}", fixture.registry.address())
        .parse()
        .unwrap();
    let rootfs = fixture.store.pull_rootfs(&reference).await.unwrap();
    assert_eq!(rootfs.digest.to_string(), digest);
    assert_eq!(cat(&rootfs.path, "/pinned"), "by digest");

    let unknown = format!("sha256:{}", "0".repeat(64));
    let reference: ImageRef = format!("{}/{repository}@{unknown}", fixture.registry.address())
        .parse()
        .unwrap();
    let error = fixture.store.pull(&reference).await.unwrap_err();
    let message = anyhow_chain(&error);
    assert!(message.contains("404"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_written_archive_is_read() {
    let fixture = fixture();
    let image = ImageBuilder::new()
        .layer(base_layer(), Compression::Gzip)
        .layer(
            LayerBuilder::new().file("from-skopeo", b"interop", Meta::mode(0o644)),
            Compression::Zstd,
        )
        .config("User", json!("app"))
        .build();
    let layout = fixture.work.join("layout");
    Artifact::Image(image)
        .write_oci_layout(&layout, "v1")
        .unwrap();

    // skopeo (a real, independent implementation) repacks our layout as an oci-archive.
    let archive = fixture.work.join("skopeo.tar");
    let output = Command::new("/usr/bin/skopeo")
        .arg("copy")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("oci-archive:{}:v1", archive.display()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let reference: ImageRef = format!("oci-archive:{}:v1", archive.display())
        .parse()
        .unwrap();
    let rootfs = fixture.store.pull_rootfs(&reference).await.unwrap();
    assert_eq!(cat(&rootfs.path, "/from-skopeo"), "interop");
    assert_eq!(rootfs.image_config.user.uid, 1000);
}

/// Opens a store with small unpack limits and unpacks a one-layer image from an OCI layout.
async fn unpack_limited(
    layer: LayerBuilder,
    name: &str,
) -> (Result<(), StoreError>, tempfile::TempDir) {
    let temp = tempfile::Builder::new()
        .prefix("kiln-image-limits-")
        .tempdir()
        .unwrap();
    let config: StoreConfig = serde_json::from_value(json!({
        "max_unpacked_bytes": 1024 * 1024,
        "max_unpacked_entries": 50,
    }))
    .unwrap();
    let store = ImageStore::open(&temp.path().join("store"), config).unwrap();
    let layout = temp.path().join(format!("{name}-layout"));
    Artifact::Image(ImageBuilder::new().layer(layer, Compression::Gzip).build())
        .write_oci_layout(&layout, "v1")
        .unwrap();
    let reference: ImageRef = format!("oci-layout:{}", layout.display()).parse().unwrap();
    let pulled = store.pull(&reference).await.unwrap();
    let root = temp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let result = store.unpack(&pulled, &root).await.map(drop);
    (result, temp)
}

fn assert_too_large(result: Result<(), StoreError>, setting: &str, limit: u64) {
    let error = result.expect_err("an image over the limit was unpacked");
    let StoreError::Unpack { source, .. } = &error else {
        panic!("unexpected error {error:?}")
    };
    let UnpackError::TooLarge {
        setting: found,
        limit: found_limit,
        ..
    } = source
    else {
        panic!("expected a too-large error, got {source:?}")
    };
    assert_eq!((*found, *found_limit), (setting, limit));
    let message = anyhow_chain(&error);
    assert!(message.contains(setting), "{message}");
    assert!(message.contains(&limit.to_string()), "{message}");
}

#[tokio::test]
async fn decompression_bomb_stops_at_byte_limit() {
    // 4 MiB of zeros gzip to a few KiB: a small blob that unpacks to four times the limit.
    let zeros = vec![0u8; 4 * 1024 * 1024];
    let layer = LayerBuilder::new()
        .file("small", b"fits", Meta::mode(0o644))
        .file("zeros", &zeros, Meta::mode(0o644));
    let (result, temp) = unpack_limited(layer, "bomb").await;
    let root = temp.path().join("root");
    assert_too_large(result, "max_unpacked_bytes", 1024 * 1024);
    // The entry that would cross the limit is refused before anything of it is written.
    assert!(root.join("small").exists());
    assert!(!root.join("zeros").exists());
}

#[tokio::test]
async fn many_entries_stop_at_entry_limit() {
    let mut layer = LayerBuilder::new();
    for index in 0..80 {
        layer = layer.file(&format!("f{index}"), b"", Meta::mode(0o644));
    }
    let (result, temp) = unpack_limited(layer, "entries").await;
    let root = temp.path().join("root");
    assert_too_large(result, "max_unpacked_entries", 50);
    assert!(root.join("f49").exists());
    assert!(!root.join("f50").exists());
}
