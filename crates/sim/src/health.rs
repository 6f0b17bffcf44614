//! `GET /health` on the plain-HTTP health port, in the setup guide's format:
//! `{"status":"healthy","region":"us-east-1","available_capacity":45,"timestamp":1699564800}`.
//! The proxy's health checker reads exactly this, so each failure state shows here the
//! way the real cluster would show it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::endpoint::{Endpoint, Hangup};
use super::{error_response, json_response, EndpointState};
use gpulink::body::ProxyBody;

/// Answers one request on the health port. An `Err` hangs up without an answer.
pub(crate) async fn handle(
    endpoint: Arc<Endpoint>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Hangup> {
    if request.uri().path() != "/health" {
        return Ok(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "the health port serves GET /health only",
        ));
    }
    if request.method() != Method::GET {
        return Ok(crate::method_not_allowed("GET", "use GET /health"));
    }
    endpoint.count(|c| &c.health_checks);

    match endpoint.state() {
        EndpointState::Blackhole => {
            endpoint.until_not_blackholed().await;
            return Err(Hangup::Blackholed);
        }
        EndpointState::Down => return Err(Hangup::Down),
        EndpointState::Slow { delay_ms } => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        EndpointState::Healthy
        | EndpointState::Full
        | EndpointState::Failing
        | EndpointState::InferenceRefused
        | EndpointState::InferenceFiltered => {}
    }

    // Read after the delay, so a slow answer reports the state at the time it is sent.
    let state = endpoint.state();
    let status = if state == EndpointState::Failing {
        "unhealthy"
    } else {
        "healthy"
    };
    let available_capacity = if state == EndpointState::Full {
        0
    } else {
        endpoint.config.capacity
    };
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = serde_json::json!({
        "status": status,
        "region": endpoint.config.region,
        "available_capacity": available_capacity,
        "timestamp": timestamp,
    });
    Ok(json_response(StatusCode::OK, &body))
}
