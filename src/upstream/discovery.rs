//! PrivateLink endpoint discovery: a region may name its VPC endpoint's DNS name
//! (`privatelink_dns`: every address the name resolves to) or its id
//! (`privatelink_endpoint_id`: the endpoint's network interfaces as EC2 lists them)
//! instead of listing ENI addresses. Each found address becomes an endpoint, and
//! discovery runs again periodically; unchanged addresses keep their endpoint (health
//! state and pooled connections) across rounds. This module finds and reports; the
//! runtime ([`crate::proxy`]) schedules the rounds and builds the generations.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{Discovery, DiscoverySource, Found, Zone};
use crate::ec2::{Ec2Client, Ec2Error, EndpointState};

/// Found addresses per region name.
pub type Resolved = BTreeMap<String, Vec<Found>>;

/// A resolution that takes longer than this is treated as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    #[error("{host} resolved to no address")]
    Empty { host: String },
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
}

impl DiscoveryError {
    /// A stable word for metrics and `/status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Resolve { .. } | Self::Empty { .. } => "dns",
            Self::Ec2(e) => e.kind(),
        }
    }
}

/// What one discovery round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The addresses to send to, sorted: none unless the endpoint is usable.
    pub found: Vec<Found>,
    /// The VPC endpoint's state (EC2 discovery only).
    pub state: Option<EndpointState>,
    /// The network interfaces EC2 listed, whether or not they are used.
    pub interfaces: usize,
}

/// Every address of the name, sorted, without duplicates.
pub async fn resolve(host: &str, port: u16) -> Result<Vec<IpAddr>, DiscoveryError> {
    let lookup = tokio::net::lookup_host((host, port));
    let addresses = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
        .await
        .map_err(|_| DiscoveryError::Resolve {
            host: host.to_string(),
            message: format!("no answer within {RESOLVE_TIMEOUT:?}"),
        })?
        .map_err(|e| DiscoveryError::Resolve {
            host: host.to_string(),
            message: e.to_string(),
        })?;
    let mut ips: Vec<IpAddr> = addresses.map(|a| a.ip()).collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return Err(DiscoveryError::Empty {
            host: host.to_string(),
        });
    }
    Ok(ips)
}

/// EC2 clients by (region, endpoint override), made once: loading the credential chain
/// is not free, and the chain caches what it loads.
#[derive(Default)]
pub struct Ec2Clients(Mutex<BTreeMap<(String, Option<String>), Ec2Client>>);

impl Ec2Clients {
    async fn get(&self, region: &str, url: Option<&str>) -> Result<Ec2Client, Ec2Error> {
        let key = (region.to_string(), url.map(str::to_string));
        if let Some(client) = self.0.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(client);
        }
        let client = Ec2Client::new(region, url, crate::ec2::DEFAULT_TIMEOUT).await?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, client.clone());
        }
        Ok(client)
    }
}

/// One discovery round for a region.
pub async fn discover(
    discovery: &Discovery,
    clients: &Ec2Clients,
) -> Result<Outcome, DiscoveryError> {
    match &discovery.source {
        DiscoverySource::Dns { host } => {
            let ips = resolve(host, discovery.port).await?;
            Ok(Outcome {
                found: ips
                    .into_iter()
                    .map(|ip| Found {
                        ip,
                        zone: None,
                        zone_alias: None,
                    })
                    .collect(),
                state: None,
                interfaces: 0,
            })
        }
        DiscoverySource::Ec2 {
            endpoint_id,
            endpoint_url,
        } => {
            let client = clients
                .get(&discovery.region, endpoint_url.as_deref())
                .await?;
            let found = client.discover(endpoint_id).await?;
            let state = found.endpoint.state.clone();
            let mut addresses: Vec<Found> = if state.is_usable() {
                found
                    .interfaces
                    .iter()
                    .map(|i| Found {
                        ip: i.private_ip,
                        // A zone EC2 spells in a way gpulink cannot compare is no zone.
                        zone: i.zone().and_then(|z| Zone::new(z).ok()),
                        // With the id as the zone, the name too (a host zone may be
                        // either).
                        zone_alias: i
                            .zone_id
                            .as_ref()
                            .and(i.zone_name.as_deref())
                            .and_then(|z| Zone::new(z).ok()),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            addresses.sort();
            Ok(Outcome {
                found: addresses,
                state: Some(state),
                interfaces: found.interfaces.len(),
            })
        }
    }
}

/// What `/status` and the metrics say about one region's discovery.
#[derive(Debug, Clone, Default)]
pub struct RegionStatus {
    pub source: &'static str,
    pub target: String,
    /// EC2's state of the VPC endpoint, as EC2 spells it.
    pub state: Option<String>,
    /// What to do about a state that gives no traffic.
    pub advice: Option<&'static str>,
    /// Addresses in service from the last good round.
    pub addresses: usize,
    /// Network interfaces EC2 listed in the last good round.
    pub interfaces: usize,
    pub last_ok: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    pub failures: u64,
}

impl RegionStatus {
    pub fn new(discovery: &Discovery) -> Self {
        Self {
            source: discovery.source.kind(),
            target: discovery.source.target().to_string(),
            ..Self::default()
        }
    }

    /// Records a good round.
    pub fn succeeded(&mut self, outcome: &Outcome) {
        self.state = outcome.state.as_ref().map(|s| s.as_str().to_string());
        self.advice = outcome.state.as_ref().and_then(EndpointState::advice);
        self.addresses = outcome.found.len();
        self.interfaces = outcome.interfaces;
        self.last_ok = Some(chrono::Utc::now());
        self.last_error = None;
    }

    /// Records a failed round (the last good addresses stay in service).
    pub fn failed(&mut self, error: &DiscoveryError) {
        self.last_error = Some(error.to_string());
        self.last_error_at = Some(chrono::Utc::now());
        self.failures = self.failures.saturating_add(1);
    }

    /// `ok` (addresses in service), `no_addresses`, `not_available` (the endpoint's
    /// state forbids traffic), `failing` (the last round failed) or `pending` (no round
    /// finished yet).
    pub fn condition(&self) -> &'static str {
        if self.last_error.is_some() {
            "failing"
        } else if self.last_ok.is_none() {
            "pending"
        } else if self.advice.is_some() {
            "not_available"
        } else if self.addresses == 0 {
            "no_addresses"
        } else {
            "ok"
        }
    }

    pub fn to_json(&self, region: &str) -> Value {
        json!({
            "region": region,
            "source": self.source,
            "target": self.target,
            "condition": self.condition(),
            "state": self.state,
            "message": self.advice,
            "addresses": self.addresses,
            "interfaces": self.interfaces,
            "last_ok": self.last_ok.map(|t| t.to_rfc3339()),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.map(|t| t.to_rfc3339()),
            "failures": self.failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_the_last_round() {
        let mut s = RegionStatus::default();
        assert_eq!(s.condition(), "pending");
        let pending = Outcome {
            found: vec![],
            state: Some(EndpointState::PendingAcceptance),
            interfaces: 2,
        };
        s.succeeded(&pending);
        assert_eq!(s.condition(), "not_available");
        assert_eq!(s.to_json("r")["state"], "pendingAcceptance");
        let ok = Outcome {
            found: vec![Found {
                ip: IpAddr::from([10, 0, 0, 1]),
                zone: Zone::new("use1-az1").ok(),
                zone_alias: None,
            }],
            state: Some(EndpointState::Available),
            interfaces: 1,
        };
        s.succeeded(&ok);
        assert_eq!(s.condition(), "ok");
        s.failed(&DiscoveryError::Ec2(Ec2Error::Timeout(
            Duration::from_secs(1),
        )));
        assert_eq!(s.condition(), "failing");
        assert_eq!(s.failures, 1);
        assert_eq!(s.addresses, 1, "a failed round keeps the last good count");
        s.succeeded(&Outcome {
            found: vec![],
            state: Some(EndpointState::Available),
            interfaces: 0,
        });
        assert_eq!(s.condition(), "no_addresses");
    }
}
