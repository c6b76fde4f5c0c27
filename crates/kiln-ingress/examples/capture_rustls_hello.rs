//! Writes the ClientHellos that a rustls client sends, as fixtures for the ClientHello tests.
//!
//! Run from the crate directory: `cargo run -p kiln-ingress --example capture_rustls_hello`.
//! rustls 0.23 with the ring provider has no ML-KEM, and Debian 12's OpenSSL 3.0 has none
//! either, so the post-quantum hellos offer X25519MLKEM768 through a stand-in key exchange
//! whose key share has the real size (1216 bytes: an ML-KEM-768 encapsulation key and an
//! X25519 public key) and random content. The hello never completes a handshake, so only
//! its bytes matter, and they are laid out exactly as rustls lays out a post-quantum hello.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, NamedGroup, RootCertStore};

/// Client key share size of X25519MLKEM768: 1184 bytes of ML-KEM-768 key plus 32 of X25519.
const X25519_MLKEM768_SHARE_LEN: usize = 1216;

struct StandInMlKem;

impl fmt::Debug for StandInMlKem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("X25519MLKEM768 (stand-in)")
    }
}

impl SupportedKxGroup for StandInMlKem {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let share: Vec<u8> = (0..X25519_MLKEM768_SHARE_LEN)
            .map(|_| rand::random::<u8>())
            .collect();
        Ok(Box::new(StandInShare(share)))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

struct StandInShare(Vec<u8>);

impl ActiveKeyExchange for StandInShare {
    fn complete(self: Box<Self>, _peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        Err(rustls::Error::General(
            "stand-in key exchange cannot complete".into(),
        ))
    }

    fn pub_key(&self) -> &[u8] {
        &self.0
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

fn client_hello(server_name: &str, post_quantum: bool, max_fragment: Option<usize>) -> Vec<u8> {
    // Deprecated only because ring has no post-quantum groups, which the stand-in adds.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    if post_quantum {
        static STAND_IN: StandInMlKem = StandInMlKem;
        provider.kx_groups.insert(0, &STAND_IN);
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.max_fragment_size = max_fragment;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let name = ServerName::try_from(server_name.to_owned()).expect("valid server name");
    let mut connection = ClientConnection::new(Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut hello).expect("write to a Vec");
    }
    hello
}

fn main() {
    let fixtures = [
        ("rustls.bin", client_hello("app.example.test", false, None)),
        ("rustls-pq.bin", client_hello("pq.example.test", true, None)),
        // A 512-byte record limit makes rustls split the hello across four records.
        (
            "rustls-pq-fragmented.bin",
            client_hello("frag.example.test", true, Some(512)),
        ),
        // rustls sends no SNI when the server name is an IP address.
        ("rustls-no-sni.bin", client_hello("127.0.0.1", false, None)),
    ];
    for (file, bytes) in fixtures {
        let path = format!("tests/fixtures/{file}");
        std::fs::write(&path, &bytes).expect("write fixture");
        println!("{path}: {} bytes", bytes.len());
    }
}
