//! `hello-tls`: the Kiln example app. See the library documentation for what it serves.

use std::process::ExitCode;

use kiln_example_hello::{Config, Server};

fn main() -> ExitCode {
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

    if let Err(error) = server.run() {
        eprintln!("hello-tls: {error}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
