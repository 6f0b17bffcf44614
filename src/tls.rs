//! TLS set-up shared by the proxy and the simulator: the one crypto provider, client
//! configurations that trust the system roots plus an optional CA file, and server
//! configurations for the simulator. Verification is always on; there is no switch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("CA file {0} holds no certificate")]
    EmptyCaFile(PathBuf),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// Not one system root certificate loaded. The AWS SDK verifies KMS, STS (IRSA's web
    /// identity) and EC2 against these, and with none it would panic while building its
    /// client (a debug assertion) or fail every HTTPS call as an unknown issuer.
    #[error(
        "no usable system CA certificates ({looked}): the AWS SDK needs them to verify \
         KMS, STS and EC2 over HTTPS. Install the ca-certificates package (the container \
         image carries it), or set SSL_CERT_FILE to a PEM bundle or SSL_CERT_DIR to a \
         directory of them; `upstream.ca_file` is for the GPU cluster only"
    )]
    NoSystemRoots { looked: String },
}

/// Installs aws-lc-rs as the process's rustls provider. Called first thing by every
/// entry point, so no code path ever depends on rustls guessing a provider.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed (e.g. by an earlier test).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Loads every certificate of a PEM file (a regular file of at most
/// [`crate::config::MAX_CA_FILE`] bytes: a CA path that is a FIFO or `/dev/zero` must not
/// hang or exhaust memory).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = crate::config::read_regular_file(path, crate::config::MAX_CA_FILE).map_err(|e| {
        TlsError::CaFile {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::CaFile {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyCaFile(path.to_owned()));
    }
    Ok(certs)
}

/// Loads a CA file exactly as [`client_config`] does (every certificate must be usable
/// as a trust anchor), without the system roots: what `gpulink check` runs.
pub fn check_ca_file(path: &Path) -> Result<(), TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(path)? {
        roots.add(cert)?;
    }
    Ok(())
}

/// The system's trusted roots and what went wrong loading them, once per process.
struct SystemRoots {
    certs: Vec<CertificateDer<'static>>,
    errors: Vec<String>,
}

fn load_system_roots() -> &'static SystemRoots {
    static ROOTS: std::sync::OnceLock<SystemRoots> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let result = rustls_native_certs::load_native_certs();
        for error in &result.errors {
            tracing::debug!(%error, "could not load some system root certificates");
        }
        SystemRoots {
            certs: result.certs,
            errors: result.errors.iter().map(ToString::to_string).collect(),
        }
    })
}

/// The system's trusted roots. Unreadable system roots are logged rather than fatal
/// here: a `ca_file` may be all the cluster needs ([`require_system_roots`] is the check
/// for AWS).
fn system_roots() -> &'static [CertificateDer<'static>] {
    &load_system_roots().certs
}

/// At least one usable system root certificate, or why there is none (where it looked:
/// `SSL_CERT_FILE`/`SSL_CERT_DIR` when set, and the loader's errors, which name paths).
/// Run before the AWS SDK is set up: without roots it panics in a debug build and fails
/// every HTTPS call in a release one, neither saying why.
pub fn require_system_roots() -> Result<usize, TlsError> {
    let roots = load_system_roots();
    let (usable, _ignored) =
        RootCertStore::empty().add_parsable_certificates(roots.certs.iter().cloned());
    if usable > 0 {
        return Ok(usable);
    }
    let mut looked: Vec<String> = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .filter_map(|name| {
            std::env::var_os(name).map(|v| format!("{name}={}", Path::new(&v).display()))
        })
        .collect();
    if looked.is_empty() {
        looked.push("the system's default locations".to_string());
    }
    looked.extend(roots.errors.iter().take(3).cloned());
    Err(TlsError::NoSystemRoots {
        looked: looked.join("; "),
    })
}

/// A client configuration trusting the system roots plus `extra_ca` files, offering
/// HTTP/2 and HTTP/1.1 by ALPN.
pub fn client_config(extra_ca: &[&Path]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    for path in extra_ca {
        for cert in load_certificates(path)? {
            roots.add(cert)?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A server configuration from PEM certificate chain and key, offering HTTP/2 and HTTP/1.1.
pub fn server_config(cert_chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rustls::Error::General(format!("bad certificate PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| rustls::Error::General(format!("bad key PEM: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
