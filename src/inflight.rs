//! The in-flight body budget: `listen.max_in_flight_bytes` bounds the request bytes gpulink
//! holds at once, across every connection and stream, plaintext and sealed copy together.
//!
//! A request reserves before it holds: its declared `Content-Length` (plus the largest
//! sealed copy it can become) up front, or, without one, as its bytes arrive. When the
//! budget cannot cover it the request gets 503 `overloaded` and its body is not read
//! further (for HTTP/2 that stops the stream's flow control). The reservation shrinks to
//! the sealed copy once the plaintext is dropped and ends with the request.
//!
//! The budget lives in the process, not in a configuration generation, so a reload never
//! forgets what requests in flight hold; the limit is the current generation's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes added to a body's size for its sealed copy beyond the ESDK framing ratio: the
/// message header, the encrypted data keys and the encryption context.
const SEAL_HEADER_ALLOWANCE: u64 = 64 * 1024;

/// What all requests hold now.
#[derive(Debug, Default)]
pub struct InFlightBytes {
    held: AtomicU64,
}

impl InFlightBytes {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` if the total stays within `limit`.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64, limit: u64) -> Option<Reservation> {
        let mut reservation = Reservation {
            budget: self.clone(),
            bytes: 0,
        };
        reservation.try_grow_to(bytes, limit).then_some(reservation)
    }

    fn try_add(&self, bytes: u64, limit: u64) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= limit)
            })
            .is_ok()
    }
}

/// The share of the budget one request holds; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<InFlightBytes>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows the reservation to `bytes` (never shrinks it); false when the budget cannot
    /// cover the difference.
    pub fn try_grow_to(&mut self, bytes: u64, limit: u64) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        let more = bytes - self.bytes;
        if !self.budget.try_add(more, limit) {
            return false;
        }
        self.bytes = bytes;
        true
    }

    /// Gives back what is above `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.budget
                .held
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

/// What a body of `plaintext` bytes needs held at its peak: itself and its sealed copy,
/// which is never larger than `upstream.max_body` (a larger one is refused).
pub fn needed_for(plaintext: u64, max_sealed: u64) -> u64 {
    let sealed = plaintext
        .saturating_add(plaintext / 64)
        .saturating_add(SEAL_HEADER_ALLOWANCE)
        .min(max_sealed);
    plaintext.saturating_add(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_limit_and_release_on_drop() {
        let budget = InFlightBytes::new();
        let a = budget.try_reserve(60, 100).expect("fits");
        assert!(budget.try_reserve(41, 100).is_none());
        let mut b = budget.try_reserve(40, 100).expect("fits exactly");
        assert_eq!(budget.held(), 100);
        assert!(!b.try_grow_to(41, 100));
        drop(a);
        assert!(b.try_grow_to(90, 100));
        b.shrink_to(10);
        assert_eq!(budget.held(), 10);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_body_needs_itself_and_its_sealed_copy() {
        assert_eq!(needed_for(10_000_000, 10_000_000), 20_000_000);
        assert!(needed_for(1000, 10_000_000) > 2000);
        assert_eq!(needed_for(0, 10_000_000), SEAL_HEADER_ALLOWANCE);
    }
}
