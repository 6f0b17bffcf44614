//! Prometheus metrics: one [`Metrics`] per proxy (never a process global: tests run many
//! proxies in one process, and a reload must not lose counts), exposed by the admin
//! server on `/metrics`.
//!
//! Two kinds of metric live here:
//!
//! * **Events**, recorded on the request path by small methods
//!   ([`Metrics::request_finished`], [`Metrics::upstream_response`],
//!   [`Metrics::upstream_failed`], [`Metrics::seal_finished`], ...). Each is a
//!   hash lookup and an atomic add; nothing here blocks or allocates much.
//! * **State** (endpoint health, capacity, in-flight, latency estimate, phase,
//!   generation, readiness), copied from the current configuration generation when
//!   `/metrics` is scraped rather than maintained on the hot path: the endpoints already
//!   hold that state, and a scrape every few seconds is far cheaper than an update per
//!   request. The gauges are cleared first, so endpoints removed by a reload disappear.
//!
//! Names follow the Prometheus conventions: `gpulink_` prefix, `_total` counters, base
//! units (`_seconds`). The `route` label is `privatelink` or `public`: the route that
//! answered, or for an error gpulink made itself (502, 504, `no_capacity`) the route,
//! region and endpoint of the request's last attempt, and for `no_endpoint` the route it
//! would have taken (region and endpoint `none`); `none` only for answers made before
//! routing. `endpoint` is the endpoint's configured `host:port`, so its cardinality is
//! bounded by the configuration. Every series a dashboard panel reads exists at zero from
//! the first scrape, so that `rate()` and `increase()` see the first burst of an outage.

use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::config::RouteKind;
use crate::error::{AttemptKind, Code, NotSent, Unprocessed};
use crate::generation::Generation;
use crate::seal::{KeyError, KmsOperation, SealError, Sealed, WireFormat};
use crate::upstream::state::{Check, HealthState};
use crate::upstream::Endpoint;

/// Request latency buckets, in seconds: 5 ms to 60 s, dense between 100 and 300 ms where
/// the guide's comparison lives (PrivateLink 140–160 ms against public 160–180 ms).
pub const LATENCY_BUCKETS: [f64; 21] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// KMS call buckets, in seconds: an in-region KMS call takes a few milliseconds; the
/// upper buckets catch retries and timeouts (`kms.timeout` defaults to 3 s).
pub const KMS_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Labels of an answer to the app.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub region: String,
    pub endpoint: String,
    pub status: &'static str,
}

/// Labels of a PrivateLink attempt by where its ENI is relative to this host's zone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalityLabels {
    /// `same_zone`, `cross_zone` or `unknown` ([`crate::placement::Locality`]).
    pub locality: &'static str,
}

/// Labels identifying one upstream endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub route: &'static str,
    pub region: String,
    pub endpoint: String,
}

impl EndpointLabels {
    pub fn of(endpoint: &Endpoint) -> Self {
        Self {
            route: endpoint.kind().as_str(),
            region: endpoint.region().to_string(),
            endpoint: endpoint.authority.clone(),
        }
    }

    /// A route without an endpoint (`region` and `endpoint` are `none`): for a request
    /// that found no endpoint to try on the route it would have taken.
    pub fn route_only(route: crate::config::RouteKind) -> Self {
        Self {
            route: route.as_str(),
            region: "none".into(),
            endpoint: "none".into(),
        }
    }
}

/// One endpoint's request-path series, resolved once (the label strings built and looked
/// up when the endpoint first serves) and kept on the endpoint, so that a request costs
/// atomic adds and histogram observations, not label allocations and locked look-ups.
/// The handles share their counts with the families they came from: the exposition is
/// the same.
pub struct EndpointSeries {
    pub labels: EndpointLabels,
    attempts: Counter,
    upstream_duration: Histogram,
    /// `gpulink_requests_total` for `2xx`, `4xx` and `5xx` answers (the series made at 0
    /// for every endpoint; a 1xx or 3xx answer is counted through the family).
    requests: [Counter; 3],
    request_duration: Histogram,
}

/// Where an answer is counted ([`Metrics::request_finished`]).
#[derive(Clone)]
pub enum Attribution {
    /// The endpoint of the request's last attempt.
    Endpoint(std::sync::Arc<EndpointSeries>),
    /// No endpoint to try on the route the request would have taken.
    Route(RouteKind),
}

impl Attribution {
    /// The labels the answer is counted under.
    pub fn labels(&self) -> std::borrow::Cow<'_, EndpointLabels> {
        match self {
            Attribution::Endpoint(series) => std::borrow::Cow::Borrowed(&series.labels),
            Attribution::Route(route) => {
                std::borrow::Cow::Owned(EndpointLabels::route_only(*route))
            }
        }
    }
}

/// An endpoint, the check that fails there (`health` or `data_path`) and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckProblemLabels {
    pub route: &'static str,
    pub region: String,
    pub endpoint: String,
    pub check: &'static str,
    pub problem: &'static str,
}

/// An endpoint's labels and why a request was refused unprocessed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnprocessedLabels {
    pub route: &'static str,
    pub region: String,
    pub endpoint: String,
    pub reason: &'static str,
}

impl UnprocessedLabels {
    fn of(endpoint: &Endpoint, reason: &'static str) -> Self {
        Self {
            route: endpoint.kind().as_str(),
            region: endpoint.region().to_string(),
            endpoint: endpoint.authority.clone(),
            reason,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteRegionLabels {
    pub route: &'static str,
    pub region: String,
}

/// Labels of a discovered region (`source`: `dns` or `ec2`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryLabels {
    pub region: String,
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FormatLabels {
    pub format: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// The state `/metrics` copies into its gauges at each scrape: the generation in service
/// and the runtime's lifecycle.
pub struct Snapshot<'a> {
    pub generation: &'a Generation,
    pub ready: bool,
    pub draining: bool,
    /// Reloads by result: (applied, rejected).
    pub reloads: (u64, u64),
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn kms_histogram() -> Histogram {
    Histogram::new(KMS_BUCKETS)
}

/// The last KMS outcomes, for `/status` and the status page (not exported as metrics:
/// timestamps of events are what logs are for; this is the at-a-glance view).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct KmsState {
    pub last_success: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<chrono::DateTime<chrono::Utc>>,
    /// The last error's message (never key material: `KeyError` carries none).
    pub last_error_message: Option<String>,
}

/// Every metric of one proxy, and the registry that exposes them.
pub struct Metrics {
    registry: Registry,

    // App-facing requests.
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    request_errors: Family<CodeLabels, Counter>,

    // Upstream attempts.
    upstream_attempts: Family<EndpointLabels, Counter>,
    upstream_duration: HistogramFamily<RouteRegionLabels>,
    upstream_connect_failures: Family<EndpointLabels, Counter>,
    upstream_timeouts: Family<EndpointLabels, Counter>,
    upstream_send_failures: Family<EndpointLabels, Counter>,
    upstream_unprocessed: Family<UnprocessedLabels, Counter>,
    upstream_retries: Counter,
    privatelink_locality: Family<LocalityLabels, Counter>,

    // Sealing and KMS.
    seal_duration: HistogramFamily<FormatLabels>,
    kms_calls: Family<OperationLabels, Counter>,
    kms_errors: Family<ReasonLabels, Counter>,
    kms_duration: HistogramFamily<OperationLabels>,
    key_cache_hits: Counter,
    key_cache_misses: Counter,
    key_cache_refresh_failures: Counter,
    kms_state: Mutex<KmsState>,

    // Configuration.
    config_reloads: Family<ResultLabels, Counter>,

    // PrivateLink discovery (`privatelink_dns`, `privatelink_endpoint_id`).
    discovery_refresh_failures: Family<DiscoveryLabels, Counter>,
    discovery_last_success: Family<DiscoveryLabels, Gauge>,
    discovery_addresses: Family<DiscoveryLabels, Gauge>,

    // Logging.
    log_lines_dropped: Counter,

    // State, refreshed at scrape time.
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    endpoint_data_path_healthy: Family<EndpointLabels, Gauge>,
    endpoint_check_failing: Family<CheckProblemLabels, Gauge>,
    endpoint_serving: Family<EndpointLabels, Gauge>,
    endpoint_capacity: Family<EndpointLabels, Gauge>,
    endpoint_in_flight: Family<EndpointLabels, Gauge>,
    endpoint_latency: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    config_generation: Gauge,
    ready: Gauge,
    draining: Gauge,
    phase: Family<PhaseLabels, Gauge>,
    public_fallback_open: Gauge,
    rollback_active: Gauge,

    /// Serialises refresh-then-encode, so two concurrent scrapes never interleave a
    /// `clear()` of one with the encoding of the other.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The exposition formats `/metrics` can answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (what Prometheus asks for first).
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 (for `curl` and older scrapers).
    PrometheusText,
}

impl Format {
    /// Chooses by the scraper's `Accept` header, as Prometheus negotiates.
    pub fn negotiate(headers: &HeaderMap) -> Self {
        let accepts_openmetrics = headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        if accepts_openmetrics {
            Format::OpenMetrics
        } else {
            Format::PrometheusText
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gpulink");

        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered to the app, by status class and the route, region and endpoint that answered, or whose last attempt failed when gpulink answered itself (region and endpoint `none` when no endpoint could be tried, route `none` when refused before routing)",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its response headers (sealing included; streamed bodies continue after), by route (gpulink's own upstream errors included, under the route they were attempted on)",
            Unit::Seconds,
            request_duration.clone(),
        );
        let request_errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "request_errors",
            "Error answers gpulink made itself, by error code",
            request_errors.clone(),
        );

        let upstream_attempts = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Attempts to send a request to an endpoint, whatever their outcome (retries included)",
            upstream_attempts.clone(),
        );
        let upstream_duration: HistogramFamily<RouteRegionLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "upstream_duration",
            "Time from sending to an endpoint to its response headers, connection set-up excluded, by route and region: PrivateLink against public without the KMS time",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let upstream_connect_failures = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "upstream_connect_failures",
            "TCP or TLS connection failures to an endpoint (the request was not sent and may be retried elsewhere)",
            upstream_connect_failures.clone(),
        );
        let upstream_timeouts = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "upstream_timeouts",
            "Requests with no response headers from an endpoint within upstream.request_timeout",
            upstream_timeouts.clone(),
        );
        let upstream_send_failures = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "upstream_send_failures",
            "Connections that failed after the request was sent (never replayed)",
            upstream_send_failures.clone(),
        );
        let upstream_unprocessed = Family::<UnprocessedLabels, Counter>::default();
        registry.register(
            "upstream_unprocessed",
            "Requests a connection to the endpoint refused unprocessed (reason goaway: above an HTTP/2 GOAWAY's last stream, as when nginx rotates connections; refused_stream; closed: the connection closed before the request was written); retried, not counted as endpoint failures",
            upstream_unprocessed.clone(),
        );
        let privatelink_locality = Family::<LocalityLabels, Counter>::default();
        registry.register(
            "privatelink_locality",
            "Attempts sent to PrivateLink endpoints by locality: same_zone (the ENI is in this host's zone), cross_zone, unknown (the host's or the ENI's zone is not known)",
            privatelink_locality.clone(),
        );
        let upstream_retries = Counter::default();
        registry.register(
            "upstream_retries",
            "Retries of a request (on another endpoint, or on a fresh connection after a refusal)",
            upstream_retries.clone(),
        );

        let seal_duration: HistogramFamily<FormatLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "seal_duration",
            "Time to seal a body (KMS calls included), by encryption format",
            Unit::Seconds,
            seal_duration.clone(),
        );
        let kms_calls = Family::<OperationLabels, Counter>::default();
        registry.register(
            "kms_calls",
            "AWS KMS calls, by operation: Encrypt (kms-direct format) and GenerateDataKey (the aws-esdk data-key cache)",
            kms_calls.clone(),
        );
        let kms_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "kms_errors",
            "Requests refused with 503 kms_unavailable because KMS failed, by reason (timeout, kms, credentials, other); nothing was sent",
            kms_errors.clone(),
        );
        let kms_duration: HistogramFamily<OperationLabels> =
            Family::new_with_constructor(kms_histogram);
        registry.register_with_unit(
            "kms_call_duration",
            "AWS KMS call latency, by operation (Encrypt: every kms-direct seal; GenerateDataKey: seals that waited for a cache miss)",
            Unit::Seconds,
            kms_duration.clone(),
        );
        let key_cache_hits = Counter::default();
        registry.register(
            "key_cache_hits",
            "Data-key cache hits (aws-esdk format): bodies sealed without a KMS call",
            key_cache_hits.clone(),
        );
        let key_cache_misses = Counter::default();
        registry.register(
            "key_cache_misses",
            "Data-key cache misses (aws-esdk format): each one is a KMS GenerateDataKey call",
            key_cache_misses.clone(),
        );
        let key_cache_refresh_failures = Counter::default();
        registry.register(
            "key_cache_refresh_failures",
            "Background data-key refreshes that failed (the previous key kept serving within its limits)",
            key_cache_refresh_failures.clone(),
        );

        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (a failed reload keeps the old configuration serving)",
            config_reloads.clone(),
        );

        let discovery_refresh_failures = Family::<DiscoveryLabels, Counter>::default();
        registry.register(
            "discovery_refresh_failures",
            "PrivateLink discovery rounds that failed, by region and source (the last good addresses kept serving)",
            discovery_refresh_failures.clone(),
        );
        let discovery_last_success = Family::<DiscoveryLabels, Gauge>::default();
        registry.register(
            "discovery_last_success_timestamp_seconds",
            "Unix time of the region's last PrivateLink discovery round that succeeded",
            discovery_last_success.clone(),
        );
        let discovery_addresses = Family::<DiscoveryLabels, Gauge>::default();
        registry.register(
            "discovery_addresses",
            "PrivateLink addresses in service from the region's last good discovery round (0 while a VPC endpoint is not available)",
            discovery_addresses.clone(),
        );

        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped rather than delay a request: the log queue was full (stderr's reader is slow or stalled) or stderr refused the write",
            log_lines_dropped.clone(),
        );

        let endpoint_healthy = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_healthy",
            "1 when the endpoint's active health checks pass, else 0",
            endpoint_healthy.clone(),
        );
        let endpoint_data_path_healthy = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_data_path_healthy",
            "1 when a fresh TCP connect and TLS handshake to the endpoint's inference address pass (and no request's connect failed since), else 0",
            endpoint_data_path_healthy.clone(),
        );
        let endpoint_check_failing = Family::<CheckProblemLabels, Gauge>::default();
        registry.register(
            "endpoint_check_failing",
            "1 for each check (health, data_path) that keeps an endpoint out, labelled with the problem gpulink probe would name (absent while passing)",
            endpoint_check_failing.clone(),
        );
        let endpoint_serving = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_serving",
            "1 when new requests may go to the endpoint (healthy and not ejected), else 0",
            endpoint_serving.clone(),
        );
        let endpoint_capacity = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_capacity",
            "available_capacity from the endpoint's last good health check (absent until one)",
            endpoint_capacity.clone(),
        );
        let endpoint_in_flight = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_in_flight",
            "Requests in flight to the endpoint",
            endpoint_in_flight.clone(),
        );
        let endpoint_latency =
            Family::<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "endpoint_latency",
            "The balancer's peak-EWMA latency estimate for the endpoint (absent until a sample)",
            Unit::Seconds,
            endpoint_latency.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "The configuration generation serving new requests (1 at start, +1 per successful reload)",
            config_generation.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when /ready answers 200", ready.clone());
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 while shutting down (/ready answers 503)",
            draining.clone(),
        );
        let phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "migration_phase",
            "1 for the migration phase in force, 0 for the others",
            phase.clone(),
        );
        let public_fallback_open = Gauge::default();
        registry.register(
            "public_fallback_open",
            "1 while phase `privatelink` may still fall back to public endpoints (before migration.public_fallback_until)",
            public_fallback_open.clone(),
        );
        let rollback_active = Gauge::default();
        registry.register(
            "rollback_active",
            "1 while automatic rollback has moved traffic to public endpoints",
            rollback_active.clone(),
        );

        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the labels tell the running version",
            build_info,
        );
        let start_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        registry.register_with_unit(
            "start_time",
            "When this proxy started, in seconds since the Unix epoch",
            Unit::Seconds,
            start_time,
        );

        let metrics = Self {
            registry,
            requests,
            request_duration,
            request_errors,
            upstream_attempts,
            upstream_duration,
            upstream_connect_failures,
            upstream_timeouts,
            upstream_send_failures,
            upstream_unprocessed,
            upstream_retries,
            privatelink_locality,
            seal_duration,
            kms_calls,
            kms_errors,
            kms_duration,
            key_cache_hits,
            key_cache_misses,
            key_cache_refresh_failures,
            kms_state: Mutex::new(KmsState::default()),
            config_reloads,
            discovery_refresh_failures,
            discovery_last_success,
            discovery_addresses,
            log_lines_dropped,
            endpoint_healthy,
            endpoint_data_path_healthy,
            endpoint_check_failing,
            endpoint_serving,
            endpoint_capacity,
            endpoint_in_flight,
            endpoint_latency,
            config_generation,
            ready,
            draining,
            phase,
            public_fallback_open,
            rollback_active,
            scrape: Mutex::new(()),
        };
        metrics.zero_init();
        metrics
    }

    /// Creates the label sets known in advance at 0, so every family is exposed from
    /// the first scrape and `rate()` and ratios work before the first event (an absent
    /// series is not a zero in PromQL).
    fn zero_init(&self) {
        for route in ["privatelink", "public", "none"] {
            drop(self.request_duration.get_or_create(&RouteLabels { route }));
        }
        for code in Code::ALL {
            let code = code.as_str();
            drop(self.request_errors.get_or_create(&CodeLabels { code }));
        }
        // Answers gpulink makes itself: before routing (`none`), and `no_endpoint` on a
        // route; the per-endpoint series are made at each scrape.
        for status in ["4xx", "5xx"] {
            drop(self.requests.get_or_create(&RequestLabels {
                route: "none",
                region: "none".into(),
                endpoint: "none".into(),
                status,
            }));
        }
        for route in [RouteKind::Privatelink, RouteKind::Public] {
            let labels = EndpointLabels::route_only(route);
            drop(self.requests.get_or_create(&RequestLabels {
                route: labels.route,
                region: labels.region,
                endpoint: labels.endpoint,
                status: "5xx",
            }));
        }
        for format in WireFormat::ALL.map(WireFormat::as_str) {
            drop(self.seal_duration.get_or_create(&FormatLabels { format }));
        }
        for operation in KmsOperation::SEALING.map(KmsOperation::as_str) {
            drop(self.kms_calls.get_or_create(&OperationLabels { operation }));
            drop(
                self.kms_duration
                    .get_or_create(&OperationLabels { operation }),
            );
        }
        for reason in ["timeout", "kms", "credentials", "other"] {
            drop(self.kms_errors.get_or_create(&ReasonLabels { reason }));
        }
        for result in ["success", "failure"] {
            drop(self.config_reloads.get_or_create(&ResultLabels { result }));
        }
    }

    /// The same for one endpoint's counters; idempotent, run at every scrape so that
    /// endpoints added by a reload get their series too.
    fn zero_init_endpoint(&self, endpoint: &Endpoint, labels: &EndpointLabels) {
        for family in [
            &self.upstream_attempts,
            &self.upstream_connect_failures,
            &self.upstream_timeouts,
            &self.upstream_send_failures,
        ] {
            drop(family.get_or_create(labels));
        }
        for reason in Unprocessed::ALL.map(Unprocessed::as_str) {
            drop(
                self.upstream_unprocessed
                    .get_or_create(&UnprocessedLabels::of(endpoint, reason)),
            );
        }
        for status in ["2xx", "4xx", "5xx"] {
            drop(self.requests.get_or_create(&RequestLabels {
                route: labels.route,
                region: labels.region.clone(),
                endpoint: labels.endpoint.clone(),
                status,
            }));
        }
        drop(self.upstream_duration.get_or_create(&RouteRegionLabels {
            route: endpoint.kind().as_str(),
            region: endpoint.region().to_string(),
        }));
    }

    // ---- App-facing requests -------------------------------------------------------

    /// One answer to the app, relayed or made by gpulink (then with its `error` code).
    /// `elapsed` runs from the request's arrival to its response headers. The answer is
    /// counted under `attribution`: the endpoint that answered or, for an error gpulink
    /// made itself, the endpoint of the request's last attempt (or the route it would
    /// have taken, for `no_endpoint`), so that "errors by route" and "latency by route"
    /// include what an outage costs; `none` when the request never reached routing
    /// (refused at ingress, KMS failed).
    pub fn request_finished(
        &self,
        status: StatusCode,
        error: Option<Code>,
        attribution: Option<&Attribution>,
        elapsed: Duration,
    ) {
        if let Some(code) = error {
            self.request_errors
                .get_or_create(&CodeLabels {
                    code: code.as_str(),
                })
                .inc();
        }
        if let Some(Attribution::Endpoint(series)) = attribution {
            if let Some(index) = status_class_index(status) {
                series.requests[index].inc();
                series.request_duration.observe(elapsed.as_secs_f64());
                return;
            }
        }
        let (route, region, endpoint) = match attribution.map(Attribution::labels) {
            Some(to) => (to.route, to.region.clone(), to.endpoint.clone()),
            None => ("none", "none".into(), "none".into()),
        };
        self.requests
            .get_or_create(&RequestLabels {
                route,
                region,
                endpoint,
                status: status_class(status),
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    // ---- Upstream attempts -----------------------------------------------------------

    /// An endpoint answered with response headers after `latency` (connection set-up
    /// excluded).
    pub fn upstream_response(&self, endpoint: &Endpoint, latency: Duration) {
        let series = self.series(endpoint);
        series.attempts.inc();
        series.upstream_duration.observe(latency.as_secs_f64());
    }

    /// `endpoint`'s request-path series, resolved at its first use and kept on it (an
    /// endpoint belongs to one proxy, whose metrics outlive every generation).
    pub fn series(&self, endpoint: &Endpoint) -> std::sync::Arc<EndpointSeries> {
        endpoint
            .metric_series()
            .get_or_init(|| {
                let labels = EndpointLabels::of(endpoint);
                let route = labels.route;
                let requests = ["2xx", "4xx", "5xx"].map(|status| {
                    self.requests
                        .get_or_create(&RequestLabels {
                            route,
                            region: labels.region.clone(),
                            endpoint: labels.endpoint.clone(),
                            status,
                        })
                        .clone()
                });
                std::sync::Arc::new(EndpointSeries {
                    attempts: self.upstream_attempts.get_or_create(&labels).clone(),
                    upstream_duration: self
                        .upstream_duration
                        .get_or_create(&RouteRegionLabels {
                            route,
                            region: labels.region.clone(),
                        })
                        .clone(),
                    requests,
                    request_duration: self
                        .request_duration
                        .get_or_create(&RouteLabels { route })
                        .clone(),
                    labels,
                })
            })
            .clone()
    }

    /// An attempt that ended without response headers, counted by how it failed.
    pub fn upstream_failed(&self, endpoint: &Endpoint, kind: AttemptKind) {
        match kind {
            AttemptKind::NotSent(NotSent::Unreachable) => self.upstream_connect_failed(endpoint),
            AttemptKind::NotSent(NotSent::Unprocessed(why)) => {
                self.upstream_unprocessed(endpoint, why)
            }
            AttemptKind::FailedAfterSend | AttemptKind::AnswerBrokeOff => {
                self.upstream_send_failed(endpoint)
            }
            AttemptKind::NoResponseHeaders { .. } => self.upstream_timed_out(endpoint),
        }
    }

    /// The request was never sent: TCP or TLS set-up with the endpoint failed. It may
    /// be retried elsewhere.
    fn upstream_connect_failed(&self, endpoint: &Endpoint) {
        let labels = EndpointLabels::of(endpoint);
        self.upstream_attempts.get_or_create(&labels).inc();
        self.upstream_connect_failures.get_or_create(&labels).inc();
    }

    /// No response headers within `upstream.request_timeout`.
    fn upstream_timed_out(&self, endpoint: &Endpoint) {
        let labels = EndpointLabels::of(endpoint);
        self.upstream_attempts.get_or_create(&labels).inc();
        self.upstream_timeouts.get_or_create(&labels).inc();
    }

    /// The connection failed after the request was (perhaps partly) sent.
    fn upstream_send_failed(&self, endpoint: &Endpoint) {
        let labels = EndpointLabels::of(endpoint);
        self.upstream_attempts.get_or_create(&labels).inc();
        self.upstream_send_failures.get_or_create(&labels).inc();
    }

    /// A working connection to the endpoint refused the request unprocessed (HTTP/2
    /// GOAWAY or REFUSED_STREAM) or closed before writing it. Retried, and not a
    /// failure of the endpoint.
    fn upstream_unprocessed(&self, endpoint: &Endpoint, reason: Unprocessed) {
        let labels = EndpointLabels::of(endpoint);
        self.upstream_attempts.get_or_create(&labels).inc();
        self.upstream_unprocessed
            .get_or_create(&UnprocessedLabels::of(endpoint, reason.as_str()))
            .inc();
    }

    /// One attempt to a PrivateLink endpoint, by where it is relative to the host's zone.
    pub fn privatelink_attempt(&self, locality: crate::placement::Locality) {
        self.privatelink_locality
            .get_or_create(&LocalityLabels {
                locality: locality.as_str(),
            })
            .inc();
    }

    /// The request goes to another attempt after a failure that made it safe to.
    pub fn upstream_retry(&self) {
        self.upstream_retries.inc();
    }

    // ---- Sealing and KMS -----------------------------------------------------------

    /// One seal of one body, from the forwarder's seal step.
    ///
    /// Counted here, exactly: `kms-direct` seals (one KMS `Encrypt` each, with its
    /// latency), the latency of `aws-esdk` seals that waited for `GenerateDataKey`, and
    /// every KMS failure that refused a request. The data-key cache's own counters
    /// (hits, misses, `GenerateDataKey` calls, refresh failures) are read at scrape
    /// time instead, because the cache also calls KMS in the background.
    pub fn seal_finished(&self, result: &Result<Sealed, SealError>, elapsed: Duration) {
        let now = chrono::Utc::now();
        match result {
            Ok(sealed) => {
                self.seal_duration
                    .get_or_create(&FormatLabels {
                        format: sealed.format.as_str(),
                    })
                    .observe(elapsed.as_secs_f64());
                let operation = match sealed.cache_hit {
                    None => {
                        self.kms_calls
                            .get_or_create(&OperationLabels {
                                operation: KmsOperation::Encrypt.as_str(),
                            })
                            .inc();
                        Some(KmsOperation::Encrypt.as_str())
                    }
                    // Waited for the key: the seal's time is the KMS call's (the local
                    // AES-GCM work is microseconds).
                    Some(false) => Some(KmsOperation::GenerateDataKey.as_str()),
                    Some(true) => None,
                };
                if let Some(operation) = operation {
                    self.kms_duration
                        .get_or_create(&OperationLabels { operation })
                        .observe(elapsed.as_secs_f64());
                    self.lock_kms_state().last_success = Some(now);
                }
            }
            Err(SealError::Key(error)) => {
                let reason = match error {
                    KeyError::Timeout(_) => "timeout",
                    KeyError::Kms { operation, .. } => {
                        // A failed Encrypt is still a call; GenerateDataKey calls are
                        // counted by the cache.
                        if *operation == KmsOperation::Encrypt {
                            self.kms_calls
                                .get_or_create(&OperationLabels {
                                    operation: KmsOperation::Encrypt.as_str(),
                                })
                                .inc();
                        }
                        "kms"
                    }
                    KeyError::Credentials(_) => "credentials",
                    _ => "other",
                };
                self.kms_errors
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
                let mut state = self.lock_kms_state();
                state.last_error = Some(now);
                state.last_error_message = Some(error.to_string());
            }
            // Refused by size before any KMS call: the 413 shows in request_errors.
            Err(_) => {}
        }
    }

    fn lock_kms_state(&self) -> std::sync::MutexGuard<'_, KmsState> {
        self.kms_state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One PrivateLink discovery round for `region`: `Some(addresses)` when it
    /// succeeded, `None` when it failed.
    pub fn discovery_round(&self, region: &str, source: &'static str, addresses: Option<usize>) {
        let labels = DiscoveryLabels {
            region: region.to_string(),
            source,
        };
        // Present at zero from the first round, so rate() sees the first failure.
        let failures = self.discovery_refresh_failures.get_or_create(&labels);
        match addresses {
            Some(n) => {
                self.discovery_last_success
                    .get_or_create(&labels)
                    .set(chrono::Utc::now().timestamp());
                self.discovery_addresses
                    .get_or_create(&labels)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            None => {
                failures.inc();
            }
        }
    }

    /// KMS outcomes for `/status`.
    pub fn kms_state(&self) -> KmsState {
        self.kms_state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// KMS calls and request-refusing KMS failures so far: (calls, failures). Cache
    /// counters are included as of the last scrape or status read.
    pub fn kms_totals(&self, generation: &Generation) -> (u64, u64) {
        self.sync_cache_counters(generation);
        let calls = KmsOperation::SEALING
            .map(KmsOperation::as_str)
            .into_iter()
            .filter_map(|operation| self.kms_calls.get(&OperationLabels { operation }))
            .map(|c| c.get())
            .sum();
        let failures = ["timeout", "kms", "credentials", "other"]
            .into_iter()
            .filter_map(|reason| self.kms_errors.get(&ReasonLabels { reason }))
            .map(|c| c.get())
            .sum();
        (calls, failures)
    }

    /// Catches the counters mirrored from the data-key cache up with it. The cache's
    /// counters are monotonic and survive reloads (the sealer hands them on), so the
    /// difference is never negative.
    fn sync_cache_counters(&self, generation: &Generation) {
        let cache = generation.sealer.cache_counters();
        catch_up(&self.key_cache_hits, cache.hits());
        catch_up(&self.key_cache_misses, cache.misses());
        catch_up(&self.key_cache_refresh_failures, cache.refresh_failures());
        catch_up(
            &self.kms_calls.get_or_create(&OperationLabels {
                operation: KmsOperation::GenerateDataKey.as_str(),
            }),
            cache.kms_calls(),
        );
    }

    // ---- Exposition ----------------------------------------------------------------

    /// Copies `state` into the gauges and encodes every metric.
    pub fn render(&self, state: &Snapshot<'_>, format: Format) -> Result<String, std::fmt::Error> {
        let _scrape = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.refresh(state);
        let mut out = String::with_capacity(16 * 1024);
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
            Format::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
        }
        Ok(out)
    }

    fn refresh(&self, state: &Snapshot<'_>) {
        let generation = state.generation;
        let now = chrono::Utc::now();
        for family in [
            &self.endpoint_healthy,
            &self.endpoint_data_path_healthy,
            &self.endpoint_serving,
            &self.endpoint_capacity,
            &self.endpoint_in_flight,
        ] {
            family.clear();
        }
        self.endpoint_latency.clear();
        self.endpoint_check_failing.clear();
        for endpoint in &generation.endpoints {
            let labels = EndpointLabels::of(endpoint);
            self.zero_init_endpoint(endpoint, &labels);
            let healthy = endpoint.health_snapshot().state == HealthState::Healthy;
            self.endpoint_healthy
                .get_or_create(&labels)
                .set(i64::from(healthy));
            self.endpoint_data_path_healthy
                .get_or_create(&labels)
                .set(i64::from(endpoint.is_data_path_ok()));
            let failing = |check: Check, problem: Option<crate::upstream::diagnose::Problem>| {
                self.endpoint_check_failing
                    .get_or_create(&CheckProblemLabels {
                        route: labels.route,
                        region: labels.region.clone(),
                        endpoint: labels.endpoint.clone(),
                        check: check.as_str(),
                        problem: problem.map_or("unknown", |p| p.as_str()),
                    })
                    .set(1);
            };
            if !endpoint.is_healthy() {
                failing(Check::Health, endpoint.health_snapshot().problem);
            }
            if !endpoint.is_data_path_ok() {
                failing(Check::DataPath, endpoint.data_path_snapshot().problem);
            }
            self.endpoint_serving
                .get_or_create(&labels)
                .set(i64::from(endpoint.is_serving()));
            if let Some(capacity) = endpoint.capacity() {
                self.endpoint_capacity
                    .get_or_create(&labels)
                    .set(i64::try_from(capacity).unwrap_or(i64::MAX));
            }
            self.endpoint_in_flight
                .get_or_create(&labels)
                .set(i64::try_from(endpoint.in_flight()).unwrap_or(i64::MAX));
            if let Some(latency) = endpoint.latency() {
                self.endpoint_latency
                    .get_or_create(&labels)
                    .set(latency.as_secs_f64());
            }
        }
        self.config_generation
            .set(i64::try_from(generation.number).unwrap_or(i64::MAX));
        self.ready.set(i64::from(state.ready));
        self.draining.set(i64::from(state.draining));
        let current = generation.routes.phase();
        for phase in crate::config::Phase::ALL {
            self.phase
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(i64::from(phase == current));
        }
        self.public_fallback_open
            .set(i64::from(generation.routes.public_fallback_open(now)));
        // Whether automatic rollback currently sends PrivateLink traffic to public.
        self.rollback_active
            .set(i64::from(generation.routes.is_rolled_back(now)));
        // The runtime counts reloads itself; catch the counters up (monotonic, so the
        // difference is never negative).
        let (applied, rejected) = state.reloads;
        for (result, total) in [("success", applied), ("failure", rejected)] {
            catch_up(
                &self.config_reloads.get_or_create(&ResultLabels { result }),
                total,
            );
        }
        self.sync_cache_counters(generation);
        catch_up(&self.log_lines_dropped, crate::logwriter::lines_dropped());
    }
}

/// Raises a counter that mirrors a monotonic total kept elsewhere.
fn catch_up(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// Every migration phase, so the phase gauge has a series for each (0 or 1).
/// `2xx`, `4xx`, ...: the status class, so label cardinality stays bounded.
/// The index of [`status_class`] among the classes [`EndpointSeries`] holds.
fn status_class_index(status: StatusCode) -> Option<usize> {
    match status_class(status) {
        "2xx" => Some(0),
        "4xx" => Some(1),
        "5xx" => Some(2),
        _ => None,
    }
}

pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::BAD_GATEWAY), "5xx");
    }

    #[test]
    fn negotiates_the_format_by_accept() {
        let mut headers = HeaderMap::new();
        assert_eq!(Format::negotiate(&headers), Format::PrometheusText);
        headers.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            ),
        );
        assert_eq!(Format::negotiate(&headers), Format::OpenMetrics);
    }

    #[test]
    fn buckets_cover_5ms_to_60s_in_order() {
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.005));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&60.0));
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(KMS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn failed_seals_count_as_kms_errors_with_a_reason() {
        let metrics = Metrics::new();
        let timeout: Result<Sealed, SealError> =
            Err(SealError::Key(KeyError::Timeout(Duration::from_secs(3))));
        metrics.seal_finished(&timeout, Duration::from_secs(3));
        let refused: Result<Sealed, SealError> = Err(SealError::Key(KeyError::Kms {
            operation: KmsOperation::Encrypt,
            kind: crate::seal::keys::KmsErrorKind::AccessDenied,
            detail: crate::seal::keys::KmsDetail {
                code: Some("AccessDeniedException"),
                status: Some(400),
            },
        }));
        metrics.seal_finished(&refused, Duration::from_millis(4));
        let errors = |reason| {
            metrics
                .kms_errors
                .get(&ReasonLabels { reason })
                .map(|c| c.get())
        };
        assert_eq!(errors("timeout"), Some(1));
        assert_eq!(errors("kms"), Some(1));
        let state = metrics.kms_state();
        assert!(state
            .last_error_message
            .as_deref()
            .is_some_and(|m| m.contains("AccessDenied")));
    }

    /// The gauges come from the snapshot handed in, not from a running proxy. The
    /// endpoints are built but never contacted.
    #[tokio::test]
    async fn renders_the_state_of_a_snapshot() {
        let config = crate::testing::config(
            r#"
            [[regions]]
            name = "us-east-1"
            privatelink = ["127.220.0.1"]
            "#,
        );
        let keys =
            crate::seal::KeyService::Kms(crate::seal::KmsKeys::from_config(&config.kms).await);
        let generation = Generation::build(
            7,
            config,
            keys,
            None,
            Some(1),
            &Default::default(),
            Default::default(),
        )
        .expect("generation");
        let metrics = Metrics::new();
        let text = metrics
            .render(
                &Snapshot {
                    generation: &generation,
                    ready: false,
                    draining: true,
                    reloads: (3, 1),
                },
                Format::PrometheusText,
            )
            .expect("encoded");
        for line in [
            "gpulink_config_generation 7",
            "gpulink_ready 0",
            "gpulink_draining 1",
            "gpulink_config_reloads_total{result=\"success\"} 3",
            "gpulink_config_reloads_total{result=\"failure\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        // The generation's endpoints get their series.
        assert!(text.lines().any(|l| l.starts_with(
            "gpulink_endpoint_serving{route=\"privatelink\",region=\"us-east-1\",endpoint=\"127.220.0.1:443\"}"
        )));

        // The request path's handles, resolved once per endpoint, count into the same
        // series the exposition shows.
        let endpoint = &generation.endpoints[0];
        let series = metrics.series(endpoint);
        assert!(std::sync::Arc::ptr_eq(&series, &metrics.series(endpoint)));
        metrics.upstream_response(endpoint, Duration::from_millis(3));
        let attribution = Attribution::Endpoint(series);
        for status in [StatusCode::OK, StatusCode::OK, StatusCode::BAD_GATEWAY] {
            metrics.request_finished(status, None, Some(&attribution), Duration::from_millis(4));
        }
        let text = metrics
            .render(
                &Snapshot {
                    generation: &generation,
                    ready: true,
                    draining: false,
                    reloads: (3, 1),
                },
                Format::PrometheusText,
            )
            .expect("encoded");
        let labels = "route=\"privatelink\",region=\"us-east-1\",endpoint=\"127.220.0.1:443\"";
        for line in [
            format!("gpulink_upstream_attempts_total{{{labels}}} 1"),
            format!("gpulink_requests_total{{{labels},status=\"2xx\"}} 2"),
            format!("gpulink_requests_total{{{labels},status=\"5xx\"}} 1"),
            "gpulink_request_duration_seconds_count{route=\"privatelink\"} 3".to_string(),
            "gpulink_upstream_duration_seconds_count{route=\"privatelink\",region=\"us-east-1\"} 1"
                .to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
    }

    #[test]
    fn families_are_exposed_before_their_first_event() {
        let metrics = Metrics::new();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &metrics.registry).unwrap();
        for family in [
            "gpulink_kms_errors",
            "gpulink_kms_calls",
            "gpulink_kms_call_duration_seconds",
            "gpulink_request_errors",
            "gpulink_request_duration_seconds",
            "gpulink_seal_duration_seconds",
            "gpulink_config_reloads",
            "gpulink_log_lines_dropped",
            "gpulink_build_info",
        ] {
            assert!(
                out.contains(&format!("# TYPE {family} ")),
                "{family}\n{out}"
            );
        }
    }
}
