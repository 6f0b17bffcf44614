//! The admin server on `admin.address` (loopback): `/live` (the process answers),
//! `/ready` (configuration loaded, listener bound, KMS credentials resolved, first
//! health round done, not draining) and `/status` (JSON: generation, phase, every
//! endpoint's state). A cluster outage shows in `/status`, not in `/ready`: taking the
//! app's pods out of service would not help it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{ProxyBody, ProxyBodyExt};
use crate::proxy::Proxy;

pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let proxy = proxy.clone();
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(route(&proxy, request)) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn route(proxy: &Proxy, request: Request<Incoming>) -> Response<ProxyBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match request.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            if proxy.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if proxy.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
            }
        }
        "/status" => json_response(status(proxy)),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready or /status\n",
        ),
    }
}

/// The JSON document behind `/status`.
pub fn status(proxy: &Proxy) -> serde_json::Value {
    let generation = proxy.current();
    let config = &generation.config;
    let now = chrono::Utc::now();
    let endpoints: Vec<serde_json::Value> = generation
        .endpoints
        .iter()
        .map(|e| {
            let health = e.health_snapshot();
            json!({
                "address": e.authority,
                "region": e.region(),
                "route": e.kind().as_str(),
                "local": e.region() == config.local_region(),
                "server_name": e.config.server_name,
                "health": health.state,
                "serving": e.is_serving(),
                "capacity": e.capacity(),
                "latency_ms": e.latency().map(|d| d.as_secs_f64() * 1000.0),
                "in_flight": e.in_flight(),
                "requests": e.requests(),
                "failures": e.failures(),
                "health_checks": health.checks,
                "last_error": health.last_error,
                "reported_region": health.region,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": generation.number,
        "ready": proxy.is_ready(),
        "draining": proxy.is_draining(),
        "uptime_seconds": proxy.uptime().as_secs(),
        "phase": generation.routes.phase().as_str(),
        "public_fallback_until": config.migration.public_fallback_until.map(|t| t.to_rfc3339()),
        "public_fallback_open": generation.routes.public_fallback_open(now),
        "tenant": config.tenant.id,
        "kms": {
            "provider": if proxy.keys().is_development() { "development" } else { "aws-kms" },
            "key_id": config.kms.key_id,
            "region": config.kms.region,
            "format": format!("{:?}", config.kms.format),
        },
        "endpoints": endpoints,
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(value: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
