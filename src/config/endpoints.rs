//! The cluster's endpoints as the configuration gives them: each `[[regions]]` entry's
//! PrivateLink ENIs and public endpoints compiled into [`EndpointConfig`]s with every
//! default applied, and the regions whose ENIs are found at run time (through DNS, or
//! through EC2 from a VPC endpoint id) compiled into [`Discovery`]s. Compiled once per
//! configuration; every problem named by its key.

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

/// A region's PrivateLink ENIs found at run time: every address discovery finds is an
/// endpoint, found again every `refresh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub region: String,
    pub source: DiscoverySource,
    /// The port the found addresses are dialed on.
    pub port: u16,
    pub server_name: String,
    pub health_port: u16,
    pub refresh: std::time::Duration,
}

/// Where a region's ENI addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoverySource {
    /// `privatelink_dns`: every address the name resolves to.
    Dns { host: String },
    /// `privatelink_endpoint_id`: the VPC endpoint's network interfaces as EC2 lists
    /// them (`ec2_endpoint_url` overrides where the EC2 calls go).
    Ec2 {
        endpoint_id: String,
        endpoint_url: Option<String>,
    },
}

impl DiscoverySource {
    /// `dns` or `ec2`, for `/status` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DiscoverySource::Dns { .. } => "dns",
            DiscoverySource::Ec2 { .. } => "ec2",
        }
    }

    /// The name or endpoint id being discovered.
    pub fn target(&self) -> &str {
        match self {
            DiscoverySource::Dns { host } => host,
            DiscoverySource::Ec2 { endpoint_id, .. } => endpoint_id,
        }
    }
}

/// One address discovery found, with its zone when the source knows it (EC2 does).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    pub ip: IpAddr,
    pub zone: Option<Zone>,
    /// The zone's other spelling, when the source gives both (EC2: `zone` is the id,
    /// this the name), so a host zone given either way matches.
    pub zone_alias: Option<Zone>,
}

impl Discovery {
    /// The endpoint for one found address.
    pub fn endpoint(&self, found: &Found) -> EndpointConfig {
        EndpointConfig {
            region: self.region.clone(),
            kind: RouteKind::Privatelink,
            host: found.ip.to_string(),
            port: self.port,
            server_name: self.server_name.clone(),
            health_port: self.health_port,
            ca_file: None,
            // EC2 gives each ENI's zone; DNS answers say nothing about zones.
            zone: found.zone.clone(),
            zone_alias: found.zone_alias.clone(),
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
    /// The zone's name when `zone` is its id (EC2 discovery gives both); zone-aware
    /// routing matches the host's zone against either ([`crate::placement`]).
    pub zone_alias: Option<Zone>,
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
    pub discovery: Vec<Discovery>,
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
        if let Some(id) = &region.privatelink_endpoint_id {
            if let Some(ec2) = ec2_discovery(i, region, id, upstream, health, problems) {
                out.discovery.push(ec2);
            }
        } else {
            for key in ["privatelink_port", "ec2_endpoint_url"] {
                let set = match key {
                    "privatelink_port" => region.privatelink_port.is_some(),
                    _ => region.ec2_endpoint_url.is_some(),
                };
                if set {
                    problems.push(
                        format!("regions[{i}].{key}"),
                        "only applies with `privatelink_endpoint_id`",
                    );
                }
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
        zone_alias: None,
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
) -> Option<Discovery> {
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
    Some(Discovery {
        region: region.name.clone(),
        source: DiscoverySource::Dns { host },
        port,
        server_name,
        health_port: health.port,
        refresh: region.dns_refresh.get(),
    })
}

/// A region's `privatelink_endpoint_id`: a VPC endpoint id (`vpce-` and hex digits),
/// instead of a list or a DNS name. The ENIs are addresses, so the TLS name is
/// `upstream.server_name`.
fn ec2_discovery(
    i: usize,
    region: &RawRegion,
    id: &str,
    upstream: &Upstream,
    health: &Health,
    problems: &mut Problems,
) -> Option<Discovery> {
    let key = format!("regions[{i}].privatelink_endpoint_id");
    let before = problems.len();
    if !region.privatelink.is_empty() || region.privatelink_dns.is_some() {
        problems.push(
            key.clone(),
            "give one of `privatelink` (ENI addresses), `privatelink_dns` or \
             `privatelink_endpoint_id`, not several",
        );
    }
    if !valid_endpoint_id(id) {
        problems.push(
            key.clone(),
            format!(
                "`{id}` is not a VPC endpoint id (`vpce-` and 8 or 17 hex digits, as \
                 `aws ec2 describe-vpc-endpoints` prints it)"
            ),
        );
    }
    if region.privatelink_port == Some(0) {
        problems.push(
            format!("regions[{i}].privatelink_port"),
            "0 is out of range: must be 1..=65535",
        );
    }
    match &region.ec2_endpoint_url {
        Some(url) => {
            if let Err(e) = crate::ec2::check_endpoint_url(url) {
                problems.push(format!("regions[{i}].ec2_endpoint_url"), e.to_string());
            }
        }
        None if !crate::ec2::valid_region(&region.name) => problems.push(
            format!("regions[{i}].name"),
            format!(
                "`{}` is not an AWS region name, which `privatelink_endpoint_id` needs to \
                 reach EC2 (or set `ec2_endpoint_url`)",
                region.name
            ),
        ),
        None => {}
    }
    let server_name = match &upstream.server_name {
        Some(name) => name.clone(),
        None => {
            problems.push(
                key,
                "the discovered ENIs are IP addresses, so gpulink needs the TLS name to \
                 verify: set `upstream.server_name`",
            );
            return None;
        }
    };
    if problems.len() != before {
        return None;
    }
    Some(Discovery {
        region: region.name.clone(),
        source: DiscoverySource::Ec2 {
            endpoint_id: id.to_string(),
            endpoint_url: region.ec2_endpoint_url.clone(),
        },
        port: region.privatelink_port.unwrap_or(443),
        server_name,
        health_port: health.port,
        refresh: region.discovery_refresh.get(),
    })
}

/// `vpce-` and 8 or 17 lowercase hex digits (EC2's short and long id forms).
pub fn valid_endpoint_id(id: &str) -> bool {
    id.strip_prefix("vpce-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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
