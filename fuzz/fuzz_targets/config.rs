//! Config parsing: arbitrary TOML text through `Config::from_toml` (parse and every
//! validation rule), then the views the proxy derives from a valid config. A panic or a
//! hang (libFuzzer's `-timeout`) is a crash; an error is the expected answer to garbage.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = gpulink::config::Config::from_toml(text, Path::new("fuzz.toml")) {
        let _ = config.endpoints();
        let _ = config.dns_discovery();
        let _ = config.local_region();
    }
});
