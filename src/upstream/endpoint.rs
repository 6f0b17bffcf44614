//! One upstream endpoint (a PrivateLink ENI or a public endpoint): where to dial, which
//! name to verify, its connection pool, and the live state the balancer reads.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use rustls::pki_types::ServerName;
use serde::Serialize;

use super::connector::EndpointConnector;
use super::diagnose::{Diagnosis, Problem};
use super::pool::Pool;
use super::state::{DataPathState, FailedBy, HealthState};
use crate::config::{EndpointConfig, RouteKind};

/// What the last active health check said, for `/status` and logs.
#[derive(Debug, Clone, Serialize, Default)]
pub struct HealthSnapshot {
    /// `unknown` until the first check, then `healthy` or `unhealthy`.
    pub state: HealthState,
    /// When `state` last changed (the status page's "down for 4 min").
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the last check failed, if it did.
    pub last_error: Option<String>,
    /// The kind of that failure, and what to do about it (as `gpulink probe` says).
    pub problem: Option<Problem>,
    pub diagnosis: Option<String>,
    /// The region the endpoint reported.
    pub region: Option<String>,
    pub checks: u64,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
}

/// Whether requests can flow: what the last data-path check (a fresh TCP connect and
/// TLS handshake to the inference address) or request-path connect failure said.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DataPathSnapshot {
    /// `unknown` until the first check, then `ok` or `failed`.
    pub state: DataPathState,
    /// When `state` last changed.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// What failed it last: the health round's handshake or a real request's connect.
    pub failed_by: Option<FailedBy>,
    pub problem: Option<Problem>,
    pub diagnosis: Option<String>,
    /// The failure as the connector reported it.
    pub last_error: Option<String>,
    /// How long the last passing handshake (TCP + TLS) took.
    pub handshake_ms: Option<f64>,
    pub checks: u64,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
}

/// The last failure of a real request to this endpoint (connect, TLS, send, timeout),
/// so `/status` shows request-path trouble, not only health-check trouble.
#[derive(Debug, Clone, Serialize)]
pub struct RequestError {
    pub at: chrono::DateTime<chrono::Utc>,
    pub message: String,
    /// Set for connect and TLS failures, which `gpulink probe` can classify.
    pub problem: Option<Problem>,
}

pub struct Endpoint {
    pub config: EndpointConfig,
    /// `host:port` as configured; the stable identity across reloads.
    pub authority: String,
    pub authority_header: HeaderValue,
    /// `server_name[:port]`: the request URI's authority, so the pool sends the TLS name
    /// as Host / `:authority`. Parsed once, here, not per request.
    uri_authority: http::uri::Authority,
    /// One connection pool per request-path worker, then one for every other thread
    /// ([`crate::runtime::pool_index`]): a pooled connection runs as a task on the
    /// runtime that opened it, so a worker's requests only use connections of its own.
    pools: Box<[Arc<Pool>]>,
    /// Makes the pool's connections; the data-path check uses it too, so the check dials
    /// exactly what a request would.
    connector: EndpointConnector,
    /// Whether active health checks currently admit this endpoint.
    healthy: AtomicBool,
    /// Whether the data path (TCP + TLS to the inference address) currently works.
    data_path_ok: AtomicBool,
    /// Passive outlier detection: failures in a row, and the ejection in force.
    pub(crate) outlier: super::outlier::OutlierState,
    /// `available_capacity` from the last good health check; -1 when unknown.
    capacity: AtomicI64,
    in_flight: AtomicU64,
    /// Peak-EWMA of response-header latency.
    latency: Mutex<PeakEwma>,
    requests: AtomicU64,
    failures: AtomicU64,
    pub(crate) health: Mutex<HealthSnapshot>,
    pub(crate) data_path: Mutex<DataPathSnapshot>,
    last_request_error: Mutex<Option<RequestError>>,
    settings: super::ConnectionSettings,
    /// Its metric series, resolved at first use ([`crate::metrics::Metrics::series`]).
    metric_series: std::sync::OnceLock<Arc<crate::metrics::EndpointSeries>>,
}

impl Endpoint {
    pub fn new(
        config: EndpointConfig,
        tls: Arc<rustls::ClientConfig>,
        settings: super::ConnectionSettings,
    ) -> Result<Self, String> {
        let (connect_timeout, pool_idle_timeout) =
            (settings.connect_timeout, settings.pool_idle_timeout);
        let server_name = ServerName::try_from(config.server_name.clone())
            .map_err(|e| format!("invalid TLS name `{}`: {e}", config.server_name))?;
        let connector =
            EndpointConnector::new(&config.host, config.port, server_name, tls, connect_timeout);
        let authority = config.authority();
        let authority_header = HeaderValue::from_str(&authority)
            .map_err(|_| format!("endpoint `{authority}` is not a valid header value"))?;
        let origin = if config.port == 443 {
            config.server_name.clone()
        } else {
            format!("{}:{}", config.server_name, config.port)
        };
        let uri_authority = http::uri::Authority::try_from(origin.as_str())
            .map_err(|e| format!("`{origin}` is not a valid URI authority: {e}"))?;
        let pools = (0..settings.pools.max(1))
            .map(|_| {
                Pool::new(connector.clone(), uri_authority.clone(), pool_idle_timeout).map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            authority,
            authority_header,
            uri_authority,
            pools,
            connector,
            healthy: AtomicBool::new(true),
            data_path_ok: AtomicBool::new(true),
            outlier: super::outlier::OutlierState::default(),
            capacity: AtomicI64::new(-1),
            in_flight: AtomicU64::new(0),
            latency: Mutex::new(PeakEwma::default()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            settings,
            health: Mutex::new(HealthSnapshot::default()),
            data_path: Mutex::new(DataPathSnapshot::default()),
            last_request_error: Mutex::new(None),
            metric_series: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn metric_series(
        &self,
    ) -> &std::sync::OnceLock<Arc<crate::metrics::EndpointSeries>> {
        &self.metric_series
    }

    pub fn connection_settings(&self) -> &super::ConnectionSettings {
        &self.settings
    }

    pub fn kind(&self) -> RouteKind {
        self.config.kind
    }

    pub fn region(&self) -> &str {
        &self.config.region
    }

    /// The ENI's availability zone, when the configuration or discovery gave one.
    pub fn zone(&self) -> Option<&crate::config::Zone> {
        self.config.zone.as_ref()
    }

    /// The connection pool of the thread asking (see [`crate::runtime::pool_index`]).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pools[crate::runtime::pool_index(self.pools.len())]
    }

    /// `https://server_name[:port]/path?query` for a request to this endpoint.
    pub fn uri_for(&self, path: &http::uri::PathAndQuery) -> Result<http::Uri, http::Error> {
        http::Uri::builder()
            .scheme(http::uri::Scheme::HTTPS)
            .authority(self.uri_authority.clone())
            .path_and_query(path.clone())
            .build()
    }

    pub(crate) fn connector(&self) -> &EndpointConnector {
        &self.connector
    }

    /// The CA files trusted for this endpoint besides the system roots.
    pub fn ca_files(&self) -> Vec<std::path::PathBuf> {
        self.settings
            .ca_file
            .iter()
            .chain(self.config.ca_file.iter())
            .cloned()
            .collect()
    }

    /// Whether new requests may go here: the health port and the data path both pass,
    /// and passive detection has not ejected it.
    pub fn is_serving(&self) -> bool {
        self.is_healthy() && self.is_data_path_ok() && !self.outlier.is_ejected()
    }

    /// Whether the last data-path verdict lets requests flow (see [`DataPathSnapshot`]).
    pub fn is_data_path_ok(&self) -> bool {
        self.data_path_ok.load(Ordering::Acquire)
    }

    pub(crate) fn set_data_path_ok(&self, ok: bool) {
        self.data_path_ok.store(ok, Ordering::Release);
    }

    pub fn data_path_snapshot(&self) -> DataPathSnapshot {
        self.data_path.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Remembers a real request's failure here for `/status`.
    pub fn record_request_error(&self, message: String, diagnosis: Option<&Diagnosis>) {
        if let Ok(mut last) = self.last_request_error.lock() {
            *last = Some(RequestError {
                at: chrono::Utc::now(),
                message,
                problem: diagnosis.map(|d| d.problem),
            });
        }
    }

    pub fn last_request_error(&self) -> Option<RequestError> {
        self.last_request_error.lock().ok().and_then(|l| l.clone())
    }

    /// What the active health checks say, ignoring passive ejection.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Release);
    }

    /// `None` until a health check reported a capacity.
    pub fn capacity(&self) -> Option<u64> {
        u64::try_from(self.capacity.load(Ordering::Relaxed)).ok()
    }

    pub(crate) fn set_capacity(&self, capacity: Option<u64>) {
        let v = capacity.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX));
        self.capacity.store(v, Ordering::Relaxed);
    }

    /// Full endpoints (capacity 0) are used only when nothing else can serve.
    pub fn is_full(&self) -> bool {
        self.capacity() == Some(0)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The current latency estimate, decayed for the time since the last sample.
    pub fn latency(&self) -> Option<Duration> {
        let now = Instant::now();
        self.latency.lock().ok().and_then(|l| l.estimate(now))
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard is dropped (which the
    /// forwarder ties to the end of the response body).
    pub fn start_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            endpoint: self.clone(),
        }
    }

    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_latency(&self, latency: Duration) {
        if let Ok(mut l) = self.latency.lock() {
            l.record(latency, Instant::now());
        }
    }

    pub fn health_snapshot(&self) -> HealthSnapshot {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

pub struct InFlightGuard {
    endpoint: Arc<Endpoint>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How fast old latency samples fade (linkerd and tower use 10 s).
const LATENCY_DECAY: Duration = Duration::from_secs(10);

/// Peak-EWMA (as in linkerd2-proxy and tower's `PeakEwma`): a sample above the estimate
/// replaces it at once, so a slowdown shows immediately; lower samples pull it down
/// with a weight that grows with the time since the last sample, and the estimate also
/// fades while an endpoint gets no traffic, so it is tried again.
#[derive(Debug, Default)]
struct PeakEwma {
    /// Seconds; `None` until the first sample.
    estimate: Option<(f64, Instant)>,
}

impl PeakEwma {
    fn decay(elapsed: Duration) -> f64 {
        (-elapsed.as_secs_f64() / LATENCY_DECAY.as_secs_f64()).exp()
    }

    fn record(&mut self, sample: Duration, now: Instant) {
        let sample = sample.as_secs_f64();
        let next = match self.estimate {
            None => sample,
            Some((old, _)) if sample > old => sample,
            Some((old, at)) => {
                let decay = Self::decay(now.saturating_duration_since(at));
                old * decay + sample * (1.0 - decay)
            }
        };
        self.estimate = Some((next, now));
    }

    fn estimate(&self, now: Instant) -> Option<Duration> {
        self.estimate.map(|(value, at)| {
            Duration::from_secs_f64(value * Self::decay(now.saturating_duration_since(at)))
        })
    }
}
