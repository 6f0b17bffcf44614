//! Passive outlier detection (Envoy's outlier detection, linkerd's failure accrual):
//! consecutive request failures eject an endpoint for a while, doubling with each repeat
//! up to a cap, and never ejecting more than a bounded share of a tier. A passing active
//! health check re-admits it early.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::Endpoint;
use crate::config::Outlier;

/// Milliseconds since the first call, so ejection deadlines fit in an atomic.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_failures: AtomicU32,
    /// 0 when not ejected, else the deadline in [`now_ms`] time.
    ejected_until_ms: AtomicU64,
    /// When the last ejection started, to forget old ejections.
    last_ejected_ms: AtomicU64,
    ejections_in_a_row: AtomicU32,
    ejections_total: AtomicU64,
}

impl OutlierState {
    pub fn is_ejected(&self) -> bool {
        match self.ejected_until_ms.load(Ordering::Acquire) {
            0 => false,
            until => now_ms() < until,
        }
    }

    pub fn ejections(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// Time left in the current ejection.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Acquire);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Ends an ejection early; true when there was one.
    pub fn readmit(&self) -> bool {
        let was = self.ejected_until_ms.swap(0, Ordering::AcqRel);
        was != 0 && now_ms() < was
    }
}

/// Counts a failure of `endpoint`; ejects it when the threshold is reached and the
/// tier can spare it. Returns the ejection's duration when it ejected.
pub fn record_failure(
    endpoint: &Endpoint,
    tier: &[Arc<Endpoint>],
    settings: &Outlier,
) -> Option<Duration> {
    let state = &endpoint.outlier;
    let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if settings.consecutive_failures == 0
        || failures < settings.consecutive_failures
        || state.is_ejected()
    {
        return None;
    }
    // Never eject so much of a tier that the rest is overwhelmed: the cap is a share
    // of the tier, rounded down, but one ejection is always allowed in a tier of two+.
    let ejected = tier.iter().filter(|e| e.outlier.is_ejected()).count();
    let cap =
        (tier.len() * settings.max_ejected_percent as usize / 100).max(usize::from(tier.len() > 1));
    if ejected + 1 > cap {
        tracing::debug!(endpoint = %endpoint.authority, ejected, cap, "not ejecting: the tier's ejection cap is reached");
        return None;
    }
    let now = now_ms();
    let max = settings.max_ejection.get();
    // Ejections long ago are forgiven: the backoff restarts.
    let last = state.last_ejected_ms.swap(now, Ordering::Relaxed);
    if last != 0
        && now.saturating_sub(last) > 2 * u64::try_from(max.as_millis()).unwrap_or(u64::MAX)
    {
        state.ejections_in_a_row.store(0, Ordering::Relaxed);
    }
    let repeat = state.ejections_in_a_row.fetch_add(1, Ordering::Relaxed);
    let duration = settings
        .base_ejection
        .get()
        .saturating_mul(1u32 << repeat.min(16))
        .min(max);
    let until = now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    state.ejected_until_ms.store(until, Ordering::Release);
    state.consecutive_failures.store(0, Ordering::Relaxed);
    state.ejections_total.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        endpoint = %endpoint.authority,
        region = endpoint.region(),
        failures,
        ?duration,
        "endpoint ejected after consecutive failures"
    );
    Some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn tier(n: usize) -> Vec<Arc<Endpoint>> {
        let addresses: Vec<String> = (1..=n).map(|i| format!("\"10.0.0.{i}\"")).collect();
        let config = crate::testing::config(&format!(
            "[[regions]]\nname = \"r\"\nprivatelink = [{}]\n",
            addresses.join(", ")
        ));
        crate::testing::endpoints(&config)
    }

    fn settings(percent: u32) -> Outlier {
        Outlier {
            consecutive_failures: 3,
            base_ejection: HumanDuration::from_secs(10),
            max_ejection: HumanDuration::from_secs(25),
            max_ejected_percent: percent,
        }
    }

    #[test]
    fn consecutive_failures_eject_with_growing_backoff_and_a_check_readmits() {
        let endpoints = tier(4);
        let e = &endpoints[0];
        let s = settings(50);
        assert!(record_failure(e, &endpoints, &s).is_none());
        e.outlier.record_success();
        assert!(record_failure(e, &endpoints, &s).is_none());
        assert!(record_failure(e, &endpoints, &s).is_none());
        assert_eq!(
            record_failure(e, &endpoints, &s),
            Some(Duration::from_secs(10))
        );
        assert!(!e.is_serving());
        assert!(e.outlier.readmit());
        assert!(e.is_serving());
        for _ in 0..2 {
            assert!(record_failure(e, &endpoints, &s).is_none());
        }
        assert_eq!(
            record_failure(e, &endpoints, &s),
            Some(Duration::from_secs(20))
        );
        e.outlier.readmit();
        for _ in 0..2 {
            record_failure(e, &endpoints, &s);
        }
        // Capped at max_ejection.
        assert_eq!(
            record_failure(e, &endpoints, &s),
            Some(Duration::from_secs(25))
        );
        assert_eq!(e.outlier.ejections(), 3);
    }

    #[test]
    fn never_more_than_the_allowed_share_of_a_tier() {
        let endpoints = tier(4);
        let s = settings(50);
        for e in &endpoints {
            for _ in 0..3 {
                record_failure(e, &endpoints, &s);
            }
        }
        let ejected = endpoints.iter().filter(|e| e.outlier.is_ejected()).count();
        assert_eq!(ejected, 2);
    }
}
