//! End-to-end tests of the example server with a real rustls client on loopback.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers should panic on a failed setup step"
)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use kiln_example_hello::{Config, DRAIN_TIMEOUT, Server};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Bound on every read of a test client, so a server bug fails the test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hello-tls-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts a server on 127.0.0.1 with an ephemeral port; returns its address and certificate.
fn start(extra: &[(&str, &str)]) -> (SocketAddr, CertificateDer<'static>) {
    let mut vars: BTreeMap<String, String> = [
        ("LISTEN_ADDR", "127.0.0.1:0"),
        ("KILN_APP", "hello"),
        ("KILN_ENV", "staging"),
        ("KILN_RELEASE", "v7"),
        ("KILN_INSTANCE", "inst_0123"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (k, v) in extra {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }

    let config = Config::from_vars(&vars).unwrap();
    let server = Server::bind(&config).unwrap();
    let address = server.local_addr().unwrap();
    let certificate = server.certificate_chain()[0].clone();
    thread::spawn(move || server.run(DRAIN_TIMEOUT));
    (address, certificate)
}

fn client(
    address: SocketAddr,
    certificate: &CertificateDer<'static>,
    sni: &str,
) -> StreamOwned<ClientConnection, TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(certificate.clone()).unwrap();
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let connection = ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    StreamOwned::new(connection, tcp)
}

/// Reads one response with a Content-Length body; returns the head and the body.
fn read_response(stream: &mut impl Read) -> (String, String) {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        bytes.push(byte[0]);
    }
    let head = String::from_utf8(bytes).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn answers_with_identity_and_secret_names() {
    let secrets = temp_dir("secrets");
    std::fs::write(secrets.join("DATABASE_URL"), "postgres://canary-value-91f3").unwrap();
    std::fs::write(secrets.join("API_KEY"), "canary-value-7c21").unwrap();
    let (address, certificate) = start(&[("SECRETS_DIR", secrets.to_str().unwrap())]);

    let mut stream = client(address, &certificate, "localhost");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: hello.example.com\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut stream);

    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(
        body,
        "Hello from Kiln!\napp: hello\nenv: staging\nrelease: v7\ninstance: inst_0123\nsecrets: API_KEY, DATABASE_URL\n"
    );
    assert!(!body.contains("canary-value"));
    std::fs::remove_dir_all(secrets).unwrap();
}

#[test]
fn keeps_connection_alive_for_several_requests() {
    let (address, certificate) = start(&[("SECRETS_DIR", "/nonexistent/kiln-secrets")]);
    let mut stream = client(address, &certificate, "localhost");

    for _ in 0..3 {
        stream
            .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut stream);
        assert!(head.contains("Connection: keep-alive"), "{head}");
        assert!(
            body.ends_with("secrets: (none: /nonexistent/kiln-secrets does not exist)\n"),
            "{body}"
        );
    }

    stream
        .write_all(b"HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert!(rest.contains("Connection: close\r\n"), "{rest}");
    assert!(rest.ends_with("\r\n\r\n"), "HEAD has no body: {rest}");
}

#[test]
fn malformed_request_gets_400_and_close() {
    let (address, certificate) = start(&[]);
    let mut stream = client(address, &certificate, "localhost");
    stream.write_all(b"NOT-HTTP\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{rest}");
    assert!(rest.contains("Connection: close"), "{rest}");
}

#[test]
fn plain_http_client_is_rejected_without_crash() {
    let (address, certificate) = start(&[]);
    let mut plain = TcpStream::connect(address).unwrap();
    plain.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("Hello from Kiln"));

    // The server still serves TLS clients afterwards.
    let mut stream = client(address, &certificate, "localhost");
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (head, _) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
}

#[test]
fn serves_certificate_from_pem_files() {
    let dir = temp_dir("pem");
    let certified =
        rcgen::generate_simple_self_signed(vec!["hello.example.com".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let (address, certificate) = start(&[
        ("TLS_CERT_FILE", cert_path.to_str().unwrap()),
        ("TLS_KEY_FILE", key_path.to_str().unwrap()),
    ]);
    assert_eq!(certificate, certified.cert.der().clone());

    let mut stream = client(address, &certificate, "hello.example.com");
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (head, _) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_pem_file_is_a_clear_error() {
    let config = Config::from_vars(
        &[
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("TLS_CERT_FILE", "/nonexistent/cert.pem"),
            ("TLS_KEY_FILE", "/nonexistent/key.pem"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect(),
    )
    .unwrap();
    let Err(error) = Server::bind(&config) else {
        panic!("bind succeeded without a certificate");
    };
    let message = error.to_string();
    assert!(
        message.starts_with("TLS setup failed: failed to read /nonexistent/cert.pem"),
        "{message}"
    );
}

#[test]
fn stop_refuses_new_connections_and_finishes_open_ones() {
    let vars: BTreeMap<String, String> = [
        ("LISTEN_ADDR", "127.0.0.1:0"),
        ("KILN_APP", "hello"),
        ("KILN_ENV", "staging"),
        ("KILN_RELEASE", "v7"),
        ("KILN_INSTANCE", "inst_0123"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let server = Server::bind(&Config::from_vars(&vars).unwrap()).unwrap();
    let address = server.local_addr().unwrap();
    let certificate = server.certificate_chain()[0].clone();
    let handle = server.stop_handle().unwrap();
    let running = thread::spawn(move || server.run(DRAIN_TIMEOUT));

    // A connection that finished its handshake before the stop, with no request yet.
    let mut open = client(address, &certificate, "localhost");
    while open.conn.is_handshaking() {
        open.conn.complete_io(&mut open.sock).unwrap();
    }

    handle.stop().unwrap();
    let refused = TcpStream::connect(address);
    assert!(refused.is_err(), "a connection was accepted after the stop");

    // A keep-alive request still gets its response, which closes the connection.
    open.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut open);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Connection: close"), "{head}");
    assert!(body.contains("inst_0123"), "{body}");
    drop(open);

    let drained = running.join().unwrap().unwrap();
    assert_eq!(drained.abandoned, 0);
}

#[test]
fn sigterm_stops_the_binary_cleanly() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_hello-tls"))
        .env_clear()
        .envs([
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("KILN_APP", "hello"),
            ("KILN_ENV", "staging"),
            ("KILN_RELEASE", "v7"),
            ("KILN_INSTANCE", "inst_0123"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");

    // SAFETY: kill(2) with the pid of a child this test started and has not reaped.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);

    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("SIGTERM received"), "{rest}");
    assert!(rest.contains("every open connection finished"), "{rest}");
}
