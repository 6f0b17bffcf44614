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

/// The system's trusted roots, loaded once per process. Unreadable system roots are
/// logged rather than fatal: a `ca_file` may be all that is needed.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let result = rustls_native_certs::load_native_certs();
        for error in &result.errors {
            tracing::debug!(%error, "could not load some system root certificates");
        }
        result.certs
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
