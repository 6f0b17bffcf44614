//! The configuration file: the TOML schema of `docs/design.md` with its defaults, parsing with
//! unknown keys rejected, and validation whose messages name the offending key.
//!
//! Everything downstream takes a validated [`Config`]; nothing else reads the file.

mod bounds;
mod file;
mod units;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset};
use serde::Deserialize;

pub use file::{read_regular_file, MAX_CA_FILE, MAX_CONFIG_FILE};
pub use units::{parse_duration, parse_size, ByteSize, HumanDuration};

/// The exit code `gpulink check` uses for an invalid configuration (sysexits EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

/// How long reading the configuration file (and the CA files it names) may take.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// KMS refuses `Encrypt` plaintext over this many bytes.
pub const KMS_DIRECT_MAX_PLAINTEXT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: invalid `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// Several keys are invalid: all are reported at once, one per line.
    #[error("{path}: {} invalid values:{}", problems.len(), list_problems(problems))]
    InvalidMany {
        path: PathBuf,
        problems: Vec<(String, String)>,
    },
}

fn list_problems(problems: &[(String, String)]) -> String {
    problems
        .iter()
        .map(|(key, message)| format!("\n  invalid `{key}`: {message}"))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub log: Log,
    pub tenant: Tenant,
    pub kms: Kms,
    #[serde(default)]
    pub upstream: Upstream,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub retry: Retry,
    #[serde(default)]
    pub regions: Vec<Region>,
    #[serde(default)]
    pub migration: Migration,
    #[serde(default)]
    pub rollback: Option<Rollback>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub address: SocketAddr,
    pub max_body: ByteSize,
    pub max_connections: usize,
    /// Request bodies held at once, plaintext and sealed copy; past it: 503 `overloaded`.
    pub max_in_flight_bytes: ByteSize,
    /// From accepting a connection (or the end of its previous request) to a complete
    /// request head.
    pub header_read_timeout: HumanDuration,
    /// The longest silence while a request body is read, and the allowance the body
    /// starts with before `body_min_rate` counts.
    pub body_read_timeout: HumanDuration,
    /// Bytes per second a body must average after `body_read_timeout`; 0 = no rate.
    pub body_min_rate: ByteSize,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: HumanDuration,
    pub h2_keepalive_interval: HumanDuration,
    pub h2_keepalive_timeout: HumanDuration,
    /// The longest a write to a client may wait (a client that stops reading its answer).
    pub send_timeout: HumanDuration,
    pub drain_delay: HumanDuration,
    pub shutdown_grace: HumanDuration,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body: ByteSize(10_000_000),
            max_connections: 10_000,
            max_in_flight_bytes: ByteSize(256 * 1024 * 1024),
            header_read_timeout: HumanDuration::from_secs(10),
            body_read_timeout: HumanDuration::from_secs(10),
            body_min_rate: ByteSize(16 * 1024),
            idle_timeout: HumanDuration::from_secs(60),
            h2_keepalive_interval: HumanDuration::from_secs(30),
            h2_keepalive_timeout: HumanDuration::from_secs(10),
            send_timeout: HumanDuration::from_secs(30),
            drain_delay: HumanDuration::from_secs(2),
            shutdown_grace: HumanDuration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub address: SocketAddr,
    /// Its own limit, small, so admin clients cannot take file descriptors from the
    /// data path.
    pub max_connections: usize,
    pub header_read_timeout: HumanDuration,
    pub idle_timeout: HumanDuration,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 9901)),
            max_connections: 64,
            header_read_timeout: HumanDuration::from_secs(10),
            idle_timeout: HumanDuration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    pub model_pool: String,
    #[serde(default)]
    pub model_pools: Vec<String>,
}

impl Tenant {
    pub fn allows_pool(&self, pool: &str) -> bool {
        self.model_pools.iter().any(|p| p == pool)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SealFormat {
    KmsDirect,
    AwsEsdk,
    #[default]
    Auto,
}

impl SealFormat {
    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            SealFormat::KmsDirect => "kms-direct",
            SealFormat::AwsEsdk => "aws-esdk",
            SealFormat::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    #[default]
    Tenant,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kms {
    pub key_id: String,
    pub region: String,
    #[serde(default)]
    pub format: SealFormat,
    #[serde(default)]
    pub context: ContextMode,
    #[serde(default = "Kms::default_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub cache: KeyCache,
}

impl Kms {
    fn default_timeout() -> HumanDuration {
        HumanDuration::from_secs(3)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyCache {
    pub max_age: HumanDuration,
    pub max_messages: u64,
    pub max_bytes: ByteSize,
}

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            max_age: HumanDuration::from_secs(300),
            max_messages: 100_000,
            max_bytes: ByteSize(10 * 1024 * 1024 * 1024),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    pub server_name: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub max_body: ByteSize,
    pub connect_timeout: HumanDuration,
    pub request_timeout: HumanDuration,
    pub idle_timeout: HumanDuration,
    pub pool_idle_timeout: HumanDuration,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            server_name: None,
            ca_file: None,
            max_body: ByteSize(10_000_000),
            connect_timeout: HumanDuration::from_secs(2),
            request_timeout: HumanDuration::from_secs(30),
            idle_timeout: HumanDuration::from_secs(60),
            pool_idle_timeout: HumanDuration::from_secs(90),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub port: u16,
    pub path: String,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub max_staleness: HumanDuration,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            port: 8080,
            path: "/health".into(),
            interval: HumanDuration::from_secs(2),
            timeout: HumanDuration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            max_staleness: HumanDuration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: HumanDuration,
    pub max_ejection: HumanDuration,
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: HumanDuration::from_secs(10),
            max_ejection: HumanDuration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    pub max_attempts: u32,
    pub budget_percent: u32,
    pub min_per_second: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_percent: 20,
            min_per_second: 10,
        }
    }
}

/// One endpoint as written in the file: `"host[:port]"` or a table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EndpointSpec {
    Address(String),
    Table(EndpointTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointTable {
    pub address: String,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub health_port: Option<u16>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl EndpointSpec {
    fn table(&self) -> EndpointTable {
        match self {
            EndpointSpec::Address(address) => EndpointTable {
                address: address.clone(),
                server_name: None,
                health_port: None,
                ca_file: None,
            },
            EndpointSpec::Table(t) => t.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    #[serde(default)]
    pub privatelink: Vec<EndpointSpec>,
    #[serde(default)]
    pub public: Vec<EndpointSpec>,
    #[serde(default)]
    pub privatelink_dns: Option<String>,
    #[serde(default = "Region::default_dns_refresh")]
    pub dns_refresh: HumanDuration,
}

impl Region {
    fn default_dns_refresh() -> HumanDuration {
        HumanDuration::from_secs(30)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Public,
    Canary,
    #[default]
    Privatelink,
    PrivatelinkOnly,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Public => "public",
            Phase::Canary => "canary",
            Phase::Privatelink => "privatelink",
            Phase::PrivatelinkOnly => "privatelink-only",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Migration {
    pub phase: Phase,
    pub canary_percent: u32,
    pub public_fallback_until: Option<DateTime<FixedOffset>>,
}

impl Default for Migration {
    fn default() -> Self {
        Self {
            phase: Phase::Privatelink,
            canary_percent: 10,
            public_fallback_until: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollback {
    pub window: HumanDuration,
    pub min_requests: u64,
    pub max_error_rate: f64,
    pub max_p99: HumanDuration,
    pub cooldown: HumanDuration,
}

impl Default for Rollback {
    fn default() -> Self {
        Self {
            window: HumanDuration::from_secs(60),
            min_requests: 100,
            max_error_rate: 0.05,
            max_p99: HumanDuration::from_secs(2),
            cooldown: HumanDuration::from_secs(600),
        }
    }
}

/// Whether an endpoint is a PrivateLink ENI or a public endpoint of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = Self::read(path)?;
        Self::from_toml(&text, path)
    }

    /// As [`Config::load`], off the async workers (a reload must never stall requests
    /// or `/live` on a slow file system) and bounded by [`READ_TIMEOUT`]: a read that
    /// does not finish is a rejected reload, never a hang.
    pub async fn load_off_thread(path: &Path) -> Result<Config, ConfigError> {
        let owned = path.to_owned();
        let read = tokio::task::spawn_blocking(move || Config::load(&owned));
        match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(ConfigError::Read {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("not read within {READ_TIMEOUT:?}"),
                ),
            }),
        }
    }

    /// The file's text, read only when it is a regular UTF-8 file of at most
    /// [`MAX_CONFIG_FILE`] bytes (see [`read_regular_file`]).
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = read_regular_file(path, MAX_CONFIG_FILE).map_err(read_error)?;
        String::from_utf8(bytes).map_err(|_| {
            read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        })
    }

    /// Parses and validates configuration text; `path` only labels messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&e),
        })?;
        config.apply_defaults();
        // Every out-of-range value, then the first structural problem, all in one answer.
        let mut problems = bounds::check(&config).0;
        if let Err((key, message)) = config.validate() {
            if !problems.iter().any(|(k, _)| *k == key) {
                problems.push((key, message));
            }
        }
        match problems.len() {
            0 => Ok(config),
            1 => {
                let (key, message) = problems.remove(0);
                Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    key,
                    message,
                })
            }
            _ => Err(ConfigError::InvalidMany {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    fn apply_defaults(&mut self) {
        if self.tenant.model_pools.is_empty() {
            self.tenant.model_pools = vec![self.tenant.model_pool.clone()];
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        if self.tenant.id.trim().is_empty() {
            return bad("tenant.id", "must not be empty".into());
        }
        for (key, value) in [
            ("tenant.id", &self.tenant.id),
            ("tenant.model_pool", &self.tenant.model_pool),
        ] {
            if http::HeaderValue::from_str(value).is_err() {
                return bad(
                    key,
                    format!("`{value}` cannot be sent as an HTTP header value"),
                );
            }
        }
        if !self.tenant.allows_pool(&self.tenant.model_pool) {
            return bad(
                "tenant.model_pools",
                format!("must include the default pool `{}`", self.tenant.model_pool),
            );
        }
        if self.kms.key_id.trim().is_empty() {
            return bad(
                "kms.key_id",
                "must name a KMS key (an ARN, key id or alias)".into(),
            );
        }
        if self.kms.region.trim().is_empty() {
            return bad(
                "kms.region",
                "must name an AWS region such as us-east-1".into(),
            );
        }
        if self.kms.format != SealFormat::KmsDirect {
            // Decided: require the key ARN rather than resolving an alias at start. The
            // ESDK header's provider info is the key ARN, and official decryptors in
            // strict mode only open data keys whose provider info equals a key ARN they
            // are configured with; an ARN in the file is what the cluster team configures
            // too, and `check` can verify it offline.
            if let Err(message) = check_key_arn(&self.kms.key_id, &self.kms.region) {
                return bad(
                    "kms.key_id",
                    format!(
                        "{message}. With kms.format = \"{}\" gpulink writes the key ARN into \
                         every AWS Encryption SDK message, and the cluster's decryptor (any \
                         official ESDK in strict mode) only opens messages whose key ARN \
                         matches the one it is configured with, so an alias or bare key id \
                         is not accepted here; find the ARN with `aws kms describe-key \
                         --key-id <alias or id>`",
                        self.kms.format.as_str()
                    ),
                );
            }
        }
        if let Some(url) = &self.kms.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad(
                    "kms.endpoint_url",
                    format!("`{url}` must start with http:// or https://"),
                );
            }
        }
        self.validate_client_limits()?;
        if let Some(ca) = &self.upstream.ca_file {
            check_ca_file("upstream.ca_file", ca)?;
        }
        if !self.health.path.starts_with('/') {
            return bad("health.path", "must start with `/`".into());
        }
        if self.regions.is_empty() {
            return bad(
                "regions",
                "at least one [[regions]] entry is required".into(),
            );
        }
        let mut names = BTreeSet::new();
        for (i, region) in self.regions.iter().enumerate() {
            if region.name.trim().is_empty() {
                return bad(&format!("regions[{i}].name"), "must not be empty".into());
            }
            if !names.insert(region.name.as_str()) {
                return bad(
                    &format!("regions[{i}].name"),
                    format!("region `{}` appears twice", region.name),
                );
            }
            if let Some(name) = &region.privatelink_dns {
                let key = format!("regions[{i}].privatelink_dns");
                if !region.privatelink.is_empty() {
                    return bad(
                        &key,
                        "give either `privatelink` (a list of ENI addresses) or `privatelink_dns`, not both".into(),
                    );
                }
                let (host, _) = split_host_port(name).map_err(|m| (key.clone(), m))?;
                if host.parse::<IpAddr>().is_ok() {
                    return bad(
                        &key,
                        format!("`{host}` is an address; put addresses in `privatelink`"),
                    );
                }
                if rustls_pki_types::ServerName::try_from(self.dns_server_name(&host)).is_err() {
                    return bad(&key, format!("`{host}` is not a valid DNS name"));
                }
            }
        }
        let endpoints = self.endpoints()?;
        let has_privatelink = endpoints.iter().any(|e| e.kind == RouteKind::Privatelink)
            || self.regions.iter().any(|r| r.privatelink_dns.is_some());
        let has_public = endpoints.iter().any(|e| e.kind == RouteKind::Public);
        match self.migration.phase {
            Phase::Public if !has_public => {
                return bad(
                    "migration.phase",
                    "phase `public` needs at least one `public` endpoint".into(),
                )
            }
            Phase::Canary if !(has_public && has_privatelink) => {
                return bad(
                    "migration.phase",
                    "phase `canary` needs both `privatelink` and `public` endpoints".into(),
                )
            }
            Phase::Privatelink | Phase::PrivatelinkOnly if !has_privatelink => {
                return bad(
                    "migration.phase",
                    format!(
                        "phase `{}` needs at least one `privatelink` endpoint",
                        self.migration.phase.as_str()
                    ),
                )
            }
            _ => {}
        }
        let mut seen = BTreeSet::new();
        for e in &endpoints {
            if !seen.insert((e.host.clone(), e.port)) {
                return bad(
                    "regions",
                    format!("endpoint `{}` is listed twice", e.authority()),
                );
            }
            if let Some(ca) = &e.ca_file {
                check_ca_file("regions.ca_file", ca)?;
            }
        }
        Ok(())
    }

    /// Every endpoint with defaults applied, in tier-relevant config order.
    pub fn endpoints(&self) -> Result<Vec<EndpointConfig>, (String, String)> {
        let mut out = Vec::new();
        for (i, region) in self.regions.iter().enumerate() {
            for (kind, list, field) in [
                (RouteKind::Privatelink, &region.privatelink, "privatelink"),
                (RouteKind::Public, &region.public, "public"),
            ] {
                for (j, spec) in list.iter().enumerate() {
                    let key = format!("regions[{i}].{field}[{j}]");
                    let table = spec.table();
                    let (host, port) =
                        split_host_port(&table.address).map_err(|m| (key.clone(), m))?;
                    let server_name = match (&table.server_name, host.parse::<IpAddr>()) {
                        (Some(name), _) => name.clone(),
                        (None, Err(_)) => host.clone(),
                        (None, Ok(_)) => self.upstream.server_name.clone().ok_or_else(|| {
                            (
                                key.clone(),
                                format!(
                                    "`{host}` is an IP address, so gpulink needs the TLS name to verify: \
                                     set `upstream.server_name` or `server_name` in this entry"
                                ),
                            )
                        })?,
                    };
                    if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
                        return Err((
                            key,
                            format!("`{server_name}` is not a valid TLS server name"),
                        ));
                    }
                    out.push(EndpointConfig {
                        region: region.name.clone(),
                        kind,
                        host,
                        port,
                        server_name,
                        health_port: table.health_port.unwrap_or(self.health.port),
                        ca_file: table.ca_file.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The regions whose PrivateLink ENIs are discovered through DNS.
    pub fn dns_discovery(&self) -> Vec<DnsDiscovery> {
        self.regions
            .iter()
            .filter_map(|region| {
                let name = region.privatelink_dns.as_ref()?;
                let (host, port) = split_host_port(name).ok()?;
                Some(DnsDiscovery {
                    region: region.name.clone(),
                    server_name: self.dns_server_name(&host),
                    host,
                    port,
                    health_port: self.health.port,
                    refresh: region.dns_refresh.get(),
                })
            })
            .collect()
    }

    /// The TLS name for endpoints found through DNS: `upstream.server_name` when set (the
    /// VPC endpoint's own DNS name is rarely in the cluster's certificate), else the name.
    fn dns_server_name(&self, host: &str) -> String {
        self.upstream
            .server_name
            .clone()
            .unwrap_or_else(|| host.to_string())
    }

    /// The first region is the local one.
    pub fn local_region(&self) -> &str {
        self.regions.first().map(|r| r.name.as_str()).unwrap_or("")
    }
}

/// Checks that `key_id` is a KMS key ARN, `arn:PARTITION:kms:REGION:ACCOUNT:key/ID`, in
/// `region` (KMS only serves a key in its own region).
pub fn check_key_arn(key_id: &str, region: &str) -> Result<(), String> {
    let not_arn = || {
        format!(
            "`{key_id}` is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/KEY-ID; \
             aliases and bare key ids are refused)"
        )
    };
    let parts: Vec<&str> = key_id.splitn(6, ':').collect();
    let [arn, partition, service, key_region, account, resource] = parts[..] else {
        return Err(not_arn());
    };
    let Some(id) = resource.strip_prefix("key/") else {
        return Err(not_arn());
    };
    let id_ok = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if arn != "arn"
        || !partition.starts_with("aws")
        || service != "kms"
        || key_region.is_empty()
        || account.len() != 12
        || !account.chars().all(|c| c.is_ascii_digit())
        || !id_ok
    {
        return Err(not_arn());
    }
    if key_region != region {
        return Err(format!(
            "the key `{key_id}` is in region `{key_region}` but kms.region is `{region}`; \
             KMS serves a key only in its own region"
        ));
    }
    Ok(())
}

impl Config {
    /// The bounds on what clients can hold: time per connection and body, connections,
    /// and the in-flight body budget.
    fn validate_client_limits(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        let ms = std::time::Duration::from_millis;
        let s = std::time::Duration::from_secs;
        for (key, value, min, max) in [
            (
                "listen.header_read_timeout",
                self.listen.header_read_timeout,
                ms(100),
                s(300),
            ),
            (
                "listen.body_read_timeout",
                self.listen.body_read_timeout,
                ms(100),
                s(600),
            ),
            (
                "listen.idle_timeout",
                self.listen.idle_timeout,
                ms(100),
                s(3600),
            ),
            (
                "listen.h2_keepalive_interval",
                self.listen.h2_keepalive_interval,
                ms(100),
                s(3600),
            ),
            (
                "listen.h2_keepalive_timeout",
                self.listen.h2_keepalive_timeout,
                ms(100),
                s(300),
            ),
            (
                "listen.send_timeout",
                self.listen.send_timeout,
                ms(100),
                s(600),
            ),
            (
                "admin.header_read_timeout",
                self.admin.header_read_timeout,
                ms(100),
                s(300),
            ),
            (
                "admin.idle_timeout",
                self.admin.idle_timeout,
                ms(100),
                s(3600),
            ),
        ] {
            if value.get() < min || value.get() > max {
                return bad(
                    key,
                    format!(
                        "{value} is out of range; use {} to {}",
                        HumanDuration(min),
                        HumanDuration(max)
                    ),
                );
            }
        }
        if self.listen.body_min_rate.bytes() > 1 << 30 {
            return bad(
                "listen.body_min_rate",
                "must be at most 1GiB (bytes per second); 0 turns the rate check off".into(),
            );
        }
        if !(1..=10_000).contains(&self.admin.max_connections) {
            return bad(
                "admin.max_connections",
                "must be between 1 and 10000".into(),
            );
        }
        // One request of the largest size must fit, or it could never be served.
        let one_request = self
            .listen
            .max_body
            .bytes()
            .saturating_add(self.upstream.max_body.bytes());
        let budget = self.listen.max_in_flight_bytes.bytes();
        if budget < one_request || budget > 1 << 40 {
            return bad(
                "listen.max_in_flight_bytes",
                format!(
                    "{budget} bytes is out of range; use at least listen.max_body + upstream.max_body ({one_request} bytes: one request of the largest size, plaintext and sealed) and at most 1TiB"
                ),
            );
        }
        Ok(())
    }
}

/// Loads the CA file exactly as `run` does, so that `check` and `run` never disagree.
/// Opening it first names the sandbox cause when it cannot be read: under the systemd
/// unit a root-owned 0600 file exists but cannot be opened.
fn check_ca_file(key: &str, path: &Path) -> Result<(), (String, String)> {
    // Non-blocking: opening a FIFO for reading would otherwise wait for a writer.
    let opened = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    };
    if let Err(e) = opened {
        return Err((
            key.to_string(),
            format!(
                "cannot read `{}`: {e}{}",
                path.display(),
                sandbox_hint(key, path, &e)
            ),
        ));
    }
    crate::tls::check_ca_file(path).map_err(|e| (key.to_string(), e.to_string()))
}

/// What to check when a file that works from a shell fails under the systemd unit
/// (packaging/systemd/gpulink.service): DynamicUser= runs gpulink as an unprivileged
/// user of its own, and PrivateTmp= gives it an empty /tmp of its own.
pub fn sandbox_hint(key: &str, path: &Path, error: &std::io::Error) -> String {
    let in_tmp = path.starts_with("/tmp") || path.starts_with("/var/tmp");
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            ". Under the systemd unit gpulink runs as an unprivileged dynamic user \
             (DynamicUser=yes): make the file readable by it (a CA certificate is not secret: \
             chmod 0644, and its directories o+x), or hand it over with LoadCredential= and \
             point `{key}` at /run/credentials/gpulink.service/NAME (recipe: \
             /usr/share/doc/gpulink/examples/credentials.conf)"
        ),
        std::io::ErrorKind::NotFound if in_tmp => format!(
            ". Under the systemd unit /tmp and /var/tmp are private to the service \
             (PrivateTmp=yes), so files placed there from a shell are not visible to it: \
             move the file (e.g. to /etc/gpulink/) and update `{key}`"
        ),
        _ => String::new(),
    }
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

/// toml's messages carry a snippet with line and column; keep them, they point at the key.
fn describe_toml_error(e: &toml::de::Error) -> String {
    e.to_string().trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [tenant]
        id = "tenant-123"
        model_pool = "model-a"
        [kms]
        key_id = "arn:aws:kms:us-east-1:111122223333:key/k"
        region = "us-east-1"
        [upstream]
        server_name = "gpu.internal"
        [[regions]]
        name = "us-east-1"
        privatelink = ["10.34.10.50", "10.34.11.50:8443", { address = "10.34.12.50", server_name = "eni.internal", health_port = 9090 }]
        public = ["gpu.us-east-1.example.com"]
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen.address.to_string(), "127.0.0.1:8000");
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:9901");
        assert_eq!(c.listen.max_body.bytes(), 10_000_000);
        assert_eq!(c.tenant.model_pools, vec!["model-a".to_string()]);
        assert_eq!(c.migration.phase, Phase::Privatelink);
        assert_eq!(c.kms.format, SealFormat::Auto);
        let eps = c.endpoints().unwrap();
        assert_eq!(eps.len(), 4);
        assert_eq!(eps[0].port, 443);
        assert_eq!(eps[0].server_name, "gpu.internal");
        assert_eq!(eps[0].health_port, 8080);
        assert_eq!(eps[1].port, 8443);
        assert_eq!(eps[2].server_name, "eni.internal");
        assert_eq!(eps[2].health_port, 9090);
        assert_eq!(eps[3].kind, RouteKind::Public);
        assert_eq!(eps[3].server_name, "gpu.us-east-1.example.com");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nconect_timeout = \"2s\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("conect_timeout"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = MINIMAL.replace(
            "[upstream]",
            "[upstream]\nconnect_timeout = \"2 fortnights\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("connect_timeout"), "{err}");
    }

    #[test]
    fn ip_endpoint_needs_a_server_name() {
        let text = MINIMAL.replace("server_name = \"gpu.internal\"", "");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("regions[0].privatelink[0]"), "{err}");
    }

    #[test]
    fn default_pool_must_be_allowed() {
        let text = MINIMAL.replace(
            "model_pool = \"model-a\"",
            "model_pool = \"model-a\"\nmodel_pools = [\"model-b\"]",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("tenant.model_pools"), "{err}");
    }

    #[test]
    fn envelope_formats_need_a_key_arn_in_the_kms_region() {
        // MINIMAL uses the default format, auto, with an ARN: valid.
        assert_eq!(parse(MINIMAL).unwrap().kms.format, SealFormat::Auto);
        for (key_id, format, why) in [
            ("alias/gpulink", "auto", "not a KMS key ARN"),
            (
                "1234abcd-12ab-34cd-56ef-1234567890ab",
                "aws-esdk",
                "not a KMS key ARN",
            ),
            (
                "arn:aws:kms:us-east-1:111122223333:alias/gpulink",
                "aws-esdk",
                "not a KMS key ARN",
            ),
            (
                "arn:aws:kms:us-east-1:1111:key/k",
                "auto",
                "not a KMS key ARN",
            ),
            (
                "arn:aws:kms:eu-west-1:111122223333:key/k",
                "auto",
                "eu-west-1",
            ),
        ] {
            let text = MINIMAL
                .replace("arn:aws:kms:us-east-1:111122223333:key/k", key_id)
                .replace(
                    "region = \"us-east-1\"\n",
                    &format!("region = \"us-east-1\"\nformat = \"{format}\"\n"),
                );
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("kms.key_id") && err.contains(why),
                "{key_id}: {err}"
            );
            assert!(err.contains("describe-key"), "{err}");
        }
        // kms-direct accepts an alias: KMS Encrypt resolves it.
        let text = MINIMAL
            .replace("arn:aws:kms:us-east-1:111122223333:key/k", "alias/gpulink")
            .replace(
                "region = \"us-east-1\"\n",
                "region = \"us-east-1\"\nformat = \"kms-direct\"\n",
            );
        parse(&text).unwrap();
        // Other partitions and multi-Region keys are ARNs too.
        assert!(check_key_arn(
            "arn:aws-cn:kms:cn-north-1:111122223333:key/mrk-1a2b",
            "cn-north-1"
        )
        .is_ok());
    }

    #[test]
    fn cache_limits_must_be_positive() {
        for (line, key) in [
            ("max_age = \"0s\"", "kms.cache.max_age"),
            ("max_messages = 0", "kms.cache.max_messages"),
            ("max_bytes = \"0B\"", "kms.cache.max_bytes"),
        ] {
            let text = MINIMAL.replace("[upstream]", &format!("[kms.cache]\n{line}\n[upstream]"));
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn host_port_split() {
        assert_eq!(
            split_host_port("10.0.0.1").unwrap(),
            ("10.0.0.1".into(), 443)
        );
        assert_eq!(
            split_host_port("10.0.0.1:8443").unwrap(),
            ("10.0.0.1".into(), 8443)
        );
        assert_eq!(split_host_port("[::1]:8443").unwrap(), ("::1".into(), 8443));
        assert_eq!(
            split_host_port("a.example.com").unwrap(),
            ("a.example.com".into(), 443)
        );
        assert!(split_host_port("https://a.example.com").is_err());
        assert!(split_host_port("a:b").is_err());
    }
}
