//! Where this host runs, for zone-aware routing: the proxy's own availability zone and
//! how it was learned. `[placement] zone` wins; else the EC2 instance metadata service
//! (IMDSv2) is asked once at start, with one short deadline and no retries (a host off
//! EC2 must not wait for, or hammer, a link-local address); else the zone is unknown and
//! routing is zone-blind, exactly as without this module.
//!
//! Zones are compared as exact strings (see [`Zone`]). The metadata service gives the
//! host's zone id (`use1-az1`) and name (`us-east-1a`), and EC2 discovery gives each
//! ENI's id and name: gpulink keeps both on each side and calls an endpoint same-zone
//! when any spelling of the host's zone equals any spelling of the endpoint's. So ids
//! match ids and names match names whichever one an operator writes; an id is never
//! translated into a name.

use std::time::Duration;

use serde::Serialize;

use crate::config::{EndpointConfig, Placement, RouteKind, Zone};

/// The whole IMDS exchange (token, zone id, zone name) must finish within this: it runs
/// before the first generation serves, so it bounds how much later a host off EC2 starts.
pub const IMDS_DEADLINE: Duration = Duration::from_secs(1);

/// The token's lifetime (the SDK's default): the client refreshes a token near its end,
/// so a short one would cost a second PUT between the two reads.
const IMDS_TOKEN_TTL: Duration = Duration::from_secs(21_600);

/// The metadata paths of the host's zone id and name.
const ZONE_ID_PATH: &str = "/latest/meta-data/placement/availability-zone-id";
const ZONE_NAME_PATH: &str = "/latest/meta-data/placement/availability-zone";

/// How the host's zone was learned: `/status`'s `placement.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZoneSource {
    /// `[placement] zone`.
    Config,
    /// The instance metadata service.
    Imds,
    /// Not learned: routing ignores zones.
    #[default]
    None,
}

impl ZoneSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Imds => "imds",
            Self::None => "none",
        }
    }
}

/// Whether a request's endpoint is in the host's zone: the `locality` label of
/// `gpulink_privatelink_locality_total` and `/status`'s per-endpoint `locality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    SameZone,
    CrossZone,
    /// The host's zone or the endpoint's is not known.
    Unknown,
}

impl Locality {
    pub const ALL: [Locality; 3] = [Self::SameZone, Self::CrossZone, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SameZone => "same_zone",
            Self::CrossZone => "cross_zone",
            Self::Unknown => "unknown",
        }
    }
}

/// The host's zone as gpulink uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostZone {
    /// The zone shown and logged: the configured one, or IMDS's zone id (else its name).
    pub zone: Option<Zone>,
    /// The other spelling IMDS gave (the name when `zone` is the id).
    pub alias: Option<Zone>,
    pub source: ZoneSource,
    /// Why no zone was learned from IMDS, when it was asked and did not give one.
    pub note: Option<String>,
}

impl HostZone {
    /// The configured zone, if any; `None` means IMDS should be asked.
    pub fn configured(placement: &Placement) -> Option<HostZone> {
        placement.zone.clone().map(|zone| HostZone {
            zone: Some(zone),
            alias: None,
            source: ZoneSource::Config,
            note: None,
        })
    }

    /// No zone, and why.
    fn unknown(note: impl Into<String>) -> HostZone {
        HostZone {
            note: Some(note.into()),
            ..HostZone::default()
        }
    }

    pub fn is_known(&self) -> bool {
        self.zone.is_some()
    }

    fn spellings(&self) -> impl Iterator<Item = &Zone> {
        self.zone.iter().chain(self.alias.iter())
    }

    /// Where `endpoint` is relative to this host. Public endpoints and endpoints or hosts
    /// without a zone are `Unknown`.
    pub fn locality(&self, endpoint: &EndpointConfig) -> Locality {
        if endpoint.kind != RouteKind::Privatelink || !self.is_known() || endpoint.zone.is_none() {
            return Locality::Unknown;
        }
        let theirs = || endpoint.zone.iter().chain(endpoint.zone_alias.iter());
        if self.spellings().any(|mine| theirs().any(|z| z == mine)) {
            Locality::SameZone
        } else {
            Locality::CrossZone
        }
    }
}

/// Where and whether to ask the instance metadata service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imds {
    /// The service's base URL; `None`: the SDK's default (`AWS_EC2_METADATA_SERVICE_ENDPOINT`,
    /// the profile, else `http://169.254.169.254`).
    pub endpoint: Option<String>,
    /// `AWS_EC2_METADATA_DISABLED=true`: never ask.
    pub disabled: bool,
}

impl Imds {
    /// As the AWS SDKs read it from the environment.
    pub fn from_env() -> Imds {
        Imds {
            endpoint: std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                .ok()
                .filter(|e| !e.trim().is_empty()),
            disabled: std::env::var("AWS_EC2_METADATA_DISABLED")
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")),
        }
    }
}

/// The host's zone: configured, else asked from IMDS (within [`IMDS_DEADLINE`], once),
/// else unknown with the reason in `note`. Never fails: a zone is an optimisation.
pub async fn learn(placement: &Placement, imds: &Imds) -> HostZone {
    if let Some(configured) = HostZone::configured(placement) {
        return configured;
    }
    let host = ask_imds(imds).await;
    match (&host.zone, &host.note) {
        (Some(zone), _) => tracing::info!(%zone, "availability zone from the instance metadata service"),
        (None, Some(note)) => tracing::info!(
            "no availability zone for this host ({note}); routing ignores zones (set [placement] zone to prefer same-zone endpoints)"
        ),
        (None, None) => {}
    }
    host
}

/// Asks IMDS for the zone id and name. Not configured: `learn` checks that.
pub async fn ask_imds(imds: &Imds) -> HostZone {
    if imds.disabled {
        return HostZone::unknown("instance metadata disabled by AWS_EC2_METADATA_DISABLED");
    }
    let mut builder = aws_config::imds::Client::builder()
        .max_attempts(1)
        .token_ttl(IMDS_TOKEN_TTL)
        .connect_timeout(IMDS_DEADLINE)
        .read_timeout(IMDS_DEADLINE)
        .operation_timeout(IMDS_DEADLINE);
    if let Some(endpoint) = &imds.endpoint {
        builder = match builder.endpoint(endpoint) {
            Ok(builder) => builder,
            Err(_) => {
                return HostZone::unknown("AWS_EC2_METADATA_SERVICE_ENDPOINT is not a usable URL")
            }
        };
    }
    let client = builder.build();
    let read = |path: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(path)
                .await
                .ok()
                .and_then(|value| Zone::new(value.as_ref().trim()).ok())
        }
    };
    let asked = async {
        // The id first: it is the spelling that is the same in every account. The name
        // reuses the token the first read fetched.
        let id = read(ZONE_ID_PATH).await;
        let name = read(ZONE_NAME_PATH).await;
        (id, name)
    };
    match tokio::time::timeout(IMDS_DEADLINE, asked).await {
        Err(_) => HostZone::unknown(format!(
            "the instance metadata service did not answer within {IMDS_DEADLINE:?}"
        )),
        Ok((None, None)) => HostZone::unknown(
            "the instance metadata service gave no availability zone (not on EC2, or IMDS unreachable)",
        ),
        Ok((id, name)) => {
            let (zone, alias) = match (id, name) {
                (Some(id), name) => (Some(id), name),
                (None, name) => (name, None),
            };
            HostZone {
                zone,
                alias,
                source: ZoneSource::Imds,
                note: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(z: &str) -> Option<Zone> {
        Zone::new(z).ok()
    }

    fn eni(zone_: Option<&str>, alias: Option<&str>) -> EndpointConfig {
        EndpointConfig {
            region: "us-east-1".into(),
            kind: RouteKind::Privatelink,
            host: "10.0.0.1".into(),
            port: 443,
            server_name: "gpu.internal".into(),
            health_port: 8080,
            ca_file: None,
            zone: zone_.and_then(zone),
            zone_alias: alias.and_then(zone),
        }
    }

    fn host(z: &str, alias: Option<&str>) -> HostZone {
        HostZone {
            zone: zone(z),
            alias: alias.and_then(zone),
            source: ZoneSource::Imds,
            note: None,
        }
    }

    #[test]
    fn any_spelling_on_either_side_matches_and_nothing_is_translated() {
        let imds = host("use1-az1", Some("us-east-1a"));
        assert_eq!(
            imds.locality(&eni(Some("use1-az1"), Some("us-east-1a"))),
            Locality::SameZone
        );
        // An endpoint table gave a name; IMDS knows the name too.
        assert_eq!(
            imds.locality(&eni(Some("us-east-1a"), None)),
            Locality::SameZone
        );
        assert_eq!(
            imds.locality(&eni(Some("use1-az2"), Some("us-east-1b"))),
            Locality::CrossZone
        );
        // `[placement] zone` given as a name against a discovered ENI (id + name).
        let named = HostZone::configured(&Placement {
            zone: zone("us-east-1a"),
        })
        .unwrap();
        assert_eq!(named.source, ZoneSource::Config);
        assert_eq!(
            named.locality(&eni(Some("use1-az1"), Some("us-east-1a"))),
            Locality::SameZone
        );
        // An id and a name of what may be the same zone are different strings.
        assert_eq!(
            named.locality(&eni(Some("use1-az1"), None)),
            Locality::CrossZone
        );
    }

    #[test]
    fn a_missing_zone_or_a_public_endpoint_is_unknown() {
        let h = host("use1-az1", None);
        assert_eq!(h.locality(&eni(None, None)), Locality::Unknown);
        let mut public = eni(Some("use1-az1"), None);
        public.kind = RouteKind::Public;
        assert_eq!(h.locality(&public), Locality::Unknown);
        assert_eq!(
            HostZone::default().locality(&eni(Some("use1-az1"), None)),
            Locality::Unknown
        );
    }

    #[tokio::test]
    async fn disabled_imds_is_not_asked() {
        let imds = Imds {
            // Would hang if dialed: a listener that never answers.
            endpoint: Some("http://127.0.0.1:9".into()),
            disabled: true,
        };
        let h = learn(&Placement::default(), &imds).await;
        assert_eq!(h.source, ZoneSource::None);
        assert!(h.note.unwrap().contains("AWS_EC2_METADATA_DISABLED"));
        // A configured zone is used without asking.
        let c = learn(
            &Placement {
                zone: zone("use1-az4"),
            },
            &Imds::default(),
        )
        .await;
        assert_eq!((c.zone, c.source), (zone("use1-az4"), ZoneSource::Config));
    }
}
