//! Event-log benchmark: appends per second with projection updates, through the store and
//! through the HTTP API, against `pgbench` single-row inserts on the same private PostgreSQL
//! cluster with the same number of clients, measured in the same run.
//!
//! Each append is a `ConfigChanged` event on the client's own environment stream, so the
//! projection work per append is one `config_vars` upsert and one `envs` update. The anchor
//! is a `pgbench` custom script inserting one row per transaction into an indexed table.
//!
//! Two more phases show where the gap to the anchor lies. `pgbench` sends the store's append
//! statement itself (`kiln_append` with a `ConfigChanged` event), which is the server's share
//! of a store append without the Rust client. `GET /v1/whoami` through the same HTTP client is
//! the API path's fixed cost: a request, its token lookup and a response.
//!
//! Settings come from the environment: `BENCH_CLIENTS` (default 4), `BENCH_SECONDS` per phase
//! (default 10) and `BENCH_ROUNDS` (default 3). Each round runs the phases in turn, and the
//! printed rates are the means over the rounds.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_api::Event;
use kiln_control::api::{ApiLimits, AppState};
use kiln_control::secrets::Keyring;
use kiln_control::store::watch::Notifier;
use kiln_control::store::{ExpectedVersion, NewEvent, Store, streams};
use kiln_core::{AppName, EnvId, EnvName, OrgName};
use kiln_testkit::postgres::PgCluster;

fn setting(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("invalid {name} {value:?}: expected a whole number")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clients = setting("BENCH_CLIENTS", 4)? as usize;
    let seconds = setting("BENCH_SECONDS", 10)?;
    let rounds = setting("BENCH_ROUNDS", 3)?.max(1);
    let duration = Duration::from_secs(seconds);
    let cluster = PgCluster::shared()?;

    let pgbench = Pgbench::prepare(cluster, clients, seconds)?;
    let target = prepare(cluster, clients).await?;
    let statement = Pgbench::append_statement(cluster, &target, clients, seconds).await?;
    let (store, envs) = (target.store, target.envs);
    let api = ApiTarget::start(cluster, clients).await?;

    // The phases alternate round by round, so a change in machine load hits all three paths
    // alike instead of one whole phase.
    let load_before = load_average();
    let (mut pgbench_sum, mut store_sum, mut api_sum) = (0.0, 0.0, 0.0);
    let (mut statement_sum, mut whoami_sum) = (0.0, 0.0);
    for round in 1..=rounds {
        let pgbench_tps = pgbench.run()?;
        let store_rate = run_store(&store, &envs, duration).await?;
        let api_rate = api.run(duration).await?;
        let statement_tps = statement.run()?;
        let whoami_rate = api.run_whoami(duration).await?;
        println!(
            "round {round}: pgbench {pgbench_tps:.0}/s, store {store_rate:.0}/s (ratio {:.2}), API {api_rate:.0}/s (ratio {:.2}), append statement {statement_tps:.0}/s, whoami {whoami_rate:.0}/s",
            store_rate / pgbench_tps,
            api_rate / pgbench_tps
        );
        pgbench_sum += pgbench_tps;
        store_sum += store_rate;
        api_sum += api_rate;
        statement_sum += statement_tps;
        whoami_sum += whoami_rate;
    }
    let load_after = load_average();
    let count = rounds as f64;
    let (pgbench_tps, store_rate, api_rate) =
        (pgbench_sum / count, store_sum / count, api_sum / count);
    let (statement_tps, whoami_rate) = (statement_sum / count, whoami_sum / count);

    println!("clients: {clients}, seconds per phase: {seconds}, rounds: {rounds}");
    println!("load average (1 min) before and after: {load_before} / {load_after}");
    println!("pgbench single-row inserts: {pgbench_tps:.0} per second");
    println!(
        "store appends:              {store_rate:.0} per second (ratio {:.2}, target 0.50)",
        store_rate / pgbench_tps
    );
    println!(
        "HTTP API appends:           {api_rate:.0} per second (ratio {:.2}, target 0.25)",
        api_rate / pgbench_tps
    );
    println!(
        "append statement (pgbench): {statement_tps:.0} per second (ratio {:.2}): the server's share of a store append",
        statement_tps / pgbench_tps
    );
    println!(
        "GET /v1/whoami:             {whoami_rate:.0} per second (ratio {:.2}): the API path's fixed cost",
        whoami_rate / pgbench_tps
    );
    Ok(())
}

/// Returns the 1-minute load average from `/proc/loadavg`, or `unknown`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The `pgbench` anchor: a table with a `jsonb` column and a script inserting one row.
struct Pgbench {
    command: PathBuf,
    args: Vec<OsString>,
    _script: tempfile::NamedTempFile,
}

impl Pgbench {
    fn prepare(cluster: &PgCluster, clients: usize, seconds: u64) -> anyhow::Result<Self> {
        let database = cluster.create_database("kiln_bench_pgbench")?;
        let psql = Command::new(cluster.bin_dir().join("psql"))
            .arg("-h")
            .arg(cluster.socket_dir())
            .args(["-p", &cluster.port().to_string(), "-U", "postgres", "-q", "-c"])
            .arg("CREATE TABLE bench_rows (id bigserial PRIMARY KEY, stream text NOT NULL, payload jsonb NOT NULL, time timestamptz NOT NULL DEFAULT now())")
            .arg(&database.name)
            .output()
            .context("failed to run psql")?;
        if !psql.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&psql.stderr));
        }

        Self::with_script(
            cluster,
            &database.name,
            "INSERT INTO bench_rows (stream, payload) VALUES ('s', '{\"k\": \"v\"}');\n",
            clients,
            seconds,
        )
    }

    /// Prepares `pgbench` to send the store's append statement on `target`'s database, each
    /// client appending to its own environment, as the store phase does. The statement reads
    /// the client's stream and event from a table first, so it costs slightly more than the
    /// store's.
    async fn append_statement(
        cluster: &PgCluster,
        target: &StoreTarget,
        clients: usize,
        seconds: u64,
    ) -> anyhow::Result<Self> {
        sqlx::query(
            "CREATE TABLE bench_clients (client int PRIMARY KEY, stream text NOT NULL,
                                         org_id uuid NOT NULL, env_id uuid NOT NULL,
                                         payload jsonb NOT NULL)",
        )
        .execute(target.store.pool())
        .await?;
        for (client, env_id) in target.envs.iter().enumerate() {
            let mut set = BTreeMap::new();
            set.insert("VAR1".to_owned(), "value 1".to_owned());
            let event = Event::ConfigChanged {
                env_id: *env_id,
                version: 1,
                set,
                unset: Vec::new(),
            };
            sqlx::query("INSERT INTO bench_clients VALUES ($1, $2, $3, $4, $5)")
                .bind(client as i32)
                .bind(streams::env(*env_id))
                .bind(target.org_id.as_uuid())
                .bind(env_id.as_uuid())
                .bind(serde_json::to_value(&event)?)
                .execute(target.store.pool())
                .await?;
        }

        let script = "SELECT a.seq FROM (SELECT * FROM bench_clients WHERE client = :client_id) b
  CROSS JOIN LATERAL kiln_append(b.stream, 'any', 0, 'bench', now(), ARRAY[b.org_id],
                                 ARRAY[b.env_id], ARRAY[NULL::uuid], ARRAY['ConfigChanged'],
                                 ARRAY[b.payload]) a;\n";
        Self::with_script(cluster, &target.database, script, clients, seconds)
    }

    /// Prepares `pgbench` to run `script` on `database` with `clients` clients for `seconds`.
    fn with_script(
        cluster: &PgCluster,
        database: &str,
        script_text: &str,
        clients: usize,
        seconds: u64,
    ) -> anyhow::Result<Self> {
        let script = tempfile::NamedTempFile::new()?;
        std::fs::write(script.path(), script_text)?;
        let mut args: Vec<OsString> = vec!["-h".into(), cluster.socket_dir().into()];
        for arg in [
            "-p",
            &cluster.port().to_string(),
            "-U",
            "postgres",
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.to_string(),
            "-T",
            &seconds.to_string(),
            "-f",
        ] {
            args.push(arg.into());
        }
        args.push(script.path().into());
        args.push(database.into());
        Ok(Self {
            command: cluster.bin_dir().join("pgbench"),
            args,
            _script: script,
        })
    }

    /// Runs one phase and returns transactions per second.
    fn run(&self) -> anyhow::Result<f64> {
        let pgbench = Command::new(&self.command)
            .args(&self.args)
            .output()
            .context("failed to run pgbench")?;
        let output = String::from_utf8_lossy(&pgbench.stdout);
        if !pgbench.status.success() {
            bail!(
                "pgbench failed: {}",
                String::from_utf8_lossy(&pgbench.stderr)
            );
        }
        output
            .lines()
            .find_map(|line| {
                line.strip_prefix("tps = ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|tps| tps.parse().ok())
            })
            .with_context(|| format!("no tps line in pgbench output:\n{output}"))
    }
}

/// A bootstrapped database with one environment per client.
struct StoreTarget {
    store: Store,
    database: String,
    org_id: kiln_core::OrgId,
    envs: Vec<EnvId>,
    token: String,
}

/// Creates a bootstrapped database with one environment per client.
async fn prepare(cluster: &PgCluster, clients: usize) -> anyhow::Result<StoreTarget> {
    let database = cluster.create_database("kiln_bench_store")?;
    let store = Store::connect(&database.url, (clients as u32 + 4).max(8)).await?;
    store.migrate().await?;
    let output = kiln_control::bootstrap::bootstrap(
        &store,
        &OrgName::new("bench")?,
        "apps.bench.test",
        None,
    )
    .await?;
    let org_id = output.org.id;
    let app_id = kiln_core::AppId::new();
    let app = Event::AppCreated {
        app_id,
        org_id,
        name: AppName::new("bench")?,
    };
    store
        .append(
            &streams::org(org_id),
            ExpectedVersion::Any,
            vec![NewEvent::org(org_id, app)],
            "bench",
        )
        .await?;
    let mut envs = Vec::new();
    for index in 0..clients {
        let env_id = EnvId::new();
        let event = Event::EnvCreated {
            env_id,
            app_id,
            org_id,
            name: EnvName::new(format!("e{index}"))?,
            hostname: kiln_core::Hostname::new(format!("bench-e{index}.apps.bench.test"))?,
            ipv6_address: std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, index as u16 + 1),
        };
        store
            .append(
                &streams::env(env_id),
                ExpectedVersion::NoStream,
                vec![NewEvent::org(org_id, event)],
                "bench",
            )
            .await?;
        envs.push(env_id);
    }
    Ok(StoreTarget {
        store,
        database: database.name,
        org_id,
        envs,
        token: output.org_token.secret,
    })
}

async fn run_store(store: &Store, envs: &[EnvId], duration: Duration) -> anyhow::Result<f64> {
    let org_id = kiln_core::OrgId::new();
    let inputs = envs.iter().map(|env_id| (store.clone(), *env_id)).collect();
    calls_per_second(duration, inputs, move |input, version| async move {
        let (store, env_id) = &*input;
        let mut set = BTreeMap::new();
        set.insert(format!("VAR{}", version % 16), format!("value {version}"));
        let event = Event::ConfigChanged {
            env_id: *env_id,
            version,
            set,
            unset: Vec::new(),
        };
        store
            .append(
                &streams::env(*env_id),
                ExpectedVersion::Any,
                vec![NewEvent::org(org_id, event)],
                "bench",
            )
            .await?;
        Ok(())
    })
    .await
}

/// Calls `call` in a loop on one task per input until `duration` has passed, and returns
/// calls per second over all tasks. `call` gets its task's input and the call's number,
/// counted from 1 per task.
async fn calls_per_second<I, F, Fut>(
    duration: Duration,
    inputs: Vec<I>,
    call: F,
) -> anyhow::Result<f64>
where
    I: Send + Sync + 'static,
    F: Fn(Arc<I>, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for input in inputs {
        let input = Arc::new(input);
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut calls = 0u64;
            while Instant::now() < deadline {
                calls += 1;
                call(Arc::clone(&input), calls).await?;
            }
            anyhow::Ok(calls)
        }));
    }

    let started = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// A control-plane HTTP server on loopback with one environment per client.
struct ApiTarget {
    client: kiln_api::Client,
    clients: usize,
    _key_dir: tempfile::TempDir,
}

impl ApiTarget {
    async fn start(cluster: &PgCluster, clients: usize) -> anyhow::Result<Self> {
        let StoreTarget { store, token, .. } = prepare(cluster, clients).await?;
        let key_dir = tempfile::tempdir()?;
        let key_file = key_dir.path().join("master.key");
        Keyring::generate_key(&key_file)?;
        let settings = kiln_control::bootstrap::load_settings(&store)
            .await?
            .context("settings missing after bootstrap")?;
        let state = AppState {
            store: store.clone(),
            keyring: Arc::new(Keyring::load(&key_file)?),
            notifier: Notifier::start(&store).await?,
            settings: Arc::new(settings),
            limits: Arc::new(ApiLimits {
                host_lease: Duration::from_secs(30),
                log_window_lines: 1000,
            }),
            release_specs: std::sync::Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, kiln_control::api::router(state)).await });

        let client = kiln_api::Client::new(&format!("http://{address}"), token)?;
        Ok(Self {
            client,
            clients,
            _key_dir: key_dir,
        })
    }

    /// Runs the `GET /v1/whoami` phase and returns calls per second.
    async fn run_whoami(&self, duration: Duration) -> anyhow::Result<f64> {
        let inputs = vec![self.client.clone(); self.clients];
        calls_per_second(duration, inputs, |client, _| async move {
            client.whoami().await?;
            Ok(())
        })
        .await
    }

    /// Runs one phase and returns appends per second.
    async fn run(&self, duration: Duration) -> anyhow::Result<f64> {
        let mut inputs = Vec::with_capacity(self.clients);
        for index in 0..self.clients {
            let path = kiln_api::client::EnvPath::new(
                OrgName::new("bench")?,
                AppName::new("bench")?,
                EnvName::new(format!("e{index}"))?,
            );
            inputs.push((self.client.clone(), path));
        }
        calls_per_second(duration, inputs, |input, version| async move {
            let (client, path) = &*input;
            let mut update = kiln_api::types::UpdateConfig::default();
            update
                .set
                .insert(format!("VAR{}", version % 16), format!("value {version}"));
            client.update_config(path, &update).await?;
            Ok(())
        })
        .await
    }
}
