//! gpulink: a sidecar that lets an application reach a private GPU inference cluster over
//! AWS PrivateLink as if it were a local HTTP service.
//!
//! The app POSTs plain JSON to `127.0.0.1`; gpulink seals the body with AWS KMS, adds the
//! tenant headers, and forwards it over pooled TLS to the healthiest endpoint allowed by
//! the migration phase, falling back to the cluster's public endpoints when allowed.
//!
//! The major components, in the order a request meets them:
//!
//! * [`ingress`]: the loopback listener: HTTP/1.1 and HTTP/2, graceful drain; with
//!   [`listener`], the connection limits and time bounds every client is held to, and
//!   with [`body`], the bounded request body reader.
//! * [`forward`]: **the one place that tells a request's journey**: validate, seal, route,
//!   send with safe retries, relay.
//! * [`generation`]: one configuration's endpoints, routes and sealer, built once per load
//!   or reload; a request keeps the generation it started with.
//! * [`seal`]: KMS (or the development key provider) and the sealed-body formats.
//! * [`route`]: migration phases and the ordered tiers of endpoints a request may use.
//! * [`upstream`]: endpoints, TLS, per-endpoint connection pools, active health checks and
//!   the choice among healthy endpoints.
//! * [`admin`]: `/live`, `/ready`, `/metrics`, `/status` and the HTML status page on the
//!   admin address; [`metrics`] holds the Prometheus metrics it exposes, [`history`] the
//!   last 15 minutes of request outcomes the status page charts.
//! * [`probe`]: `gpulink probe`, the guide's connectivity test and troubleshooting.
//! * [`healthcheck`]: `gpulink health`, the readiness probe for containers and exec.
//! * [`systemd`]: readiness, watchdog and reload notifications for `Type=notify` units.
//! * [`config`]: the TOML contract and its validation; [`check`], the warnings of
//!   `gpulink check` about a valid file that is likely not what was meant.
//! * [`proxy`]: the runtime that starts all of the above, reloads and shuts down; only
//!   `main`, the demo and [`reload`] see it. [`runtime`]: its request-path threads (one
//!   single-threaded runtime per core, `[runtime] workers`).
//!
//! Not here, on purpose: the cluster simulator (the `gpulink-sim` crate, `crates/sim`)
//! and `gpulink demo` (the binary's `src/demo.rs`), test equipment behind the binary's
//! `dev-tools` feature. The simulator depends on this library, so this library cannot
//! depend on it. The ESDK message codec is the `gpulink-esdk` crate, re-exported as
//! [`seal::esdk`].

// No unsafe code but the one audited module that needs it (`rlimit`, the file-descriptor
// limit through libc), and no unwrap/expect outside tests: a request path answers with
// an error, never a panic.
#![deny(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod body;
pub mod check;
pub mod config;
pub mod discover;
pub mod ec2;
pub mod error;
pub mod forward;
pub mod generation;
pub mod h1guard;
pub mod headers;
pub mod healthcheck;
pub mod history;
pub mod inflight;
pub mod ingress;
pub mod listener;
pub mod logwriter;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod reload;
mod rlimit;
pub mod route;
pub mod runtime;
pub mod seal;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod upstream;
