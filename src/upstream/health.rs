//! Active health checks: `GET http://<endpoint>:<health_port>/health` on a fresh
//! connection every interval (a pooled connection could hide an L4 failure), flipping an
//! endpoint after `healthy_threshold` / `unhealthy_threshold` results in a row.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::endpoint::Endpoint;
use crate::config::Health;

/// A health answer larger than this is not a health answer.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// The cluster's `/health` document (extra fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct HealthDocument {
    pub status: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub available_capacity: Option<u64>,
    #[serde(default)]
    pub timestamp: Option<i64>,
}

/// A passing check: the endpoint said healthy, recently.
#[derive(Debug, Clone)]
pub struct HealthOk {
    pub document: HealthDocument,
    pub latency: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("health check timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("health check failed: {0}")]
    Http(String),
    #[error("/health answered HTTP {0}")]
    Status(u16),
    #[error("/health answer is not the expected JSON: {0}")]
    Parse(String),
    #[error("endpoint reports status {0:?}")]
    Unhealthy(String),
    #[error("health timestamp is {age_secs}s old (health.max_staleness is {max:?})")]
    Stale { age_secs: i64, max: Duration },
}

/// Runs one check against `host:port` with an overall deadline.
pub async fn check(host: &str, port: u16, settings: &Health) -> Result<HealthOk, HealthError> {
    let timeout = settings.timeout.get();
    let started = tokio::time::Instant::now();
    let body = tokio::time::timeout(timeout, fetch(host, port, &settings.path))
        .await
        .map_err(|_| HealthError::Timeout(timeout))??;
    let latency = started.elapsed();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let document = evaluate(&body, settings, now)?;
    Ok(HealthOk { document, latency })
}

/// Judges one `/health` answer body at `now` (Unix seconds): the JSON document, its
/// status and its freshness. No I/O, so it can be tested (and fuzzed) on its own.
pub fn evaluate(body: &[u8], settings: &Health, now: i64) -> Result<HealthDocument, HealthError> {
    let document = serde_json::from_slice::<HealthDocument>(body)
        .map_err(|e| HealthError::Parse(e.to_string()))?;
    if !document.status.eq_ignore_ascii_case("healthy") {
        return Err(HealthError::Unhealthy(document.status));
    }
    if let Some(ts) = document.timestamp {
        // An age that does not fit in an i64 (a timestamp near i64::MIN) is not fresh.
        let age = now.checked_sub(ts).unwrap_or(i64::MAX);
        let max = settings.max_staleness.get();
        if age > i64::try_from(max.as_secs()).unwrap_or(i64::MAX) {
            return Err(HealthError::Stale { age_secs: age, max });
        }
    }
    Ok(document)
}

async fn fetch(host: &str, port: u16, path: &str) -> Result<Bytes, HealthError> {
    let addr = format!("{}:{port}", bracket_ipv6(host));
    let connect_error = |e: std::io::Error| HealthError::Connect {
        addr: addr.clone(),
        message: e.to_string(),
    };
    let target: SocketAddr = match tokio::net::lookup_host(addr.as_str()).await {
        Ok(mut it) => it.next().ok_or_else(|| HealthError::Connect {
            addr: addr.clone(),
            message: "resolved to no address".into(),
        })?,
        Err(e) => return Err(connect_error(e)),
    };
    let stream = TcpStream::connect(target).await.map_err(connect_error)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| HealthError::Http(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.as_str())
        .header(
            http::header::USER_AGENT,
            concat!("gpulink/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| HealthError::Http(e.to_string()))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| HealthError::Http(e.to_string()))?;
        if response.status() != http::StatusCode::OK {
            return Err(HealthError::Status(response.status().as_u16()));
        }
        Ok(Limited::new(response.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await
            .map_err(|e| HealthError::Http(e.to_string()))?
            .to_bytes())
    }
    .await;
    driver.abort();
    result
}

fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Applies one check result to the endpoint. The very first result decides at once (so a
/// fresh start knows where it stands); after that thresholds damp flapping.
pub fn record(endpoint: &Endpoint, result: &Result<HealthOk, HealthError>, settings: &Health) {
    let Ok(mut h) = endpoint.health.lock() else {
        return;
    };
    let first = h.checks == 0;
    h.checks += 1;
    match result {
        Ok(ok) => {
            h.consecutive_successes = h.consecutive_successes.saturating_add(1);
            h.consecutive_failures = 0;
            h.last_error = None;
            h.region = ok.document.region.clone();
            endpoint.set_capacity(ok.document.available_capacity);
            // A passing check re-admits an endpoint that passive detection ejected.
            if endpoint.outlier.readmit() {
                tracing::info!(endpoint = %endpoint.authority, "health check passed; ejected endpoint re-admitted");
            }
            if h.state != "healthy"
                && (first || h.consecutive_successes >= settings.healthy_threshold)
            {
                if !first {
                    tracing::info!(endpoint = %endpoint.authority, region = endpoint.region(), "endpoint is healthy again");
                }
                h.state = "healthy";
                endpoint.set_healthy(true);
            }
        }
        Err(error) => {
            h.consecutive_failures = h.consecutive_failures.saturating_add(1);
            h.consecutive_successes = 0;
            h.last_error = Some(error.to_string());
            if h.state != "unhealthy"
                && (first || h.consecutive_failures >= settings.unhealthy_threshold)
            {
                tracing::warn!(endpoint = %endpoint.authority, region = endpoint.region(), %error, "endpoint is unhealthy; no new requests go to it");
                h.state = "unhealthy";
                endpoint.set_healthy(false);
            }
        }
    }
}

async fn check_endpoint(endpoint: &Endpoint, settings: &Health) {
    let result = check(&endpoint.config.host, endpoint.config.health_port, settings).await;
    record(endpoint, &result, settings);
}

/// Checks every endpoint once, concurrently; used before the proxy reports ready.
pub async fn first_round(endpoints: &[Arc<Endpoint>], settings: &Health) {
    let mut set = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        let endpoint = endpoint.clone();
        let settings = settings.clone();
        set.spawn(async move { check_endpoint(&endpoint, &settings).await });
    }
    while set.join_next().await.is_some() {}
}

/// Spawns one checker per endpoint, stopped by `stop`.
pub fn spawn_checkers(endpoints: &[Arc<Endpoint>], settings: &Health, stop: CancellationToken) {
    for endpoint in endpoints {
        let endpoint = endpoint.clone();
        let settings = settings.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let interval = settings.interval.get();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = check_endpoint(&endpoint, &settings) => {}
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluate_judges_status_and_freshness() {
        let settings = Health::default();
        let now = 1_700_000_000;
        let ok = evaluate(
            br#"{"status":"healthy","timestamp":1700000000}"#,
            &settings,
            now,
        );
        assert!(ok.is_ok(), "{ok:?}");
        let down = evaluate(br#"{"status":"draining"}"#, &settings, now);
        assert!(matches!(down, Err(HealthError::Unhealthy(_))), "{down:?}");
        let stale = evaluate(br#"{"status":"healthy","timestamp":1}"#, &settings, now);
        assert!(matches!(stale, Err(HealthError::Stale { .. })), "{stale:?}");
        let overflow = format!(r#"{{"status":"healthy","timestamp":{}}}"#, i64::MIN);
        let overflow = evaluate(overflow.as_bytes(), &settings, now);
        assert!(
            matches!(overflow, Err(HealthError::Stale { .. })),
            "{overflow:?}"
        );
        let garbage = evaluate(b"\xff{", &settings, now);
        assert!(matches!(garbage, Err(HealthError::Parse(_))), "{garbage:?}");
    }
}
