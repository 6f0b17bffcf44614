//! The admin server on `admin.address` (loopback by default; it has no authentication):
//!
//! * `/live`: the process answers.
//! * `/ready`: configuration loaded, listener bound, first health round done, KMS proven
//!   (one seal with the configured key and context succeeded; until then 503 with
//!   `{"status":"starting","waiting_for":"kms","reason":...}`), and not draining. A cluster outage shows in `/status` and the
//!   metrics, not here: taking the app's pods out of service would not help the app.
//! * `/metrics`: Prometheus exposition (OpenMetrics when the scraper asks for it, else
//!   the classic text format), see [`crate::metrics`].
//! * `/status`: JSON: generation, phase, every endpoint's state, KMS and key cache.
//! * `/`: the same as a small self-contained HTML page (inline CSS, no scripts, no
//!   external assets), refreshed every few seconds, for an operator's browser or
//!   `kubectl port-forward`.
//!
//! The page is rendered from the `/status` document, so the two never disagree.

use std::fmt::Write as _;
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

/// How often the status page reloads itself.
const PAGE_REFRESH_SECONDS: u32 = 5;

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

// ---- The HTML status page --------------------------------------------------------------

/// Escapes text for HTML element content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as page text: strings bare, null as a dash.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => esc(s),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => esc(&other.to_string()),
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#1d2329;background:#f7f8fa}\
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.4em 0 .4em}\
.facts{display:flex;flex-wrap:wrap;gap:.5em}.fact{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.4em .8em}\
.fact b{display:block;font-size:.75em;color:#5a6570;font-weight:600;text-transform:uppercase}\
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e6;width:100%}\
th,td{padding:.35em .7em;border-bottom:1px solid #eef0f2;text-align:left;white-space:nowrap}\
th{background:#eef1f4;font-size:.8em;text-transform:uppercase;color:#4a5560}\
td.err{white-space:normal;color:#8a2a1f;font-size:.9em}\
.ok{color:#fff;background:#1f8a4c}.bad{color:#fff;background:#c0392b}.warn{color:#1d2329;background:#f1c40f}.mute{color:#fff;background:#7f8c8d}\
.badge{border-radius:4px;padding:.05em .5em;font-size:.85em;font-weight:600}\
footer{margin-top:1.5em;color:#6b7680;font-size:.85em}";

fn badge(class: &str, label: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(label))
}

/// The status page: the `/status` document, readable at a glance.
pub fn render_page(status: &Value) -> String {
    let mut page = String::with_capacity(8 * 1024);
    let ready = status["ready"].as_bool().unwrap_or(false);
    let draining = status["draining"].as_bool().unwrap_or(false);
    let state = if draining {
        badge("warn", "draining")
    } else if ready {
        badge("ok", "ready")
    } else {
        badge("bad", "starting")
    };
    let endpoints = status["endpoints"].as_array().cloned().unwrap_or_default();
    let serving = endpoints
        .iter()
        .filter(|e| e["serving"].as_bool() == Some(true))
        .count();
    let _ = write!(
        page,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>gpulink {}: {} of {} endpoints serving</title><style>{STYLE}</style></head><body>",
        show(&status["tenant"]),
        serving,
        endpoints.len()
    );
    let _ = write!(
        page,
        "<h1>gpulink {} {state}</h1>",
        show(&status["version"])
    );
    let rollback = if status["rollback"]["active"].as_bool() == Some(true) {
        badge("bad", "rolled back to public")
    } else if status["rollback"]["configured"].as_bool() == Some(true) {
        badge("ok", "armed")
    } else {
        badge("mute", "off")
    };
    let fallback = if status["public_fallback_open"].as_bool() == Some(true) {
        "open"
    } else {
        "closed"
    };
    let serving_badge = if serving == 0 {
        badge("bad", &format!("{serving} of {}", endpoints.len()))
    } else if serving < endpoints.len() {
        badge("warn", &format!("{serving} of {}", endpoints.len()))
    } else {
        badge("ok", &format!("{serving} of {}", endpoints.len()))
    };
    let _ = write!(
        page,
        "<div class=\"facts\">\
         <div class=\"fact\"><b>phase</b>{}</div>\
         <div class=\"fact\"><b>generation</b><span id=\"generation\">{}</span></div>\
         <div class=\"fact\"><b>endpoints serving</b>{serving_badge}</div>\
         <div class=\"fact\"><b>public fallback</b>{fallback} (until {})</div>\
         <div class=\"fact\"><b>auto rollback</b>{rollback}</div>\
         <div class=\"fact\"><b>tenant</b>{}</div>\
         <div class=\"fact\"><b>uptime</b>{} s</div>\
         <div class=\"fact\"><b>reloads</b>{} applied, {} rejected</div>\
         </div>",
        show(&status["phase"]),
        show(&status["generation"]),
        show(&status["public_fallback_until"]),
        show(&status["tenant"]),
        show(&status["uptime_seconds"]),
        show(&status["reloads"]["applied"]),
        show(&status["reloads"]["rejected"]),
    );

    page.push_str(
        "<h2>Endpoints</h2><table><thead><tr><th>endpoint</th><th>tier</th><th>region</th>\
         <th>health</th><th>data path</th><th>capacity</th><th>latency</th><th>in flight</th><th>requests</th>\
         <th>failures</th><th>ejections</th><th>why not serving</th><th>last request error</th></tr></thead><tbody>",
    );
    for e in &endpoints {
        let health = e["health"].as_str().unwrap_or("unknown");
        let health_badge = if e["ejected"].as_bool() == Some(true) {
            badge("bad", "ejected")
        } else if health == "healthy" && e["capacity"].as_u64() == Some(0) {
            badge("warn", "full")
        } else if health == "healthy" {
            badge("ok", "healthy")
        } else if health == "unhealthy" {
            badge("bad", "unhealthy")
        } else {
            badge("mute", health)
        };
        let data_path = e["data_path"]["state"].as_str().unwrap_or("unknown");
        let data_path_badge = match data_path {
            "ok" => badge("ok", "ok"),
            "failed" => badge("bad", "failed"),
            other => badge("mute", other),
        };
        let latency = match e["latency_ms"].as_f64() {
            Some(ms) => format!("{ms:.1} ms"),
            None => "-".into(),
        };
        // The failing checks' diagnoses (the same words `gpulink probe` uses), else the
        // last health error while below the threshold.
        let mut why = Vec::new();
        if e["health"] == "unhealthy" {
            let text = e["health_diagnosis"]
                .as_str()
                .or(e["last_error"].as_str())
                .unwrap_or("health check failing");
            why.push(format!("<b>health</b>: {}", esc(text)));
        }
        if data_path == "failed" {
            let problem = e["data_path"]["problem"].as_str().unwrap_or("failed");
            let text = e["data_path"]["diagnosis"]
                .as_str()
                .or(e["data_path"]["last_error"].as_str())
                .unwrap_or("data-path check failing");
            why.push(format!(
                "<b>data path</b> ({}): {}",
                esc(problem),
                esc(text)
            ));
        }
        if why.is_empty() && !e["last_error"].is_null() {
            why.push(show(&e["last_error"]));
        }
        let why = if why.is_empty() {
            "-".to_string()
        } else {
            why.join("<br>")
        };
        let request_error = &e["last_request_error"];
        let request_error = if request_error.is_null() {
            "-".to_string()
        } else {
            format!(
                "{} {}",
                show(&request_error["at"]),
                show(&request_error["message"])
            )
        };
        let _ = write!(
            page,
            "<tr data-endpoint=\"{}\" data-health=\"{}\" data-path=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{health_badge}</td>\
             <td>{data_path_badge}</td><td>{}</td><td>{latency}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"err\">{why}</td><td class=\"err\">{request_error}</td></tr>",
            show(&e["address"]),
            esc(health),
            esc(data_path),
            show(&e["address"]),
            show(&e["tier"]),
            show(&e["region"]),
            show(&e["capacity"]),
            show(&e["in_flight"]),
            show(&e["requests"]),
            show(&e["failures"]),
            show(&e["ejections"]),
        );
    }
    page.push_str("</tbody></table>");

    let kms = &status["kms"];
    let kms_badge = if kms["last_error"].is_null() {
        if kms["last_success"].is_null() {
            badge("mute", "no call yet")
        } else {
            badge("ok", "ok")
        }
    } else if kms["last_success"].as_str() > kms["last_error"].as_str() {
        badge("warn", "recovered")
    } else {
        badge("bad", "failing")
    };
    let _ = write!(
        page,
        "<h2>KMS {kms_badge}</h2><div class=\"facts\">\
         <div class=\"fact\"><b>provider</b>{}</div>\
         <div class=\"fact\"><b>key</b>{}</div>\
         <div class=\"fact\"><b>region</b>{}</div>\
         <div class=\"fact\"><b>format</b>{} / context {}</div>\
         <div class=\"fact\"><b>calls</b>{} ({} failed)</div>\
         <div class=\"fact\"><b>last success</b>{}</div>\
         <div class=\"fact\"><b>last error</b>{} {}</div>\
         <div class=\"fact\"><b>data-key cache</b>{} hits, {} misses, {} entries</div>\
         </div>",
        show(&kms["provider"]),
        show(&kms["key_id"]),
        show(&kms["region"]),
        show(&kms["format"]),
        show(&kms["context"]),
        show(&kms["calls"]),
        show(&kms["failures"]),
        show(&kms["last_success"]),
        show(&kms["last_error"]),
        show(&kms["last_error_message"]),
        show(&status["key_cache"]["hits"]),
        show(&status["key_cache"]["misses"]),
        status["key_cache"]["entries"]
            .as_array()
            .map_or(0, |entries| entries.len()),
    );
    let _ = write!(
        page,
        "<footer>Refreshes every {PAGE_REFRESH_SECONDS} s. Machine-readable: \
         <a href=\"/status\">/status</a>, <a href=\"/metrics\">/metrics</a>; \
         <a href=\"/ready\">/ready</a>, <a href=\"/live\">/live</a>.</footer></body></html>"
    );
    page
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn page_shows_every_endpoint_and_escapes_errors() {
        let status = json!({
            "version": "0.1.0", "ready": true, "draining": false, "generation": 3,
            "phase": "privatelink", "tenant": "tenant-123", "uptime_seconds": 5,
            "public_fallback_open": true, "public_fallback_until": null,
            "rollback": {"configured": false, "active": false},
            "reloads": {"applied": 2, "rejected": 0},
            "kms": {"provider": "aws-kms", "key_id": "arn:k", "region": "us-east-1",
                    "format": "KmsDirect", "context": "Tenant", "calls": 1, "failures": 0,
                    "last_success": "2026-01-01T00:00:00Z", "last_error": null, "last_error_message": null},
            "key_cache": {"hits": 0, "misses": 0},
            "endpoints": [
                {"address": "10.0.0.1:443", "tier": "local privatelink", "region": "us-east-1",
                 "health": "healthy", "serving": true, "capacity": 45, "latency_ms": 1.25,
                 "in_flight": 0, "requests": 3, "failures": 0, "ejections": 0, "last_error": null},
                {"address": "10.0.0.2:443", "tier": "local privatelink", "region": "us-east-1",
                 "health": "unhealthy", "serving": false, "capacity": null, "latency_ms": null,
                 "in_flight": 0, "requests": 0, "failures": 1, "ejections": 0,
                 "last_error": "<script>alert(1)</script>"},
                {"address": "10.0.0.3:443", "tier": "local privatelink", "region": "us-east-1",
                 "health": "healthy", "serving": false, "capacity": 45, "latency_ms": null,
                 "in_flight": 0, "requests": 1, "failures": 1, "ejections": 0, "last_error": null,
                 "data_path": {"state": "failed", "problem": "tls_unknown_ca",
                               "diagnosis": "untrusted CA: set upstream.ca_file"},
                 "last_request_error": {"at": "2026-01-01T00:00:00Z", "message": "TLS <failed>"}}
            ]
        });
        let page = render_page(&status);
        assert!(page.contains("10.0.0.1:443") && page.contains("10.0.0.2:443"));
        assert!(page.contains("data-health=\"unhealthy\""));
        assert!(page.contains("1 of 3"));
        assert!(page.contains("data-path=\"failed\""));
        assert!(page.contains("untrusted CA: set upstream.ca_file"));
        assert!(page.contains("TLS &lt;failed&gt;"));
        assert!(!page.contains("<script>"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
