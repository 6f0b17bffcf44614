//! Routing policy: which endpoints a request may use, in which order. The migration phase
//! (the guide's cutover and rollback plan) turns into an ordered list of tiers: local
//! PrivateLink, other regions' PrivateLink, local public, other regions' public. Also the
//! policies that decide over many requests: the retry budget and automatic rollback.
//!
//! **Fall-through across tiers.** A broken tier must cost no request another tier could
//! carry. Two rules together guarantee it within `retry.max_attempts` (and the retry
//! budget):
//!
//! 1. A request's connect or TLS failure takes that endpoint's data path out at once
//!    (see [`crate::upstream::health`]), so the next selection, this request's retry
//!    included, skips it: each attempt on a tier whose inference port just broke uses up
//!    one of its endpoints, and once none is left [`Plan::select`] moves to the next tier.
//! 2. When every attempt so far failed before the request was sent, the **last** attempt
//!    goes to the first tier below every tier already tried that has a serving endpoint
//!    ([`Plan::select_fall_through`]); only when no lower tier has one does it stay. So a
//!    local tier of three ENIs whose :443 broke before gpulink noticed, with
//!    `max_attempts = 3`, costs two failed connects and the request is served by the next
//!    tier; with `max_attempts = 2`, one.
//!
//! A request that may have reached the cluster is never retried at all, so neither rule
//! can replay one.

pub mod budget;
pub mod rollback;

use std::sync::{Arc, Mutex};

use chrono::{DateTime, FixedOffset, Utc};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::config::{Migration, Phase, Rollback, RouteKind};
use crate::upstream::{balance, Endpoint};
pub use budget::RetryBudget;
pub use rollback::RollbackMonitor;

/// The randomness behind canary membership and power-of-two choices: the thread's RNG,
/// or a seeded one so tests can replay a sequence of choices.
pub enum Chooser {
    Thread,
    Seeded(Box<Mutex<StdRng>>),
}

impl Chooser {
    pub fn new(seed: Option<u64>) -> Self {
        match seed {
            Some(seed) => Chooser::Seeded(Box::new(Mutex::new(StdRng::seed_from_u64(seed)))),
            None => Chooser::Thread,
        }
    }

    /// An RNG to use within one statement (it is not `Send`; never hold it across
    /// an `.await`).
    pub fn rng(&self) -> ChooserRng<'_> {
        match self {
            Chooser::Seeded(rng) => match rng.lock() {
                Ok(guard) => ChooserRng::Seeded(guard),
                Err(_) => ChooserRng::Thread(rand::thread_rng()),
            },
            Chooser::Thread => ChooserRng::Thread(rand::thread_rng()),
        }
    }
}

pub enum ChooserRng<'a> {
    Thread(rand::rngs::ThreadRng),
    Seeded(std::sync::MutexGuard<'a, StdRng>),
}

impl RngCore for ChooserRng<'_> {
    fn next_u32(&mut self) -> u32 {
        match self {
            ChooserRng::Thread(r) => r.next_u32(),
            ChooserRng::Seeded(r) => r.next_u32(),
        }
    }
    fn next_u64(&mut self) -> u64 {
        match self {
            ChooserRng::Thread(r) => r.next_u64(),
            ChooserRng::Seeded(r) => r.next_u64(),
        }
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        match self {
            ChooserRng::Thread(r) => r.fill_bytes(dest),
            ChooserRng::Seeded(r) => r.fill_bytes(dest),
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        match self {
            ChooserRng::Thread(r) => r.try_fill_bytes(dest),
            ChooserRng::Seeded(r) => r.try_fill_bytes(dest),
        }
    }
}

/// The state of the public fallback window worth telling an operator about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowNotice {
    /// Closes at the given time, this much from now.
    Closing(DateTime<FixedOffset>, chrono::TimeDelta),
    Closed(DateTime<FixedOffset>),
}

/// Endpoints of one kind in one region.
pub struct Tier {
    pub kind: RouteKind,
    pub region: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// For the local region's PrivateLink tier, when the host's zone and some endpoint's
    /// zone are known: which endpoints (same order) are in the host's zone. Empty: the
    /// tier is zone-blind (every other tier, and no zone known).
    pub same_zone: Vec<bool>,
}

/// Zone-aware routing spills out of the host's zone when the best same-zone endpoint's
/// balancer cost (latency × (in-flight + 1) / capacity weight, [`balance::cost`]) is
/// more than this many times the best other-zone endpoint's. 2 keeps the local zone
/// through ordinary noise and a moderate queue, and moves traffic once it is clearly
/// slower or busier (Envoy spills by host counts; gpulink has the live scores, so it
/// spills by those).
pub const ZONE_SPILL_RATIO: f64 = 2.0;

/// Which endpoints of a zone-aware tier one pick chooses among.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneChoice {
    /// Only the same-zone candidates.
    SameZone,
    /// Every candidate: the local zone has none, or it is clearly worse.
    Spill,
}

/// The zone rule: given the lowest cost among same-zone candidates and among the
/// others (`None`: no such candidate), stay in the zone unless it has no candidate or
/// its best is more than [`ZONE_SPILL_RATIO`] times the others' best.
pub fn zone_choice(same_zone_best: Option<f64>, other_best: Option<f64>) -> ZoneChoice {
    match (same_zone_best, other_best) {
        (None, _) => ZoneChoice::Spill,
        (Some(_), None) => ZoneChoice::SameZone,
        (Some(local), Some(other)) if local > ZONE_SPILL_RATIO * other => ZoneChoice::Spill,
        (Some(_), Some(_)) => ZoneChoice::SameZone,
    }
}

/// The tiers of one configuration generation, precomputed so the request path only
/// filters and picks.
pub struct RouteTable {
    phase: Phase,
    canary_percent: u32,
    public_fallback_until: Option<DateTime<FixedOffset>>,
    privatelink: Vec<Tier>,
    public: Vec<Tier>,
    rollback: Option<RollbackMonitor>,
}

/// What a [`RouteTable`] is built from: the parts of the configuration that decide where
/// requests go, and nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// Where this host runs: zone-aware routing in the local PrivateLink tier.
    pub host_zone: &'a crate::placement::HostZone,
    /// The region names in configuration order; the first is the local one.
    pub regions: &'a [String],
    pub migration: &'a Migration,
    /// `[rollback]`, when automatic rollback is configured.
    pub rollback: Option<&'a Rollback>,
}

/// The tiers one request may use, in order.
pub struct Plan<'a> {
    tiers: Vec<&'a Tier>,
}

impl RouteTable {
    pub fn new(policy: Policy<'_>, endpoints: &[Arc<Endpoint>]) -> Self {
        // Config order of regions puts the local region first, as the tiers require.
        let tiers_of = |kind: RouteKind| -> Vec<Tier> {
            policy
                .regions
                .iter()
                .enumerate()
                .map(|(n, region)| {
                    let endpoints: Vec<Arc<Endpoint>> = endpoints
                        .iter()
                        .filter(|e| e.kind() == kind && e.region() == region)
                        .cloned()
                        .collect();
                    let same_zone = if n == 0 && kind == RouteKind::Privatelink {
                        same_zone(policy.host_zone, &endpoints)
                    } else {
                        Vec::new()
                    };
                    Tier {
                        kind,
                        region: region.clone(),
                        endpoints,
                        same_zone,
                    }
                })
                .filter(|tier| !tier.endpoints.is_empty())
                .collect()
        };
        Self {
            phase: policy.migration.phase,
            canary_percent: policy.migration.canary_percent,
            public_fallback_until: policy.migration.public_fallback_until,
            privatelink: tiers_of(RouteKind::Privatelink),
            public: tiers_of(RouteKind::Public),
            rollback: policy.rollback.cloned().map(RollbackMonitor::new),
        }
    }

    /// The endpoints sharing `endpoint`'s tier (same route kind and region).
    pub fn tier_members(&self, endpoint: &Endpoint) -> &[Arc<Endpoint>] {
        self.privatelink
            .iter()
            .chain(self.public.iter())
            .find(|t| t.kind == endpoint.kind() && t.region == endpoint.region())
            .map_or(&[], |t| t.endpoints.as_slice())
    }

    pub fn rollback(&self) -> Option<&RollbackMonitor> {
        self.rollback.as_ref()
    }

    /// Whether automatic rollback may act now: configured, phase `canary`, or phase
    /// `privatelink` inside the public fallback window; never `privatelink-only`.
    pub fn rollback_allowed(&self, now: DateTime<Utc>) -> bool {
        self.rollback.is_some()
            && !self.public.is_empty()
            && match self.phase {
                Phase::Canary => true,
                Phase::Privatelink => self.public_fallback_open(now),
                Phase::Public | Phase::PrivatelinkOnly => false,
            }
    }

    /// What an operator should hear about the public fallback window at `now`: a
    /// warning during its last day, a notice once it has closed.
    pub fn fallback_window_notice(&self, now: DateTime<Utc>) -> Option<WindowNotice> {
        if self.phase != Phase::Privatelink || self.public.is_empty() {
            return None;
        }
        let until = self.public_fallback_until?;
        let left = until.signed_duration_since(now);
        if left <= chrono::TimeDelta::zero() {
            Some(WindowNotice::Closed(until))
        } else if left <= chrono::TimeDelta::hours(24) {
            Some(WindowNotice::Closing(until, left))
        } else {
            None
        }
    }

    /// Whether traffic is rolled back to public right now.
    pub fn is_rolled_back(&self, now: DateTime<Utc>) -> bool {
        self.rollback_allowed(now) && self.rollback.as_ref().is_some_and(|r| r.is_rolled_back())
    }

    /// Feeds one PrivateLink outcome to the rollback monitor (when rollback may act).
    pub fn record_privatelink(
        &self,
        now: DateTime<Utc>,
        error: bool,
        latency: std::time::Duration,
    ) {
        if !self.rollback_allowed(now) {
            return;
        }
        if let Some(breach) = self
            .rollback
            .as_ref()
            .and_then(|r| r.record(error, latency))
        {
            tracing::error!(
                requests = breach.requests,
                error_rate = breach.error_rate,
                p99_ms = breach.p99_ms,
                "automatic rollback: {}; traffic moves to public until the cool-down ends or the configuration is reloaded",
                breach.reason
            );
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
            // Rolled back: public first; PrivateLink stays as the fallback, since
            // failing requests outright would be worse than a degraded PrivateLink.
            Phase::Canary | Phase::Privatelink if self.is_rolled_back(now) => {
                public.chain(privatelink).collect()
            }
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

/// Which of `endpoints` are in the host's zone; empty (zone-blind) unless the host's
/// zone and at least one endpoint's are known.
fn same_zone(host: &crate::placement::HostZone, endpoints: &[Arc<Endpoint>]) -> Vec<bool> {
    use crate::placement::Locality;
    let localities: Vec<Locality> = endpoints.iter().map(|e| host.locality(&e.config)).collect();
    if localities.iter().all(|l| *l == Locality::Unknown) {
        return Vec::new();
    }
    localities
        .iter()
        .map(|l| *l == Locality::SameZone)
        .collect()
}

/// The balancer's pick among `candidates` (each marked same-zone or not) by the zone
/// rule ([`zone_choice`]): among the same-zone ones while they are not clearly worse,
/// else among all of them, so a slow local zone still gets its share when it recovers.
fn pick_zone_aware<'a, R: Rng + ?Sized>(
    candidates: &[(bool, &'a Arc<Endpoint>)],
    rng: &mut R,
) -> Option<&'a Arc<Endpoint>> {
    // An other-zone endpoint without a latency sample yet is no evidence that the local
    // zone is worse (the balancer assumes 1 ms for it): the rule compares measured ones.
    let best = |same: bool| {
        candidates
            .iter()
            .filter(|(s, e)| *s == same && (same || e.latency().is_some()))
            .map(|(_, e)| balance::cost(e))
            .reduce(f64::min)
    };
    let pool: Vec<&Arc<Endpoint>> = match zone_choice(best(true), best(false)) {
        ZoneChoice::SameZone => candidates
            .iter()
            .filter(|(same, _)| *same)
            .map(|(_, e)| *e)
            .collect(),
        ZoneChoice::Spill => candidates.iter().map(|(_, e)| *e).collect(),
    };
    balance::pick(&pool, rng)
}

impl Plan<'_> {
    /// The best endpoint not in `tried`: the first tier with a serving endpoint that has
    /// capacity wins; full endpoints are used only when no tier has any other.
    pub fn select<R: Rng + ?Sized>(
        &self,
        tried: &[Arc<Endpoint>],
        rng: &mut R,
    ) -> Option<Arc<Endpoint>> {
        self.pick(&self.tiers, tried, false, rng)
            .or_else(|| self.pick(&self.tiers, tried, true, rng))
    }

    /// For the last attempt of a request whose attempts all failed before it was sent:
    /// the best endpoint with capacity in the tiers below every tier in `tried`, else
    /// (no lower tier has one) the same as [`Plan::select`].
    pub fn select_fall_through<R: Rng + ?Sized>(
        &self,
        tried: &[Arc<Endpoint>],
        rng: &mut R,
    ) -> Option<Arc<Endpoint>> {
        let lowest_tried = tried.iter().filter_map(|e| self.tier_of(e)).max();
        lowest_tried
            .and_then(|lowest| self.tiers.get(lowest + 1..))
            .and_then(|lower| self.pick(lower, tried, false, rng))
            .or_else(|| self.select(tried, rng))
    }

    /// The position of `endpoint`'s tier in this plan.
    fn tier_of(&self, endpoint: &Arc<Endpoint>) -> Option<usize> {
        self.tiers
            .iter()
            .position(|tier| tier.endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint)))
    }

    /// The balancer's pick in the first of `tiers` with a serving endpoint not in
    /// `tried` (and, unless `full`, with capacity).
    fn pick<R: Rng + ?Sized>(
        &self,
        tiers: &[&Tier],
        tried: &[Arc<Endpoint>],
        full: bool,
        rng: &mut R,
    ) -> Option<Arc<Endpoint>> {
        for tier in tiers {
            let usable = |e: &Arc<Endpoint>| {
                e.is_serving() && !tried.iter().any(|t| Arc::ptr_eq(t, e)) && (full || !e.is_full())
            };
            let candidates: Vec<(bool, &Arc<Endpoint>)> = tier
                .endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| usable(e))
                .map(|(n, e)| (tier.same_zone.get(n).copied().unwrap_or(false), e))
                .collect();
            let chosen = if tier.same_zone.is_empty() {
                let all: Vec<&Arc<Endpoint>> = candidates.iter().map(|(_, e)| *e).collect();
                balance::pick(&all, rng)
            } else {
                pick_zone_aware(&candidates, rng)
            };
            if let Some(e) = chosen {
                return Some(e.clone());
            }
        }
        None
    }

    /// Why none of the plan's endpoints serves, for the `no_endpoint` message: each
    /// reason once, with how many endpoints it holds out, e.g. `3 × data path: wrong
    /// server name`. Empty when some endpoint serves (or there is none).
    pub fn why_none_serve(&self) -> String {
        let mut reasons: Vec<(String, usize)> = Vec::new();
        for endpoint in self.tiers.iter().flat_map(|tier| tier.endpoints.iter()) {
            let label =
                |p: Option<crate::upstream::diagnose::Problem>| p.map_or("failing", |p| p.label());
            let reason = if !endpoint.is_data_path_ok() {
                format!(
                    "data path: {}",
                    label(endpoint.data_path_snapshot().problem)
                )
            } else if !endpoint.is_healthy() {
                format!(
                    "health check: {}",
                    label(endpoint.health_snapshot().problem)
                )
            } else if endpoint.outlier.is_ejected() {
                "ejected after failures".to_string()
            } else {
                continue;
            };
            match reasons.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => reasons.push((reason, 1)),
            }
        }
        reasons
            .iter()
            .map(|(reason, n)| format!("{n} × {reason}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }

    /// The route of the first tier: where the request would have gone.
    pub fn first_route(&self) -> Option<RouteKind> {
        self.tiers.first().map(|tier| tier.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(phase: &str, extra: &str) -> (RouteTable, Vec<Arc<Endpoint>>) {
        let config = crate::testing::config(&format!(
            r#"
            [[regions]]
            name = "us-east-1"
            privatelink = ["10.0.0.1", "10.0.0.2"]
            public = ["public.example.com"]
            [[regions]]
            name = "us-west-2"
            privatelink = ["10.1.0.1"]
            [migration]
            phase = "{phase}"
            canary_percent = 25
            {extra}
            "#
        ));
        route_table(&config, &crate::placement::HostZone::default())
    }

    /// The table a generation would build from `config` on a host in `host_zone`.
    fn route_table(
        config: &Config,
        host_zone: &crate::placement::HostZone,
    ) -> (RouteTable, Vec<Arc<Endpoint>>) {
        let endpoints = crate::testing::endpoints(config);
        let policy = crate::generation::route_policy(config, host_zone);
        (RouteTable::new(policy, &endpoints), endpoints)
    }

    /// Every PrivateLink endpoint fails its health check; public ones stay up.
    fn privatelink_down(endpoints: &[Arc<Endpoint>]) {
        for e in endpoints
            .iter()
            .filter(|e| e.kind() == RouteKind::Privatelink)
        {
            e.set_healthy(false);
        }
    }

    fn first_choice(table: &RouteTable, rng: &mut StdRng) -> Option<Arc<Endpoint>> {
        table.plan(Utc::now(), rng).select(&[], rng)
    }

    #[test]
    fn tiers_are_local_privatelink_then_remote_then_public() {
        let (t, endpoints) = table("privatelink", "");
        let mut rng = StdRng::seed_from_u64(1);
        let kinds = |e: &Arc<Endpoint>| (e.kind(), e.region().to_string());
        let first = first_choice(&t, &mut rng).expect("endpoint");
        assert_eq!(kinds(&first), (RouteKind::Privatelink, "us-east-1".into()));
        for e in &endpoints[..2] {
            e.set_healthy(false);
        }
        let second = first_choice(&t, &mut rng).expect("endpoint");
        assert_eq!(kinds(&second), (RouteKind::Privatelink, "us-west-2".into()));
        endpoints[3].set_healthy(false);
        let third = first_choice(&t, &mut rng).expect("endpoint");
        assert_eq!(third.kind(), RouteKind::Public);
    }

    #[test]
    fn full_endpoints_come_last() {
        let (t, endpoints) = table("privatelink", "");
        endpoints[0].set_capacity(Some(0));
        endpoints[1].set_capacity(Some(0));
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..20 {
            let e = first_choice(&t, &mut rng).expect("endpoint");
            assert_eq!(e.region(), "us-west-2");
        }
    }

    #[test]
    fn canary_sends_about_its_share_to_privatelink() {
        let (t, _) = table("canary", "");
        let mut rng = StdRng::seed_from_u64(3);
        let privatelink = (0..4000)
            .filter(|_| {
                first_choice(&t, &mut rng).is_some_and(|e| e.kind() == RouteKind::Privatelink)
            })
            .count();
        assert!((800..1200).contains(&privatelink), "{privatelink} of 4000");
    }

    #[test]
    fn fallback_window() {
        let (open, _) = table(
            "privatelink",
            "public_fallback_until = \"2999-01-01T00:00:00Z\"",
        );
        assert!(open.public_fallback_open(Utc::now()));
        assert_eq!(open.fallback_window_notice(Utc::now()), None);
        let (closed, endpoints) = table(
            "privatelink",
            "public_fallback_until = \"2000-01-01T00:00:00+02:00\"",
        );
        assert!(!closed.public_fallback_open(Utc::now()));
        assert!(matches!(
            closed.fallback_window_notice(Utc::now()),
            Some(WindowNotice::Closed(_))
        ));
        privatelink_down(&endpoints);
        let mut rng = StdRng::seed_from_u64(4);
        assert!(first_choice(&closed, &mut rng).is_none());
        let soon = (Utc::now() + chrono::TimeDelta::hours(3)).to_rfc3339();
        let (closing, _) = table(
            "privatelink",
            &format!("public_fallback_until = \"{soon}\""),
        );
        assert!(matches!(
            closing.fallback_window_notice(Utc::now()),
            Some(WindowNotice::Closing(..))
        ));
    }

    #[test]
    fn a_broken_tier_falls_through_to_the_next_one() {
        // Three local ENIs whose :443 just broke, not yet learned: all still serving.
        let text_extra = "";
        let (t, endpoints) = table("privatelink", text_extra);
        let mut rng = StdRng::seed_from_u64(6);
        let plan = t.plan(Utc::now(), &mut rng);
        let local: Vec<Arc<Endpoint>> = endpoints
            .iter()
            .filter(|e| e.kind() == RouteKind::Privatelink && e.region() == "us-east-1")
            .cloned()
            .collect();
        assert_eq!(local.len(), 2);
        // Rule 2: after one unsent failure in the local tier, the last attempt (here the
        // second of max_attempts = 2) goes to the next tier although a local ENI serves.
        let tried = vec![local[0].clone()];
        let last = plan
            .select_fall_through(&tried, &mut rng)
            .expect("endpoint");
        assert_eq!(
            (last.kind(), last.region()),
            (RouteKind::Privatelink, "us-west-2")
        );
        // An ordinary (not last) retry stays in the tier while it has a serving endpoint.
        let next = plan.select(&tried, &mut rng).expect("endpoint");
        assert!(Arc::ptr_eq(&next, &local[1]));
        // Having tried the remote tier too, the last attempt goes to public.
        let tried = vec![local[0].clone(), last.clone()];
        let last = plan
            .select_fall_through(&tried, &mut rng)
            .expect("endpoint");
        assert_eq!(last.kind(), RouteKind::Public);
        // A full lower tier is passed over for a lower one with capacity.
        let remote = endpoints
            .iter()
            .find(|e| e.region() == "us-west-2")
            .expect("remote");
        remote.set_capacity(Some(0));
        let last = plan
            .select_fall_through(&[local[0].clone()], &mut rng)
            .expect("endpoint");
        assert_eq!(last.kind(), RouteKind::Public);
        remote.set_capacity(None);
        // Rule 1: a data path taken out makes plain selection skip the endpoint, so with
        // every local ENI out the first choice is already the next tier.
        for e in &local {
            e.set_data_path_ok(false);
            assert!(!e.is_serving());
        }
        let first = plan.select(&[], &mut rng).expect("endpoint");
        assert_eq!(first.region(), "us-west-2");
        // Nothing lower can serve: the last attempt stays where an endpoint serves.
        for e in &endpoints {
            e.set_data_path_ok(e.region() == "us-east-1" && e.kind() == RouteKind::Privatelink);
        }
        let tried = vec![local[0].clone()];
        let last = plan
            .select_fall_through(&tried, &mut rng)
            .expect("endpoint");
        assert!(Arc::ptr_eq(&last, &local[1]));
    }

    #[test]
    fn fall_through_respects_the_phase() {
        let (t, endpoints) = table("privatelink-only", "");
        let mut rng = StdRng::seed_from_u64(7);
        let plan = t.plan(Utc::now(), &mut rng);
        let remote = endpoints
            .iter()
            .find(|e| e.region() == "us-west-2")
            .expect("remote")
            .clone();
        // The lowest tier this phase allows was tried: no public, back to the local tier.
        let last = plan
            .select_fall_through(&[remote], &mut rng)
            .expect("endpoint");
        assert_eq!(
            (last.kind(), last.region()),
            (RouteKind::Privatelink, "us-east-1")
        );
    }

    /// Three local ENIs, one per zone, a remote region and public; the host in `host`.
    fn zoned(host: Option<&str>) -> (RouteTable, Vec<Arc<Endpoint>>) {
        let config = crate::testing::config(
            r#"
            [[regions]]
            name = "us-east-1"
            privatelink = [
              { address = "10.0.0.1", zone = "use1-az1" },
              { address = "10.0.0.2", zone = "use1-az2" },
              { address = "10.0.0.3", zone = "use1-az4" },
            ]
            public = ["public.example.com"]
            [[regions]]
            name = "us-west-2"
            privatelink = [{ address = "10.1.0.1", zone = "usw2-az1" }]
            [migration]
            phase = "privatelink"
            "#,
        );
        let host_zone = crate::placement::HostZone {
            zone: host.and_then(|z| crate::config::Zone::new(z).ok()),
            source: crate::placement::ZoneSource::Config,
            ..Default::default()
        };
        route_table(&config, &host_zone)
    }

    fn picks(t: &RouteTable, rng: &mut StdRng, n: usize) -> Vec<String> {
        (0..n)
            .filter_map(|_| first_choice(t, rng))
            .map(|e| e.config.host.clone())
            .collect()
    }

    #[test]
    fn the_zone_rule() {
        use ZoneChoice::*;
        assert_eq!(zone_choice(None, Some(1.0)), Spill);
        assert_eq!(zone_choice(None, None), Spill);
        assert_eq!(zone_choice(Some(9.0), None), SameZone);
        assert_eq!(zone_choice(Some(1.0), Some(1.0)), SameZone);
        // Up to the ratio the zone keeps its traffic; past it, it spills.
        assert_eq!(zone_choice(Some(2.0), Some(1.0)), SameZone);
        assert_eq!(zone_choice(Some(2.01), Some(1.0)), Spill);
        assert_eq!(zone_choice(Some(0.5), Some(5.0)), SameZone);
    }

    #[test]
    fn the_hosts_zone_is_preferred_and_spilled_from_when_down_or_slow() {
        let (t, endpoints) = zoned(Some("use1-az2"));
        let mut rng = StdRng::seed_from_u64(8);
        assert!(picks(&t, &mut rng, 200).iter().all(|h| h == "10.0.0.2"));
        // Slow: the same-zone ENI's latency clearly above the others'.
        for e in &endpoints {
            e.record_latency(std::time::Duration::from_millis(
                if e.config.host == "10.0.0.2" { 50 } else { 10 },
            ));
        }
        let slow = picks(&t, &mut rng, 200);
        assert!(slow.iter().all(|h| h.starts_with("10.0.0.")), "{slow:?}");
        assert!(slow.iter().any(|h| h != "10.0.0.2"), "{slow:?}");
        // Down: the other local zones take it all, before any other tier.
        endpoints[1].set_healthy(false);
        let down = picks(&t, &mut rng, 200);
        assert!(
            down.iter().all(|h| h == "10.0.0.1" || h == "10.0.0.3"),
            "{down:?}"
        );
        assert!(down.iter().any(|h| h == "10.0.0.1") && down.iter().any(|h| h == "10.0.0.3"));
        // Full counts as overloaded: spill (fresh endpoints, no latency history).
        let (t, endpoints) = zoned(Some("use1-az2"));
        endpoints[1].set_capacity(Some(0));
        assert!(picks(&t, &mut rng, 50).iter().all(|h| h != "10.0.0.2"));
    }

    #[test]
    fn no_zone_known_is_zone_blind() {
        // No host zone: every local ENI gets traffic, as without zones.
        let (t, _) = zoned(None);
        assert!(t.privatelink.iter().all(|tier| tier.same_zone.is_empty()));
        let mut rng = StdRng::seed_from_u64(9);
        let blind = picks(&t, &mut rng, 300);
        for host in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            assert!(blind.iter().any(|h| h == host), "{host} never chosen");
        }
        // A host zone but no endpoint zones (the plain table): zone-blind too.
        let (t, _) = table("privatelink", "");
        assert!(t.privatelink.iter().all(|tier| tier.same_zone.is_empty()));
        // A host zone no local ENI is in: zone-aware, nothing same-zone, all spill.
        let (t, _) = zoned(Some("use1-az6"));
        assert_eq!(t.privatelink[0].same_zone, [false, false, false]);
        assert!(t.privatelink[1].same_zone.is_empty());
        let mut rng = StdRng::seed_from_u64(10);
        let elsewhere = picks(&t, &mut rng, 300);
        for host in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            assert!(elsewhere.iter().any(|h| h == host), "{host} never chosen");
        }
    }

    #[test]
    fn privatelink_only_never_uses_public() {
        let (t, endpoints) = table("privatelink-only", "");
        privatelink_down(&endpoints);
        let mut rng = StdRng::seed_from_u64(5);
        assert!(first_choice(&t, &mut rng).is_none());
    }
}
