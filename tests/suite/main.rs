//! gpulink's integration tests: ONE test binary (`suite`), one module per concern, all
//! sharing the harness in `common` (moto as KMS, the simulator, a proxy between them).
//!
//! One binary compiles and links the harness once instead of once per file, and lets
//! the compiler see which helpers are unused. Select tests by module path:
//! `bash scripts/test.sh --test suite routing::` runs the routing tests,
//! `bash scripts/test.sh --test suite -- --exact proxy::guide_request_end_to_end` one test.
//!
//! Every test of every module runs in the same process, in parallel: a test takes its own
//! loopback block and touches no process-wide state (environment, current directory,
//! rlimits) except through `common::init`, which runs once.

mod common;
mod deb;
mod prom;
mod reliability;

mod admin;
mod adversarial;
mod cli;
mod cutover_metrics;
mod datapath;
mod docs;
mod esdk;
mod fuzz_replay;
mod goaway;
mod health;
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
