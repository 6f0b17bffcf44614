//! A request's journey, from the app's plain JSON to the cluster's answer. This is the
//! one place that tells it; `journey` reads as its four phases:
//!
//! 1. **Admit** (`admit`): POST only, an origin-form target and a bounded head; the
//!    app's `X-Model-Pool` checked; memory reserved from the in-flight budget; the body
//!    read within `listen.max_body` and its time bounds, and proven to be UTF-8 JSON;
//!    inbound identity headers dropped. Every refusal here happens before KMS or the
//!    cluster see anything.
//! 2. **Seal** (`seal`): KMS (or the development key provider) encrypts the body under
//!    the tenant's context, and the tenant headers are set. Any failure is an error
//!    answer and nothing leaves the host.
//! 3. **Dispatch** (`dispatch`): the migration phase orders the tiers; the balancer
//!    picks the healthiest endpoint of the first tier that has one; the request goes
//!    over that endpoint's pooled TLS connection. It is retried only when the cluster
//!    cannot have started it: the connection was never established (on a different
//!    endpoint), or HTTP/2 said the request was not processed (GOAWAY, REFUSED_STREAM; a
//!    connection going away is retried on a fresh one, perhaps to the same endpoint,
//!    which is not counted as failing), or the endpoint answered `503 no_capacity`. A
//!    connect or TLS failure takes the endpoint's data path out at once, and when every
//!    attempt failed unsent the last one falls through to the next tier (see
//!    `crate::route`).
//! 4. **Relay** (`relay`): the answer as a stream, bounded by `upstream.idle_timeout`
//!    per silence, with gpulink's headers.
//!
//! The request's `Context` carries what the phases share and what the edge
//! ([`handle`]) reports: the generation, the request id, and where the answer is
//! counted. Errors are typed (`crate::error`) and become the JSON answer once, in
//! [`handle`].

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::{self as request_body, BodyError, BodyLimits, ProxyBodyExt};
use crate::body::{IdleTimeoutBody, ProxyBody};
use crate::config::RouteKind;
use crate::error::{
    AttemptError, AttemptKind, Causes, JsonError, NoEndpoint, NotSent, ProxyError, Unprocessed,
};
use crate::generation::{Current, Generation};
use crate::headers::{self, X_GPULINK_ENDPOINT, X_GPULINK_ROUTE, X_MODEL_POOL, X_REQUEST_ID};
use crate::history::History;
use crate::inflight::{InFlightBytes, Reservation};
use crate::ingress::Handler;
use crate::listener::ConnectionSettings;
use crate::metrics::{Attribution, Metrics};
use crate::route::Plan;
use crate::seal::Sealed;
use crate::upstream::pool::{Lease, Pooled, SendError};
use crate::upstream::{health, outlier, ConnectedPeer, Endpoint};

/// The request path: what a request needs from the running gpulink, and nothing more.
pub struct Forwarder {
    generations: Arc<Current>,
    metrics: Arc<Metrics>,
    history: Arc<History>,
    in_flight: Arc<InFlightBytes>,
    /// Where refused bodies are drained (the runtime's tracker, awaited on shutdown).
    drains: TaskTracker,
}

impl Forwarder {
    pub fn new(
        generations: Arc<Current>,
        metrics: Arc<Metrics>,
        history: Arc<History>,
        in_flight: Arc<InFlightBytes>,
        drains: TaskTracker,
    ) -> Self {
        Self {
            generations,
            metrics,
            history,
            in_flight,
            drains,
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

/// What one request carries through its phases.
struct Context<'a> {
    /// The generation the request started with and keeps to its end.
    generation: &'a Generation,
    metrics: &'a Metrics,
    in_flight: &'a Arc<InFlightBytes>,
    drains: &'a TaskTracker,
    /// The app's `X-Request-ID`, or the one gpulink made.
    id: HeaderValue,
    /// Where the answer is counted: the endpoint of the last attempt (the one that
    /// answered, or the one whose failure gpulink answers with), or the route the
    /// request would have taken when there was no endpoint to try; `None` before routing.
    attribution: Option<Attribution>,
}

/// Serves one app request. Never fails: every error becomes a JSON answer, here.
pub async fn handle(forwarder: &Forwarder, request: Request<Incoming>) -> Response<ProxyBody> {
    let generation = forwarder.generations.get();
    let mut cx = Context {
        generation: &generation,
        metrics: &forwarder.metrics,
        in_flight: &forwarder.in_flight,
        drains: &forwarder.drains,
        id: request_id_for(request.headers()),
        attribution: None,
    };
    let span = tracing::info_span!(
        "request",
        id = %cx.id.to_str().unwrap_or("-"),
        path = %request.uri().path(),
    );
    let started = Instant::now();
    let result = journey(&mut cx, request).instrument(span.clone()).await;
    let (status, code) = match &result {
        Ok(response) => (response.status(), None),
        Err(error) => (error.status(), Some(error.code())),
    };
    cx.metrics
        .request_finished(status, code, cx.attribution.as_ref(), started.elapsed());
    let labels = cx.attribution.as_ref().map(Attribution::labels);
    forwarder
        .history
        .request_finished(&result, labels.as_deref(), started.elapsed());
    let _enter = span.enter();
    match result {
        Ok(response) => {
            tracing::info!(
                status = status.as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "relayed"
            );
            response
        }
        Err(error) => {
            let code = error.code().as_str();
            if status.is_server_error() {
                tracing::warn!(status = status.as_u16(), code, %error, "request failed");
            } else {
                tracing::info!(status = status.as_u16(), code, %error, "request refused");
            }
            error.into_response(Some(&cx.id))
        }
    }
}

/// The journey, phase by phase.
async fn journey(
    cx: &mut Context<'_>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let admitted = admit(cx, request).await?;
    let outbound = seal(cx, admitted).await?;
    let (endpoint, upstream) = dispatch(cx, &outbound).await?;
    // The reservation ends with the journey: the sealed copy is not needed once the
    // cluster answered.
    Ok(relay(cx, &endpoint, upstream))
}

// ---- 1. Admit ------------------------------------------------------------------------

/// A request admitted: its head (identity headers dropped), its model pool, its JSON
/// body, and the in-flight bytes it holds.
struct Admitted {
    parts: Parts,
    model_pool: String,
    plaintext: Bytes,
    held: Reservation,
}

async fn admit(cx: &Context<'_>, request: Request<Incoming>) -> Result<Admitted, ProxyError> {
    let (mut parts, body) = request.into_parts();
    let model_pool = match check_head(cx, &parts) {
        Ok(pool) => pool,
        Err(error) => {
            request_body::drain_in_background(body, cx.drains);
            return Err(error);
        }
    };
    let (plaintext, held) = read_body(cx, &parts, body).await?;
    check_json(&plaintext).map_err(ProxyError::InvalidJson)?;
    headers::sanitize_inbound(&mut parts.headers);
    Ok(Admitted {
        parts,
        model_pool,
        plaintext,
        held,
    })
}

/// The largest request head forwarded: target plus header names and values. Larger
/// heads are refused here, before KMS, rather than sealed and refused by the cluster.
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;

/// What the head must be, and the model pool it names: POST; an origin-form target (a
/// path; absolute-form `POST http://host/path` is accepted and forwarded as its path,
/// since gpulink always sends to the cluster whatever authority the app named; `*` and
/// anything else that is not a path is refused); a head of at most [`MAX_REQUEST_HEAD`]
/// bytes; an `X-Model-Pool` (if any) among the tenant's pools.
fn check_head(cx: &Context<'_>, parts: &Parts) -> Result<String, ProxyError> {
    if parts.method != Method::POST {
        return Err(ProxyError::MethodNotAllowed(parts.method.clone()));
    }
    if !parts.uri.path().starts_with('/') {
        return Err(ProxyError::TargetNotPath {
            target: parts.uri.to_string(),
        });
    }
    let size = target_len(&parts.uri)
        + parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size > MAX_REQUEST_HEAD {
        return Err(ProxyError::HeadersTooLarge {
            size,
            limit: MAX_REQUEST_HEAD,
        });
    }
    let tenant = &cx.generation.config.tenant;
    match parts.headers.get(X_MODEL_POOL) {
        None => Ok(tenant.model_pool.clone()),
        Some(value) => {
            let pool = value.to_str().unwrap_or("");
            if tenant.allows_pool(pool) {
                Ok(pool.to_string())
            } else {
                Err(ProxyError::ModelPoolNotAllowed(
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ))
            }
        }
    }
}

/// The whole body, within `listen.max_body` and its time bounds, with the memory it
/// holds reserved before it is held (the declared body and its sealed copy). A refused
/// body is drained when the client is still sending it, so that it reads the answer.
async fn read_body(
    cx: &Context<'_>,
    parts: &Parts,
    mut body: Incoming,
) -> Result<(Bytes, Reservation), ProxyError> {
    let limits = BodyLimits::new(&cx.generation.config.listen, &cx.generation.config.upstream);
    let declared_len = content_length(&parts.headers);
    // A client waiting for `100 Continue` has not sent the body: nothing to drain.
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if declared_len.is_some_and(|n| n > limits.max as u64) {
        if !expects_continue {
            request_body::drain_in_background(body, cx.drains);
        }
        return Err(ProxyError::BodyTooLarge { limit: limits.max });
    }
    let up_front = limits.needed_for(declared_len.unwrap_or(0));
    let Some(mut held) = cx.in_flight.try_reserve(up_front, limits.in_flight) else {
        if !expects_continue {
            request_body::refuse_for_budget(body, parts.version, cx.drains);
        }
        return Err(ProxyError::Overloaded(limits.in_flight));
    };
    match request_body::read_body(&mut body, &limits, declared_len, &mut held).await {
        Ok(plaintext) => Ok((plaintext, held)),
        Err(BodyError::Overloaded) => {
            request_body::refuse_for_budget(body, parts.version, cx.drains);
            Err(ProxyError::Overloaded(limits.in_flight))
        }
        Err(BodyError::TooLarge { limit }) => {
            request_body::drain_in_background(body, cx.drains);
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(error @ BodyError::TooSlow { .. }) => Err(ProxyError::BodyTimeout(error)),
        Err(BodyError::Read(error)) => Err(ProxyError::BodyRead(error)),
    }
}

/// The length of `uri` as it was written (`Uri`'s `Display`), without formatting it.
fn target_len(uri: &http::Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| q.len() + 1)
}

/// RFC 8259: JSON exchanged between systems is UTF-8. serde_json skips over the strings
/// of a document it only checks, invalid UTF-8 inside them included, hence both checks.
fn check_json(body: &[u8]) -> Result<(), JsonError> {
    std::str::from_utf8(body).map_err(JsonError::NotUtf8)?;
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(JsonError::Syntax)?;
    Ok(())
}

// ---- 2. Seal -------------------------------------------------------------------------

/// What goes to the cluster: the sealed body, the headers and the path.
struct Outbound {
    headers: HeaderMap,
    path: PathAndQuery,
    body: Bytes,
    /// The in-flight bytes, shrunk to the sealed copy.
    _held: Reservation,
}

/// Seals the body (fail closed: any failure is an error answer and nothing is sent) and
/// sets the tenant headers.
async fn seal(cx: &Context<'_>, admitted: Admitted) -> Result<Outbound, ProxyError> {
    let Admitted {
        parts,
        model_pool,
        plaintext,
        mut held,
    } = admitted;
    let started = Instant::now();
    let sealed = cx
        .generation
        .sealer
        .seal_bytes(&plaintext, &model_pool)
        .await;
    cx.metrics.seal_finished(&sealed, started.elapsed());
    let sealed = sealed?;
    drop(plaintext);
    held.shrink_to(sealed.body.len() as u64);
    let tenant = &cx.generation.config.tenant.id;
    let prebuilt = &cx.generation.tenant_headers;
    let headers = upstream_headers(
        parts.headers,
        &sealed,
        prebuilt,
        tenant,
        &model_pool,
        &cx.id,
    )?;
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Ok(Outbound {
        headers,
        path,
        body: sealed.body,
        _held: held,
    })
}

/// The headers the cluster receives: the app's end-to-end headers plus the tenant's,
/// from the values the generation made (`prebuilt`) where it has them.
fn upstream_headers(
    mut headers: HeaderMap,
    sealed: &Sealed,
    prebuilt: &headers::TenantHeaders,
    tenant_id: &str,
    model_pool: &str,
    request_id: &HeaderValue,
) -> Result<HeaderMap, ProxyError> {
    // The configuration's values are checked when it is loaded, so only the key id (from
    // KMS's answer) can fail here; the value is never echoed.
    let value = |header: &'static str, origin: &'static str, value: &str| {
        HeaderValue::from_str(value).map_err(|_| ProxyError::UnsendableHeader { header, origin })
    };
    let or_made = |made: Option<&HeaderValue>, header, origin, text| match made {
        Some(made) => Ok(made.clone()),
        None => value(header, origin, text),
    };
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        headers::X_TENANT_ID,
        or_made(prebuilt.tenant_id(), "X-Tenant-ID", "tenant.id", tenant_id)?,
    );
    headers.insert(
        headers::X_KMS_KEY_ID,
        or_made(
            prebuilt.key_arn(&sealed.key_arn),
            "X-KMS-Key-ID",
            "the key id KMS answered with",
            &sealed.key_arn,
        )?,
    );
    headers.insert(
        X_MODEL_POOL,
        or_made(
            prebuilt.model_pool(model_pool),
            "X-Model-Pool",
            "the model pool",
            model_pool,
        )?,
    );
    headers.insert(
        headers::X_ENCRYPTION_FORMAT,
        HeaderValue::from_static(sealed.format.as_str()),
    );
    headers.insert(X_REQUEST_ID, request_id.clone());
    Ok(headers)
}

// ---- 3. Dispatch ---------------------------------------------------------------------

/// Sends the request to the endpoints the plan allows, one attempt at a time, until one
/// answers or no attempt is left that is safe and allowed.
async fn dispatch(
    cx: &mut Context<'_>,
    outbound: &Outbound,
) -> Result<(Arc<Endpoint>, Upstream), ProxyError> {
    let generation = cx.generation;
    let now = chrono::Utc::now();
    let plan = generation.routes.plan(now, &mut generation.chooser.rng());
    // With no endpoint to try, an error still belongs to the route it would have taken.
    cx.attribution = plan.first_route().map(Attribution::Route);
    generation.retry_budget.record_request();
    let mut tries = Tries::new(generation.config.retry.max_attempts);
    while let Some((endpoint, retry)) = tries.next(generation, &plan) {
        cx.attribution = Some(Attribution::Endpoint(cx.metrics.series(&endpoint)));
        let uri = endpoint
            .uri_for(&outbound.path)
            .map_err(ProxyError::TargetNotForwardable)?;
        if retry {
            cx.metrics.upstream_retry();
        }
        if endpoint.kind() == crate::config::RouteKind::Privatelink {
            cx.metrics
                .privatelink_attempt(generation.host_zone.locality(&endpoint.config));
        }
        match attempt(cx, &endpoint, uri, outbound, now).await {
            Outcome::Answered(upstream) => return Ok((endpoint, upstream)),
            Outcome::Failed(failure) => tries.failed(&endpoint, failure)?,
            Outcome::NoCapacity => tries.no_capacity(&endpoint),
            Outcome::Broken(error) => return Err(ProxyError::Attempt(error)),
        }
    }
    Err(tries.into_error(generation, &plan))
}

/// How one attempt ended.
enum Outcome {
    /// Response headers to relay.
    Answered(Upstream),
    /// No response headers: retried when [`AttemptError::retryable`].
    Failed(AttemptError),
    /// `503 no_capacity`: the cluster did not start the work; safe to go elsewhere.
    NoCapacity,
    /// The cluster's 503 broke off while gpulink read it: never retried.
    Broken(AttemptError),
}

/// One attempt on `endpoint`, with its feedback to metrics, passive outlier detection
/// and the rollback monitor.
async fn attempt(
    cx: &Context<'_>,
    endpoint: &Arc<Endpoint>,
    uri: http::Uri,
    outbound: &Outbound,
    now: chrono::DateTime<chrono::Utc>,
) -> Outcome {
    let started = tokio::time::Instant::now();
    let upstream = match send(cx, endpoint, uri, outbound).await {
        Ok(upstream) => upstream,
        Err(failure) => {
            cx.metrics.upstream_failed(endpoint, failure.kind);
            // A refusal says nothing about the endpoint's health: not an outlier
            // failure, nor a PrivateLink error for the rollback monitor.
            if failure.endpoint_failed() {
                settle(cx.generation, endpoint, now, started, true);
            }
            return Outcome::Failed(failure);
        }
    };
    if upstream.response.status() != StatusCode::SERVICE_UNAVAILABLE {
        let failed = upstream.response.status().is_server_error();
        settle(cx.generation, endpoint, now, started, failed);
        return Outcome::Answered(upstream);
    }
    match check_no_capacity(endpoint, upstream).await {
        Capacity::Refused => Outcome::NoCapacity,
        Capacity::Relay(upstream) => {
            settle(cx.generation, endpoint, now, started, true);
            Outcome::Answered(upstream)
        }
        Capacity::Failed(error) => {
            settle(cx.generation, endpoint, now, started, true);
            Outcome::Broken(error)
        }
    }
}

/// A request's attempts so far, and what they allow next. Attempts count against
/// `retry.max_attempts` and (after the first) the retry budget, except those a
/// connection refused unprocessed because it was going away (GOAWAY, closed before
/// writing): the cluster did no work for them, so they are retried on a fresh
/// connection, bounded by [`MAX_CONNECTION_REFUSALS`] instead.
struct Tries {
    max: usize,
    attempts: usize,
    refusals: usize,
    /// The next retry is not charged to the budget (the last refusal was a connection
    /// going away).
    free_retry: bool,
    /// Endpoints not to choose again: those that failed, refused the stream or had no
    /// capacity. One whose connection was going away stays eligible.
    tried: Vec<Arc<Endpoint>>,
    /// Whether every attempt so far failed before the request was sent: then the last
    /// attempt falls through to a lower tier (see `route`'s "Fall-through across tiers").
    all_unsent: bool,
    last_error: Option<ProxyError>,
}

impl Tries {
    fn new(max_attempts: u32) -> Self {
        let max = max_attempts.max(1) as usize;
        Self {
            max,
            attempts: 0,
            refusals: 0,
            free_retry: false,
            tried: Vec::with_capacity(max),
            all_unsent: true,
            last_error: None,
        }
    }

    /// The endpoint for the next attempt and whether it is a retry; `None` when the
    /// attempts or the retry budget are spent, or no endpoint is left.
    fn next(&mut self, generation: &Generation, plan: &Plan<'_>) -> Option<(Arc<Endpoint>, bool)> {
        if self.attempts >= self.max {
            return None;
        }
        let retry = self.attempts + self.refusals > 0;
        let charged = retry && !std::mem::take(&mut self.free_retry);
        if charged && !generation.retry_budget.try_retry() {
            tracing::warn!("retry budget spent (retry.budget_percent); not retrying");
            return None;
        }
        let last_attempt = self.attempts + 1 == self.max;
        let mut rng = generation.chooser.rng();
        let chosen = if last_attempt && self.all_unsent && !self.tried.is_empty() {
            plan.select_fall_through(&self.tried, &mut rng)
        } else {
            plan.select(&self.tried, &mut rng)
        };
        chosen.map(|endpoint| (endpoint, retry))
    }

    /// Books a failed attempt; the error to answer with when no retry is allowed.
    fn failed(
        &mut self,
        endpoint: &Arc<Endpoint>,
        failure: AttemptError,
    ) -> Result<(), ProxyError> {
        self.free_retry = failure.connection_going_away();
        if self.free_retry {
            self.refusals += 1;
        } else {
            self.attempts += 1;
            self.tried.push(endpoint.clone());
        }
        let exhausted = self.refusals > MAX_CONNECTION_REFUSALS;
        if !failure.retryable() || exhausted {
            return Err(ProxyError::Attempt(failure));
        }
        tracing::warn!(endpoint = %endpoint.authority, error = %failure, "the request was not sent; retrying");
        self.last_error = Some(ProxyError::Attempt(failure));
        Ok(())
    }

    fn no_capacity(&mut self, endpoint: &Arc<Endpoint>) {
        self.attempts += 1;
        self.all_unsent = false;
        tracing::info!(endpoint = %endpoint.authority, "endpoint has no capacity (503 no_capacity); trying another");
        self.tried.push(endpoint.clone());
        self.last_error = Some(ProxyError::NoEndpoint(NoEndpoint::NoCapacity {
            last: endpoint.authority.clone(),
        }));
    }

    /// The answer when no attempt succeeded: the last attempt's error, or why no
    /// endpoint could be tried.
    fn into_error(self, generation: &Generation, plan: &Plan<'_>) -> ProxyError {
        self.last_error.unwrap_or_else(|| {
            ProxyError::NoEndpoint(NoEndpoint::NoneServes {
                phase: generation.routes.phase().as_str(),
                configured: !plan.is_empty(),
                why: plan.why_none_serve(),
            })
        })
    }
}

/// How many times one request may be refused by connections going away (GOAWAY, or
/// closed before the request was written) before it fails. Each refusal costs the
/// cluster nothing; the bound keeps a server that refuses everything from holding a
/// request in a loop. Far above what rotation produces: a retry lands early on a fresh
/// connection, so repeated refusals are rare even with nginx `keepalive_requests = 5`.
const MAX_CONNECTION_REFUSALS: usize = 10;

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

/// A response with headers, the connection it came over, and what must live as long as
/// its body: the in-flight guard and the pooled connection's lease.
struct Upstream {
    response: Response<ProxyBody>,
    peer: Arc<ConnectedPeer>,
    guard: crate::upstream::InFlightGuard,
    lease: Lease,
}

async fn send(
    cx: &Context<'_>,
    endpoint: &Arc<Endpoint>,
    uri: http::Uri,
    outbound: &Outbound,
) -> Result<Upstream, AttemptError> {
    let upstream = &cx.generation.config.upstream;
    let mut request = Request::new(Full::new(outbound.body.clone()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = outbound.headers.clone();

    let guard = endpoint.start_request();
    let started = tokio::time::Instant::now();
    let timeout = upstream.request_timeout.get();
    match pooled(endpoint, request, timeout).await {
        Ok(Ok(Pooled {
            response,
            peer,
            lease,
        })) => {
            let mut latency = started.elapsed();
            if peer.established >= started {
                latency = latency.saturating_sub(peer.setup);
            }
            endpoint.record_latency(latency);
            cx.metrics.upstream_response(endpoint, latency);
            let idle = upstream.idle_timeout.get();
            // The idle bound starts with the body: the first byte may take as long as
            // the generation needs, each later silence at most `idle_timeout`.
            let response = response.map(|body| IdleTimeoutBody::new(body, idle).boxed());
            Ok(Upstream {
                response,
                peer,
                guard,
                lease,
            })
        }
        Ok(Err(error)) => Err(classify(error, endpoint)),
        Err(_) => Err(attempt_error(
            endpoint,
            AttemptKind::NoResponseHeaders { timeout },
            None,
        )),
    }
}

fn attempt_error(
    endpoint: &Endpoint,
    kind: AttemptKind,
    cause: Option<crate::body::BoxError>,
) -> AttemptError {
    AttemptError {
        kind,
        endpoint: endpoint.authority.clone(),
        region: endpoint.region().to_string(),
        cause,
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
    Failed(AttemptError),
}

async fn check_no_capacity(endpoint: &Endpoint, upstream: Upstream) -> Capacity {
    let Upstream {
        response,
        peer,
        guard,
        lease,
    } = upstream;
    let (mut parts, mut body) = response.into_parts();
    let mut peeked = bytes::BytesMut::new();
    // How the peek ended: the whole body read, more than the peek holds (with the data
    // frame that did not fit), or the body failed.
    enum Peek {
        Whole,
        Longer(Bytes),
        Failed(crate::body::BoxError),
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
            Some(Err(error)) => break Peek::Failed(error),
        }
    };
    let peeked = peeked.freeze();
    let body = match peek {
        Peek::Failed(error) => {
            // Never relay a 503 cut short: its Content-Length would promise bytes that
            // never come. The cluster may have started the request: not retried.
            return Capacity::Failed(attempt_error(
                endpoint,
                AttemptKind::AnswerBrokeOff,
                Some(error),
            ));
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
            return Capacity::Relay(Upstream {
                response,
                peer,
                guard,
                lease,
            });
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
        Capacity::Relay(Upstream {
            response,
            peer,
            guard,
            lease,
        })
    }
}

/// The pool's answer within `timeout`. What went wrong is remembered on the endpoint for
/// `/status`, and a connect or TLS failure takes its data path out at once, so that the
/// next selection (this request's retry included) skips it.
async fn pooled(
    endpoint: &Endpoint,
    request: Request<Full<Bytes>>,
    timeout: std::time::Duration,
) -> Result<Result<Pooled, SendError>, tokio::time::error::Elapsed> {
    let result = tokio::time::timeout(timeout, endpoint.pool().send(request)).await;
    match &result {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            let diagnosis = error
                .connect_error()
                .map(|e| health::data_path_failed_by_request(endpoint, e));
            endpoint.record_request_error(Causes(Some(error)).to_string(), diagnosis.as_ref());
        }
        Err(_) => endpoint.record_request_error(
            format!("no response headers within {timeout:?} (upstream.request_timeout)"),
            None,
        ),
    }
    result
}

/// 4. Relay: the cluster's answer as a stream, with gpulink's headers added.
fn relay(cx: &Context<'_>, endpoint: &Endpoint, upstream: Upstream) -> Response<ProxyBody> {
    let Upstream {
        response,
        peer,
        guard,
        lease,
    } = upstream;
    let dialed = peer.header.clone();
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        X_GPULINK_ROUTE,
        HeaderValue::from_static(endpoint.kind().as_str()),
    );
    parts.headers.insert(X_GPULINK_ENDPOINT, dialed);
    parts.headers.insert(X_REQUEST_ID, cx.id.clone());
    parts.extensions.clear();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        parts.status = StatusCode::BAD_GATEWAY;
    }
    // The guard rides in the body so the endpoint counts the request as in flight until
    // the last byte is relayed; the lease too, so an HTTP/1.1 connection goes back to
    // the pool only once its response is done (the closure drops after the body).
    let body = body
        .map_frame(move |frame| {
            let _in_flight = (&guard, &lease);
            frame
        })
        .boxed();
    Response::from_parts(parts, body)
}

/// The app's `X-Request-ID` when it is 1..=128 visible ASCII characters, else a new UUIDv4.
fn request_id_for(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| headers::valid_request_id(v.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// A fresh UUIDv4 from the thread's RNG (a CSPRNG seeded from the OS, reseeded every
/// 64 KiB of output), formatted on the stack: no `getrandom` syscall and no `String` per
/// request, as `Uuid::new_v4` would cost. A request id needs to be unique, not secret.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// What a failed attempt means, from the pool's error and its causes.
fn classify(error: SendError, endpoint: &Endpoint) -> AttemptError {
    let kind = match never_sent(&error) {
        Some(why) => AttemptKind::NotSent(why),
        None => AttemptKind::FailedAfterSend,
    };
    attempt_error(endpoint, kind, Some(Box::new(error)))
}

/// Whether, and why, the cluster cannot have processed the request:
///
/// * the connection (TCP or TLS) was never established;
/// * HTTP/2 said so: a stream above the last-stream-id of the server's GOAWAY, or one
///   opened after the GOAWAY arrived (h2 fails both with the GOAWAY as a remote error,
///   and only those: streams the server may have processed end with an I/O or reset
///   error), or RST_STREAM with REFUSED_STREAM (RFC 9113 6.8, 8.7);
/// * hyper handed it back unwritten: a fresh connection closed before the request was
///   written (the pool already retries those on a reused connection by itself, as the
///   legacy client did).
fn never_sent(error: &SendError) -> Option<NotSent> {
    match error {
        SendError::Connect(_) => return Some(NotSent::Unreachable),
        SendError::Canceled(_) => return Some(NotSent::Unprocessed(Unprocessed::Closed)),
        SendError::Send(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_len_is_the_written_length() {
        for target in [
            "/",
            "/inference",
            "/inference?model=a&x=1",
            "http://example.com/inference?q",
            "http://example.com:8080/",
            "https://user@example.com/a/b",
        ] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(target_len(&uri), uri.to_string().len(), "{target}");
        }
    }

    #[test]
    fn new_request_ids_are_distinct_uuid_v4s() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        for id in [a, b] {
            let text = id.to_str().unwrap();
            let parsed = uuid::Uuid::parse_str(text).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(parsed.hyphenated().to_string(), text);
        }
    }

    fn sealed(key_arn: &str) -> Sealed {
        Sealed {
            body: Bytes::from_static(b"sealed"),
            format: crate::seal::WireFormat::KmsDirectV1,
            key_arn: key_arn.into(),
            cache_hit: None,
        }
    }

    #[test]
    fn the_tenant_headers_replace_the_apps() {
        let mut app = HeaderMap::new();
        app.insert("x-app", HeaderValue::from_static("kept"));
        app.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let id = HeaderValue::from_static("req-1");
        let tenant = crate::config::Tenant {
            id: "t1".into(),
            model_pool: "pool-a".into(),
            model_pools: vec!["pool-a".into()],
        };
        // The values made per request and those the generation made are the same.
        for prebuilt in [
            headers::TenantHeaders::default(),
            headers::TenantHeaders::new(&tenant, "arn:aws:kms:k"),
        ] {
            let headers = upstream_headers(
                app.clone(),
                &sealed("arn:aws:kms:k"),
                &prebuilt,
                "t1",
                "pool-a",
                &id,
            )
            .expect("valid values");
            assert_eq!(headers["x-app"], "kept");
            assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
            assert_eq!(headers[headers::X_TENANT_ID], "t1");
            assert_eq!(headers[headers::X_KMS_KEY_ID], "arn:aws:kms:k");
            assert_eq!(headers[X_MODEL_POOL], "pool-a");
            assert_eq!(headers[X_REQUEST_ID], "req-1");
        }
    }

    #[test]
    fn a_key_id_that_cannot_be_a_header_is_an_internal_error_not_a_kms_outage() {
        let id = HeaderValue::from_static("req-1");
        let error = upstream_headers(
            HeaderMap::new(),
            &sealed("arn:aws:kms:\nsecret-ish"),
            &headers::TenantHeaders::default(),
            "t1",
            "pool-a",
            &id,
        )
        .expect_err("a newline is not a header value");
        assert_eq!(error.code(), crate::error::Code::InternalError);
        let message = error.to_string();
        assert!(message.contains("X-KMS-Key-ID"), "{message}");
        assert!(!message.contains("secret-ish"), "{message}");
    }

    #[test]
    fn a_connection_never_made_is_never_sent_and_says_so() {
        let error = SendError::Connect(crate::upstream::connector::ConnectError::NoAddress {
            host: "eni.example".into(),
        });
        assert!(matches!(never_sent(&error), Some(NotSent::Unreachable)));
        // The legacy client's wording, with the connector's cause, as `/status` showed it.
        let text = Causes(Some(&error)).to_string();
        assert_eq!(
            text,
            "client error (Connect): eni.example resolved to no address"
        );
    }

    #[test]
    fn json_must_be_utf8_and_well_formed() {
        assert!(check_json(br#"{"prompt": "hi"}"#).is_ok());
        let not_utf8 = check_json(b"{\"prompt\": \"\xff\"}").expect_err("invalid UTF-8");
        assert!(matches!(not_utf8, JsonError::NotUtf8(_)));
        assert!(not_utf8.to_string().contains("byte 12"), "{not_utf8}");
        assert!(matches!(check_json(b"{"), Err(JsonError::Syntax(_))));
    }
}
