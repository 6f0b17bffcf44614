//! The cluster simulator (`gpulink sim`): a stand-in for the GPU cluster's PrivateLink
//! endpoints, used by the tests, the benchmarks and `gpulink demo`.
//!
//! Each simulated endpoint listens on its own loopback address with a TLS inference port
//! (HTTP/2 and HTTP/1.1 by ALPN) and a plain-HTTP health port, under a CA written to disk.
//! It opens every sealed body through the key service, checks the encryption context
//! against the tenant headers, and counts what it saw, so that tests can assert on the
//! cluster's side of the wire (was anything sent in plaintext? was a request replayed?).
//! A control API, and [`Sim::set_state`], put an endpoint into a failure state.
//!
//! The pieces:
//!
//! * [`certs`]: the throw-away CA and the leaf every endpoint serves.
//! * `endpoint`: one endpoint's listeners, counters and state transitions.
//! * `inference`: the `POST /inference` handler: open, check, answer (JSON or SSE).
//! * `health`: `GET /health` in the setup guide's format.
//! * `control`: the plain-HTTP control API on loopback.
//! * `cli`: `gpulink sim`.

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod certs;
mod cli;
mod control;
mod endpoint;
mod health;
mod inference;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use gpulink::seal::KeyService;

pub use cli::{parse_endpoint_spec, run_cli, EndpointKind, EndpointSpec, SimArgs};
use endpoint::Endpoint;

/// The TLS name the proxy verifies by default (`upstream.server_name`).
pub const DEFAULT_SERVER_NAME: &str = "gpu-cluster.yourcompany.internal";
/// The name of the cluster's public endpoints in the default layout.
pub const PUBLIC_SERVER_NAME: &str = "gpu-cluster.public.example.com";
/// The guide's advertised capacity of one endpoint.
pub const DEFAULT_CAPACITY: u32 = 45;
/// Largest sealed body an endpoint accepts (the guide: "requests under 10 MB").
pub const MAX_SEALED_BODY: usize = 10_000_000;
/// The delivery map stops taking new request ids past this many, so a long benchmark
/// cannot grow the simulator without bound. Ids already present keep counting.
pub const MAX_TRACKED_REQUEST_IDS: usize = 1_000_000;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub endpoints: Vec<SimEndpointConfig>,
    /// DNS names in the leaf certificate (every endpoint serves the same leaf).
    pub server_names: Vec<String>,
    /// Where `ca.pem` is written (created if missing).
    pub ca_dir: PathBuf,
    /// Control API address (loopback); port 0 = pick one (see [`Sim::control_addr`]).
    pub control_addr: SocketAddr,
    /// For benchmarks: skip opening bodies (count them only), so that the simulator is
    /// never the bottleneck.
    pub skip_open: bool,
}

/// One simulated PrivateLink endpoint (ENI), or a public endpoint of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimEndpointConfig {
    pub ip: IpAddr,
    pub region: String,
    pub tls_port: u16,
    pub health_port: u16,
    /// `available_capacity` reported by `/health` while the endpoint is not full.
    pub capacity: u32,
}

impl SimEndpointConfig {
    /// An endpoint on the guide's ports (8443 stands in for 443, which needs privileges).
    pub fn new(ip: IpAddr, region: &str) -> Self {
        Self {
            ip,
            region: region.to_string(),
            tls_port: 8443,
            health_port: 8080,
            capacity: DEFAULT_CAPACITY,
        }
    }

    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.tls_port)
    }

    pub fn health_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.health_port)
    }
}

impl SimConfig {
    /// The guide's layout on loopback: three PrivateLink ENIs in us-east-1, one in
    /// us-west-2, and a public endpoint in us-east-1. The control API picks a free port.
    pub fn default_layout(ca_dir: PathBuf) -> Self {
        let ep = |a, b, c, d, region: &str| {
            SimEndpointConfig::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), region)
        };
        Self {
            endpoints: vec![
                ep(127, 0, 10, 50, "us-east-1"),
                ep(127, 0, 11, 50, "us-east-1"),
                ep(127, 0, 12, 50, "us-east-1"),
                ep(127, 0, 13, 50, "us-west-2"),
                ep(127, 0, 20, 1, "us-east-1"),
            ],
            server_names: default_server_names(),
            ca_dir,
            control_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            skip_open: false,
        }
    }
}

/// `["gpu-cluster.yourcompany.internal", "gpu-cluster.public.example.com"]`.
pub fn default_server_names() -> Vec<String> {
    vec![
        DEFAULT_SERVER_NAME.to_string(),
        PUBLIC_SERVER_NAME.to_string(),
    ]
}

/// The failure state of one endpoint. Serialised as the control API's body, e.g.
/// `{"state":"down"}` or `{"state":"slow","delay_ms":2000}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum EndpointState {
    /// Answers normally.
    Healthy,
    /// Both ports closed: connects are refused, open connections are closed.
    Down,
    /// TCP and TLS handshakes complete, but no request (inference or health) is ever
    /// answered, including requests on connections opened before the state changed.
    /// When the state changes, the held requests are dropped (the stream or connection
    /// is reset), never answered late.
    Blackhole,
    /// Every response, health included, is delayed by `delay_ms`.
    Slow { delay_ms: u64 },
    /// Health reports `available_capacity: 0`; inference answers 503 `no_capacity`
    /// (safe for the proxy to retry: the request did no work).
    Full,
    /// Health reports `"status": "unhealthy"`; inference answers 500 `internal`.
    Failing,
    /// The health port answers healthy; the inference port is closed (connects are
    /// refused, open inference connections are closed): a wrong or closed TLS port.
    #[serde(rename = "inference_refused")]
    InferenceRefused,
    /// The health port answers healthy; connects to the inference port time out (SYNs
    /// are dropped; open inference connections are closed): a security group that
    /// allows 8080 and drops 443.
    #[serde(rename = "inference_filtered")]
    InferenceFiltered,
}

impl EndpointState {
    /// The state's name as the control API and [`EndpointStats::state`] spell it.
    pub fn name(&self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Down => "down",
            EndpointState::Blackhole => "blackhole",
            EndpointState::Slow { .. } => "slow",
            EndpointState::Full => "full",
            EndpointState::Failing => "failing",
            EndpointState::InferenceRefused => "inference_refused",
            EndpointState::InferenceFiltered => "inference_filtered",
        }
    }
}

/// What one endpoint has seen since start (or the last reset).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointStats {
    pub ip: String,
    pub region: String,
    pub state: String,
    /// Every inference request received, whatever its outcome.
    pub requests: u64,
    /// Inference requests answered 200 (opened and context-checked, or counted only
    /// with `skip_open`).
    pub ok: u64,
    /// Sealed bodies that opened under neither the tenant context nor an empty one.
    pub decrypt_failures: u64,
    /// Bodies that arrived as JSON, i.e. unsealed: the leak the tests look for.
    pub plaintext_seen: u64,
    /// Bodies that opened only with an empty encryption context (`kms.context = "none"`).
    pub context_none: u64,
    /// Inference requests being handled now (a gauge; not zeroed by a reset).
    pub in_flight: u64,
    pub health_checks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the simulator's certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot write the CA certificate {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] gpulink::tls::TlsError),
    #[error("no simulated endpoint has the address {0}")]
    UnknownEndpoint(IpAddr),
    #[error("the endpoint address {0} is configured twice")]
    DuplicateEndpoint(IpAddr),
    #[error("the simulator needs at least one endpoint")]
    NoEndpoints,
    #[error("the simulator needs at least one server name for its certificate")]
    NoServerNames,
    #[error("the control API has no authentication, so it must listen on loopback, not {0}")]
    ControlNotLoopback(SocketAddr),
}

/// State shared by every listener, handler and the control API.
pub(crate) struct Shared {
    /// In configuration order, for stable listings.
    endpoints: Vec<Arc<Endpoint>>,
    by_ip: HashMap<IpAddr, Arc<Endpoint>>,
    pub(crate) keys: KeyService,
    pub(crate) skip_open: bool,
    /// Data keys of `aws-esdk` bodies already opened through KMS, so that the simulator
    /// makes one KMS call per data key, not per request.
    pub(crate) data_keys: inference::OpenedDataKeys,
    /// Test hook: keep the last inference body received (see [`Sim::capture_bodies`]).
    pub(crate) capture: inference::BodyCapture,
    pub(crate) tls: tokio_rustls::TlsAcceptor,
    /// Deliveries per `X-Request-ID`, across all endpoints.
    deliveries: Mutex<HashMap<String, u64>>,
    /// Flips to true once, when the simulator stops; every accept loop watches it.
    pub(crate) shutdown: watch::Sender<bool>,
}

impl Shared {
    fn endpoint(&self, ip: IpAddr) -> Result<&Arc<Endpoint>, SimError> {
        self.by_ip.get(&ip).ok_or(SimError::UnknownEndpoint(ip))
    }

    pub(crate) async fn set_state(
        self: &Arc<Self>,
        ip: IpAddr,
        state: EndpointState,
    ) -> Result<(), SimError> {
        let endpoint = self.endpoint(ip)?.clone();
        endpoint.transition(self, state).await
    }

    pub(crate) fn all_stats(&self) -> Vec<EndpointStats> {
        self.endpoints.iter().map(|e| e.stats()).collect()
    }

    pub(crate) fn stats(&self, ip: IpAddr) -> Option<EndpointStats> {
        self.by_ip.get(&ip).map(|e| e.stats())
    }

    /// Records one delivery of `request_id`: the cluster accepted the request for work.
    pub(crate) fn record_delivery(&self, request_id: &str) {
        let mut map = self
            .deliveries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = map.get_mut(request_id) {
            *count += 1;
        } else if map.len() < MAX_TRACKED_REQUEST_IDS {
            map.insert(request_id.to_string(), 1);
        }
    }

    pub(crate) fn deliveries(&self, request_id: &str) -> u64 {
        self.deliveries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(request_id)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn reset(&self) {
        self.deliveries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
        for endpoint in &self.endpoints {
            endpoint.reset();
        }
    }
}

/// A running simulator. Dropping it stops every listener (without waiting); prefer
/// [`Sim::shutdown`], which waits until every socket is closed.
pub struct Sim {
    shared: Arc<Shared>,
    ca_file: PathBuf,
    control_addr: SocketAddr,
    control_task: Option<JoinHandle<()>>,
}

impl Sim {
    /// Generates the certificates, writes `ca.pem`, binds every endpoint's ports and the
    /// control API. Every endpoint starts healthy.
    pub async fn start(config: SimConfig, keys: KeyService) -> Result<Sim, SimError> {
        gpulink::tls::install_crypto_provider();
        if config.endpoints.is_empty() {
            return Err(SimError::NoEndpoints);
        }
        if config.server_names.is_empty() {
            return Err(SimError::NoServerNames);
        }
        if !config.control_addr.ip().is_loopback() {
            return Err(SimError::ControlNotLoopback(config.control_addr));
        }
        let mut by_ip = HashMap::new();
        let mut endpoints = Vec::new();
        for endpoint in &config.endpoints {
            let ep = Arc::new(Endpoint::new(endpoint.clone()));
            if by_ip.insert(endpoint.ip, ep.clone()).is_some() {
                return Err(SimError::DuplicateEndpoint(endpoint.ip));
            }
            endpoints.push(ep);
        }

        let ips: Vec<IpAddr> = config.endpoints.iter().map(|e| e.ip).collect();
        let pki = certs::generate(&config.ca_dir, &config.server_names, &ips)?;
        let server_config = gpulink::tls::server_config(&pki.leaf_pem, &pki.leaf_key_pem)?;

        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            endpoints,
            by_ip,
            keys,
            skip_open: config.skip_open,
            data_keys: inference::OpenedDataKeys::default(),
            capture: inference::BodyCapture::default(),
            tls: tokio_rustls::TlsAcceptor::from(server_config),
            deliveries: Mutex::new(HashMap::new()),
            shutdown,
        });

        // From here on, a failure must release what was already bound.
        let started = async {
            for endpoint in &shared.endpoints {
                endpoint.start(&shared).await?;
            }
            control::start(&shared, config.control_addr).await
        }
        .await;
        let (control_addr, control_task) = match started {
            Ok(v) => v,
            Err(e) => {
                stop_all(&shared).await;
                return Err(e);
            }
        };
        tracing::info!(
            endpoints = shared.endpoints.len(),
            %control_addr,
            ca_file = %pki.ca_file.display(),
            "cluster simulator started"
        );
        Ok(Sim {
            shared,
            ca_file: pki.ca_file,
            control_addr,
            control_task: Some(control_task),
        })
    }

    /// The CA certificate every endpoint's leaf chains to (`upstream.ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// The control API's bound address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The endpoints as configured.
    pub fn endpoints(&self) -> Vec<SimEndpointConfig> {
        self.shared
            .endpoints
            .iter()
            .map(|e| e.config.clone())
            .collect()
    }

    /// Puts an endpoint into `state`. Returns once the change is in effect: after
    /// `Down`, connects are refused and every connection is closed; after leaving
    /// `Down`, both ports accept again.
    pub async fn set_state(&self, ip: IpAddr, state: EndpointState) -> Result<(), SimError> {
        self.shared.set_state(ip, state).await
    }

    /// The current state of an endpoint.
    pub fn state(&self, ip: IpAddr) -> Option<EndpointState> {
        self.shared.by_ip.get(&ip).map(|e| e.state())
    }

    pub fn stats(&self, ip: IpAddr) -> Option<EndpointStats> {
        self.shared.stats(ip)
    }

    pub fn all_stats(&self) -> Vec<EndpointStats> {
        self.shared.all_stats()
    }

    /// Total deliveries of one `X-Request-ID` across all endpoints (for "never replay"
    /// tests). A delivery is a request the cluster accepted for work: every request
    /// except those refused with `no_capacity` (or cut by `down`), counted on arrival,
    /// so a request held by a blackhole counts too.
    pub fn deliveries(&self, request_id: &str) -> u64 {
        self.shared.deliveries(request_id)
    }

    /// Test hook, off by default: while on, the simulator keeps the last inference body
    /// it received, byte for byte as it arrived, for [`Sim::last_body`]. Lets a test hand
    /// exactly what the proxy sent to another decryptor (or tamper with it).
    pub fn capture_bodies(&self, on: bool) {
        self.shared.capture.set(on);
    }

    /// The last inference body received while [`Sim::capture_bodies`] was on.
    pub fn last_body(&self) -> Option<bytes::Bytes> {
        self.shared.capture.last()
    }

    /// Zeroes every counter (except the in-flight gauges) and forgets delivered ids.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Resolves when the endpoint has at least `n` inference requests in flight.
    ///
    /// # Panics
    /// When `ip` is not a simulated endpoint (a mistake in the test, not a condition).
    pub async fn wait_in_flight(&self, ip: IpAddr, n: u64) {
        self.wait_for(ip, |s| s.in_flight >= n).await;
    }

    /// Resolves with the endpoint's stats as soon as `condition` holds for them, e.g.
    /// `sim.wait_for(ip, |s| s.health_checks >= 3)`. Event-driven: the condition is
    /// checked again on every counter change, never by polling.
    ///
    /// # Panics
    /// When `ip` is not a simulated endpoint.
    pub async fn wait_for(
        &self,
        ip: IpAddr,
        condition: impl Fn(&EndpointStats) -> bool,
    ) -> EndpointStats {
        let endpoint = match self.shared.by_ip.get(&ip) {
            Some(endpoint) => endpoint,
            None => panic!("wait_for: {ip} is not a simulated endpoint"),
        };
        endpoint.wait_for(condition).await
    }

    /// Stops every listener and the control API, closes every connection, and waits
    /// until all sockets are released.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.control_task.take() {
            self.shared.shutdown.send_replace(true);
            let _ = task.await;
        }
        stop_all(&self.shared).await;
        tracing::info!("cluster simulator stopped");
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        // Every accept loop watches this flag and closes its listener and connections.
        self.shared.shutdown.send_replace(true);
    }
}

async fn stop_all(shared: &Arc<Shared>) {
    shared.shutdown.send_replace(true);
    for endpoint in &shared.endpoints {
        endpoint.stop().await;
    }
}

/// A JSON response with the given status.
pub(crate) fn json_response(
    status: http::StatusCode,
    body: &serde_json::Value,
) -> http::Response<gpulink::body::ProxyBody> {
    use gpulink::body::ProxyBodyExt;
    let mut response = http::Response::new(gpulink::body::ProxyBody::full(bytes::Bytes::from(
        body.to_string(),
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// An error answer not rendered yet, so that `Result`s carrying it stay small.
pub(crate) struct Reject {
    pub status: http::StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Reject {
    pub(crate) fn bad_request(code: &'static str, message: String) -> Self {
        Self {
            status: http::StatusCode::BAD_REQUEST,
            code,
            message,
        }
    }

    pub(crate) fn into_response(self) -> http::Response<gpulink::body::ProxyBody> {
        error_response(self.status, self.code, &self.message)
    }
}

/// 405 for a port that takes one method: `Allow: {allow}`, and `message` saying which.
pub(crate) fn method_not_allowed(
    allow: &'static str,
    message: &str,
) -> http::Response<gpulink::body::ProxyBody> {
    let mut response = error_response(
        http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

/// The cluster's error shape, the same as gpulink's own:
/// `{"error": {"code": "...", "message": "..."}}`.
pub(crate) fn error_response(
    status: http::StatusCode,
    code: &str,
    message: &str,
) -> http::Response<gpulink::body::ProxyBody> {
    json_response(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_method_is_told_the_one_allowed() {
        let response = method_not_allowed("POST", "the inference API takes POST");
        assert_eq!(response.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[http::header::ALLOW], "POST");
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
    }
}
