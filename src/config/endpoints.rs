//! The cluster's endpoints as the configuration gives them: each `[[regions]]` entry's
//! PrivateLink ENIs and public endpoints compiled into [`EndpointConfig`]s with every
//! default applied, and the regions whose ENIs are found through DNS compiled into
//! [`DnsDiscovery`]s. Compiled once per configuration; every problem named by its key.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::compile::Problems;
use super::raw::RawRegion;
use super::sections::{Health, Upstream};
use super::zone::Zone;

/// Whether an endpoint is a PrivateLink ENI or a public endpoint of the cluster. Its JSON
/// form is its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    Privatelink,
    Public,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Privatelink => "privatelink",
            RouteKind::Public => "public",
        }
    }
}

/// A region's PrivateLink ENIs given as a DNS name: every address it resolves to is an
/// endpoint, re-resolved every `refresh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDiscovery {
    pub region: String,
    pub host: String,
    pub port: u16,
    pub server_name: String,
    pub health_port: u16,
    pub refresh: std::time::Duration,
}

impl DnsDiscovery {
    /// The endpoint for one resolved address.
    pub fn endpoint(&self, ip: IpAddr) -> EndpointConfig {
        EndpointConfig {
            region: self.region.clone(),
            kind: RouteKind::Privatelink,
            host: ip.to_string(),
            port: self.port,
            server_name: self.server_name.clone(),
            health_port: self.health_port,
            ca_file: None,
            // DNS answers say nothing about zones.
            zone: None,
        }
    }
}

/// An endpoint with every default applied: what the upstream layer dials and checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    pub region: String,
    pub kind: RouteKind,
    /// Host as written (an IP address or a DNS name).
    pub host: String,
    pub port: u16,
    /// The name the certificate is verified against; also Host / `:authority`.
    pub server_name: String,
    pub health_port: u16,
    pub ca_file: Option<PathBuf>,
    /// The availability zone of a PrivateLink ENI, when known (an endpoint table's
    /// `zone`, or discovery); always `None` for public endpoints. Part of the identity:
    /// an endpoint whose zone changes is a new endpoint.
    pub zone: Option<Zone>,
}

impl EndpointConfig {
    /// `host:port` as dialed, for logs, headers and metrics.
    pub fn authority(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// What the `[[regions]]` compile to, in configuration order (the first region is the
/// local one).
#[derive(Debug, Clone, Default)]
pub(super) struct Regions {
    pub names: Vec<String>,
    pub endpoints: Vec<EndpointConfig>,
    pub discovery: Vec<DnsDiscovery>,
}

/// Compiles every region, reporting each problem in `problems`.
pub(super) fn compile(
    regions: &[RawRegion],
    upstream: &Upstream,
    health: &Health,
    problems: &mut Problems,
) -> Regions {
    let mut out = Regions::default();
    if regions.is_empty() {
        problems.push("regions", "at least one [[regions]] entry is required");
    }
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (i, region) in regions.iter().enumerate() {
        if region.name.trim().is_empty() {
            problems.push(format!("regions[{i}].name"), "must not be empty");
        } else if !names.insert(region.name.as_str()) {
            problems.push(
                format!("regions[{i}].name"),
                format!("region `{}` appears twice", region.name),
            );
        }
        if let Some(name) = &region.privatelink_dns {
            if let Some(dns) = dns_discovery(i, region, name, upstream, health, problems) {
                out.discovery.push(dns);
            }
        }
        for (kind, list, field) in [
            (RouteKind::Privatelink, &region.privatelink, "privatelink"),
            (RouteKind::Public, &region.public, "public"),
        ] {
            for (j, spec) in list.iter().enumerate() {
                let key = format!("regions[{i}].{field}[{j}]");
                let table = spec.table();
                if kind == RouteKind::Public && table.zone.is_some() {
                    // Zone-aware routing is about the local PrivateLink tier only; a zone
                    // here would silently do nothing.
                    problems.push(
                        format!("{key}.zone"),
                        "zones apply to `privatelink` entries only (a public endpoint is \
                         not in a zone of this VPC)",
                    );
                    continue;
                }
                let zone = match table.zone.as_deref().map(Zone::new).transpose() {
                    Ok(zone) => zone,
                    Err(message) => {
                        problems.push(format!("{key}.zone"), message);
                        continue;
                    }
                };
                let Some(endpoint) = endpoint(region, kind, table, zone, upstream, health)
                    .map_err(|message| problems.push(key.clone(), message))
                    .ok()
                else {
                    continue;
                };
                if !seen.insert((endpoint.host.clone(), endpoint.port)) {
                    problems.push(
                        "regions",
                        format!("endpoint `{}` is listed twice", endpoint.authority()),
                    );
                }
                if let Some(ca) = &endpoint.ca_file {
                    super::file::check_ca_file(&format!("{key}.ca_file"), ca, problems);
                }
                out.endpoints.push(endpoint);
            }
        }
        out.names.push(region.name.clone());
    }
    out
}

/// One endpoint entry with its defaults: port 443, the TLS name from the entry, else
/// the host when it is a name, else `upstream.server_name`.
fn endpoint(
    region: &RawRegion,
    kind: RouteKind,
    table: super::raw::EndpointTable,
    zone: Option<Zone>,
    upstream: &Upstream,
    health: &Health,
) -> Result<EndpointConfig, String> {
    let (host, port) = split_host_port(&table.address)?;
    let server_name = match (table.server_name, host.parse::<IpAddr>()) {
        (Some(name), _) => name,
        (None, Err(_)) => host.clone(),
        (None, Ok(_)) => upstream.server_name.clone().ok_or_else(|| {
            format!(
                "`{host}` is an IP address, so gpulink needs the TLS name to verify: \
                 set `upstream.server_name` or `server_name` in this entry"
            )
        })?,
    };
    if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
        return Err(format!("`{server_name}` is not a valid TLS server name"));
    }
    Ok(EndpointConfig {
        region: region.name.clone(),
        kind,
        host,
        port,
        server_name,
        health_port: table.health_port.unwrap_or(health.port),
        ca_file: table.ca_file,
        zone,
    })
}

/// A region's `privatelink_dns`: a DNS name (not an address), instead of a list.
fn dns_discovery(
    i: usize,
    region: &RawRegion,
    name: &str,
    upstream: &Upstream,
    health: &Health,
    problems: &mut Problems,
) -> Option<DnsDiscovery> {
    let key = format!("regions[{i}].privatelink_dns");
    let mut bad = |message: String| {
        problems.push(key.clone(), message);
        None
    };
    if !region.privatelink.is_empty() {
        return bad(
            "give either `privatelink` (a list of ENI addresses) or `privatelink_dns`, not both"
                .into(),
        );
    }
    let (host, port) = match split_host_port(name) {
        Ok(split) => split,
        Err(message) => return bad(message),
    };
    if host.parse::<IpAddr>().is_ok() {
        return bad(format!(
            "`{host}` is an address; put addresses in `privatelink`"
        ));
    }
    // `upstream.server_name` when set: the VPC endpoint's own DNS name is rarely in the
    // cluster's certificate.
    let server_name = upstream.server_name.clone().unwrap_or_else(|| host.clone());
    if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
        return bad(format!("`{host}` is not a valid DNS name"));
    }
    Some(DnsDiscovery {
        region: region.name.clone(),
        host,
        port,
        server_name,
        health_port: health.port,
        refresh: region.dns_refresh.get(),
    })
}

/// Splits `host[:port]` (IPv6 as `[::1]:443`); the port defaults to 443.
pub fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let address = address.trim();
    if address.is_empty() {
        return Err("an endpoint address must not be empty".into());
    }
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Ok((ip.to_string(), 443));
    }
    if let Ok(sa) = address.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("`{address}` has an invalid port (1..=65535)"));
        }
        return Ok((sa.ip().to_string(), sa.port()));
    }
    if address.contains("://") || address.contains('/') {
        return Err(format!(
            "`{address}` must be host[:port], without a scheme or path"
        ));
    }
    match address.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{address}` has an invalid port (1..=65535)"))?;
            Ok((host.to_string(), port))
        }
        None => Ok((address.to_string(), 443)),
    }
}
