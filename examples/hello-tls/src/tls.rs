//! The server certificate: loaded from PEM files or generated self-signed at start.

use std::path::{Path, PathBuf};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::TlsSource;

/// Error while preparing the TLS configuration.
#[derive(Debug)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        message: String,
    },
    /// The certificate file contains no certificate.
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rcgen failed to generate the self-signed certificate.
    Generate(String),
    /// rustls rejected the certificate or key.
    Config(rustls::Error),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pem { path, message } => {
                write!(f, "failed to read {}: {message}", path.display())
            }
            Self::NoCertificate { path } => write!(
                f,
                "{} contains no PEM certificate; TLS_CERT_FILE must name a certificate chain",
                path.display()
            ),
            Self::Generate(message) => {
                write!(f, "failed to generate a self-signed certificate: {message}")
            }
            Self::Config(error) => write!(f, "the certificate or key was rejected: {error}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// Builds the rustls server configuration and returns it with the certificate chain in use.
pub fn server_config(
    source: &TlsSource,
) -> Result<(ServerConfig, Vec<CertificateDer<'static>>), TlsError> {
    let (chain, key) = match source {
        TlsSource::Files { cert, key } => load_files(cert, key)?,
        TlsSource::SelfSigned { hostnames } => self_signed(hostnames)?,
    };

    // With only rustls's `ring` feature enabled, the builder installs ring as the process
    // default provider.
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, chain))
}

/// Loads a PEM certificate chain and private key.
pub fn load_files(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let pem_error = |path: &Path| {
        let path = path.to_owned();
        move |error: rustls::pki_types::pem::Error| TlsError::Pem {
            path,
            message: error.to_string(),
        }
    };

    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem_error(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(cert))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
    Ok((chain, key))
}

/// Generates a self-signed certificate for `hostnames` with a fresh ECDSA P-256 key.
pub fn self_signed(
    hostnames: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certified = rcgen::generate_simple_self_signed(hostnames.to_vec())
        .map_err(|error| TlsError::Generate(error.to_string()))?;
    let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
    Ok((
        vec![certified.cert.der().clone()],
        PrivateKeyDer::Pkcs8(key),
    ))
}
