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
//!
//! The server sees only a [`Source`]: readiness, the status document and the metrics.
//! The runtime implements it (building the document with [`status::document`]); tests
//! use a fake.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{ProxyBody, ProxyBodyExt};
use crate::listener::{ConnectionSettings, Listener};
use crate::metrics::Format;

mod chart;
mod page;
pub mod status;
pub use page::render_page;

/// What the admin server reports: the runtime in gpulink, a fake in tests.
pub trait Source: Send + Sync + 'static {
    fn readiness(&self) -> Readiness;

    /// The `/status` document (the page is rendered from it).
    fn status(&self) -> Value;

    /// Every metric as of now, encoded in `format`.
    fn metrics(&self, format: Format) -> Result<String, std::fmt::Error>;

    /// The time bounds for a new admin connection (read at each accept, so a reload
    /// applies to new connections).
    fn connection_settings(&self) -> ConnectionSettings;
}

/// What `/ready` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Shutting down: the app should stop sending here.
    Draining,
    /// KMS has not been proven yet; `reason` is why the last attempt failed, if one has.
    WaitingForKms {
        reason: Option<String>,
    },
    /// Listeners, the first health round or the background tasks are not up yet.
    Starting,
}

/// Serves until `stop`; connections are held to `admin.max_connections` (idle ones make
/// room for new ones) and the admin time bounds, so a crowd of admin clients neither
/// locks `/ready` out nor takes file descriptors from the data path.
pub async fn serve<S: Source>(
    listener: TcpListener,
    connections: Arc<Listener>,
    source: Arc<S>,
    stop: CancellationToken,
) {
    let settings = {
        let source = source.clone();
        move || source.connection_settings()
    };
    let handler = move |request: Request<hyper::body::Incoming>| {
        let source = source.clone();
        async move { route(&*source, &request) }
    };
    connections
        .serve(listener, settings, handler, stop, || None)
        .await;
}

fn route<S: Source, B>(source: &S, request: &Request<B>) -> Response<ProxyBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => ready(source.readiness()),
        "/metrics" => metrics(source, Format::negotiate(request.headers())),
        "/status" => json_response(source.status()),
        "/" => html_response(render_page(&source.status())),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /, /live, /ready, /metrics or /status\n",
        ),
    }
}

fn ready(readiness: Readiness) -> Response<ProxyBody> {
    match readiness {
        Readiness::Ready => text(StatusCode::OK, "ready\n"),
        Readiness::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        Readiness::WaitingForKms { reason } => {
            let mut response = json_response(serde_json::json!({
                "status": "starting",
                "waiting_for": "kms",
                "reason": reason.as_deref().unwrap_or("the first KMS seal is under way"),
            }));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
        }
        Readiness::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
    }
}

fn metrics<S: Source>(source: &S, format: Format) -> Response<ProxyBody> {
    match source.metrics(format) {
        Ok(body) => answer(StatusCode::OK, format.content_type(), body),
        Err(error) => {
            tracing::error!(%error, "cannot encode metrics");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics could not be encoded; see the log\n",
            )
        }
    }
}

/// Every admin answer: `body` as `content_type`, never cached (each one is the state
/// at the moment it was asked for).
fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    answer(status, "text/plain; charset=utf-8", body)
}

fn json_response(value: Value) -> Response<ProxyBody> {
    answer(StatusCode::OK, "application/json", value.to_string())
}

fn html_response(page: String) -> Response<ProxyBody> {
    let mut response = answer(StatusCode::OK, "text/html; charset=utf-8", page);
    // Self-contained by design: forbid anything external, and scripts entirely.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::BodyExt;

    use super::*;

    /// A stand-in for the runtime: whatever a test sets is what the server reports.
    struct Fake {
        readiness: Mutex<Readiness>,
        metrics: Result<String, std::fmt::Error>,
    }

    impl Fake {
        fn new(readiness: Readiness) -> Self {
            Self {
                readiness: Mutex::new(readiness),
                metrics: Ok("# TYPE gpulink_up gauge\ngpulink_up 1\n".into()),
            }
        }
    }

    impl Source for Fake {
        fn readiness(&self) -> Readiness {
            self.readiness.lock().unwrap().clone()
        }

        fn status(&self) -> Value {
            serde_json::json!({ "generation": 7, "phase": "canary", "endpoints": [] })
        }

        fn metrics(&self, _format: Format) -> Result<String, std::fmt::Error> {
            self.metrics.clone()
        }

        fn connection_settings(&self) -> ConnectionSettings {
            unreachable!("route() does not ask")
        }
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn body(response: Response<ProxyBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn ready_follows_the_source() {
        let fake = Fake::new(Readiness::Ready);
        let response = route(&fake, &get("/ready"));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "ready\n");

        *fake.readiness.lock().unwrap() = Readiness::WaitingForKms {
            reason: Some("KMS refuses kms.key_id".into()),
        };
        let response = route(&fake, &get("/ready"));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let answer: Value = serde_json::from_str(&body(response).await).unwrap();
        assert_eq!(answer["waiting_for"], "kms");
        assert_eq!(answer["reason"], "KMS refuses kms.key_id");

        *fake.readiness.lock().unwrap() = Readiness::WaitingForKms { reason: None };
        let answer: Value =
            serde_json::from_str(&body(route(&fake, &get("/ready"))).await).unwrap();
        assert_eq!(answer["reason"], "the first KMS seal is under way");

        *fake.readiness.lock().unwrap() = Readiness::Draining;
        let response = route(&fake, &get("/ready"));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(response).await, "draining\n");

        *fake.readiness.lock().unwrap() = Readiness::Starting;
        let response = route(&fake, &get("/ready"));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(response).await, "starting\n");
    }

    #[tokio::test]
    async fn status_and_page_come_from_the_same_document() {
        let fake = Fake::new(Readiness::Ready);
        let response = route(&fake, &get("/status"));
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let document: Value = serde_json::from_str(&body(response).await).unwrap();
        assert_eq!(document, fake.status());

        let response = route(&fake, &get("/"));
        assert!(response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(response
            .headers()
            .contains_key(header::CONTENT_SECURITY_POLICY));
        assert!(body(response).await.contains("canary"));
    }

    #[tokio::test]
    async fn metrics_are_served_with_their_format_or_a_500() {
        let mut fake = Fake::new(Readiness::Ready);
        let response = route(&fake, &get("/metrics"));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            Format::PrometheusText.content_type()
        );
        assert!(body(response).await.contains("gpulink_up 1"));

        fake.metrics = Err(std::fmt::Error);
        let response = route(&fake, &get("/metrics"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn only_get_and_known_paths() {
        let fake = Fake::new(Readiness::Ready);
        let post = Request::post("/ready").body(()).unwrap();
        let response = route(&fake, &post);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(route(&fake, &get("/nope")).status(), StatusCode::NOT_FOUND);
        assert_eq!(route(&fake, &get("/live")).status(), StatusCode::OK);
    }
}
