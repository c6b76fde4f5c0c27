//! The `kiln-control` binary: serves the API, bootstraps a cluster, rebuilds projections and
//! manages the secrets' master keys.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_control::config::{Config, Overrides};
use kiln_control::secrets::{Keyring, Sealed};
use kiln_control::store::Store;
use kiln_control::store::rebuild::RebuildMode;
use kiln_core::{EnvId, OrgName};
use sqlx::Row;

#[derive(Parser)]
#[command(name = "kiln-control", version, about = "Kiln control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run the leader's singleton work.
    Serve {
        /// TOML config file (unknown keys are rejected).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, such as 127.0.0.1:7070 (overrides the file and KILN_LISTEN).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PostgreSQL URL (overrides the file and KILN_DATABASE_URL).
        #[arg(long)]
        database_url: Option<String>,
        /// Master key file of the secrets (overrides the file and KILN_MASTER_KEY_FILE).
        #[arg(long)]
        master_key_file: Option<PathBuf>,
    },
    /// Create the schema, the cluster settings, the first org, its admin token and an
    /// operator token. Prints them as JSON; the tokens are shown only once.
    Bootstrap {
        /// PostgreSQL URL.
        #[arg(long, env = "KILN_DATABASE_URL")]
        database_url: String,
        /// Name of the first org.
        #[arg(long)]
        org: OrgName,
        /// Domain under which environments get their platform hostnames.
        #[arg(long, default_value = "apps.kiln.test")]
        apps_domain: String,
        /// The cluster's ULA /48, such as fd12:3456:789a::/48; random when absent.
        #[arg(long)]
        cluster_prefix: Option<String>,
    },
    /// Apply pending database migrations.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "KILN_DATABASE_URL")]
        database_url: String,
    },
    /// Projection maintenance.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Secret master keys.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// Replay the event log into fresh tables and compare them with the live projections.
    Rebuild {
        /// PostgreSQL URL.
        #[arg(long, env = "KILN_DATABASE_URL")]
        database_url: String,
        /// Only compare; exit with status 1 when a table differs. Without it, the live
        /// tables are replaced by the rebuilt ones.
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Add a new random key as the first line of the key file (creating the file with mode
    /// 0600). The new key encrypts from the next server start; older keys still decrypt.
    GenerateKey {
        /// The master key file.
        #[arg(long, env = "KILN_MASTER_KEY_FILE")]
        master_key_file: PathBuf,
    },
    /// Add a new key to the key file and re-encrypt every secret under it.
    RotateKey {
        /// PostgreSQL URL.
        #[arg(long, env = "KILN_DATABASE_URL")]
        database_url: String,
        /// The master key file.
        #[arg(long, env = "KILN_MASTER_KEY_FILE")]
        master_key_file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            database_url,
            master_key_file,
        } => {
            let overrides = Overrides {
                listen,
                database_url,
                master_key_file,
            };
            let config = Config::resolve(config.as_deref(), &overrides)?;
            kiln_control::server::serve(config).await?;
        }
        Command::Bootstrap {
            database_url,
            org,
            apps_domain,
            cluster_prefix,
        } => {
            let store = connect(&database_url).await?;
            let output = kiln_control::bootstrap::bootstrap(
                &store,
                &org,
                &apps_domain,
                cluster_prefix.as_deref(),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&output)?);
        }
        Command::Migrate { database_url } => {
            connect(&database_url).await?;
        }
        Command::Projections {
            command:
                ProjectionsCommand::Rebuild {
                    database_url,
                    verify,
                },
        } => {
            let store = connect(&database_url).await?;
            let mode = if verify {
                RebuildMode::Verify
            } else {
                RebuildMode::Replace
            };
            let report = store.rebuild_projections(mode).await?;
            println!("replayed {} events", report.events);
            for diff in &report.diffs {
                println!(
                    "table {}: {} row(s) only live, {} row(s) only rebuilt",
                    diff.table, diff.only_live_count, diff.only_rebuilt_count
                );
                for row in &diff.only_live {
                    println!("  live:    {row}");
                }
                for row in &diff.only_rebuilt {
                    println!("  rebuilt: {row}");
                }
            }
            if report.matches() {
                println!("projections match the event log");
            } else if verify {
                return Ok(ExitCode::from(1));
            }
            if report.replaced {
                println!("live projections replaced by the rebuilt ones");
            }
        }
        Command::Secrets {
            command: SecretsCommand::GenerateKey { master_key_file },
        } => {
            let id = Keyring::generate_key(&master_key_file)?;
            println!("added key {id} to {}", master_key_file.display());
        }
        Command::Secrets {
            command:
                SecretsCommand::RotateKey {
                    database_url,
                    master_key_file,
                },
        } => {
            let store = connect(&database_url).await?;
            let id = Keyring::generate_key(&master_key_file)?;
            let keyring = Keyring::load(&master_key_file)?;
            let count = rotate(&store, &keyring).await?;
            println!(
                "re-encrypted {count} secret(s) under key {id}; restart the servers so they encrypt with it"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(url: &str) -> anyhow::Result<Store> {
    let store = Store::connect(url, 4).await?;
    store
        .migrate()
        .await
        .context("failed to apply database migrations")?;
    Ok(store)
}

/// Re-encrypts every secret not sealed under the active key.
async fn rotate(store: &Store, keyring: &Keyring) -> anyhow::Result<u64> {
    let mut tx = store.pool().begin().await?;
    let rows = sqlx::query(
        "SELECT env_id, name, version, key_id, nonce, ciphertext FROM secret_values WHERE key_id <> $1 FOR UPDATE",
    )
    .bind(keyring.active_key_id())
    .fetch_all(&mut *tx)
    .await?;
    let mut count = 0;
    for row in &rows {
        let env_id = EnvId::from_uuid(row.get("env_id"));
        let name: String = row.get("name");
        let version: i64 = row.get("version");
        let sealed = Sealed {
            key_id: row.get("key_id"),
            nonce: row.get("nonce"),
            ciphertext: row.get("ciphertext"),
        };
        let plain = keyring.open(env_id, &name, version as u64, &sealed)?;
        let resealed = keyring.seal(env_id, &name, version as u64, &plain)?;
        sqlx::query("UPDATE secret_values SET key_id = $4, nonce = $5, ciphertext = $6 WHERE env_id = $1 AND name = $2 AND version = $3")
            .bind(env_id.as_uuid())
            .bind(&name)
            .bind(version)
            .bind(&resealed.key_id)
            .bind(&resealed.nonce)
            .bind(&resealed.ciphertext)
            .execute(&mut *tx)
            .await?;
        count += 1;
    }
    tx.commit().await?;
    Ok(count)
}
