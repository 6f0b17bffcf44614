//! The ESDK message decoder (see `fuzz/checks/esdk.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/esdk.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::check(data);
});
