//! `kiln-agent image ...`: operator commands over the host's image store (the same store
//! the agent uses), for pre-pulling, debugging an image, and reclaiming disk.
//!
//! REF is a registry reference (`registry/repo:tag@digest`), `oci-layout:DIR[:TAG]` or
//! `oci-archive:FILE[:TAG]`. Results go to stdout; `--json` prints the library's objects.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use kiln_image::{ImageRef, ImageStore, StoreConfig};

/// Options shared by every `kiln-agent image` subcommand.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// Image store directory (blobs, root filesystems, pins).
    #[arg(
        long,
        env = "KILN_IMAGE_STORE",
        default_value = "/var/lib/kiln/images",
        global = true
    )]
    store: PathBuf,
    /// TOML file with the image store settings (registries, credentials, platform, budget).
    #[arg(long, env = "KILN_IMAGE_CONFIG", global = true)]
    config: Option<PathBuf>,
}

/// `kiln-agent image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ImageCommand {
    /// Pull an image into the store and print its digest.
    Pull {
        /// The image reference.
        reference: String,
        /// Print the pulled image as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Pull an image and unpack its layers into a directory, for inspection.
    Unpack {
        /// The image reference.
        reference: String,
        /// Directory to unpack into; it must be empty or not exist.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Pull an image, build (or reuse) its read-only ext4 root filesystem, and link or copy
    /// it to a file.
    BuildRootfs {
        /// The image reference.
        reference: String,
        /// Output path of the ext4 image.
        #[arg(long)]
        out: PathBuf,
        /// Print the root filesystem (path, digest, guest config) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show an image's digest, platform, layers and config.
    Inspect {
        /// The image reference.
        reference: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove least recently used images until the store fits its disk budget; images that
    /// running instances use are kept.
    Gc {
        /// Disk budget in bytes (default: the config's disk_budget_bytes).
        #[arg(long)]
        budget_bytes: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Runs a `kiln-agent image` subcommand.
pub(crate) async fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Pull {
            reference,
            json,
            store,
        } => pull(&store, &reference, json).await,
        ImageCommand::Unpack {
            reference,
            out,
            store,
        } => unpack(&store, &reference, &out).await,
        ImageCommand::BuildRootfs {
            reference,
            out,
            json,
            store,
        } => build_rootfs(&store, &reference, &out, json).await,
        ImageCommand::Inspect {
            reference,
            json,
            store,
        } => inspect(&store, &reference, json).await,
        ImageCommand::Gc {
            budget_bytes,
            json,
            store,
        } => gc(&store, budget_bytes, json),
    }
}

fn open_store(args: &StoreArgs) -> anyhow::Result<(ImageStore, StoreConfig)> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            toml::from_str::<StoreConfig>(&text)
                .with_context(|| format!("invalid image store config {}", path.display()))?
        }
        None => StoreConfig::default(),
    };
    config.validate().context("invalid image store config")?;
    let root = std::path::absolute(&args.store)
        .with_context(|| format!("invalid store path {}", args.store.display()))?;
    let store = ImageStore::open(&root, config.clone())
        .with_context(|| format!("failed to open image store {}", args.store.display()))?;
    Ok((store, config))
}

fn parse_reference(reference: &str) -> anyhow::Result<ImageRef> {
    Ok(reference.parse()?)
}

async fn pull(args: &StoreArgs, reference: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (store, _) = open_store(args)?;
    let image = store.pull(&parse_reference(reference)?).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&image)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", image.digest);
    Ok(ExitCode::SUCCESS)
}

async fn unpack(args: &StoreArgs, reference: &str, out: &Path) -> anyhow::Result<ExitCode> {
    let (store, _) = open_store(args)?;
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!(
            "{} is not empty: choose a new or empty directory",
            out.display()
        );
    }
    let image = store.pull(&parse_reference(reference)?).await?;
    std::fs::create_dir_all(out).with_context(|| format!("failed to create {}", out.display()))?;
    let stats = store.unpack(&image, out).await?;
    eprintln!("unpacked {} entries, {} bytes", stats.entries, stats.bytes);
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}

async fn build_rootfs(
    args: &StoreArgs,
    reference: &str,
    out: &Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (store, _) = open_store(args)?;
    let rootfs = store.pull_rootfs(&parse_reference(reference)?).await?;

    // A hardlink is instant and shares the read-only cache file; another filesystem needs a copy.
    if out.exists() {
        std::fs::remove_file(out)
            .with_context(|| format!("failed to replace {}", out.display()))?;
    }
    if std::fs::hard_link(&rootfs.path, out).is_err() {
        std::fs::copy(&rootfs.path, out)
            .with_context(|| format!("failed to copy the rootfs to {}", out.display()))?;
    }

    if json {
        println!("{}", serde_json::to_string_pretty(&rootfs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", out.display());
    eprintln!("image {} ({} bytes)", rootfs.digest, rootfs.size_bytes);
    Ok(ExitCode::SUCCESS)
}

async fn inspect(args: &StoreArgs, reference: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (store, _) = open_store(args)?;
    let image = store.pull(&parse_reference(reference)?).await?;
    let rootfs = store.cached_rootfs(&image.digest)?;

    if json {
        let object = serde_json::json!({
            "image": image,
            "rootfs": rootfs,
        });
        println!("{}", serde_json::to_string_pretty(&object)?);
        return Ok(ExitCode::SUCCESS);
    }

    println!("reference:  {}", image.reference);
    println!("digest:     {}", image.digest);
    if let Some(index) = &image.index_digest {
        println!("index:      {index}");
    }
    println!("platform:   {}/{}", image.os, image.architecture);
    println!("config:     {}", image.config_digest);
    println!(
        "layers:     {} ({} bytes compressed)",
        image.layers.len(),
        image.layers_size()
    );
    for layer in &image.layers {
        println!(
            "  {}  {:>12}  {}",
            layer.digest, layer.size, layer.media_type
        );
    }
    let runtime = &image.runtime;
    println!(
        "entrypoint: {:?}",
        runtime.entrypoint.clone().unwrap_or_default()
    );
    println!("cmd:        {:?}", runtime.cmd.clone().unwrap_or_default());
    println!("user:       {}", runtime.user.clone().unwrap_or_default());
    println!(
        "workdir:    {}",
        runtime.working_dir.clone().unwrap_or_default()
    );
    match rootfs {
        Some(rootfs) => println!(
            "rootfs:     {} ({} bytes)",
            rootfs.path.display(),
            rootfs.size_bytes
        ),
        None => println!("rootfs:     not built"),
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(args: &StoreArgs, budget_bytes: Option<u64>, json: bool) -> anyhow::Result<ExitCode> {
    let (store, config) = open_store(args)?;
    let report = store.gc(budget_bytes.unwrap_or(config.disk_budget_bytes))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for digest in &report.removed_images {
        println!("removed {digest}");
    }
    for digest in &report.pinned_images {
        println!("kept {digest} (in use)");
    }
    eprintln!(
        "{} images and {} blobs removed; {} -> {} bytes",
        report.removed_images.len(),
        report.removed_blobs,
        report.bytes_before,
        report.bytes_after
    );
    Ok(ExitCode::SUCCESS)
}
