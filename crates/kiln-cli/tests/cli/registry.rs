//! A real OCI registry for resolution tests: `KILN_TEST_REGISTRY` when the runner provides
//! one, otherwise a private Debian `docker-registry` on a loopback port, stopped on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long a private registry may take to return 200 for `GET /v2/` after it starts.
const REGISTRY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A registry reachable at `addr` (`127.0.0.1:PORT`).
pub(crate) struct Registry {
    pub(crate) addr: String,
    child: Option<Child>,
    _storage: Option<tempfile::TempDir>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Registry {
    /// Uses `KILN_TEST_REGISTRY` or starts a private registry.
    pub(crate) fn start() -> Self {
        if let Ok(addr) = std::env::var("KILN_TEST_REGISTRY")
            && !addr.is_empty()
        {
            return Self {
                addr,
                child: None,
                _storage: None,
            };
        }

        let storage = tempfile::Builder::new()
            .prefix("kiln-cli-registry-")
            .tempdir()
            .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = storage.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/bin/docker-registry (Debian package docker-registry)");
        let registry = Self {
            addr,
            child: Some(child),
            _storage: Some(storage),
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let runtime = runtime();
        let url = format!("http://{}/v2/", self.addr);
        let deadline = Instant::now() + REGISTRY_START_TIMEOUT;
        loop {
            let ready = runtime.block_on(async {
                reqwest::get(&url)
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "registry at {} not ready within {REGISTRY_START_TIMEOUT:?}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pushes a one-layer OCI image as `repository:tag` and returns its manifest digest.
    pub(crate) fn push_image(&self, repository: &str, tag: &str, layer: &[u8]) -> String {
        let runtime = runtime();
        runtime.block_on(async {
            let client = reqwest::Client::new();
            let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
            let config_digest = self.push_blob(&client, repository, config).await;
            let layer_digest = self.push_blob(&client, repository, layer).await;
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": config.len(),
                },
                "layers": [{
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": layer.len(),
                }],
            });
            let body = serde_json::to_vec(&manifest).unwrap();
            let response = client
                .put(format!("http://{}/v2/{repository}/manifests/{tag}", self.addr))
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success(), "manifest push: {}", response.status());
            digest_of(&body)
        })
    }

    async fn push_blob(&self, client: &reqwest::Client, repository: &str, blob: &[u8]) -> String {
        let digest = digest_of(blob);
        let response = client
            .post(format!(
                "http://{}/v2/{repository}/blobs/uploads/",
                self.addr
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202, "blob upload start");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let url = if location.starts_with("http") {
            location
        } else {
            format!("http://{}{location}", self.addr)
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        let response = client
            .put(format!("{url}{separator}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(blob.to_vec())
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "blob upload: {}",
            response.status()
        );
        digest
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Returns a repository name no other test uses.
pub(crate) fn unique_repository(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
