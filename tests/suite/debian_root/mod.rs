//! The minimal Debian bookworm root the tests that need a real OS build on: made once
//! with debootstrap (a minute or a few, depending on the mirror), cached as
//! `target/nspawn-root`, and never changed after (tests/suite/systemd_boot.rs boots it with
//! `--volatile=overlay`; tests/suite/image.rs turns a copy of it into the image's base
//! images with `scripts/image-bases.sh`).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The cached root, made when missing. Callers hold `common::alone_blocking()`, so two
/// tests never run debootstrap at once.
pub fn path() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let root = target.join("nspawn-root");
    if root.join("usr/bin/systemctl").exists() && root.join("usr/bin/python3").exists() {
        return root;
    }
    let partial = target.join(format!("nspawn-root.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,python3,ca-certificates,procps",
            "bookworm",
        ])
        .arg(&partial)
        .arg("http://deb.debian.org/debian")
        .stdout(Stdio::null())
        .status()
        .expect("debootstrap runs");
    assert!(status.success(), "debootstrap failed");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root).expect("move the new root into place");
    root
}
