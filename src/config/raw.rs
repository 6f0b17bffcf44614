//! The configuration file exactly as written: the serde shape of the TOML, unknown keys
//! rejected, defaults of single keys applied. Nothing here is validated beyond what
//! serde and the unit parsers check; [`super::compile`] turns it into a [`super::Config`].
//!
//! Sections whose parsed form is already their final one (`[listen]`, `[health]`, ...)
//! are the compiled types themselves (see `sections.rs`); only what compiling changes has
//! a raw type here.

use std::path::PathBuf;

use serde::Deserialize;

use super::sections::{
    Admin, ContextMode, Health, KeyCache, Listen, Log, Migration, Outlier, Retry, Rollback,
    Runtime, SealFormat, Upstream,
};
use super::units::HumanDuration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub runtime: Runtime,
    pub tenant: RawTenant,
    pub kms: RawKms,
    #[serde(default)]
    pub upstream: Upstream,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub retry: Retry,
    #[serde(default)]
    pub regions: Vec<RawRegion>,
    #[serde(default)]
    pub migration: Migration,
    #[serde(default)]
    pub rollback: Option<Rollback>,
    #[serde(default)]
    pub placement: RawPlacement,
}

/// `[placement]`: where this host runs. Unset keys are learned at start (see
/// `crate::placement`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlacement {
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub id: String,
    pub model_pool: String,
    /// Empty: only `model_pool`.
    #[serde(default)]
    pub model_pools: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKms {
    pub key_id: String,
    pub region: String,
    #[serde(default)]
    pub format: SealFormat,
    #[serde(default)]
    pub context: ContextMode,
    #[serde(default = "RawKms::default_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub cache: KeyCache,
}

impl RawKms {
    fn default_timeout() -> HumanDuration {
        HumanDuration::from_secs(3)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    pub name: String,
    #[serde(default)]
    pub privatelink: Vec<EndpointSpec>,
    #[serde(default)]
    pub public: Vec<EndpointSpec>,
    #[serde(default)]
    pub privatelink_dns: Option<String>,
    #[serde(default = "RawRegion::default_dns_refresh")]
    pub dns_refresh: HumanDuration,
    /// A VPC endpoint whose ENIs EC2 lists (`DescribeVpcEndpoints`).
    #[serde(default)]
    pub privatelink_endpoint_id: Option<String>,
    /// The inference port of the discovered ENIs (443 when unset).
    #[serde(default)]
    pub privatelink_port: Option<u16>,
    #[serde(default = "RawRegion::default_discovery_refresh")]
    pub discovery_refresh: HumanDuration,
    /// Where the EC2 calls go instead of `AWS_ENDPOINT_URL_EC2` / the region's EC2.
    #[serde(default)]
    pub ec2_endpoint_url: Option<String>,
}

impl RawRegion {
    fn default_dns_refresh() -> HumanDuration {
        HumanDuration::from_secs(30)
    }

    fn default_discovery_refresh() -> HumanDuration {
        HumanDuration::from_secs(300)
    }
}

/// One endpoint as written in the file: `"host[:port]"` or a table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum EndpointSpec {
    Address(String),
    Table(EndpointTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EndpointTable {
    pub address: String,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub health_port: Option<u16>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The ENI's availability zone (id or name), for zone-aware routing.
    #[serde(default)]
    pub zone: Option<String>,
}

impl EndpointSpec {
    pub fn table(&self) -> EndpointTable {
        match self {
            EndpointSpec::Address(address) => EndpointTable {
                address: address.clone(),
                server_name: None,
                health_port: None,
                ca_file: None,
                zone: None,
            },
            EndpointSpec::Table(t) => t.clone(),
        }
    }
}
