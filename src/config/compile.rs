//! Compiling the file as written ([`RawConfig`]) into the [`Config`] every component
//! reads: defaults that depend on other keys applied, the key id and the endpoints
//! typed, every value checked. Every problem is collected and reported at once, each
//! naming its key; a configuration with any problem compiles to nothing.

use super::endpoints::{self, RouteKind};
use super::key::{check_key_arn, KeyId};
use super::raw::{RawConfig, RawKms, RawPlacement, RawTenant};
use super::sections::{Kms, Phase, Placement, SealFormat, Tenant};
use super::zone::Zone;
use super::Config;

/// `(key, problem)` pairs, at most one per key, in the order found.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<(String, String)>);

impl Problems {
    /// Records a problem with `key`, unless one is already recorded for it (the first
    /// says what to fix first).
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        if !self.0.iter().any(|(k, _)| *k == key) {
            self.0.push((key, message.into()));
        }
    }

    /// Adds `why` to the problem just found, when it is `key`'s.
    pub fn explain_last(&mut self, key: &str, why: &str) {
        if let Some((k, message)) = self.0.last_mut() {
            if k == key {
                message.push_str("; ");
                message.push_str(why);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }
}

/// Compiles a parsed file; `Err` holds every problem found.
pub(super) fn compile(raw: RawConfig) -> Result<Config, Vec<(String, String)>> {
    let mut p = Problems::default();
    super::bounds::check(&raw, &mut p);
    let tenant = tenant(raw.tenant, &mut p);
    let kms = kms(raw.kms, &mut p);
    let placement = placement(&raw.placement, &mut p);
    if let Some(ca) = &raw.upstream.ca_file {
        super::file::check_ca_file("upstream.ca_file", ca, &mut p);
    }
    if !raw.health.path.starts_with('/') {
        p.push("health.path", "must start with `/`");
    }
    let before = p.len();
    let regions = endpoints::compile(&raw.regions, &raw.upstream, &raw.health, &mut p);
    // Whether the phase can be served is only known when every endpoint compiled: a
    // broken entry is the problem to name, not the phase it leaves unsatisfied.
    if p.len() == before {
        let has_privatelink = !regions.discovery.is_empty()
            || regions
                .endpoints
                .iter()
                .any(|e| e.kind == RouteKind::Privatelink);
        let has_public = regions
            .endpoints
            .iter()
            .any(|e| e.kind == RouteKind::Public);
        if let Some(message) = unsatisfiable(raw.migration.phase, has_privatelink, has_public) {
            p.push("migration.phase", message);
        }
    }
    if p.len() > 0 {
        return Err(p.into_vec());
    }
    Ok(Config {
        listen: raw.listen,
        admin: raw.admin,
        log: raw.log,
        runtime: raw.runtime,
        tenant,
        kms,
        upstream: raw.upstream,
        health: raw.health,
        outlier: raw.outlier,
        retry: raw.retry,
        regions: regions.names,
        endpoints: regions.endpoints,
        discovery: regions.discovery,
        migration: raw.migration,
        rollback: raw.rollback,
        placement,
    })
}

fn placement(raw: &RawPlacement, p: &mut Problems) -> Placement {
    let zone = raw.zone.as_deref().and_then(|zone| {
        Zone::new(zone)
            .map_err(|message| p.push("placement.zone", message))
            .ok()
    });
    Placement { zone }
}

fn tenant(raw: RawTenant, p: &mut Problems) -> Tenant {
    if raw.id.trim().is_empty() {
        p.push("tenant.id", "must not be empty");
    }
    for (key, value) in [
        ("tenant.id", &raw.id),
        ("tenant.model_pool", &raw.model_pool),
    ] {
        if http::HeaderValue::from_str(value).is_err() {
            p.push(
                key,
                format!("`{value}` cannot be sent as an HTTP header value"),
            );
        }
    }
    let model_pools = if raw.model_pools.is_empty() {
        vec![raw.model_pool.clone()]
    } else {
        raw.model_pools
    };
    let tenant = Tenant {
        id: raw.id,
        model_pool: raw.model_pool,
        model_pools,
    };
    if !tenant.allows_pool(&tenant.model_pool) {
        p.push(
            "tenant.model_pools",
            format!("must include the default pool `{}`", tenant.model_pool),
        );
    }
    tenant
}

fn kms(raw: RawKms, p: &mut Problems) -> Kms {
    if raw.key_id.trim().is_empty() {
        p.push(
            "kms.key_id",
            "must name a KMS key (an ARN, key id or alias)",
        );
    }
    if raw.region.trim().is_empty() {
        p.push("kms.region", "must name an AWS region such as us-east-1");
    }
    if raw.format != SealFormat::KmsDirect {
        // Decided: require the key ARN rather than resolving an alias at start. The
        // ESDK header's provider info is the key ARN, and official decryptors in
        // strict mode only open data keys whose provider info equals a key ARN they
        // are configured with; an ARN in the file is what the cluster team configures
        // too, and `check` can verify it offline.
        if let Err(message) = check_key_arn(&raw.key_id, &raw.region) {
            p.push(
                "kms.key_id",
                format!(
                    "{message}. With kms.format = \"{}\" gpulink writes the key ARN into \
                     every AWS Encryption SDK message, and the cluster's decryptor (any \
                     official ESDK in strict mode) only opens messages whose key ARN \
                     matches the one it is configured with, so an alias or bare key id \
                     is not accepted here; find the ARN with `aws kms describe-key \
                     --key-id <alias or id>`",
                    raw.format.as_str()
                ),
            );
        }
    }
    if let Some(url) = &raw.endpoint_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            p.push(
                "kms.endpoint_url",
                format!("`{url}` must start with http:// or https://"),
            );
        }
    }
    Kms {
        key_id: KeyId::new(&raw.key_id),
        region: raw.region,
        format: raw.format,
        context: raw.context,
        timeout: raw.timeout,
        endpoint_url: raw.endpoint_url,
        cache: raw.cache,
    }
}

/// Why `phase` cannot be served by the configured endpoints, if it cannot.
fn unsatisfiable(phase: Phase, has_privatelink: bool, has_public: bool) -> Option<String> {
    match phase {
        Phase::Public if !has_public => {
            Some("phase `public` needs at least one `public` endpoint".into())
        }
        Phase::Canary if !(has_public && has_privatelink) => {
            Some("phase `canary` needs both `privatelink` and `public` endpoints".into())
        }
        Phase::Privatelink | Phase::PrivatelinkOnly if !has_privatelink => Some(format!(
            "phase `{}` needs at least one `privatelink` endpoint",
            phase.as_str()
        )),
        _ => None,
    }
}
