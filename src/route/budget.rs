//! The retry budget (as in linkerd and Finagle): retries may add at most
//! `retry.budget_percent` of recent requests, plus `retry.min_per_second`, so that a
//! struggling cluster is not buried under retries.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::Retry;

/// How far back "recent" reaches.
const WINDOW_SECS: u64 = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    requests: u64,
    retries: u64,
}

pub struct RetryBudget {
    percent: u64,
    min_per_second: u64,
    started: Instant,
    buckets: Mutex<[Bucket; WINDOW_SECS as usize]>,
}

impl RetryBudget {
    pub fn new(settings: &Retry) -> Self {
        Self {
            percent: u64::from(settings.budget_percent),
            min_per_second: u64::from(settings.min_per_second),
            started: Instant::now(),
            buckets: Mutex::new([Bucket::default(); WINDOW_SECS as usize]),
        }
    }

    fn with_current<T>(
        &self,
        f: impl FnOnce(&mut [Bucket; WINDOW_SECS as usize], usize, u64) -> T,
    ) -> Option<T> {
        let second = self.started.elapsed().as_secs();
        let index = (second % WINDOW_SECS) as usize;
        let mut buckets = self.buckets.lock().ok()?;
        if buckets[index].second != second {
            buckets[index] = Bucket {
                second,
                requests: 0,
                retries: 0,
            };
        }
        Some(f(&mut buckets, index, second))
    }

    /// Counts a first attempt.
    pub fn record_request(&self) {
        self.with_current(|b, i, _| b[i].requests += 1);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self) -> bool {
        let (percent, floor) = (self.percent, self.min_per_second * WINDOW_SECS);
        self.with_current(|buckets, index, second| {
            let recent = buckets
                .iter()
                .filter(|b| second.saturating_sub(b.second) < WINDOW_SECS);
            let (requests, retries) =
                recent.fold((0, 0), |(r, t), b| (r + b.requests, t + b.retries));
            let allowed = requests * percent / 100 + floor;
            if retries < allowed {
                buckets[index].retries += 1;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_a_share_of_requests_plus_a_floor() {
        let budget = RetryBudget::new(&Retry {
            max_attempts: 3,
            budget_percent: 20,
            min_per_second: 1,
        });
        // Floor: 1/s over a 10 s window.
        for _ in 0..10 {
            assert!(budget.try_retry());
        }
        assert!(!budget.try_retry());
        for _ in 0..50 {
            budget.record_request();
        }
        // 20 % of 50 more.
        for _ in 0..10 {
            assert!(budget.try_retry());
        }
        assert!(!budget.try_retry());
    }
}
