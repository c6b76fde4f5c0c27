//! Network namespaces for tests: each test gets its own namespace, with its own links, routes
//! and nftables ruleset, so network tests run in parallel and never touch the host's network.
//!
//! Names start with `knt-` and carry the process id, so leftovers of a killed test run are easy
//! to find (`ip netns list`) and never collide with another run.

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// The `ip` binary used to create and delete namespaces (fixture setup only).
const IP: &str = "/usr/bin/ip";

static NEXT_NAMESPACE: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/NAME`), deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace named `knt-LABEL-PID-N` with its loopback interface up.
    pub fn create(label: &str) -> anyhow::Result<Self> {
        let sequence = NEXT_NAMESPACE.fetch_add(1, Ordering::Relaxed);
        let name = format!("knt-{label}-{}-{sequence}", std::process::id());
        run_ip(&["netns", "add", &name])?;
        let namespace = Self { name };
        run_ip(&["-n", &namespace.name, "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// Returns the namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `task` on a new thread that has entered this namespace, inside a single-threaded
    /// Tokio runtime, so every socket and child process it creates belongs to the namespace.
    pub fn block_on<F, Fut, T>(&self, task: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file =
                        File::open(&path).with_context(|| format!("failed to open {path}"))?;
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("failed to enter network namespace {path}"))?;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("failed to build a Tokio runtime")?;
                    Ok(runtime.block_on(task()))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("task in network namespace {} panicked", self.name))?
        })
    }

    /// Runs the blocking `task` on a new thread that has entered this namespace and returns
    /// its result. Sockets it creates stay in this namespace after the thread ends, so a test
    /// running in one namespace can listen in another.
    pub fn run<F, T>(&self, task: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file =
                        File::open(&path).with_context(|| format!("failed to open {path}"))?;
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("failed to enter network namespace {path}"))?;
                    Ok(task())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("task in network namespace {} panicked", self.name))?
        })
    }

    /// Runs `ip -n NAME ARGS...` and returns its standard output (for counting links and
    /// routes in tests).
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Runs `ip netns exec NAME PROGRAM ARGS...` and returns its standard output.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run_ip(&full)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(error) = run_ip(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: failed to delete network namespace {}: {error:#}",
                self.name
            );
        }
    }
}

fn run_ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(IP)
        .args(args)
        .output()
        .with_context(|| format!("failed to run {IP} {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "`{IP} {}` failed with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
