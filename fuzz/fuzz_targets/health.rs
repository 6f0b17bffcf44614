//! The cluster's `/health` answer (see `fuzz/checks/health.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/health.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::check(data);
});
