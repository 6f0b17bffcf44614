//! Builds the .deb under test with cargo-deb, from the binary this `cargo test` run
//! built (`--no-build --profile dev`: a release build would double CI's compile time,
//! and the packaging, not the optimiser, is what these tests check).
//!
//! cargo-deb is pinned (3.8.0, `cargo install --locked cargo-deb@3.8.0`, which
//! `scripts/test.sh` does when it is missing): its dev-profile support is deprecated and
//! its script snippets are what the tests assert.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Whether `cargo deb` is installed; in CI (`CI` set) its absence is a failure, not a skip.
pub fn available() -> bool {
    let found = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "cargo-deb is missing in CI: scripts/test.sh installs it \
             (cargo install --locked cargo-deb@{CARGO_DEB_VERSION})"
        );
        println!(
            "skipped: cargo-deb is not installed (cargo install --locked cargo-deb@{CARGO_DEB_VERSION}, \
             or run scripts/test.sh)"
        );
    }
    found
}

/// Builds `gpulink_<version>_<arch>.deb` into `out` and returns its path.
pub fn build(version: &str, out: &Path) -> PathBuf {
    let output = Command::new("cargo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            // gzip -1 by the system's gzip: seconds, where cargo-deb's own xz takes a
            // minute on a busy machine; the compression is not what is tested.
            "--fast",
            "--compress-system",
            "--compress-type",
            "gz",
            "--no-strip",
            "--quiet",
            "--deb-version",
            version,
            "--output",
        ])
        .arg(out)
        .output()
        .expect("cargo deb runs");
    crate::common::assert_success(&output, "cargo deb failed");
    let deb = std::fs::read_dir(out)
        .expect("cargo deb output directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("gpulink_{version}_")) && n.ends_with(".deb")
            })
        });
    deb.unwrap_or_else(|| panic!("no gpulink_{version}_*.deb in {}", out.display()))
}
