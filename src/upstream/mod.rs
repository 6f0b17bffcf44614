//! The cluster side: endpoints with their TLS connection pools, active health checks,
//! and the choice of one endpoint among many.

pub mod balance;
pub mod connector;
pub mod diagnose;
pub mod discovery;
pub mod endpoint;
pub mod health;
pub mod outlier;
pub mod pool;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use connector::ConnectedPeer;
pub use endpoint::{Endpoint, InFlightGuard};

use crate::config::{Discovery, EndpointConfig, Upstream};
use crate::tls::{client_config, TlsError};

/// Builds every endpoint a configuration lists (`listed`, and the addresses discovery
/// found for the regions in `discovery`), sharing one TLS client
/// configuration per distinct set of trusted CA files. An endpoint in `reusable` with
/// identical settings (and the same connection settings) is kept as it is, with its
/// health and its pool. Each endpoint gets `pools` connection pools (one per
/// request-path worker and one for the other threads, [`crate::runtime::pool_index`]).
pub fn build_endpoints_with_pools(
    listed: &[EndpointConfig],
    discovery: &[Discovery],
    upstream: &Upstream,
    reusable: &[Arc<Endpoint>],
    resolved: &discovery::Resolved,
    pools: usize,
) -> Result<Vec<Arc<Endpoint>>, UpstreamError> {
    let mut endpoint_configs = listed.to_vec();
    for found in discovery {
        for address in resolved.get(&found.region).into_iter().flatten() {
            endpoint_configs.push(found.endpoint(address));
        }
    }
    let mut tls_by_ca: BTreeMap<Vec<PathBuf>, Arc<rustls::ClientConfig>> = BTreeMap::new();
    let mut endpoints = Vec::with_capacity(endpoint_configs.len());
    let settings = ConnectionSettings {
        pools,
        ..connection_settings(upstream)
    };
    for ec in endpoint_configs {
        if let Some(same) = reusable
            .iter()
            .find(|e| e.config == ec && *e.connection_settings() == settings)
        {
            endpoints.push(same.clone());
            continue;
        }
        let cas: Vec<PathBuf> = upstream
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
        let endpoint = Endpoint::new(ec, tls, settings.clone()).map_err(UpstreamError::Config)?;
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

/// The global settings baked into an endpoint's pool: a change means a new endpoint.
pub(crate) fn connection_settings(upstream: &Upstream) -> ConnectionSettings {
    ConnectionSettings {
        connect_timeout: upstream.connect_timeout.get(),
        pool_idle_timeout: upstream.pool_idle_timeout.get(),
        ca_file: upstream.ca_file.clone(),
        pools: 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSettings {
    pub connect_timeout: std::time::Duration,
    pub pool_idle_timeout: std::time::Duration,
    pub ca_file: Option<PathBuf>,
    /// Connection pools per endpoint: the request-path workers and one more.
    pub pools: usize,
}
