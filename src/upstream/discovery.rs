//! PrivateLink endpoint discovery through DNS: a region may name its VPC endpoint's DNS
//! name instead of listing ENI addresses; every address the name resolves to becomes an
//! endpoint, and the name is re-resolved periodically. Unchanged addresses keep their
//! endpoint (health state and pooled connections) across re-resolution.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::DnsDiscovery;

/// Resolved addresses per region name.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// A resolution that takes longer than this is treated as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    #[error("{host} resolved to no address")]
    Empty { host: String },
}

/// Every address of the name, sorted, without duplicates.
pub async fn resolve(discovery: &DnsDiscovery) -> Result<Vec<IpAddr>, DiscoveryError> {
    let host = discovery.host.clone();
    let lookup = tokio::net::lookup_host((host.as_str(), discovery.port));
    let addresses = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
        .await
        .map_err(|_| DiscoveryError::Resolve {
            host: host.clone(),
            message: format!("no answer within {RESOLVE_TIMEOUT:?}"),
        })?
        .map_err(|e| DiscoveryError::Resolve {
            host: host.clone(),
            message: e.to_string(),
        })?;
    let mut ips: Vec<IpAddr> = addresses.map(|a| a.ip()).collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return Err(DiscoveryError::Empty { host });
    }
    Ok(ips)
}
