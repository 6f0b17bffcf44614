//! gpulink's integration tests: ONE test binary (`suite`), one module per concern, all
//! sharing the harness in `common` (moto as KMS, the simulator, a proxy between them).
//!
//! One binary compiles and links the harness once instead of once per file, and lets
//! the compiler see which helpers are unused. Select tests by module path:
//! `bash scripts/test.sh --test suite routing::` runs the routing tests,
//! `bash scripts/test.sh --test suite -- --exact proxy::guide_request_end_to_end` one test.
//!
//! Every test of every module runs in the same process, in parallel. The rules that makes:
//! - a test takes its loopback blocks from `common::next_block()` (1..=219, each once;
//!   fixed blocks only from 220..=252);
//! - it touches no process-wide state (environment, current directory, rlimits: set them
//!   on the child processes it starts) except through `common::init`, which runs once;
//! - it waits with `assert_eventually!` (a deadline, and the last value seen on failure);
//! - it states its configuration as changes by key (`ProxyOptions::set`);
//! - a test that loads the whole machine (the soak, the booted systemd, the GOAWAY storm)
//!   takes `common::alone()`: every other harness test holds a share of the machine
//!   through its `Moto`, so the two never overlap.

mod common;
mod deb;
mod debian_root;
mod prom;
mod reliability;

mod admin;
mod adversarial;
mod cli;
mod cutover_metrics;
mod datapath;
mod discovery_ec2;
mod docs;
mod esdk;
mod fuzz_replay;
mod goaway;
mod health;
mod image;
mod ingress;
mod input;
mod kms;
mod limits;
mod packaging;
mod probe;
mod process;
mod proxy;
mod routing;
mod sim;
mod soak;
mod status_page;
mod systemd;
mod systemd_boot;
mod workers;
mod zones;
