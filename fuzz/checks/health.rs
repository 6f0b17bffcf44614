//! The cluster's `/health` answer: arbitrary bytes through the JSON parse and the
//! status and freshness rules, at an arbitrary "now". Upstream-controlled input, so a
//! panic (an overflow in the age arithmetic, say) is a crash.
//!
//! Shared by the cargo-fuzz target and the stable replay in `tests/suite/fuzz_replay.rs`.

pub fn check(data: &[u8]) {
    // The first 8 bytes choose "now" so extreme clocks are covered too.
    let (now, body) = match data.split_first_chunk::<8>() {
        Some((now, body)) => (i64::from_le_bytes(*now), body),
        None => (1_700_000_000, data),
    };
    let settings = gpulink::config::Health::default();
    if let Ok(document) = gpulink::evaluate_health(body, &settings, now) {
        assert!(document.status.eq_ignore_ascii_case("healthy"));
    }
}
