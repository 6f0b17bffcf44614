//! Config parsing: arbitrary TOML text through `Config::from_toml` (parse and compile,
//! every validation rule), then what the proxy reads from a compiled config. A panic or a
//! hang is a crash; an error is the expected answer to garbage.
//!
//! Shared by the cargo-fuzz target (`fuzz/fuzz_targets/config.rs`) and the stable replay
//! of the seed corpus in the test suite (`tests/suite/fuzz_replay.rs`).

use std::path::Path;

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = gpulink::config::Config::from_toml(text, Path::new("fuzz.toml")) {
        for endpoint in &config.endpoints {
            let _ = endpoint.authority();
        }
        for discovery in &config.discovery {
            let _ = discovery.endpoint(&gpulink::config::Found {
                ip: std::net::IpAddr::from([127, 0, 0, 1]),
                zone: gpulink::config::Zone::new("use1-az1").ok(),
                zone_alias: gpulink::config::Zone::new("us-east-1a").ok(),
            });
        }
        let _ = config.local_region();
    }
}
