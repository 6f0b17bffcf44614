//! The admin server on `admin.address` (loopback by default; it has no authentication):
//!
//! * `/live`: the process answers.
//! * `/ready`: configuration loaded, listener bound, first health round done, KMS proven
//!   (one seal with the configured key and context succeeded; until then 503 with
//!   `{"status":"starting","waiting_for":"kms","reason":...}`), and not draining. A cluster outage shows in `/status` and the
//!   metrics, not here: taking the app's pods out of service would not help the app.
//! * `/metrics`: Prometheus exposition (OpenMetrics when the scraper asks for it, else
//!   the classic text format), see [`crate::metrics`].
//! * `/status`: JSON: generation, phase, every endpoint's state, KMS and key cache, and
//!   `traffic`: the last 15 minutes of request outcomes per route ([`crate::history`]).
//! * `/`: the same as a small self-contained HTML page (inline CSS, no scripts, no
//!   external assets), refreshed every few seconds, for an operator's browser or
//!   `kubectl port-forward`.
//!
//! The page is rendered from the `/status` document ([`page`]), so the two never disagree.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{ProxyBody, ProxyBodyExt};
use crate::listener::ConnectionSettings;
use crate::metrics::Format;
use crate::proxy::Proxy;

mod page;
pub use page::render_page;

/// Serves until `stop`; connections are held to `admin.max_connections` (idle ones make
/// room for new ones) and the admin time bounds, so a crowd of admin clients neither
/// locks `/ready` out nor takes file descriptors from the data path.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let connections = proxy.admin_connections().clone();
    let settings = {
        let proxy = proxy.clone();
        move || ConnectionSettings::admin(&proxy.current().config)
    };
    let handler = move |request| {
        let proxy = proxy.clone();
        async move { route(&proxy, request) }
    };
    connections
        .serve(listener, settings, handler, stop, || None)
        .await;
}

fn route(proxy: &Proxy, request: Request<Incoming>) -> Response<ProxyBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if proxy.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if !proxy.kms_proof().proven {
                let proof = proxy.kms_proof();
                let mut response = json_response(serde_json::json!({
                    "status": "starting",
                    "waiting_for": "kms",
                    "reason": proof.last_error.as_deref().unwrap_or("the first KMS seal is under way"),
                }));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
            }
        }
        "/metrics" => metrics(proxy, Format::negotiate(request.headers())),
        "/status" => json_response(status(proxy)),
        "/" => html_response(render_page(&status(proxy))),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /, /live, /ready, /metrics or /status\n",
        ),
    }
}

fn metrics(proxy: &Proxy, format: Format) -> Response<ProxyBody> {
    match proxy.metrics().render(proxy, format) {
        Ok(body) => {
            let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            no_store(&mut response);
            response
        }
        Err(error) => {
            tracing::error!(%error, "cannot encode metrics");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics could not be encoded; see the log\n",
            )
        }
    }
}

/// The JSON document behind `/status`.
pub fn status(proxy: &Proxy) -> Value {
    let generation = proxy.current();
    let config = &generation.config;
    let now = chrono::Utc::now();
    let endpoints: Vec<Value> = generation
        .endpoints
        .iter()
        .map(|e| {
            let health = e.health_snapshot();
            let data_path = e.data_path_snapshot();
            // Which checks keep the endpoint out right now, so an operator sees at once
            // whether it is the health port or the inference port.
            let mut failing: Vec<&str> = Vec::new();
            if !e.is_healthy() {
                failing.push("health");
            }
            if !e.is_data_path_ok() {
                failing.push("data_path");
            }
            json!({
                "address": e.authority,
                "region": e.region(),
                "route": e.kind().as_str(),
                "tier": tier_name(e.kind().as_str(), e.region() == config.local_region()),
                "local": e.region() == config.local_region(),
                "server_name": e.config.server_name,
                "health": health.state,
                "serving": e.is_serving(),
                "ejected": e.outlier.is_ejected(),
                "ejected_for_ms": e.outlier.ejected_for().map(|d| d.as_millis() as u64),
                "ejections": e.outlier.ejections(),
                "capacity": e.capacity(),
                "latency_ms": e.latency().map(|d| d.as_secs_f64() * 1000.0),
                "in_flight": e.in_flight(),
                "requests": e.requests(),
                "failures": e.failures(),
                "health_checks": health.checks,
                "last_error": health.last_error,
                "health_problem": health.problem,
                "health_diagnosis": health.diagnosis,
                "reported_region": health.region,
                "data_path": data_path,
                "failing_checks": failing,
                "last_request_error": e.last_request_error(),
                // The last 5xx answer attributed to it (the cluster's or gpulink's).
                "last_failed_request": proxy.history().last_failure(&e.authority),
            })
        })
        .collect();
    let metrics = proxy.metrics();
    let kms_state = metrics.kms_state();
    let (kms_calls, kms_failures) = metrics.kms_totals(proxy);
    let key_cache = serde_json::to_value(generation.sealer.cache_state()).unwrap_or(Value::Null);
    let keys = proxy.keys();
    let (reloads_ok, reloads_failed) = proxy.reload_counts();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": generation.number,
        "loaded_at": generation.loaded_at.to_rfc3339(),
        // The page's relative times ("3 s ago") are measured from here.
        "now": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "ready": proxy.is_ready(),
        "draining": proxy.is_draining(),
        "uptime_seconds": proxy.uptime().as_secs(),
        "phase": generation.routes.phase().as_str(),
        "public_fallback_until": config.migration.public_fallback_until.map(|t| t.to_rfc3339()),
        "public_fallback_open": generation.routes.public_fallback_open(now),
        "rollback": {
            "configured": generation.routes.rollback().is_some(),
            // Whether it may act now (phase and fallback window allow it).
            "allowed": generation.routes.rollback_allowed(now),
            "active": generation.routes.is_rolled_back(now),
            "fired": generation.routes.rollback().map_or(0, |r| r.times_fired()),
            "last_breach": generation.routes.rollback().and_then(|r| r.last_breach()),
        },
        "reloads": { "applied": reloads_ok, "rejected": reloads_failed },
        // Open client connections per listener against its limit; `evicted` counts idle
        // connections closed to admit new ones at the limit.
        "connections": {
            "listen": listener_status(proxy.app_connections()),
            "admin": listener_status(proxy.admin_connections()),
        },
        // Request bytes held now (plaintext and sealed copies) against
        // listen.max_in_flight_bytes; past it new requests get 503 overloaded.
        "request_bodies": {
            "held_bytes": proxy.in_flight_bytes().held(),
            "limit_bytes": config.listen.max_in_flight_bytes.bytes(),
        },
        "tenant": config.tenant.id,
        "kms": {
            "provider": if keys.is_development() { "development" } else { "aws-kms" },
            "key_id": config.kms.key_id,
            "region": config.kms.region,
            "format": config.kms.format.as_str(),
            "context": format!("{:?}", config.kms.context),
            "calls": kms_calls,
            "failures": kms_failures,
            "last_success": kms_state.last_success.map(|t| t.to_rfc3339()),
            "last_error": kms_state.last_error.map(|t| t.to_rfc3339()),
            "last_error_message": kms_state.last_error_message,
            // The start-up proof `/ready` waits for.
            "proof": proxy.kms_proof(),
        },
        // The aws-esdk data-key cache: limits, counters, and each entry's key age and
        // use (never key material).
        "key_cache": key_cache,
        "endpoints": endpoints,
        "traffic": proxy.history().to_json(),
    })
}

fn listener_status(listener: &crate::listener::Listener) -> Value {
    json!({
        "open": listener.open(),
        "limit": listener.limit(),
        "evicted": listener.evicted(),
    })
}

fn tier_name(route: &str, local: bool) -> String {
    format!("{} {route}", if local { "local" } else { "remote" })
}

fn no_store(response: &mut Response<ProxyBody>) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    no_store(&mut response);
    response
}

fn json_response(value: Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    no_store(&mut response);
    response
}

fn html_response(page: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(page)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Self-contained by design: forbid anything external, and scripts entirely.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    no_store(&mut response);
    response
}
