//! The errors gpulink answers the app with. Each has a stable `code` and HTTP status
//! (the contract in `docs/design.md`) and a message the app's operator can act on. They are
//! always sent as `{"error": {"code": "...", "message": "..."}}`.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{ProxyBody, ProxyBodyExt};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("method {0} is not allowed; send the inference request with POST")]
    MethodNotAllowed(http::Method),
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("X-Model-Pool {0:?} is not one of this tenant's model pools")]
    ModelPoolNotAllowed(String),
    #[error("{0}")]
    BodyTooLarge(String),
    #[error("the request body could not be read: {0}")]
    BadRequestBody(String),
    /// A request gpulink cannot forward as sent (its target is not a path).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{0}; the connection is closed")]
    BodyTimeout(String),
    #[error("gpulink holds as many request body bytes as it may (listen.max_in_flight_bytes = {0} bytes); nothing was sent, retry shortly")]
    Overloaded(u64),
    #[error("encryption failed, nothing was sent: {0}")]
    KmsUnavailable(String),
    #[error("{0}")]
    NoEndpoint(String),
    #[error("{0}")]
    UpstreamConnect(String),
    #[error("{0}")]
    UpstreamTimeout(String),
}

impl ProxyError {
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::InvalidJson(_) => "invalid_json",
            ProxyError::ModelPoolNotAllowed(_) => "model_pool_not_allowed",
            ProxyError::BodyTooLarge(_) => "body_too_large",
            ProxyError::BadRequestBody(_) | ProxyError::BadRequest(_) => "bad_request",
            ProxyError::HeadersTooLarge(_) => "headers_too_large",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::Overloaded(_) => "overloaded",
            ProxyError::KmsUnavailable(_) => "kms_unavailable",
            ProxyError::NoEndpoint(_) => "no_endpoint",
            ProxyError::UpstreamConnect(_) => "upstream_connect",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::InvalidJson(_)
            | ProxyError::ModelPoolNotAllowed(_)
            | ProxyError::BadRequestBody(_)
            | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::KmsUnavailable(_)
            | ProxyError::NoEndpoint(_)
            | ProxyError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The JSON error response; `request_id` is echoed so the app can correlate logs.
    pub fn into_response(self, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
        let closes = matches!(self, ProxyError::BodyTimeout(_));
        let overloaded = matches!(self, ProxyError::Overloaded(_));
        let mut response = json_error(self.status(), self.code(), &self.to_string(), request_id);
        if overloaded {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if closes {
            // The rest of the body may still come: HTTP/1.1 cannot find the next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
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
