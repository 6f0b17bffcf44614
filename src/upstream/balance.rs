//! Choosing one endpoint among the candidates of a tier: power of two random choices,
//! comparing latency times load, weighted by the capacity the endpoint reports. Full
//! endpoints are only chosen when no other candidate exists.

use std::sync::Arc;

use rand::Rng;

use super::endpoint::Endpoint;

/// The cost of sending one more request to `endpoint`: lower is better. Zone-aware
/// routing compares zones by it too ([`crate::route::zone_choice`]).
pub fn cost(endpoint: &Endpoint) -> f64 {
    // An endpoint without a latency sample yet is assumed as fast as a typical one
    // (1 ms), so new endpoints get traffic and earn a sample.
    let latency_ms = endpoint.latency().map_or(1.0, |d| d.as_secs_f64() * 1000.0);
    let load = endpoint.in_flight() as f64 + 1.0;
    let weight = endpoint
        .capacity()
        .map_or(1.0, |c| (c as f64).clamp(1.0, 100.0).sqrt());
    latency_ms * load / weight
}

/// Picks from `candidates` (all already known to be usable). P2C avoids the herd that
/// "always the best" causes, while still steering away from slow or busy endpoints.
pub fn pick<'a, R: Rng + ?Sized>(
    candidates: &[&'a Arc<Endpoint>],
    rng: &mut R,
) -> Option<&'a Arc<Endpoint>> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = rng.gen_range(0..n);
            let mut b = rng.gen_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (candidates[a], candidates[b]);
            Some(if cost(eb) < cost(ea) { eb } else { ea })
        }
    }
}
