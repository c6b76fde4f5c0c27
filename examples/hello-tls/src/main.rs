//! `hello-tls`: the Kiln example app. See the library documentation for what it serves.

use std::process::ExitCode;
use std::thread;

use kiln_example_hello::{Config, DRAIN_TIMEOUT, Server, StopHandle};

fn main() -> ExitCode {
    // Blocked before any thread starts, so every thread inherits the mask and the signals
    // reach only the thread that waits for them.
    let signals = match block_stop_signals() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("hello-tls: failed to block SIGTERM and SIGINT: {error}");
            return ExitCode::FAILURE;
        }
    };

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("hello-tls: {error}");
            return ExitCode::from(2);
        }
    };

    let server = match Server::bind(&config) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("hello-tls: {error}");
            return ExitCode::FAILURE;
        }
    };
    match server.local_addr() {
        Ok(address) => eprintln!(
            "hello-tls: listening on {address} (app {}, env {}, release {}, instance {})",
            config.identity.app,
            config.identity.env,
            config.identity.release,
            config.identity.instance
        ),
        Err(error) => eprintln!("hello-tls: listening (address unknown: {error})"),
    }

    let handle = match server.stop_handle() {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("hello-tls: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || stop_on_signal(&signals, &handle))
    {
        eprintln!("hello-tls: failed to start the signal thread: {error}");
        return ExitCode::FAILURE;
    }

    match server.run(DRAIN_TIMEOUT) {
        Ok(drained) if drained.abandoned == 0 => {
            eprintln!("hello-tls: stopped; every open connection finished");
            ExitCode::SUCCESS
        }
        Ok(drained) => {
            eprintln!(
                "hello-tls: stopped; {} connections were still open after {DRAIN_TIMEOUT:?}",
                drained.abandoned
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("hello-tls: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and returns the set.
fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: the set is initialized by sigemptyset before use, and pthread_sigmask only reads
    // it; no pointer outlives the call.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let error = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if error != 0 {
            return Err(std::io::Error::from_raw_os_error(error));
        }
        Ok(set)
    }
}

/// Waits for SIGTERM or SIGINT, then stops the server: Kiln sends SIGTERM when it replaces or
/// stops an instance, after moving its route away.
fn stop_on_signal(signals: &libc::sigset_t, handle: &StopHandle) {
    let mut signal = 0;
    // SAFETY: sigwait reads the initialized set and writes one int it is given.
    let error = unsafe { libc::sigwait(signals, &mut signal) };
    if error != 0 {
        eprintln!(
            "hello-tls: waiting for signals failed: {}",
            std::io::Error::from_raw_os_error(error)
        );
        return;
    }
    let name = if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    eprintln!("hello-tls: {name} received; refusing new connections, finishing open ones");
    if let Err(error) = handle.stop() {
        // The listener keeps accepting; the kill timeout ends the process instead.
        eprintln!("hello-tls: failed to shut the listening socket: {error}");
    }
}
