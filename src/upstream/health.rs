//! Active health checks. Each round makes two checks, each on a fresh connection (a
//! pooled connection could hide an L4 failure):
//!
//! * **health**: `GET http://<endpoint>:<health_port>/health`, bounded by `health.timeout`;
//! * **data path**: a TCP connect and TLS handshake to the inference address, made by the
//!   endpoint's own connector (the address the pool dials, the endpoint's TLS name and
//!   rustls configuration), bounded as a request's connect is: `upstream.connect_timeout`
//!   for TCP and again for TLS, so the check fails exactly when a request's connect would.
//!
//! The health port alone proves nothing about the inference port (a security group may
//! allow 8080 and drop 443; a CA or server name may be wrong), so an endpoint serves only
//! while both pass. Each flips after `healthy_threshold` / `unhealthy_threshold` results
//! in a row (the first result decides at once). A real request's connect or TLS failure
//! marks the data path failed at once ([`data_path_failed_by_request`]); only passing
//! data-path checks clear it: a passing health check alone never re-admits. Failures
//! carry the diagnosis `gpulink probe` gives ([`super::diagnose`]); transitions are
//! logged once, not every round.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::connector::ConnectError;
use super::diagnose::{self, Diagnosis};
use super::endpoint::Endpoint;
use super::state::{Check, DataPathState, FailedBy, HealthState};
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
    #[error("health timestamp {timestamp} is not a plausible time (before 1970, or more than {}s in the future)", MAX_CLOCK_SKEW_SECS)]
    Implausible { timestamp: i64 },
}

/// How far in the future a health timestamp may be (the two clocks may disagree a
/// little); a timestamp further ahead cannot vouch for freshness.
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;

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
        // A year-3000 timestamp would stay "fresh" for ever.
        if ts < 0 || ts > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(HealthError::Implausible { timestamp: ts });
        }
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
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.as_str())
        .header(
            http::header::USER_AGENT,
            concat!("gpulink/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| HealthError::Http(e.to_string()))?;
    let exchange = async {
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
    };
    // The connection is driven here, beside the exchange, rather than by a task of its
    // own: whatever ends this check (its answer, an error, the caller's timeout) ends
    // the connection with it. When the connection ends first, the exchange still
    // decides (it sees the answer, or the error that ended it).
    let drive = async {
        let _ = connection.await;
        std::future::pending::<std::convert::Infallible>().await
    };
    tokio::select! {
        result = exchange => result,
        never = drive => match never {},
    }
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
            h.problem = None;
            h.diagnosis = None;
            h.region = ok.document.region.clone();
            endpoint.set_capacity(ok.document.available_capacity);
            // A passing check re-admits an endpoint that passive detection ejected.
            if endpoint.outlier.readmit() {
                tracing::info!(endpoint = %endpoint.authority, "health check passed; ejected endpoint re-admitted");
            }
            if h.state != HealthState::Healthy
                && (first || h.consecutive_successes >= settings.healthy_threshold)
            {
                if !first {
                    tracing::info!(endpoint = %endpoint.authority, region = endpoint.region(), "endpoint is healthy again");
                }
                h.state = HealthState::Healthy;
                h.since = Some(chrono::Utc::now());
                endpoint.set_healthy(true);
            }
        }
        Err(error) => {
            h.consecutive_failures = h.consecutive_failures.saturating_add(1);
            h.consecutive_successes = 0;
            h.last_error = Some(error.to_string());
            let url = format!(
                "http://{}:{}{}",
                bracket_ipv6(&endpoint.config.host),
                endpoint.config.health_port,
                settings.path
            );
            let diagnosis = diagnose::health_error(error, &endpoint.config, &url, None);
            h.problem = diagnosis.as_ref().map(|d| d.problem);
            h.diagnosis = diagnosis.map(|d| d.message);
            if h.state != HealthState::Unhealthy
                && (first || h.consecutive_failures >= settings.unhealthy_threshold)
            {
                tracing::warn!(
                    endpoint = %endpoint.authority,
                    region = endpoint.region(),
                    check = Check::Health.as_str(),
                    problem = h.problem.map_or("-", |p| p.as_str()),
                    %error,
                    diagnosis = h.diagnosis.as_deref().unwrap_or("-"),
                    "endpoint is unhealthy (health check failed); no new requests go to it"
                );
                h.state = HealthState::Unhealthy;
                h.since = Some(chrono::Utc::now());
                endpoint.set_healthy(false);
            }
        }
    }
}

/// The data-path check: one fresh connection exactly as the pool would make it.
pub async fn check_data_path(endpoint: &Endpoint) -> Result<Duration, ConnectError> {
    endpoint.connector().check().await
}

/// Applies one data-path check result, with the same thresholds as the health check.
pub fn record_data_path(
    endpoint: &Endpoint,
    result: &Result<Duration, ConnectError>,
    settings: &Health,
) {
    let Ok(mut d) = endpoint.data_path.lock() else {
        return;
    };
    let first = d.checks == 0;
    d.checks += 1;
    match result {
        Ok(setup) => {
            d.consecutive_successes = d.consecutive_successes.saturating_add(1);
            d.consecutive_failures = 0;
            d.handshake_ms = Some(setup.as_secs_f64() * 1000.0);
            if d.state != DataPathState::Ok
                && (first || d.consecutive_successes >= settings.healthy_threshold)
            {
                if d.state == DataPathState::Failed {
                    tracing::info!(
                        endpoint = %endpoint.authority,
                        region = endpoint.region(),
                        check = Check::DataPath.as_str(),
                        "data path works again (TCP and TLS to the inference port); the endpoint may serve"
                    );
                }
                d.state = DataPathState::Ok;
                d.since = Some(chrono::Utc::now());
                d.failed_by = None;
                d.problem = None;
                d.diagnosis = None;
                d.last_error = None;
                endpoint.set_data_path_ok(true);
            }
        }
        Err(error) => {
            d.consecutive_failures = d.consecutive_failures.saturating_add(1);
            d.consecutive_successes = 0;
            let diagnosis =
                diagnose::connect_failure(error, &endpoint.config, &endpoint.ca_files());
            let fail = d.state == DataPathState::Failed
                || first
                || d.consecutive_failures >= settings.unhealthy_threshold;
            if fail {
                mark_failed(endpoint, &mut d, FailedBy::Check, error, diagnosis);
            } else {
                // Below the threshold: remembered for /status, not yet acted on.
                d.last_error = Some(error.to_string());
            }
        }
    }
}

/// A real request could not connect (TCP or TLS): the data path is out at once, so the
/// next selection (this request's retry included) skips the endpoint, and it stays out
/// until data-path checks pass again.
pub fn data_path_failed_by_request(endpoint: &Endpoint, error: &ConnectError) -> Diagnosis {
    let diagnosis = diagnose::connect_failure(error, &endpoint.config, &endpoint.ca_files());
    if let Ok(mut d) = endpoint.data_path.lock() {
        d.consecutive_failures = d.consecutive_failures.saturating_add(1);
        d.consecutive_successes = 0;
        mark_failed(
            endpoint,
            &mut d,
            FailedBy::Request,
            error,
            diagnosis.clone(),
        );
    }
    diagnosis
}

/// Takes the data path out, logging only a change: into `failed`, or to a new problem.
fn mark_failed(
    endpoint: &Endpoint,
    d: &mut super::endpoint::DataPathSnapshot,
    by: FailedBy,
    error: &ConnectError,
    diagnosis: Diagnosis,
) {
    let changed = d.state != DataPathState::Failed || d.problem != Some(diagnosis.problem);
    if changed {
        tracing::warn!(
            endpoint = %endpoint.authority,
            region = endpoint.region(),
            check = Check::DataPath.as_str(),
            failed_by = by.as_str(),
            problem = diagnosis.problem.as_str(),
            %error,
            diagnosis = %diagnosis.message,
            "data path failed (no TCP/TLS connection to the inference port); no new requests go to this endpoint until a data-path check passes"
        );
    }
    if d.state != DataPathState::Failed {
        d.since = Some(chrono::Utc::now());
    }
    d.state = DataPathState::Failed;
    d.failed_by = Some(by);
    d.problem = Some(diagnosis.problem);
    d.diagnosis = Some(diagnosis.message);
    d.last_error = Some(error.to_string());
    endpoint.set_data_path_ok(false);
}

/// One health round for one endpoint: both checks, concurrently, then both recorded.
pub async fn round(endpoint: &Endpoint, settings: &Health) {
    let (health, data_path) = tokio::join!(
        check(&endpoint.config.host, endpoint.config.health_port, settings),
        check_data_path(endpoint)
    );
    record(endpoint, &health, settings);
    record_data_path(endpoint, &data_path, settings);
}

/// Checks every endpoint once, concurrently; used before the proxy reports ready.
pub async fn first_round(endpoints: &[Arc<Endpoint>], settings: &Health) {
    let mut set = tokio::task::JoinSet::new();
    for endpoint in endpoints {
        let endpoint = endpoint.clone();
        let settings = settings.clone();
        set.spawn(async move { round(&endpoint, &settings).await });
    }
    while set.join_next().await.is_some() {}
}
#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<Endpoint> {
        let config =
            crate::testing::config("[[regions]]\nname = \"r\"\nprivatelink = [\"10.0.0.1\"]\n");
        crate::testing::endpoints(&config).remove(0)
    }

    fn refused() -> ConnectError {
        ConnectError::Tcp {
            addr: "10.0.0.1:443".parse().expect("addr"),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }
    }

    fn healthy() -> Result<HealthOk, HealthError> {
        Ok(HealthOk {
            document: HealthDocument {
                status: "healthy".into(),
                region: None,
                available_capacity: Some(45),
                timestamp: None,
            },
            latency: Duration::from_millis(1),
        })
    }

    #[test]
    fn only_data_path_checks_readmit_after_a_request_failure() {
        let e = endpoint();
        let settings = Health {
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            ..Health::default()
        };
        record(&e, &healthy(), &settings);
        record_data_path(&e, &Ok(Duration::from_millis(1)), &settings);
        assert!(e.is_serving());
        // One request's refused connect: out at once, whatever the threshold says.
        let diagnosis = data_path_failed_by_request(&e, &refused());
        assert_eq!(diagnosis.problem, diagnose::Problem::ConnectRefused);
        assert!(!e.is_serving());
        let snapshot = e.data_path_snapshot();
        assert_eq!(
            (snapshot.state, snapshot.failed_by),
            (DataPathState::Failed, Some(FailedBy::Request))
        );
        // The health port keeps passing: never enough.
        for _ in 0..5 {
            record(&e, &healthy(), &settings);
        }
        assert!(e.is_healthy() && !e.is_serving());
        // Data-path checks bring it back after healthy_threshold passes in a row.
        record_data_path(&e, &Ok(Duration::from_millis(1)), &settings);
        assert!(!e.is_serving());
        record_data_path(&e, &Ok(Duration::from_millis(1)), &settings);
        assert!(e.is_serving());
        assert_eq!(e.data_path_snapshot().state, "ok");
        // A failing check alone waits for unhealthy_threshold, and names the problem.
        record_data_path(&e, &Err(refused()), &settings);
        assert!(e.is_serving());
        record_data_path(&e, &Err(refused()), &settings);
        assert!(!e.is_serving());
        let snapshot = e.data_path_snapshot();
        assert_eq!(snapshot.failed_by, Some(FailedBy::Check));
        assert!(snapshot
            .diagnosis
            .is_some_and(|d| d.contains("connection refused")));
    }

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
        for ts in [now + 61, 32_503_680_000, -1, i64::MIN, i64::MAX] {
            let body = format!(r#"{{"status":"healthy","timestamp":{ts}}}"#);
            let judged = evaluate(body.as_bytes(), &settings, now);
            assert!(
                matches!(judged, Err(HealthError::Implausible { .. })),
                "{ts}: {judged:?}"
            );
        }
        let skewed = format!(r#"{{"status":"healthy","timestamp":{}}}"#, now + 60);
        assert!(evaluate(skewed.as_bytes(), &settings, now).is_ok());
        let garbage = evaluate(b"\xff{", &settings, now);
        assert!(matches!(garbage, Err(HealthError::Parse(_))), "{garbage:?}");
    }
}
