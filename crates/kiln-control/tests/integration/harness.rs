//! Test harness: a bootstrapped control plane on a fresh database, served on an ephemeral
//! loopback port, and a log capture for checking what reaches log lines.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kiln_api::Client;
use kiln_control::api::{ApiLimits, AppState};
use kiln_control::secrets::Keyring;
use kiln_control::store::Store;
use kiln_control::store::watch::Notifier;
use kiln_core::OrgName;

/// Everything the server logged in this test process.
pub(crate) fn captured_logs() -> String {
    let buffer = log_buffer().lock().unwrap();
    String::from_utf8_lossy(&buffer).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

#[derive(Clone)]
struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        log_buffer().lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_writer(|| CaptureWriter)
            .with_ansi(false)
            .try_init();
    });
}

/// A fresh database with the schema applied.
pub(crate) async fn store() -> (Store, kiln_testkit::postgres::TestDatabase) {
    let database = tokio::task::spawn_blocking(kiln_testkit::postgres::database)
        .await
        .unwrap()
        .unwrap();
    let store = Store::connect(&database.url, 40).await.unwrap();
    store.migrate().await.unwrap();
    (store, database)
}

/// A running control plane.
pub(crate) struct TestServer {
    pub(crate) base_url: String,
    pub(crate) store: Store,
    pub(crate) database: kiln_testkit::postgres::TestDatabase,
    pub(crate) org: OrgName,
    pub(crate) org_token: String,
    pub(crate) operator_token: String,
    pub(crate) key_file: std::path::PathBuf,
    _key_dir: tempfile::TempDir,
}

impl TestServer {
    pub(crate) async fn start() -> TestServer {
        init_logging();
        let (store, database) = store().await;
        let org = OrgName::new("acme").unwrap();
        let output = kiln_control::bootstrap::bootstrap(
            &store,
            &org,
            "apps.kiln.test",
            Some("fd12:3456:789a::/48"),
        )
        .await
        .unwrap();

        let key_dir = tempfile::tempdir().unwrap();
        let key_file = key_dir.path().join("master.key");
        Keyring::generate_key(&key_file).unwrap();
        let keyring = Keyring::load(&key_file).unwrap();
        let settings = kiln_control::bootstrap::load_settings(&store)
            .await
            .unwrap()
            .unwrap();

        let state = AppState {
            store: store.clone(),
            keyring: Arc::new(keyring),
            notifier: Notifier::start(&store).await.unwrap(),
            settings: Arc::new(settings),
            limits: Arc::new(ApiLimits {
                host_lease: Duration::from_secs(30),
                log_window_lines: 100,
            }),
            release_specs: Arc::default(),
        };
        let app = kiln_control::api::router(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });

        TestServer {
            base_url: format!("http://{address}"),
            store,
            database,
            org,
            org_token: output.org_token.secret,
            operator_token: output.operator_token.secret,
            key_file,
            _key_dir: key_dir,
        }
    }

    pub(crate) fn client(&self, token: &str) -> Client {
        Client::new(&self.base_url, token).unwrap()
    }

    pub(crate) fn org_client(&self) -> Client {
        self.client(&self.org_token)
    }

    pub(crate) fn operator(&self) -> Client {
        self.client(&self.operator_token)
    }

    /// Creates another org and returns its name and admin token.
    pub(crate) async fn other_org(&self, name: &str) -> (OrgName, String) {
        let org = OrgName::new(name).unwrap();
        let created = self
            .operator()
            .create_org(&kiln_api::types::CreateOrg { name: org.clone() })
            .await
            .unwrap();
        let mut tx = self.store.begin().await.unwrap();
        let token = kiln_control::api::tokens::issue(
            &mut tx,
            &kiln_control::store::streams::org(created.id),
            kiln_api::types::TokenKind::Org,
            Some(created.id),
            None,
            "test",
            None,
            "system:test",
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        (org, token.secret)
    }

    /// Sends a raw request and returns the status and the body as JSON (or null).
    pub(crate) async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, serde_json::Value) {
        let http = reqwest::Client::new();
        let mut request = http.request(method.parse().unwrap(), format!("{}{path}", self.base_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }
}

/// A minimal valid release spec with one `web` process and one TLS service.
pub(crate) fn release_spec() -> kiln_api::types::ReleaseSpec {
    serde_json::from_value(serde_json::json!({
        "processes": {"web": {"command": ["/bin/server"], "count": 2, "vcpus": 1, "memory_mib": 256}},
        "services": [{"name": "http", "process": "web", "internal_port": 8080, "protocol": "tls"}],
        "env": {"MODE": "production"}
    }))
    .unwrap()
}

/// An image pinned by a syntactically valid digest.
pub(crate) fn image() -> kiln_api::types::ImageRef {
    kiln_api::types::ImageRef {
        reference: "registry.test/acme/web:1".to_owned(),
        digest: format!("sha256:{}", "ab".repeat(32)),
    }
}

/// Names used by most tests.
pub(crate) fn env_path(org: &OrgName) -> kiln_api::client::EnvPath {
    kiln_api::client::EnvPath::new(
        org.clone(),
        kiln_core::AppName::new("web").unwrap(),
        kiln_core::EnvName::new("prod").unwrap(),
    )
}

/// Creates a release of `spec` in `web/prod` of the server's org.
pub(crate) async fn create_release(
    server: &TestServer,
    spec: kiln_api::types::ReleaseSpec,
) -> kiln_api::types::Release {
    server
        .org_client()
        .create_release(
            &env_path(&server.org),
            &kiln_api::types::CreateRelease {
                image: image(),
                spec,
                description: String::new(),
            },
        )
        .await
        .unwrap()
}

/// Creates app `web` and environment `prod` in the server's org.
pub(crate) async fn create_app_and_env(server: &TestServer) -> kiln_api::types::Env {
    let client = server.org_client();
    client
        .create_app(
            &server.org,
            &kiln_api::types::CreateApp {
                name: kiln_core::AppName::new("web").unwrap(),
            },
        )
        .await
        .unwrap();
    client
        .create_env(
            &server.org,
            &kiln_core::AppName::new("web").unwrap(),
            &kiln_api::types::CreateEnv {
                name: kiln_core::EnvName::new("prod").unwrap(),
            },
        )
        .await
        .unwrap()
}
