//! The request head into hyper and the handler (see `fuzz/checks/request_head.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/request_head.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    // 127.199.x.y: the fuzz block of the test address plan.
    check::check(199, data);
});
