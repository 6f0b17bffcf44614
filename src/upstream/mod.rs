//! The cluster side: endpoints with their TLS connection pools, active health checks,
//! and the choice of one endpoint among many.

pub mod balance;
pub mod connector;
pub mod endpoint;
pub mod health;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use connector::{ConnectError, ConnectedPeer};
pub use endpoint::{Endpoint, InFlightGuard};

use crate::config::Config;
use crate::tls::{client_config, TlsError};

/// Builds every endpoint of a configuration, sharing one TLS client configuration per
/// distinct set of trusted CA files.
pub fn build_endpoints(config: &Config) -> Result<Vec<Arc<Endpoint>>, UpstreamError> {
    let endpoint_configs = config
        .endpoints()
        .map_err(|(key, message)| UpstreamError::Config(format!("{key}: {message}")))?;
    let mut tls_by_ca: BTreeMap<Vec<PathBuf>, Arc<rustls::ClientConfig>> = BTreeMap::new();
    let mut endpoints = Vec::with_capacity(endpoint_configs.len());
    for ec in endpoint_configs {
        let cas: Vec<PathBuf> = config
            .upstream
            .ca_file
            .iter()
            .chain(ec.ca_file.iter())
            .cloned()
            .collect();
        let tls = match tls_by_ca.get(&cas) {
            Some(tls) => tls.clone(),
            None => {
                let paths: Vec<&std::path::Path> = cas.iter().map(|p| p.as_path()).collect();
                let tls = client_config(&paths)?;
                tls_by_ca.insert(cas, tls.clone());
                tls
            }
        };
        let endpoint = Endpoint::new(
            ec,
            tls,
            config.upstream.connect_timeout.get(),
            config.upstream.pool_idle_timeout.get(),
        )
        .map_err(UpstreamError::Config)?;
        endpoints.push(Arc::new(endpoint));
    }
    Ok(endpoints)
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}
