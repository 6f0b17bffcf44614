//! Automatic rollback: watches PrivateLink's error rate and p99 latency over a sliding
//! window and, when either breaches its threshold with enough requests to judge, moves
//! traffic to public until the cool-down ends or the configuration is reloaded. Only in
//! phase `canary`, and in `privatelink` while the public fallback window is open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Rollback;

/// The window is split into this many slices; old slices fall off whole.
const SLICES: usize = 30;
/// Latency histogram: bucket i holds latencies below 2^i ms (the last is open-ended).
const LATENCY_BUCKETS: usize = 24;

#[derive(Clone, Copy)]
struct Slice {
    index: u64,
    requests: u64,
    errors: u64,
    latency: [u32; LATENCY_BUCKETS],
}

impl Slice {
    const EMPTY: Slice = Slice {
        index: 0,
        requests: 0,
        errors: 0,
        latency: [0; LATENCY_BUCKETS],
    };
}

/// Why rollback fired, for logs and `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Breach {
    pub requests: u64,
    pub error_rate: f64,
    pub p99_ms: f64,
    pub reason: String,
}

pub struct RollbackMonitor {
    settings: Rollback,
    slice_len: Duration,
    started: Instant,
    slices: Mutex<[Slice; SLICES]>,
    /// 0 = not rolled back; else the end of the cool-down in ms since `started`.
    rolled_back_until_ms: AtomicU64,
    breach: Mutex<Option<Breach>>,
    fired: AtomicU64,
}

fn bucket_of(latency: Duration) -> usize {
    let ms = latency.as_millis().max(1) as u64;
    ((64 - ms.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

/// The upper edge of a histogram bucket, in ms.
fn bucket_upper_ms(index: usize) -> f64 {
    (1u64 << index) as f64
}

impl RollbackMonitor {
    pub fn new(settings: Rollback) -> Self {
        let slice_len = (settings.window.get() / SLICES as u32).max(Duration::from_millis(10));
        Self {
            settings,
            slice_len,
            started: Instant::now(),
            slices: Mutex::new([Slice::EMPTY; SLICES]),
            rolled_back_until_ms: AtomicU64::new(0),
            breach: Mutex::new(None),
            fired: AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether traffic is currently rolled back to public.
    pub fn is_rolled_back(&self) -> bool {
        let until = self.rolled_back_until_ms.load(Ordering::Acquire);
        until != 0 && self.elapsed_ms() < until
    }

    pub fn times_fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    pub fn last_breach(&self) -> Option<Breach> {
        self.breach.lock().ok().and_then(|b| b.clone())
    }

    /// Records one PrivateLink request's outcome and checks the thresholds.
    /// Returns the breach when this call fired the rollback.
    pub fn record(&self, error: bool, latency: Duration) -> Option<Breach> {
        let index = (self.started.elapsed().as_nanos() / self.slice_len.as_nanos().max(1)) as u64;
        let mut slices = self.slices.lock().ok()?;
        let slot = &mut slices[(index % SLICES as u64) as usize];
        if slot.index != index {
            *slot = Slice {
                index,
                ..Slice::EMPTY
            };
        }
        slot.requests += 1;
        slot.errors += u64::from(error);
        slot.latency[bucket_of(latency)] += 1;
        if self.is_rolled_back() {
            return None;
        }
        let breach = self.evaluate(&slices, index)?;
        drop(slices);
        let cooldown = u64::try_from(self.settings.cooldown.get().as_millis()).unwrap_or(u64::MAX);
        self.rolled_back_until_ms.store(
            self.elapsed_ms().saturating_add(cooldown).max(1),
            Ordering::Release,
        );
        self.fired.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut b) = self.breach.lock() {
            *b = Some(breach.clone());
        }
        Some(breach)
    }

    fn evaluate(&self, slices: &[Slice; SLICES], current: u64) -> Option<Breach> {
        let mut requests = 0u64;
        let mut errors = 0u64;
        let mut histogram = [0u64; LATENCY_BUCKETS];
        for s in slices
            .iter()
            .filter(|s| s.requests > 0 && current.saturating_sub(s.index) < SLICES as u64)
        {
            requests += s.requests;
            errors += s.errors;
            for (total, n) in histogram.iter_mut().zip(s.latency.iter()) {
                *total += u64::from(*n);
            }
        }
        if requests < self.settings.min_requests.max(1) {
            return None;
        }
        let error_rate = errors as f64 / requests as f64;
        let rank = (requests as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        let mut p99_ms = 0.0;
        for (i, n) in histogram.iter().enumerate() {
            seen += n;
            if seen >= rank {
                p99_ms = bucket_upper_ms(i);
                break;
            }
        }
        let max_p99_ms = self.settings.max_p99.get().as_secs_f64() * 1000.0;
        let reason = if error_rate > self.settings.max_error_rate {
            format!(
                "PrivateLink error rate {:.1}% over the last {:?} exceeds rollback.max_error_rate {:.1}%",
                error_rate * 100.0,
                self.settings.window.get(),
                self.settings.max_error_rate * 100.0
            )
        } else if p99_ms > max_p99_ms {
            format!(
                "PrivateLink p99 latency ~{p99_ms:.0} ms over the last {:?} exceeds rollback.max_p99 {:.0} ms",
                self.settings.window.get(),
                max_p99_ms
            )
        } else {
            return None;
        };
        Some(Breach {
            requests,
            error_rate,
            p99_ms,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn monitor(min_requests: u64) -> RollbackMonitor {
        RollbackMonitor::new(Rollback {
            window: HumanDuration::from_secs(60),
            min_requests,
            max_error_rate: 0.05,
            max_p99: HumanDuration::from_secs(2),
            cooldown: HumanDuration::from_secs(600),
        })
    }

    #[test]
    fn errors_below_the_minimum_count_do_not_fire() {
        let m = monitor(100);
        for _ in 0..99 {
            assert!(m.record(true, Duration::from_millis(5)).is_none());
        }
        assert!(!m.is_rolled_back());
        assert!(m.record(true, Duration::from_millis(5)).is_some());
        assert!(m.is_rolled_back());
    }

    #[test]
    fn a_low_error_rate_does_not_fire() {
        let m = monitor(20);
        for i in 0..200 {
            m.record(i % 50 == 0, Duration::from_millis(5));
        }
        assert!(!m.is_rolled_back());
    }

    #[test]
    fn slow_p99_fires() {
        let m = monitor(20);
        let mut fired = None;
        for _ in 0..30 {
            fired = fired.or(m.record(false, Duration::from_secs(5)));
        }
        let breach = fired.expect("fired");
        assert!(breach.reason.contains("p99"), "{}", breach.reason);
    }
}
