//! A request's journey, from the app's plain JSON to the cluster's answer. This is the
//! one place that tells it, phase by phase:
//!
//! 1. **Ingress**: POST only; the app's `X-Model-Pool` checked; body bounded by
//!    `listen.max_body` and proven to be JSON; inbound identity headers dropped.
//! 2. **Seal**: KMS (or the development key provider) encrypts the body under the
//!    tenant's context. Any failure is a 503 and nothing leaves the host.
//! 3. **Route**: the migration phase orders the tiers; the balancer picks the healthiest
//!    endpoint of the first tier that has one.
//! 4. **Send** over the endpoint's pooled TLS connection, with the tenant headers.
//! 5. **Retry** only when the cluster cannot have started the request: the connection
//!    was never established (on a different endpoint), or HTTP/2 said the request was
//!    not processed (GOAWAY, REFUSED_STREAM; a connection going away is retried on a
//!    fresh one, perhaps to the same endpoint, which is not counted as failing). A
//!    connect or TLS failure takes the endpoint's data path out at once, and when every
//!    attempt failed unsent the last one falls through to the next tier (see
//!    [`crate::route`]).
//! 6. **Relay** the answer as a stream, bounded by `upstream.idle_timeout` per silence.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::body::{self as request_body, BodyError, BodyLimits, ProxyBodyExt};
use crate::body::{IdleTimeoutBody, ProxyBody};
use crate::config::RouteKind;
use crate::error::ProxyError;
use crate::generation::{Current, Generation};
use crate::headers::{self, X_GPULINK_ENDPOINT, X_GPULINK_ROUTE, X_MODEL_POOL, X_REQUEST_ID};
use crate::history::History;
use crate::inflight::InFlightBytes;
use crate::ingress::Handler;
use crate::listener::ConnectionSettings;
use crate::metrics::{EndpointLabels, Metrics, ServedBy};
use crate::seal::{SealError, Sealed};
use crate::upstream::{health, outlier, ConnectError, ConnectedPeer, Endpoint};

/// The request path: what a request needs from the running gpulink, and nothing more.
pub struct Forwarder {
    generations: Arc<Current>,
    metrics: Arc<Metrics>,
    history: Arc<History>,
    in_flight: Arc<InFlightBytes>,
}

impl Forwarder {
    pub fn new(
        generations: Arc<Current>,
        metrics: Arc<Metrics>,
        history: Arc<History>,
        in_flight: Arc<InFlightBytes>,
    ) -> Self {
        Self {
            generations,
            metrics,
            history,
            in_flight,
        }
    }
}

impl Handler for Forwarder {
    async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        handle(self, request).await
    }

    fn connection_settings(&self) -> ConnectionSettings {
        ConnectionSettings::app(&self.generations.get().config.listen)
    }

    fn shutdown_grace(&self) -> std::time::Duration {
        self.generations.get().config.listen.shutdown_grace.get()
    }
}

/// Serves one app request. Never fails: every error becomes a JSON answer.
pub async fn handle(forwarder: &Forwarder, request: Request<Incoming>) -> Response<ProxyBody> {
    let generation = forwarder.generations.get();
    let request_id = request_id_for(request.headers());
    let span = tracing::info_span!(
        "request",
        id = %request_id.to_str().unwrap_or("-"),
        path = %request.uri().path(),
    );
    let started = Instant::now();
    // Where an answer gpulink makes itself is counted: the last attempt's endpoint.
    let mut attribution = None;
    let result = journey(
        &generation,
        &forwarder.metrics,
        &forwarder.in_flight,
        request,
        &request_id,
        &mut attribution,
    )
    .instrument(span.clone())
    .await;
    forwarder
        .metrics
        .request_finished(&result, attribution.as_ref(), started.elapsed());
    forwarder
        .history
        .request_finished(&result, attribution.as_ref(), started.elapsed());
    let _enter = span.enter();
    match result {
        Ok(response) => {
            tracing::info!(
                status = response.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "relayed"
            );
            response
        }
        Err(error) => {
            let status = error.status();
            if status.is_server_error() {
                tracing::warn!(status = status.as_u16(), code = error.code(), %error, "request failed");
            } else {
                tracing::info!(status = status.as_u16(), code = error.code(), %error, "request refused");
            }
            error.into_response(Some(&request_id))
        }
    }
}

async fn journey(
    generation: &Generation,
    metrics: &Metrics,
    in_flight: &Arc<InFlightBytes>,
    request: Request<Incoming>,
    request_id: &HeaderValue,
    attribution: &mut Option<EndpointLabels>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let config = &generation.config;
    let (mut parts, mut body) = request.into_parts();

    // 1. Ingress. Every refusal here happens before KMS or the cluster see anything.
    if parts.method != Method::POST {
        request_body::drain_in_background(body);
        return Err(ProxyError::MethodNotAllowed(parts.method));
    }
    if let Err(error) = check_head(&parts) {
        request_body::drain_in_background(body);
        return Err(error);
    }
    let model_pool = match parts.headers.get(X_MODEL_POOL) {
        None => config.tenant.model_pool.clone(),
        Some(value) => {
            let pool = value.to_str().unwrap_or("").to_string();
            if !config.tenant.allows_pool(&pool) {
                request_body::drain_in_background(body);
                return Err(ProxyError::ModelPoolNotAllowed(
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ));
            }
            pool
        }
    };
    let limits = BodyLimits::from_config(config);
    let limit = limits.max;
    let declared_len = content_length(&parts.headers);
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if declared_len.is_some_and(|n| n > limit as u64) {
        // A client waiting for `100 Continue` has not sent the body: nothing to drain.
        if !expects_continue {
            request_body::drain_in_background(body);
        }
        return Err(too_large(limit));
    }
    // Memory is reserved before it is held: the declared body and its sealed copy.
    let up_front = limits.needed_for(declared_len.unwrap_or(0));
    let Some(mut held) = in_flight.try_reserve(up_front, limits.in_flight) else {
        // A client waiting for `100 Continue` has not sent the body: nothing to drain.
        if !expects_continue {
            request_body::refuse_for_budget(body, parts.version);
        }
        return Err(ProxyError::Overloaded(limits.in_flight));
    };
    let read = request_body::read_body(&mut body, &limits, declared_len, &mut held).await;
    let plaintext = match read {
        Ok(bytes) => bytes,
        Err(BodyError::Overloaded) => {
            request_body::refuse_for_budget(body, parts.version);
            return Err(ProxyError::Overloaded(limits.in_flight));
        }
        Err(BodyError::TooLarge { limit }) => {
            request_body::drain_in_background(body);
            return Err(too_large(limit));
        }
        Err(error @ BodyError::TooSlow { .. }) => {
            return Err(ProxyError::BodyTimeout(error.to_string()))
        }
        Err(BodyError::Read(message)) => return Err(ProxyError::BadRequestBody(message)),
    };
    // RFC 8259: JSON exchanged between systems is UTF-8. serde_json skips over the
    // strings of a document it only checks, invalid UTF-8 inside them included.
    if let Err(error) = std::str::from_utf8(&plaintext) {
        return Err(ProxyError::InvalidJson(format!(
            "the body is not UTF-8 (byte {} is not valid UTF-8); JSON must be UTF-8 (RFC 8259)",
            error.valid_up_to()
        )));
    }
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(&plaintext) {
        // serde_json's message gives line and column, never the content.
        return Err(ProxyError::InvalidJson(error.to_string()));
    }
    headers::sanitize_inbound(&mut parts.headers);

    // 2. Seal. Fail closed.
    let seal_started = Instant::now();
    let sealed = generation.sealer.seal(&plaintext, &model_pool).await;
    metrics.seal_finished(&sealed, seal_started.elapsed());
    let sealed = sealed.map_err(|error| match error {
        SealError::TooLarge { .. } => ProxyError::BodyTooLarge(error.to_string()),
        SealError::Key(key_error) => ProxyError::KmsUnavailable(key_error.to_string()),
    })?;
    drop(plaintext);
    held.shrink_to(sealed.body.len() as u64);
    let upstream_headers = upstream_headers(
        parts.headers,
        &sealed,
        &config.tenant.id,
        &model_pool,
        request_id,
    )?;
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));

    // 3-5. Route, send, retry only when safe.
    let now = chrono::Utc::now();
    let plan = generation.routes.plan(now, &mut generation.chooser.rng());
    // With no endpoint to try, an error still belongs to the route it would have taken.
    *attribution = plan.first_route().map(EndpointLabels::route_only);
    generation.retry_budget.record_request();
    let max_attempts = config.retry.max_attempts.max(1) as usize;
    // Attempts count against retry.max_attempts and (after the first) the retry
    // budget, except those a connection refused unprocessed because it was going away
    // (GOAWAY, closed before writing): the cluster did no work for them, so they are
    // retried on a fresh connection, bounded by MAX_CONNECTION_REFUSALS instead.
    let mut attempts = 0;
    let mut refusals = 0;
    let mut free_retry = false;
    // Endpoints not to choose again for this request: those that failed, refused the
    // stream or had no capacity. One whose connection was going away stays eligible.
    let mut tried: Vec<Arc<Endpoint>> = Vec::with_capacity(max_attempts);
    let mut last_error: Option<ProxyError> = None;
    // Whether every attempt so far failed before the request was sent: then the last
    // attempt falls through to a lower tier (see `route`'s "Fall-through across tiers").
    let mut all_unsent = true;
    while attempts < max_attempts {
        let retry = attempts + refusals > 0;
        let charged = retry && !std::mem::take(&mut free_retry);
        if charged && !generation.retry_budget.try_retry() {
            tracing::warn!("retry budget spent (retry.budget_percent); not retrying");
            break;
        }
        let last_attempt = attempts + 1 == max_attempts;
        let chosen = if last_attempt && all_unsent && !tried.is_empty() {
            plan.select_fall_through(&tried, &mut generation.chooser.rng())
        } else {
            plan.select(&tried, &mut generation.chooser.rng())
        };
        let Some(endpoint) = chosen else {
            break;
        };
        *attribution = Some(EndpointLabels::of(&endpoint));
        let uri = endpoint
            .uri_for(&path)
            .map_err(|_| ProxyError::BadRequestBody(format!("invalid path `{path}`")))?;
        if retry {
            metrics.upstream_retry();
        }
        let started = tokio::time::Instant::now();
        let outcome = send(
            generation,
            metrics,
            &endpoint,
            uri,
            &upstream_headers,
            &sealed.body,
        )
        .await;
        let upstream = match outcome {
            Ok(upstream) => upstream,
            Err(failure) => {
                match &failure {
                    AttemptError::NotSent(NotSent::Unreachable, _) => {
                        metrics.upstream_connect_failed(&endpoint);
                    }
                    AttemptError::NotSent(NotSent::Unprocessed(why), _) => {
                        metrics.upstream_unprocessed(&endpoint, why.as_str());
                    }
                    AttemptError::FailedAfterSend(_) => metrics.upstream_send_failed(&endpoint),
                    AttemptError::NoResponseHeaders(_) => metrics.upstream_timed_out(&endpoint),
                }
                // A refusal says nothing about the endpoint's health: not an outlier
                // failure, nor a PrivateLink error for the rollback monitor.
                if failure.endpoint_failed() {
                    settle(generation, &endpoint, now, started, true);
                }
                free_retry = failure.connection_going_away();
                if free_retry {
                    refusals += 1;
                } else {
                    attempts += 1;
                    tried.push(endpoint.clone());
                }
                let exhausted = refusals > MAX_CONNECTION_REFUSALS;
                if !failure.retryable() || exhausted {
                    return Err(failure.into_error());
                }
                let error = failure.into_error();
                tracing::warn!(endpoint = %endpoint.authority, %error, "the request was not sent; retrying");
                last_error = Some(error);
                continue;
            }
        };
        attempts += 1;
        if upstream.response.status() != StatusCode::SERVICE_UNAVAILABLE {
            let failed = upstream.response.status().is_server_error();
            settle(generation, &endpoint, now, started, failed);
            return Ok(relay(&endpoint, upstream, request_id));
        }
        match check_no_capacity(upstream).await {
            Capacity::Refused => {
                all_unsent = false;
                // The cluster did not start the work: safe to go elsewhere.
                tracing::info!(endpoint = %endpoint.authority, "endpoint has no capacity (503 no_capacity); trying another");
                tried.push(endpoint.clone());
                last_error = Some(ProxyError::NoEndpoint(format!(
                    "{} and every other endpoint tried reported no capacity",
                    endpoint.authority
                )));
            }
            Capacity::Relay(upstream) => {
                settle(generation, &endpoint, now, started, true);
                return Ok(relay(&endpoint, upstream, request_id));
            }
            Capacity::Failed(error) => {
                settle(generation, &endpoint, now, started, true);
                return Err(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        let why = plan.why_none_serve();
        ProxyError::NoEndpoint(format!(
            "no endpoint can serve: every endpoint allowed in phase `{}` is out of service{}",
            generation.routes.phase().as_str(),
            if plan.is_empty() {
                " or none is configured".to_string()
            } else if why.is_empty() {
                String::new()
            } else {
                format!(" ({why}; /status and `gpulink probe` say what to change)")
            }
        ))
    }))
}

/// Feeds one attempt's outcome to passive outlier detection and, for PrivateLink, to
/// the automatic-rollback monitor.
fn settle(
    generation: &Generation,
    endpoint: &Endpoint,
    now: chrono::DateTime<chrono::Utc>,
    started: tokio::time::Instant,
    failed: bool,
) {
    if failed {
        endpoint.record_failure();
        let tier = generation.routes.tier_members(endpoint);
        outlier::record_failure(endpoint, tier, &generation.config.outlier);
    } else {
        endpoint.outlier.record_success();
    }
    if endpoint.kind() == RouteKind::Privatelink {
        generation
            .routes
            .record_privatelink(now, failed, started.elapsed());
    }
}

/// How much of a 503 body is read to see whether it is the cluster's `no_capacity`.
const NO_CAPACITY_PEEK: usize = 64 * 1024;

enum Capacity {
    /// A 503 whose JSON says `error.code == "no_capacity"`: the work was not started.
    Refused,
    /// Any other 503: relayed to the app as the cluster sent it.
    Relay(Upstream),
    /// The 503's body broke off: gpulink answers with its own error instead.
    Failed(ProxyError),
}

async fn check_no_capacity(upstream: Upstream) -> Capacity {
    let Upstream { response, guard } = upstream;
    let (mut parts, mut body) = response.into_parts();
    let mut peeked = bytes::BytesMut::new();
    // How the peek ended: the whole body read, more than the peek holds (with the data
    // frame that did not fit), or the body failed.
    enum Peek {
        Whole,
        Longer(Bytes),
        Failed(String),
    }
    let peek = loop {
        match body.frame().await {
            None => break Peek::Whole,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if peeked.len() + data.len() > NO_CAPACITY_PEEK => {
                    break Peek::Longer(data)
                }
                Ok(data) => peeked.extend_from_slice(&data),
                // Trailers end the body; a 503's trailers carry nothing gpulink relays.
                Err(_) => break Peek::Whole,
            },
            Some(Err(error)) => break Peek::Failed(error.to_string()),
        }
    };
    let peeked = peeked.freeze();
    let body = match peek {
        Peek::Failed(error) => {
            // Never relay a 503 cut short: its Content-Length would promise bytes that
            // never come. The cluster may have started the request: not retried.
            return Capacity::Failed(ProxyError::UpstreamConnect(format!(
                "the connection failed while reading the cluster's 503 answer ({error}); not retried because the cluster may have started the request"
            )));
        }
        // Longer than any no_capacity answer: relayed whole, the peeked bytes and then
        // the rest of the stream, so its Content-Length still holds.
        Peek::Longer(data) => {
            let mut head = bytes::BytesMut::from(&peeked[..]);
            head.extend_from_slice(&data);
            let response = Response::from_parts(
                parts,
                crate::body::Prefixed::new(head.freeze(), body).boxed(),
            );
            return Capacity::Relay(Upstream { response, guard });
        }
        Peek::Whole => peeked,
    };
    #[derive(serde::Deserialize)]
    struct Body {
        error: Option<ErrorCode>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorCode {
        code: Option<String>,
    }
    let no_capacity = serde_json::from_slice::<Body>(&body)
        .ok()
        .and_then(|b| b.error)
        .and_then(|e| e.code)
        .is_some_and(|code| code == "no_capacity");
    if no_capacity {
        Capacity::Refused
    } else {
        // The whole body, re-sent from memory: its length is what hyper frames.
        parts.headers.remove(header::CONTENT_LENGTH);
        let response = Response::from_parts(parts, ProxyBody::full(body));
        Capacity::Relay(Upstream { response, guard })
    }
}

/// The largest request head forwarded: target plus header names and values. Larger
/// heads are refused here, before KMS, rather than sealed and refused by the cluster.
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;

/// The request head gpulink can forward: an origin-form target (a path; absolute-form
/// `POST http://host/path` is accepted and forwarded as its path, since gpulink always
/// sends to the cluster whatever authority the app named; `*` and anything else that is
/// not a path is refused) and a head of at most [`MAX_REQUEST_HEAD`] bytes.
fn check_head(parts: &http::request::Parts) -> Result<(), ProxyError> {
    if !parts.uri.path().starts_with('/') {
        return Err(ProxyError::BadRequest(format!(
            "the request target {:?} is not a path; send POST /inference",
            parts.uri.to_string()
        )));
    }
    let size = parts.uri.to_string().len()
        + parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size > MAX_REQUEST_HEAD {
        return Err(ProxyError::HeadersTooLarge(format!(
            "the request head is {size} bytes, over gpulink's limit of {MAX_REQUEST_HEAD} bytes"
        )));
    }
    Ok(())
}

fn too_large(limit: usize) -> ProxyError {
    ProxyError::BodyTooLarge(format!(
        "the body is larger than listen.max_body ({limit} bytes)"
    ))
}

/// How one attempt ended without response headers, classified once, where hyper's
/// error is seen: what it means for a retry and for the endpoint's health follows from
/// the kind.
enum AttemptError {
    /// The cluster cannot have processed the request: safe to retry.
    NotSent(NotSent, ProxyError),
    /// The connection failed after the request was (perhaps partly) sent: the cluster
    /// may have started it, so it is never replayed.
    FailedAfterSend(ProxyError),
    /// No response headers within `upstream.request_timeout`: never replayed.
    NoResponseHeaders(ProxyError),
}

/// Why a request was not sent.
enum NotSent {
    /// TCP or TLS set-up failed: the endpoint is unreachable.
    Unreachable,
    /// A working connection refused it unprocessed or closed before writing it: the
    /// endpoint is fine, that one connection is going away.
    Unprocessed(Unprocessed),
}

#[derive(Clone, Copy)]
enum Unprocessed {
    /// The stream is above the last-stream-id of the server's GOAWAY (RFC 9113 6.8),
    /// or was opened after a GOAWAY arrived: an HTTP/2 connection being rotated (nginx
    /// `keepalive_requests`) or drained.
    GoAway,
    /// RST_STREAM with REFUSED_STREAM (RFC 9113 8.7).
    RefusedStream,
    /// The pooled connection closed before the request was written.
    Closed,
}

impl Unprocessed {
    /// The `reason` label of `gpulink_upstream_unprocessed_total`.
    fn as_str(self) -> &'static str {
        match self {
            Unprocessed::GoAway => "goaway",
            Unprocessed::RefusedStream => "refused_stream",
            Unprocessed::Closed => "closed",
        }
    }
}

impl AttemptError {
    fn retryable(&self) -> bool {
        matches!(self, AttemptError::NotSent(..))
    }

    /// Whether the attempt counts against the endpoint (passive outlier detection, the
    /// rollback monitor).
    fn endpoint_failed(&self) -> bool {
        !matches!(self, AttemptError::NotSent(NotSent::Unprocessed(_), _))
    }

    /// A refusal by one connection that is going away, not by the endpoint: the retry
    /// may go to the same endpoint, and is not charged to the attempts or the budget.
    /// REFUSED_STREAM is not one: servers also use it to shed load, so that retry goes
    /// elsewhere and is charged like any other.
    fn connection_going_away(&self) -> bool {
        matches!(
            self,
            AttemptError::NotSent(
                NotSent::Unprocessed(Unprocessed::GoAway | Unprocessed::Closed),
                _
            )
        )
    }

    fn into_error(self) -> ProxyError {
        match self {
            AttemptError::NotSent(_, error)
            | AttemptError::FailedAfterSend(error)
            | AttemptError::NoResponseHeaders(error) => error,
        }
    }
}

/// How many times one request may be refused by connections going away (GOAWAY, or
/// closed before the request was written) before it fails. Each refusal costs the
/// cluster nothing; the bound keeps a server that refuses everything from holding a
/// request in a loop. Far above what rotation produces: a retry lands early on a fresh
/// connection, so repeated refusals are rare even with nginx `keepalive_requests = 5`.
const MAX_CONNECTION_REFUSALS: usize = 10;

/// A response with headers, and the in-flight guard that must live as long as its body.
struct Upstream {
    response: Response<ProxyBody>,
    guard: crate::upstream::InFlightGuard,
}

async fn send(
    generation: &Generation,
    metrics: &Metrics,
    endpoint: &Arc<Endpoint>,
    uri: http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Upstream, AttemptError> {
    let upstream = &generation.config.upstream;
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers.clone();

    let guard = endpoint.start_request();
    let started = tokio::time::Instant::now();
    let timeout = upstream.request_timeout.get();
    match pooled(endpoint, request, timeout).await {
        Ok(Ok(response)) => {
            let mut latency = started.elapsed();
            if let Some(peer) = response.extensions().get::<ConnectedPeer>() {
                if peer.established >= started {
                    latency = latency.saturating_sub(peer.setup);
                }
            }
            endpoint.record_latency(latency);
            metrics.upstream_response(endpoint, latency);
            let idle = upstream.idle_timeout.get();
            // The idle bound starts with the body: the first byte may take as long as
            // the generation needs, each later silence at most `idle_timeout`.
            let response = response.map(|body| IdleTimeoutBody::new(body, idle).boxed());
            Ok(Upstream { response, guard })
        }
        Ok(Err(error)) => Err(classify(&error, endpoint)),
        Err(_) => Err(AttemptError::NoResponseHeaders(
            ProxyError::UpstreamTimeout(format!(
                "{} sent no response headers within {:?} (upstream.request_timeout)",
                endpoint.authority, timeout
            )),
        )),
    }
}

/// The pool's answer within `timeout`. What went wrong is remembered on the endpoint for
/// `/status`, and a connect or TLS failure takes its data path out at once, so that the
/// next selection (this request's retry included) skips it.
async fn pooled(
    endpoint: &Endpoint,
    request: Request<Full<Bytes>>,
    timeout: std::time::Duration,
) -> Result<
    Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
> {
    let result = tokio::time::timeout(timeout, endpoint.client().request(request)).await;
    match &result {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            let diagnosis =
                connect_error(error).map(|e| health::data_path_failed_by_request(endpoint, e));
            endpoint.record_request_error(error_chain(error), diagnosis.as_ref());
        }
        Err(_) => endpoint.record_request_error(
            format!("no response headers within {timeout:?} (upstream.request_timeout)"),
            None,
        ),
    }
    result
}

/// The connector's own error among `error`'s causes: the connection (TCP or TLS) was
/// never made.
fn connect_error(error: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(connect) = cause.downcast_ref::<ConnectError>() {
            return Some(connect);
        }
        source = cause.source();
    }
    None
}

/// 6. Relay: the cluster's answer as a stream, with gpulink's headers added.
fn relay(endpoint: &Endpoint, upstream: Upstream, request_id: &HeaderValue) -> Response<ProxyBody> {
    let Upstream { response, guard } = upstream;
    let dialed = response
        .extensions()
        .get::<ConnectedPeer>()
        .map(|peer| peer.header.clone())
        .unwrap_or_else(|| endpoint.authority_header.clone());
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        X_GPULINK_ROUTE,
        HeaderValue::from_static(endpoint.kind().as_str()),
    );
    parts.headers.insert(X_GPULINK_ENDPOINT, dialed);
    parts.headers.insert(X_REQUEST_ID, request_id.clone());
    parts.extensions.clear();
    parts.extensions.insert(ServedBy::new(endpoint));
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        parts.status = StatusCode::BAD_GATEWAY;
    }
    // The guard rides in the body so the endpoint counts the request as in flight until
    // the last byte is relayed.
    let body = body
        .map_frame(move |frame| {
            let _in_flight = &guard;
            frame
        })
        .boxed();
    Response::from_parts(parts, body)
}

/// The headers the cluster receives: the app's end-to-end headers plus the tenant's.
fn upstream_headers(
    mut headers: HeaderMap,
    sealed: &Sealed,
    tenant_id: &str,
    model_pool: &str,
    request_id: &HeaderValue,
) -> Result<HeaderMap, ProxyError> {
    let value = |v: &str| {
        HeaderValue::from_str(v)
            .map_err(|_| {
            // Never echoed: the value may come from KMS's answer.
            ProxyError::KmsUnavailable(
                "a tenant header (X-Tenant-ID, X-KMS-Key-ID or X-Model-Pool) would not be a valid header value".into(),
            )
        })
    };
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(headers::X_TENANT_ID, value(tenant_id)?);
    headers.insert(headers::X_KMS_KEY_ID, value(&sealed.key_arn)?);
    headers.insert(X_MODEL_POOL, value(model_pool)?);
    headers.insert(
        headers::X_ENCRYPTION_FORMAT,
        HeaderValue::from_static(sealed.format),
    );
    headers.insert(X_REQUEST_ID, request_id.clone());
    Ok(headers)
}

/// The app's `X-Request-ID` when it is 1..=128 visible ASCII characters, else a new UUIDv4.
fn request_id_for(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| headers::valid_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(|| {
            let id = uuid::Uuid::new_v4().hyphenated().to_string();
            HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// What a failed attempt means, from hyper's error and its causes.
fn classify(error: &hyper_util::client::legacy::Error, endpoint: &Endpoint) -> AttemptError {
    let chain = error_chain(error);
    match never_sent(error) {
        Some(NotSent::Unreachable) => AttemptError::NotSent(
            NotSent::Unreachable,
            ProxyError::UpstreamConnect(format!(
                "cannot reach {} ({}): {chain}",
                endpoint.authority,
                endpoint.region(),
            )),
        ),
        Some(NotSent::Unprocessed(why)) => {
            let what = match why {
                Unprocessed::GoAway => "is closing the connection (HTTP/2 GOAWAY) and did not process the request",
                Unprocessed::RefusedStream => "refused the request unprocessed (HTTP/2 REFUSED_STREAM)",
                Unprocessed::Closed => "closed the connection before the request was written",
            };
            AttemptError::NotSent(
                NotSent::Unprocessed(why),
                ProxyError::UpstreamConnect(format!("{} {what}: {chain}", endpoint.authority)),
            )
        }
        None => AttemptError::FailedAfterSend(ProxyError::UpstreamConnect(format!(
            "the connection to {} failed after the request was sent ({chain}); not retried because the cluster may have started it",
            endpoint.authority,
        ))),
    }
}

/// Whether, and why, the cluster cannot have processed the request:
///
/// * the connection (TCP or TLS) was never established;
/// * HTTP/2 said so: a stream above the last-stream-id of the server's GOAWAY, or one
///   opened after the GOAWAY arrived (h2 fails both with the GOAWAY as a remote error,
///   and only those: streams the server may have processed end with an I/O or reset
///   error), or RST_STREAM with REFUSED_STREAM (RFC 9113 6.8, 8.7);
/// * hyper cancelled it before writing it (its `Canceled` kind means exactly that; the
///   legacy client already retries those on a reused connection by itself).
fn never_sent(error: &hyper_util::client::legacy::Error) -> Option<NotSent> {
    if error.is_connect() {
        return Some(NotSent::Unreachable);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Some(NotSent::Unprocessed(Unprocessed::GoAway));
            }
            if h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Some(NotSent::Unprocessed(Unprocessed::RefusedStream));
            }
        }
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return Some(NotSent::Unprocessed(Unprocessed::Closed));
            }
        }
        source = cause.source();
    }
    None
}

/// The error and its causes on one line: hyper's top-level messages alone ("client
/// error (Connect)") do not tell an operator what happened.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
