//! gpulink: a sidecar that lets an application reach a private GPU inference cluster over
//! AWS PrivateLink as if it were a local HTTP service.
//!
//! The app POSTs plain JSON to `127.0.0.1`; gpulink seals the body with AWS KMS, adds the
//! tenant headers, and forwards it over pooled TLS to the healthiest endpoint allowed by
//! the migration phase, falling back to the cluster's public endpoints when allowed.
//!
//! The major components, in the order a request meets them (the private ones are
//! named plainly; what other crates use of them is re-exported by name below):
//!
//! * `ingress`: the loopback listener: HTTP/1.1 and HTTP/2, graceful drain; with
//!   `listener`, the connection limits and time bounds every client is held to, with
//!   [`h1guard`], the HTTP/1.1 head guard that refuses a bad head with the JSON error
//!   body, and with [`body`], the bounded request body reader.
//! * [`headers`]: the header names of the tenant API and of gpulink, and inbound
//!   hygiene; `inflight`: the in-flight body budget (`listen.max_in_flight_bytes`).
//! * [`forward`]: **the one place that tells a request's journey**: validate, seal, route,
//!   send with safe retries, relay. `error`: the typed errors it answers with, each code
//!   and its status in one place.
//! * `generation`: one configuration's endpoints, routes and sealer, built once per load
//!   or reload; a request keeps the generation it started with.
//! * [`seal`]: KMS (or the development key provider) and the sealed-body formats.
//! * `route`: migration phases and the ordered tiers of endpoints a request may use;
//!   [`placement`]: the host's availability zone the local tier prefers.
//! * `upstream`: endpoints, TLS, per-endpoint connection pools, active health checks and
//!   the choice among healthy endpoints; [`tls`]: the crypto provider and the client
//!   configurations.
//! * `admin`: `/live`, `/ready`, `/metrics`, `/status` and the HTML status page on the
//!   admin address; `metrics` holds the Prometheus metrics it exposes, `history` the
//!   last 15 minutes of request outcomes the status page charts.
//! * [`telemetry`]: logging (filter, text or JSON, one span per request); `logwriter`,
//!   the bounded queue and thread that write it, so a stalled stderr never stalls a
//!   request.
//! * [`config`]: the TOML contract and its validation; [`check`], the warnings of
//!   `gpulink check` about a valid file that is likely not what was meant.
//! * [`proxy`]: the running proxy that starts all of the above, reloads and shuts down;
//!   only `main`, the demo and [`reload`] (SIGHUP and the directory watch) see it.
//!   `runtime`: its request-path threads (one single-threaded runtime per core,
//!   `[runtime] workers`); `rlimit`: the file-descriptor limit raised at start (the one
//!   module with unsafe code); [`systemd`]: readiness, watchdog and reload notifications
//!   for `Type=notify` units.
//! * The other subcommands: [`probe`] (`gpulink probe`, the guide's connectivity test and
//!   troubleshooting), [`healthcheck`] (`gpulink health`, the readiness probe for
//!   containers and exec) and [`discover`] (`gpulink discover`, a VPC endpoint as EC2
//!   lists it) with [`ec2`], the small EC2 client discovery uses.
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

// The components, in the order a request meets them. A module is public when a crate
// outside this one (the binary, the tests, the benchmarks, the simulator, the fuzz
// targets) uses it as a whole; the rest are private, and the few items of theirs used
// outside are re-exported below by name, so this list is the library's whole surface.

// The app side: listener, head guard, bodies, inbound headers.
pub mod body;
pub mod h1guard;
pub mod headers;
mod inflight;
mod ingress;
mod listener;

// The journey, and the configuration generation it runs under.
pub mod forward;
mod generation;
pub use generation::seal_settings;
mod error;

// Sealing, routing, the cluster side.
mod route;
// The host's zone; public for `StartOptions::imds` (tests point it at a stand-in).
pub mod placement;
pub mod seal;
mod upstream;
pub use upstream::health::evaluate as evaluate_health;
pub mod tls;

// What the operator sees: admin server, metrics, the status page's history, logs.
mod admin;
mod history;
mod logwriter;
mod metrics;
pub mod telemetry;

// Configuration.
pub mod check;
pub mod config;

// The runtime and what starts, reloads and supervises it.
pub mod proxy;
mod runtime;
pub use runtime::current_worker;
pub mod reload;
mod rlimit;
pub mod systemd;

// The other subcommands: `gpulink health`, `probe`, `discover`, and discover's EC2 client.
pub mod discover;
pub mod ec2;
pub mod healthcheck;
pub mod probe;

// What the unit tests above share: a minimal configuration and its endpoints.
#[cfg(test)]
mod testing;
