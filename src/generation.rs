//! Configuration generations: everything one configuration needs to serve a request
//! (its endpoints, routes, sealer, retry budget), built once per load or reload, and the
//! cell holding the generation in service.
//!
//! A request reads the current generation once at its start and keeps it to its end, so a
//! reload never changes a request half-way. The runtime ([`crate::proxy`]) builds and
//! swaps generations; the request path, the admin server, the metrics and the systemd
//! status read them through [`Current`] without seeing the runtime.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::placement::HostZone;
use crate::route::{self, Chooser, RetryBudget, RouteTable};
use crate::seal::{self, KeyService, Sealer};
use crate::upstream::discovery::Resolved;
use crate::upstream::{self, Endpoint, UpstreamError};

/// Everything one configuration generation needs to serve a request.
pub struct Generation {
    pub number: u64,
    pub config: Arc<Config>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub routes: RouteTable,
    pub sealer: Sealer,
    pub retry_budget: RetryBudget,
    pub chooser: Chooser,
    /// The tenant headers' values, made once for every request of this generation.
    pub tenant_headers: crate::headers::TenantHeaders,
    /// This host's availability zone, for zone-aware routing and the locality metric.
    pub host_zone: HostZone,
    pub loaded_at: chrono::DateTime<chrono::Utc>,
}

impl Generation {
    /// Builds the endpoints, routes and sealer of one configuration, reusing the
    /// endpoints of `previous` whose settings are unchanged (they keep their health state
    /// and pooled connections). `random_seed` seeds canary membership and the
    /// balancer's choices (tests, the demo). `host_zone` is where this host runs
    /// ([`crate::placement::learn`]).
    pub fn build(
        number: u64,
        config: Config,
        keys: KeyService,
        previous: Option<&Generation>,
        random_seed: Option<u64>,
        resolved: &Resolved,
        host_zone: HostZone,
    ) -> Result<Generation, UpstreamError> {
        let reusable = previous.map_or(&[][..], |p| p.endpoints.as_slice());
        let pools = crate::runtime::worker_count(config.runtime.workers) + 1;
        let endpoints = upstream::build_endpoints_with_pools(
            &config.endpoints,
            &config.discovery,
            &config.upstream,
            reusable,
            resolved,
            pools,
        )?;
        let routes = RouteTable::new(route_policy(&config, &host_zone), &endpoints);
        let settings = seal_settings(&config);
        // The data-key cache survives a reload that keeps the key and its limits: a reload
        // must not cost a KMS call or reset the counters.
        let sealer = match previous {
            Some(p) => Sealer::after_reload(&p.sealer, settings, keys),
            None => Sealer::new(settings, keys),
        };
        Ok(Generation {
            number,
            retry_budget: RetryBudget::new(&config.retry),
            chooser: Chooser::new(random_seed),
            tenant_headers: crate::headers::TenantHeaders::new(
                &config.tenant,
                config.kms.key_id.as_str(),
            ),
            config: Arc::new(config),
            host_zone,
            endpoints,
            routes,
            sealer,
            loaded_at: chrono::Utc::now(),
        })
    }

    pub fn contains(&self, endpoint: &Arc<Endpoint>) -> bool {
        self.endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint))
    }

    /// How many endpoints may receive requests now.
    pub fn serving(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_serving()).count()
    }
}

/// The parts of `config` the route table is built from, with the host's zone.
pub fn route_policy<'a>(config: &'a Config, host_zone: &'a HostZone) -> route::Policy<'a> {
    route::Policy {
        host_zone,
        regions: &config.regions,
        migration: &config.migration,
        rollback: config.rollback.as_ref(),
    }
}

/// The parts of `config` the sealer is built from.
pub fn seal_settings(config: &Config) -> seal::Settings<'_> {
    seal::Settings {
        kms: &config.kms,
        tenant_id: &config.tenant.id,
        max_sealed: config.upstream.max_body,
    }
}

/// The generation new requests use, replaced whole by a reload.
pub struct Current(ArcSwap<Generation>);

impl Current {
    pub fn new(generation: Arc<Generation>) -> Arc<Self> {
        Arc::new(Self(ArcSwap::new(generation)))
    }

    pub fn get(&self) -> Arc<Generation> {
        self.0.load_full()
    }

    /// Puts `generation` in service; requests already under way keep theirs.
    pub(crate) fn replace(&self, generation: Arc<Generation>) {
        self.0.store(generation);
    }
}
