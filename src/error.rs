//! The errors gpulink answers the app with. Each has a stable [`Code`] (the contract in
//! `docs/design.md`), the HTTP status that goes with it, and a message the app's operator
//! can act on. Causes are carried as typed values and rendered by `Display` when the
//! answer is made, once, at the edge ([`ProxyError::into_response`]). They are always sent
//! as `{"error": {"code": "...", "message": "..."}}`.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{BodyError, BoxError, ProxyBody, ProxyBodyExt};
use crate::seal::{KeyError, SealError};

/// The stable `error.code` of every answer gpulink makes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    MethodNotAllowed,
    InvalidJson,
    ModelPoolNotAllowed,
    BodyTooLarge,
    BadRequest,
    BodyTimeout,
    Overloaded,
    HeadersTooLarge,
    KmsUnavailable,
    NoEndpoint,
    UpstreamConnect,
    UpstreamTimeout,
    InternalError,
}

impl Code {
    /// Every code, for the metrics' zero series and the docs' table.
    pub const ALL: [Code; 13] = [
        Code::MethodNotAllowed,
        Code::InvalidJson,
        Code::ModelPoolNotAllowed,
        Code::BodyTooLarge,
        Code::BadRequest,
        Code::BodyTimeout,
        Code::Overloaded,
        Code::HeadersTooLarge,
        Code::KmsUnavailable,
        Code::NoEndpoint,
        Code::UpstreamConnect,
        Code::UpstreamTimeout,
        Code::InternalError,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Code::MethodNotAllowed => "method_not_allowed",
            Code::InvalidJson => "invalid_json",
            Code::ModelPoolNotAllowed => "model_pool_not_allowed",
            Code::BodyTooLarge => "body_too_large",
            Code::BadRequest => "bad_request",
            Code::BodyTimeout => "body_timeout",
            Code::Overloaded => "overloaded",
            Code::HeadersTooLarge => "headers_too_large",
            Code::KmsUnavailable => "kms_unavailable",
            Code::NoEndpoint => "no_endpoint",
            Code::UpstreamConnect => "upstream_connect",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::InternalError => "internal_error",
        }
    }

    /// Each code has exactly one status.
    pub const fn status(self) -> StatusCode {
        match self {
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::InvalidJson | Code::ModelPoolNotAllowed | Code::BadRequest => {
                StatusCode::BAD_REQUEST
            }
            Code::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Code::Overloaded | Code::KmsUnavailable | Code::NoEndpoint => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Code::UpstreamConnect => StatusCode::BAD_GATEWAY,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("method {0} is not allowed; send the inference request with POST")]
    MethodNotAllowed(http::Method),
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(#[source] JsonError),
    #[error("X-Model-Pool {0:?} is not one of this tenant's model pools")]
    ModelPoolNotAllowed(String),
    #[error("the body is larger than listen.max_body ({limit} bytes)")]
    BodyTooLarge { limit: usize },
    /// The body fits `listen.max_body` but not the format or `upstream.max_body`.
    #[error("{0}")]
    SealedTooLarge(#[source] SealError),
    #[error("the request body could not be read: {0}")]
    BodyRead(#[source] hyper::Error),
    /// The target is not a path (`POST *`): gpulink forwards paths only.
    #[error("the request target {target:?} is not a path; send POST /inference")]
    TargetNotPath { target: String },
    #[error("the request target cannot be forwarded: {0}")]
    TargetNotForwardable(#[source] http::Error),
    #[error("the request head is {size} bytes, over gpulink's limit of {limit} bytes")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("{0}; the connection is closed")]
    BodyTimeout(#[source] BodyError),
    #[error("gpulink holds as many request body bytes as it may (listen.max_in_flight_bytes = {0} bytes); nothing was sent, retry shortly")]
    Overloaded(u64),
    #[error("encryption failed, nothing was sent: {0}")]
    KmsUnavailable(#[source] KeyError),
    /// A tenant header's value cannot be sent. The value is never echoed: the key id
    /// comes from KMS's answer.
    #[error("gpulink cannot send the {header} header: {origin} is not a valid HTTP header value; nothing was sent")]
    UnsendableHeader {
        header: &'static str,
        origin: &'static str,
    },
    #[error("{0}")]
    NoEndpoint(NoEndpoint),
    #[error(transparent)]
    Attempt(AttemptError),
}

impl ProxyError {
    pub fn code(&self) -> Code {
        match self {
            ProxyError::MethodNotAllowed(_) => Code::MethodNotAllowed,
            ProxyError::InvalidJson(_) => Code::InvalidJson,
            ProxyError::ModelPoolNotAllowed(_) => Code::ModelPoolNotAllowed,
            ProxyError::BodyTooLarge { .. } | ProxyError::SealedTooLarge(_) => Code::BodyTooLarge,
            ProxyError::BodyRead(_)
            | ProxyError::TargetNotPath { .. }
            | ProxyError::TargetNotForwardable(_) => Code::BadRequest,
            ProxyError::HeadersTooLarge { .. } => Code::HeadersTooLarge,
            ProxyError::BodyTimeout(_) => Code::BodyTimeout,
            ProxyError::Overloaded(_) => Code::Overloaded,
            ProxyError::KmsUnavailable(_) => Code::KmsUnavailable,
            ProxyError::UnsendableHeader { .. } => Code::InternalError,
            ProxyError::NoEndpoint(_) => Code::NoEndpoint,
            ProxyError::Attempt(attempt) => attempt.code(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().status()
    }

    /// The JSON error response; `request_id` is echoed so the app can correlate logs.
    pub fn into_response(self, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
        let code = self.code();
        let mut response = json_error(code.status(), code.as_str(), &self.to_string(), request_id);
        match code {
            Code::Overloaded => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The rest of the body may still come: HTTP/1.1 cannot find the next request.
            Code::BodyTimeout => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<SealError> for ProxyError {
    fn from(error: SealError) -> Self {
        match error {
            SealError::Key(key) => ProxyError::KmsUnavailable(key),
            too_large @ SealError::TooLarge { .. } => ProxyError::SealedTooLarge(too_large),
        }
    }
}

/// Why a body is not JSON gpulink forwards.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("the body is not UTF-8 (byte {} is not valid UTF-8); JSON must be UTF-8 (RFC 8259)", .0.valid_up_to())]
    NotUtf8(#[source] std::str::Utf8Error),
    /// serde_json's message gives line and column, never the content.
    #[error(transparent)]
    Syntax(serde_json::Error),
}

/// No endpoint was left to try.
#[derive(Debug)]
pub enum NoEndpoint {
    /// None of the endpoints the phase allows serves now. `why` counts the reasons, e.g.
    /// `3 × data path: wrong server name`.
    NoneServes {
        phase: &'static str,
        configured: bool,
        why: String,
    },
    /// Every endpoint tried answered `503 no_capacity`; `last` was the last one.
    NoCapacity { last: String },
}

impl fmt::Display for NoEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoEndpoint::NoneServes {
                phase,
                configured,
                why,
            } => {
                write!(
                    f,
                    "no endpoint can serve: every endpoint allowed in phase `{phase}` is out of service"
                )?;
                if !configured {
                    f.write_str(" or none is configured")
                } else if why.is_empty() {
                    Ok(())
                } else {
                    write!(
                        f,
                        " ({why}; /status and `gpulink probe` say what to change)"
                    )
                }
            }
            NoEndpoint::NoCapacity { last } => write!(
                f,
                "{last} and every other endpoint tried reported no capacity"
            ),
        }
    }
}

/// One attempt to send the request to an endpoint that ended without response headers
/// (or with a 503 that broke off), classified once where hyper's error is seen: whether
/// it may be retried and whether it counts against the endpoint follow from the kind.
#[derive(Debug)]
pub struct AttemptError {
    pub kind: AttemptKind,
    /// The endpoint's `host:port` and region, for the message.
    pub endpoint: String,
    pub region: String,
    pub cause: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    /// The cluster cannot have processed the request: safe to retry.
    NotSent(NotSent),
    /// The connection failed after the request was (perhaps partly) sent: the cluster
    /// may have started it, so it is never replayed.
    FailedAfterSend,
    /// The cluster's 503 broke off while gpulink read it to look for `no_capacity`.
    AnswerBrokeOff,
    /// No response headers within `upstream.request_timeout`: never replayed.
    NoResponseHeaders { timeout: Duration },
}

/// Why a request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// TCP or TLS set-up failed: the endpoint is unreachable.
    Unreachable,
    /// A working connection refused it unprocessed or closed before writing it: the
    /// endpoint is fine, that one connection is going away.
    Unprocessed(Unprocessed),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unprocessed {
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
    pub const ALL: [Unprocessed; 3] = [
        Unprocessed::GoAway,
        Unprocessed::RefusedStream,
        Unprocessed::Closed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Unprocessed::GoAway => "goaway",
            Unprocessed::RefusedStream => "refused_stream",
            Unprocessed::Closed => "closed",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Unprocessed::GoAway => {
                "is closing the connection (HTTP/2 GOAWAY) and did not process the request"
            }
            Unprocessed::RefusedStream => "refused the request unprocessed (HTTP/2 REFUSED_STREAM)",
            Unprocessed::Closed => "closed the connection before the request was written",
        }
    }
}

impl AttemptError {
    pub fn code(&self) -> Code {
        match self.kind {
            AttemptKind::NoResponseHeaders { .. } => Code::UpstreamTimeout,
            _ => Code::UpstreamConnect,
        }
    }

    /// Whether another attempt may be made: only when the cluster cannot have started it.
    pub fn retryable(&self) -> bool {
        matches!(self.kind, AttemptKind::NotSent(_))
    }

    /// Whether the attempt counts against the endpoint (passive outlier detection, the
    /// rollback monitor). A refusal says nothing about the endpoint's health.
    pub fn endpoint_failed(&self) -> bool {
        !matches!(self.kind, AttemptKind::NotSent(NotSent::Unprocessed(_)))
    }

    /// A refusal by one connection that is going away, not by the endpoint: the retry
    /// may go to the same endpoint, and is not charged to the attempts or the budget.
    /// REFUSED_STREAM is not one: servers also use it to shed load, so that retry goes
    /// elsewhere and is charged like any other.
    pub fn connection_going_away(&self) -> bool {
        matches!(
            self.kind,
            AttemptKind::NotSent(NotSent::Unprocessed(
                Unprocessed::GoAway | Unprocessed::Closed
            ))
        )
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoint = &self.endpoint;
        let cause = Causes(self.cause.as_deref());
        match self.kind {
            AttemptKind::NotSent(NotSent::Unreachable) => {
                write!(f, "cannot reach {endpoint} ({}): {cause}", self.region)
            }
            AttemptKind::NotSent(NotSent::Unprocessed(why)) => {
                write!(f, "{endpoint} {}: {cause}", why.what())
            }
            AttemptKind::FailedAfterSend => write!(
                f,
                "the connection to {endpoint} failed after the request was sent ({cause}); not retried because the cluster may have started it"
            ),
            AttemptKind::AnswerBrokeOff => write!(
                f,
                "the connection failed while reading the cluster's 503 answer ({cause}); not retried because the cluster may have started the request"
            ),
            AttemptKind::NoResponseHeaders { timeout } => write!(
                f,
                "{endpoint} sent no response headers within {timeout:?} (upstream.request_timeout)"
            ),
        }
    }
}

impl std::error::Error for AttemptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// An error and its causes on one line: hyper's top-level messages alone ("client error
/// (Connect)") do not tell an operator what happened.
pub struct Causes<'a>(pub Option<&'a (dyn std::error::Error + Send + Sync + 'static)>);

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(error) = self.0 else {
            return Ok(());
        };
        // An error whose message already ends with its cause's (`"TCP connect to … failed:
        // {source}"`) would otherwise show that cause twice.
        let mut written = error.to_string();
        f.write_str(&written)?;
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !written.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            written = text;
            source = cause.source();
        }
        Ok(())
    }
}

/// Builds `{"error": {"code", "message"}}` with the given status.
pub fn json_error(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    if let Some(id) = request_id {
        headers.insert(crate::headers::X_REQUEST_ID, id.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_its_errors_message_is_shown_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let refused_text = refused.to_string();
        let connect = crate::upstream::connector::ConnectError::Tcp {
            addr: "127.0.0.1:9".parse().expect("address"),
            source: refused,
        };
        let error = crate::upstream::pool::SendError::Connect(connect);
        let text = Causes(Some(&error)).to_string();
        assert_eq!(
            text,
            format!("client error (Connect): TCP connect to 127.0.0.1:9 failed: {refused_text}")
        );
        assert_eq!(text.matches(&refused_text).count(), 1, "{text}");
    }

    #[test]
    fn every_code_has_one_status_and_a_distinct_name() {
        let names: std::collections::BTreeSet<_> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), Code::ALL.len());
        assert_eq!(Code::Overloaded.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Code::UpstreamTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn attempt_errors_render_their_causes_and_say_whether_they_retry() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let error = AttemptError {
            kind: AttemptKind::NotSent(NotSent::Unreachable),
            endpoint: "10.0.0.1:443".into(),
            region: "us-east-1".into(),
            cause: Some(Box::new(Outer(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            )))),
        };
        assert!(error.retryable() && error.endpoint_failed());
        assert!(!error.connection_going_away());
        assert_eq!(
            error.to_string(),
            "cannot reach 10.0.0.1:443 (us-east-1): client error (Connect): connection refused"
        );
        let error = ProxyError::Attempt(error);
        assert_eq!(error.code(), Code::UpstreamConnect);
        assert_eq!(error.status(), StatusCode::BAD_GATEWAY);

        let goaway = AttemptError {
            kind: AttemptKind::NotSent(NotSent::Unprocessed(Unprocessed::GoAway)),
            endpoint: "e:443".into(),
            region: "r".into(),
            cause: None,
        };
        assert!(goaway.retryable() && !goaway.endpoint_failed());
        assert!(goaway.connection_going_away());

        let timeout = AttemptError {
            kind: AttemptKind::NoResponseHeaders {
                timeout: Duration::from_secs(30),
            },
            endpoint: "e:443".into(),
            region: "r".into(),
            cause: None,
        };
        assert!(!timeout.retryable());
        assert_eq!(timeout.code(), Code::UpstreamTimeout);
        assert_eq!(
            timeout.to_string(),
            "e:443 sent no response headers within 30s (upstream.request_timeout)"
        );
    }

    #[test]
    fn an_unsendable_header_is_an_internal_error_that_names_the_header_only() {
        let error = ProxyError::UnsendableHeader {
            header: "X-KMS-Key-ID",
            origin: "the key id KMS answered with",
        };
        assert_eq!(error.code(), Code::InternalError);
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let message = error.to_string();
        assert!(message.contains("X-KMS-Key-ID") && message.contains("nothing was sent"));
    }

    #[test]
    fn no_endpoint_messages() {
        let none = NoEndpoint::NoneServes {
            phase: "privatelink",
            configured: true,
            why: "3 × data path: wrong server name".into(),
        };
        assert_eq!(
            none.to_string(),
            "no endpoint can serve: every endpoint allowed in phase `privatelink` is out of service (3 × data path: wrong server name; /status and `gpulink probe` say what to change)"
        );
        let empty = NoEndpoint::NoneServes {
            phase: "public",
            configured: false,
            why: String::new(),
        };
        assert!(empty
            .to_string()
            .ends_with("out of service or none is configured"));
    }
}
