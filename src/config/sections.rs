//! The sections of the configuration, each the settings of one component: what
//! `[listen]`, `[health]`, `[retry]`, ... hold, with their defaults. A component takes
//! its own section (`&Health`, `&Outlier`, `&Upstream`), never the whole file.
//!
//! Where the section as parsed is already its final form it is parsed directly (the
//! durations and sizes are typed units: [`HumanDuration`], [`ByteSize`]); the ranges are
//! checked by the compiler (`bounds.rs`). `[tenant]` and `[kms]` are compiled from their
//! raw forms (`raw.rs`): the pool list gets its default, the key id its type, and
//! `[placement]` its zone checked ([`Zone`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::{DateTime, FixedOffset};
use serde::Deserialize;

use super::key::KeyId;
use super::units::{ByteSize, HumanDuration};
use super::zone::Zone;

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

/// `[runtime]`: the threads that serve requests (see `crate::runtime`).
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Request-path threads, each a single-threaded runtime with its own listener
    /// socket and upstream pools; 0 = the cores this process may use. Restart only.
    pub workers: usize,
}

/// `[tenant]`, with `model_pools` defaulted to `[model_pool]`.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub model_pool: String,
    /// Always includes `model_pool`.
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
    pub const ALL: [SealFormat; 3] = [Self::KmsDirect, Self::AwsEsdk, Self::Auto];

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

impl ContextMode {
    pub const ALL: [ContextMode; 2] = [Self::Tenant, Self::None];

    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::None => "none",
        }
    }
}

/// `[kms]` with its key id typed: an ARN whenever the format needs one.
#[derive(Debug, Clone)]
pub struct Kms {
    pub key_id: KeyId,
    pub region: String,
    pub format: SealFormat,
    pub context: ContextMode,
    pub timeout: HumanDuration,
    pub endpoint_url: Option<String>,
    pub cache: KeyCache,
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
    /// Every phase, in the order of the migration (the order `/metrics` lists them in).
    pub const ALL: [Phase; 4] = [
        Phase::Public,
        Phase::Canary,
        Phase::Privatelink,
        Phase::PrivatelinkOnly,
    ];

    /// The name as written in the file; also the `phase` label, `/status` and logs.
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

/// `[placement]`, compiled: this host's availability zone when the file gives it. `None`
/// means "ask the instance metadata service at start, else unknown".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub zone: Option<Zone>,
}
