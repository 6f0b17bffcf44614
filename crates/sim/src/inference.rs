//! The cluster's inference API as the simulator plays it: `POST` (any path) with a sealed
//! body and the tenant headers. The handler checks what a real cluster would (the body
//! is sealed, it opens under the tenant's encryption context) and answers like one, so
//! that the tests can tell from the cluster's side whether the proxy did its job.
//!
//! The order of the checks matters to the counters: the failure states come first (a
//! blackholed request never gets an answer), the body is always inspected for plaintext
//! (a leak is a leak whatever the state), and `full` refuses before the request counts
//! as delivered, because the proxy is allowed to retry it.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, Hangup, InFlight};
use super::{error_response, json_response, EndpointState, Reject, Shared, MAX_SEALED_BODY};
use gpulink::body::{BoxError, ProxyBody};
use gpulink::headers::{
    X_ENCRYPTION_FORMAT, X_KMS_KEY_ID, X_MODEL_POOL, X_REGION, X_REQUEST_ID, X_TENANT_ID,
};
use gpulink::seal::esdk;
use gpulink::seal::{
    EncryptionContext, KeyService, FORMAT_AWS_ESDK, FORMAT_KMS_DIRECT, PROVIDER_ID_AWS_KMS,
};
use zeroize::Zeroizing;

/// The canned model output.
const OUTPUT: &str = "Hello from the simulated cluster";
/// Most events in a streamed answer.
const MAX_STREAM_TOKENS: u64 = 20;

/// Handles one inference request. An `Err` hangs up without an answer.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Hangup> {
    endpoint.count(|c| &c.requests);
    let in_flight = InFlight::new(endpoint.clone());
    let request_id = header_text(request.headers(), &X_REQUEST_ID).map(str::to_owned);

    if request.method() != Method::POST {
        return Ok(crate::method_not_allowed(
            "POST",
            "the inference API takes POST",
        ));
    }

    match endpoint.state() {
        EndpointState::Blackhole => return hold(&shared, &endpoint, request_id.as_deref()).await,
        // Only a request on a connection opened before the port closed gets here.
        EndpointState::Down
        | EndpointState::InferenceRefused
        | EndpointState::InferenceFiltered => return Err(Hangup::refused()),
        EndpointState::Slow { delay_ms } => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        EndpointState::Healthy | EndpointState::Full | EndpointState::Failing => {}
    }

    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_SEALED_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("the cluster accepts sealed bodies of at most {MAX_SEALED_BODY} bytes"),
            ));
        }
        Err(error) => return Err(Hangup::Body(error.to_string())),
    };
    shared.capture.keep(&body);

    // An unsealed body is the leak the tests look for, so it is counted in every state.
    let plaintext = serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
    if plaintext {
        endpoint.count(|c| &c.plaintext_seen);
        tracing::warn!(endpoint = %endpoint.config.ip, "received an unsealed JSON body");
    }

    // Read again: the state may have changed while the body arrived. A request already
    // being served when the endpoint goes down is finished, as a draining ENI does.
    match endpoint.state() {
        EndpointState::Blackhole => return hold(&shared, &endpoint, request_id.as_deref()).await,
        EndpointState::Full => {
            return Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_capacity",
                "no GPU capacity is available on this endpoint; the request was not started",
            ));
        }
        _ => {}
    }

    if let Some(id) = &request_id {
        shared.record_delivery(id);
    }
    if endpoint.state() == EndpointState::Failing {
        return Ok(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the simulated endpoint is failing",
        ));
    }
    if plaintext {
        return Ok(error_response(
            StatusCode::BAD_REQUEST,
            "plaintext_body",
            "the body is unsealed JSON; the cluster accepts only KMS-sealed bodies",
        ));
    }

    let headers = match TenantHeaders::read(&parts.headers) {
        Ok(headers) => headers,
        Err(reject) => return Ok(reject.into_response()),
    };
    let TenantHeaders {
        tenant,
        model_pool,
        key_id,
        format,
        content_type,
    } = headers;

    let opened = if shared.skip_open {
        None
    } else {
        let mut context = EncryptionContext::new();
        context.insert("tenant_id".into(), tenant.to_string());
        context.insert("model_pool".into(), model_pool.to_string());
        match open(
            &shared.keys,
            &shared.data_keys,
            format,
            key_id,
            &body,
            &context,
        )
        .await
        {
            Ok(opened) => Some(opened),
            Err(OpenError::UnsupportedFormat) => {
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    "unsupported_format",
                    &format!(
                        "X-Encryption-Format `{format}` is not supported here; use {FORMAT_KMS_DIRECT} or {FORMAT_AWS_ESDK}"
                    ),
                ));
            }
            Err(OpenError::Decrypt) => {
                endpoint.count(|c| &c.decrypt_failures);
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    "decrypt_failed",
                    "the body could not be opened under the tenant's encryption context",
                ));
            }
        }
    };
    if opened.as_ref().is_some_and(|o| o.context_none) {
        endpoint.count(|c| &c.context_none);
    }

    let summary = Summary {
        endpoint: &endpoint,
        tenant,
        model_pool,
        key_id,
        format,
        content_type,
        request_id: request_id.as_deref(),
    };
    let response = match opened {
        Some(opened) => match stream_tokens(&opened.plaintext) {
            Some(tokens) => stream_response(&endpoint, tokens, in_flight),
            None => summary.json(Some(&opened.plaintext), body.len()),
        },
        None => summary.json(None, body.len()),
    };
    endpoint.count(|c| &c.ok);
    Ok(response)
}

/// A blackhole swallows the request: it has been delivered (the cluster may have started
/// it, so the proxy must not replay it) but is never answered.
async fn hold(
    shared: &Shared,
    endpoint: &Endpoint,
    request_id: Option<&str>,
) -> Result<Response<ProxyBody>, Hangup> {
    if let Some(id) = request_id {
        shared.record_delivery(id);
    }
    endpoint.until_not_blackholed().await;
    Err(Hangup::Blackholed)
}

fn header_text<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

fn required<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    code: &'static str,
) -> Result<&'a str, Reject> {
    header_text(headers, name).ok_or_else(|| {
        Reject::bad_request(
            code,
            format!("the {name} header is missing or not visible ASCII"),
        )
    })
}

/// The headers that bind a request to a tenant; all are required.
struct TenantHeaders<'a> {
    tenant: &'a str,
    model_pool: &'a str,
    key_id: &'a str,
    format: &'a str,
    content_type: Option<&'a str>,
}

impl<'a> TenantHeaders<'a> {
    fn read(headers: &'a HeaderMap) -> Result<Self, Reject> {
        let tenant = required(headers, &X_TENANT_ID, "missing_tenant_id")?;
        let model_pool = required(headers, &X_MODEL_POOL, "missing_model_pool")?;
        // Required like the real cluster requires it, though the key is not needed to
        // open: a KMS ciphertext names its key itself.
        let key_id = required(headers, &X_KMS_KEY_ID, "missing_kms_key_id")?;
        let format = required(headers, &X_ENCRYPTION_FORMAT, "missing_encryption_format")?;
        Ok(Self {
            tenant,
            model_pool,
            key_id,
            format,
            content_type: header_text(headers, &http::header::CONTENT_TYPE),
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("unsupported encryption format")]
    UnsupportedFormat,
    #[error("the body could not be opened")]
    Decrypt,
}

struct Opened {
    plaintext: Vec<u8>,
    /// Opened only with an empty encryption context (the proxy's `kms.context = "none"`).
    context_none: bool,
}

/// Opens a sealed body by its `X-Encryption-Format`.
async fn open(
    keys: &KeyService,
    data_keys: &OpenedDataKeys,
    format: &str,
    key_id: &str,
    body: &[u8],
    context: &EncryptionContext,
) -> Result<Opened, OpenError> {
    match format {
        FORMAT_KMS_DIRECT => open_kms_direct(keys, body, context).await,
        FORMAT_AWS_ESDK => open_esdk(keys, data_keys, key_id, body, context).await,
        _ => Err(OpenError::UnsupportedFormat),
    }
}

/// KMS `Decrypt` under the tenant's context; failing that, under no context, which is
/// how the guide's own example seals (and the proxy's `kms.context = "none"`).
async fn open_kms_direct(
    keys: &KeyService,
    body: &[u8],
    context: &EncryptionContext,
) -> Result<Opened, OpenError> {
    if let Ok(plaintext) = keys.decrypt(body, context).await {
        return Ok(Opened {
            plaintext,
            context_none: false,
        });
    }
    match keys.decrypt(body, &EncryptionContext::new()).await {
        Ok(plaintext) => Ok(Opened {
            plaintext,
            context_none: true,
        }),
        Err(error) => {
            tracing::debug!(%error, "a kms-direct body did not open");
            Err(OpenError::Decrypt)
        }
    }
}

/// Opens an AWS Encryption SDK v2 message as the cluster's decryptor does:
///
/// 1. parse the header; its encryption context must equal the one the tenant headers
///    give (or be empty, the proxy's `kms.context = "none"`);
/// 2. take the `aws-kms` encrypted data keys whose provider info is the request's
///    `X-KMS-Key-ID`, as an official ESDK in strict mode only uses its configured key ARN;
/// 3. KMS `Decrypt` the data key under the header's context (or take it from the cache
///    of data keys already opened);
/// 4. verify the key commitment, the header and every frame while decrypting.
async fn open_esdk(
    keys: &KeyService,
    data_keys: &OpenedDataKeys,
    key_id: &str,
    body: &[u8],
    context: &EncryptionContext,
) -> Result<Opened, OpenError> {
    let header = esdk::parse_header(body).map_err(|error| {
        tracing::debug!(%error, "an aws-esdk body has no valid header");
        OpenError::Decrypt
    })?;
    let context_none = if header.context == *context {
        false
    } else if header.context.is_empty() {
        true
    } else {
        tracing::debug!("an aws-esdk body's encryption context differs from the tenant headers");
        return Err(OpenError::Decrypt);
    };
    let candidates = header.edks.iter().filter(|edk| {
        edk.provider_id == PROVIDER_ID_AWS_KMS && edk.provider_info == key_id.as_bytes()
    });
    for edk in candidates {
        let data_key = match data_keys.get(&edk.ciphertext, &header.context) {
            Some(data_key) => data_key,
            None => match keys.decrypt(&edk.ciphertext, &header.context).await {
                Ok(plaintext) => {
                    let plaintext = Zeroizing::new(plaintext);
                    let Ok(bytes) = <[u8; 32]>::try_from(plaintext.as_slice()) else {
                        tracing::debug!("an aws-esdk data key is not 32 bytes");
                        continue;
                    };
                    let data_key = Arc::new(Zeroizing::new(bytes));
                    data_keys.insert(&edk.ciphertext, &header.context, data_key.clone());
                    data_key
                }
                Err(error) => {
                    tracing::debug!(%error, "an aws-esdk data key did not open");
                    continue;
                }
            },
        };
        return match esdk::decrypt(&data_key, &header, body) {
            Ok(plaintext) => Ok(Opened {
                plaintext,
                context_none,
            }),
            Err(error) => {
                tracing::debug!(%error, "an aws-esdk body did not open");
                Err(OpenError::Decrypt)
            }
        };
    }
    tracing::debug!("no aws-kms data key in the message could be opened with the request's key");
    Err(OpenError::Decrypt)
}

/// Most data keys [`OpenedDataKeys`] remembers; the oldest is forgotten first. The proxy
/// uses one data key per context for many requests, so a few are plenty.
const MAX_OPENED_DATA_KEYS: usize = 1024;

/// Data keys the simulator has opened through KMS, by encrypted data key and context
/// (the context is part of the key because KMS binds it: the same EDK under another
/// context must not open). Keys are zeroized when forgotten.
#[derive(Default)]
pub(crate) struct OpenedDataKeys {
    inner: Mutex<OpenedInner>,
}

type OpenedKey = (Vec<u8>, EncryptionContext);

#[derive(Default)]
struct OpenedInner {
    keys: HashMap<OpenedKey, Arc<Zeroizing<[u8; 32]>>>,
    order: VecDeque<OpenedKey>,
}

impl OpenedDataKeys {
    fn get(&self, edk: &[u8], context: &EncryptionContext) -> Option<Arc<Zeroizing<[u8; 32]>>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // A clone of the lookup key is cheap next to a KMS call; the map holds few keys.
        inner.keys.get(&(edk.to_vec(), context.clone())).cloned()
    }

    fn insert(&self, edk: &[u8], context: &EncryptionContext, key: Arc<Zeroizing<[u8; 32]>>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let id = (edk.to_vec(), context.clone());
        if inner.keys.insert(id.clone(), key).is_none() {
            inner.order.push_back(id);
        }
        while inner.order.len() > MAX_OPENED_DATA_KEYS {
            if let Some(oldest) = inner.order.pop_front() {
                inner.keys.remove(&oldest);
            }
        }
    }
}

/// The opt-in test hook behind [`super::Sim::capture_bodies`]: off by default, so a
/// simulator never holds on to bodies unless a test asks it to.
#[derive(Default)]
pub(crate) struct BodyCapture {
    on: AtomicBool,
    last: Mutex<Option<Bytes>>,
}

impl BodyCapture {
    pub(crate) fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
        if !on {
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    pub(crate) fn last(&self) -> Option<Bytes> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn keep(&self, body: &Bytes) {
        if self.on.load(Ordering::SeqCst) {
            // A reference-counted handle: the body is not copied.
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(body.clone());
        }
    }
}

/// What a successful answer reports about the request.
struct Summary<'a> {
    endpoint: &'a Endpoint,
    tenant: &'a str,
    model_pool: &'a str,
    key_id: &'a str,
    format: &'a str,
    content_type: Option<&'a str>,
    request_id: Option<&'a str>,
}

impl Summary<'_> {
    /// The JSON answer; with `skip_open` there is no plaintext, so `bytes` is the sealed
    /// size and `sha256` is null.
    fn json(&self, plaintext: Option<&[u8]>, sealed_len: usize) -> Response<ProxyBody> {
        let (bytes, sha256) = match plaintext {
            Some(p) => (p.len(), Some(hex_sha256(p))),
            None => (sealed_len, None),
        };
        let body = serde_json::json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "region": self.endpoint.config.region,
            "endpoint": self.endpoint.tls_addr().to_string(),
            "tenant_id": self.tenant,
            "model_pool": self.model_pool,
            "key_id": self.key_id,
            "content_type": self.content_type,
            "request_id": self.request_id,
            "format": self.format,
            "opened": plaintext.is_some(),
            "bytes": bytes,
            "sha256": sha256,
            "output": OUTPUT,
        });
        let mut response = json_response(StatusCode::OK, &body);
        add_region(&mut response, self.endpoint);
        response
    }
}

fn add_region(response: &mut Response<ProxyBody>, endpoint: &Endpoint) {
    if let Ok(region) = HeaderValue::from_str(&endpoint.config.region) {
        response.headers_mut().insert(X_REGION, region);
    }
}

fn hex_sha256(data: &[u8]) -> String {
    use std::fmt::Write;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// `Some(n)` when the opened request asks for a stream: `{"stream": true, "max_tokens": n}`.
/// How a streamed answer is generated: the token count, and the pause before each
/// token after the first (`"token_delay_ms"` in the request: a slow generation, to test
/// the proxy's idle timeout; capped so a request cannot pin the simulator).
#[derive(Debug, Clone, Copy)]
struct StreamPlan {
    tokens: u64,
    delay: Duration,
}

/// Longest pause a request may ask for between tokens.
const MAX_TOKEN_DELAY: Duration = Duration::from_secs(10);

fn stream_tokens(plaintext: &[u8]) -> Option<StreamPlan> {
    let request: serde_json::Value = serde_json::from_slice(plaintext).ok()?;
    if request.get("stream").and_then(serde_json::Value::as_bool) != Some(true) {
        return None;
    }
    let max_tokens = request
        .get("max_tokens")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(MAX_STREAM_TOKENS);
    let delay = request
        .get("token_delay_ms")
        .and_then(serde_json::Value::as_u64)
        .map_or(Duration::ZERO, Duration::from_millis)
        .min(MAX_TOKEN_DELAY);
    Some(StreamPlan {
        tokens: max_tokens.min(MAX_STREAM_TOKENS),
        delay,
    })
}

/// Server-sent events, one frame per token, so that the proxy's relay is exercised as a
/// stream. The request stays in flight until the last event is sent (or the client
/// goes away and the channel closes).
fn stream_response(
    endpoint: &Endpoint,
    plan: StreamPlan,
    in_flight: InFlight,
) -> Response<ProxyBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let _in_flight = in_flight;
        for token in 0..plan.tokens {
            if token > 0 && !plan.delay.is_zero() {
                tokio::time::sleep(plan.delay).await;
            }
            let event = format!("data: {{\"token\": {token}}}\n\n");
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut response = Response::new(ChannelBody { rx }.boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    add_region(&mut response, endpoint);
    response
}

/// A body fed by a channel: each message is one data frame.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            hex_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn stream_requests() {
        let tokens = |body: &[u8]| stream_tokens(body).map(|plan| plan.tokens);
        assert_eq!(tokens(br#"{"stream":true,"max_tokens":5}"#), Some(5));
        assert_eq!(tokens(br#"{"stream":true,"max_tokens":500}"#), Some(20));
        assert_eq!(tokens(br#"{"stream":true}"#), Some(20));
        assert_eq!(tokens(br#"{"stream":false}"#), None);
        assert_eq!(tokens(b"not json"), None);
        let delay = stream_tokens(br#"{"stream":true,"token_delay_ms":99999}"#).map(|p| p.delay);
        assert_eq!(delay, Some(MAX_TOKEN_DELAY));
    }
}
