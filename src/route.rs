//! Routing policy: which endpoints a request may use, in which order. The migration phase
//! (the guide's cutover and rollback plan) turns into an ordered list of tiers: local
//! PrivateLink, other regions' PrivateLink, local public, other regions' public.

use std::sync::Arc;

use chrono::{DateTime, FixedOffset, Utc};
use rand::Rng;

use crate::config::{Config, Phase, RouteKind};
use crate::upstream::{balance, Endpoint};

/// Endpoints of one kind in one region.
pub struct Tier {
    pub kind: RouteKind,
    pub region: String,
    pub endpoints: Vec<Arc<Endpoint>>,
}

/// The tiers of one configuration generation, precomputed so the request path only
/// filters and picks.
pub struct RouteTable {
    phase: Phase,
    canary_percent: u32,
    public_fallback_until: Option<DateTime<FixedOffset>>,
    privatelink: Vec<Tier>,
    public: Vec<Tier>,
}

/// The tiers one request may use, in order.
pub struct Plan<'a> {
    tiers: Vec<&'a Tier>,
}

impl RouteTable {
    pub fn new(config: &Config, endpoints: &[Arc<Endpoint>]) -> Self {
        // Config order of regions puts the local region first, as the tiers require.
        let tiers_of = |kind: RouteKind| -> Vec<Tier> {
            config
                .regions
                .iter()
                .map(|region| Tier {
                    kind,
                    region: region.name.clone(),
                    endpoints: endpoints
                        .iter()
                        .filter(|e| e.kind() == kind && e.region() == region.name)
                        .cloned()
                        .collect(),
                })
                .filter(|tier| !tier.endpoints.is_empty())
                .collect()
        };
        Self {
            phase: config.migration.phase,
            canary_percent: config.migration.canary_percent,
            public_fallback_until: config.migration.public_fallback_until,
            privatelink: tiers_of(RouteKind::Privatelink),
            public: tiers_of(RouteKind::Public),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether falling back to public is still allowed in phase `privatelink`. Without a
    /// `public_fallback_until` the fallback stays allowed for as long as public endpoints
    /// are configured (the guide keeps them for a week as the rollback plan).
    pub fn public_fallback_open(&self, now: DateTime<Utc>) -> bool {
        self.public_fallback_until.is_none_or(|until| now < until)
    }

    /// The tiers for one request. `rng` decides canary membership.
    pub fn plan<R: Rng + ?Sized>(&self, now: DateTime<Utc>, rng: &mut R) -> Plan<'_> {
        let privatelink = self.privatelink.iter();
        let public = self.public.iter();
        let tiers: Vec<&Tier> = match self.phase {
            Phase::Public => public.collect(),
            Phase::Canary => {
                if rng.gen_range(0..100) < self.canary_percent {
                    privatelink.chain(public).collect()
                } else {
                    public.collect()
                }
            }
            Phase::Privatelink => {
                if self.public_fallback_open(now) {
                    privatelink.chain(public).collect()
                } else {
                    privatelink.collect()
                }
            }
            Phase::PrivatelinkOnly => privatelink.collect(),
        };
        Plan { tiers }
    }
}

impl Plan<'_> {
    /// The best endpoint not in `tried`: the first tier with a serving endpoint that has
    /// capacity wins; full endpoints are used only when no tier has any other.
    pub fn select<R: Rng + ?Sized>(
        &self,
        tried: &[Arc<Endpoint>],
        rng: &mut R,
    ) -> Option<Arc<Endpoint>> {
        let usable =
            |e: &&Arc<Endpoint>| e.is_serving() && !tried.iter().any(|t| Arc::ptr_eq(t, e));
        for tier in &self.tiers {
            let candidates: Vec<&Arc<Endpoint>> = tier
                .endpoints
                .iter()
                .filter(usable)
                .filter(|e| !e.is_full())
                .collect();
            if let Some(e) = balance::pick(&candidates, rng) {
                return Some(e.clone());
            }
        }
        for tier in &self.tiers {
            let candidates: Vec<&Arc<Endpoint>> = tier.endpoints.iter().filter(usable).collect();
            if let Some(e) = balance::pick(&candidates, rng) {
                return Some(e.clone());
            }
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }
}
