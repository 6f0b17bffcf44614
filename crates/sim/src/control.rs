//! The simulator's control API: plain HTTP on loopback, so that shell scripts, the demo
//! and tests in other processes can inject failures and read the counters.
//!
//! * `GET /endpoints`: every endpoint's [`EndpointStats`](super::EndpointStats).
//! * `GET /endpoints/{ip}`: one endpoint's stats.
//! * `GET /endpoints/{ip}/state`: its state, e.g. `{"state":"slow","delay_ms":2000}`.
//! * `PUT /endpoints/{ip}/state` with `{"state":"down"}`: change it; answers the stats
//!   once the change is in effect.
//! * `GET /deliveries/{request_id}`: `{"request_id": "...", "deliveries": n}`.
//! * `POST /reset`: zero the counters and forget the delivered ids.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::{endpoint, error_response, json_response, EndpointState, Reject, Shared, SimError};
use gpulink::body::ProxyBody;

/// A state change body is a few dozen bytes; anything much larger is a mistake.
const MAX_CONTROL_BODY: usize = 64 * 1024;

/// Binds the control API and serves it until the simulator shuts down.
pub(crate) async fn start(
    shared: &Arc<Shared>,
    addr: SocketAddr,
) -> Result<(SocketAddr, JoinHandle<()>), SimError> {
    let listener = endpoint::listen(addr)?;
    let bound = listener
        .local_addr()
        .map_err(|source| SimError::Bind { addr, source })?;
    let task = tokio::spawn(serve(listener, shared.clone()));
    Ok((bound, task))
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| handle(shared.clone(), request));
                        let builder = auto::Builder::new(TokioExecutor::new());
                        if let Err(error) =
                            builder.serve_connection(TokioIo::new(stream), service).await
                        {
                            tracing::debug!(%error, "control connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::debug!(%error, "control API accept failed");
                    // Back off rather than spin on EMFILE.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = endpoint::raised(&mut shutdown) => break,
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["endpoints"]) => {
            json_response(StatusCode::OK, &serde_json::json!(shared.all_stats()))
        }
        (&Method::GET, ["endpoints", ip]) => match endpoint_ip(&shared, ip) {
            Ok(ip) => json_response(StatusCode::OK, &serde_json::json!(shared.stats(ip))),
            Err(reject) => reject.into_response(),
        },
        (&Method::GET, ["endpoints", ip, "state"]) => match endpoint_ip(&shared, ip) {
            Ok(ip) => {
                let state = shared.by_ip.get(&ip).map(|e| e.state());
                json_response(StatusCode::OK, &serde_json::json!(state))
            }
            Err(reject) => reject.into_response(),
        },
        (&Method::PUT | &Method::POST, ["endpoints", ip, "state"]) => {
            match endpoint_ip(&shared, ip) {
                Ok(ip) => set_state(&shared, ip, request).await,
                Err(reject) => reject.into_response(),
            }
        }
        (&Method::GET, ["deliveries", id]) => {
            let id = percent_decode(id);
            let count = shared.deliveries(&id);
            json_response(
                StatusCode::OK,
                &serde_json::json!({ "request_id": id, "deliveries": count }),
            )
        }
        (&Method::POST, ["reset"]) => {
            shared.reset();
            json_response(StatusCode::OK, &serde_json::json!({ "reset": true }))
        }
        (_, ["endpoints"] | ["endpoints", _] | ["endpoints", _, "state"] | ["deliveries", _] | ["reset"]) => {
            error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{method} is not allowed on {path}"),
            )
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "routes: GET /endpoints, GET|PUT /endpoints/{ip}/state, GET /deliveries/{request_id}, POST /reset",
        ),
    };
    Ok(response)
}

fn endpoint_ip(shared: &Shared, text: &str) -> Result<IpAddr, Reject> {
    let ip: IpAddr = text.parse().map_err(|_| {
        Reject::bad_request("bad_address", format!("`{text}` is not an IP address"))
    })?;
    shared.endpoint(ip).map_err(|e| Reject {
        status: StatusCode::NOT_FOUND,
        code: "unknown_endpoint",
        message: e.to_string(),
    })?;
    Ok(ip)
}

async fn set_state(
    shared: &Arc<Shared>,
    ip: IpAddr,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let body = match Limited::new(request.into_body(), MAX_CONTROL_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return error_response(StatusCode::BAD_REQUEST, "bad_body", &error.to_string());
        }
    };
    let state: EndpointState = match serde_json::from_slice(&body) {
        Ok(state) => state,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_state",
                &format!(
                    "{error}; send e.g. {{\"state\":\"down\"}} or {{\"state\":\"slow\",\"delay_ms\":2000}} \
                     (states: healthy, down, blackhole, slow, full, failing, inference_refused, inference_filtered)"
                ),
            );
        }
    };
    match shared.set_state(ip, state).await {
        Ok(()) => json_response(StatusCode::OK, &serde_json::json!(shared.stats(ip))),
        Err(error) => error_response(
            StatusCode::CONFLICT,
            "state_change_failed",
            &error.to_string(),
        ),
    }
}

/// Decodes `%XX` escapes in a path segment; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("abc"), "abc");
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn state_bodies() {
        let down: EndpointState = serde_json::from_str(r#"{"state":"down"}"#).unwrap();
        assert_eq!(down, EndpointState::Down);
        let slow: EndpointState =
            serde_json::from_str(r#"{"state":"slow","delay_ms":2000}"#).unwrap();
        assert_eq!(slow, EndpointState::Slow { delay_ms: 2000 });
        assert!(serde_json::from_str::<EndpointState>(r#"{"state":"slow"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&EndpointState::Full).unwrap(),
            r#"{"state":"full"}"#
        );
        let filtered: EndpointState =
            serde_json::from_str(r#"{"state":"inference_filtered"}"#).unwrap();
        assert_eq!(filtered, EndpointState::InferenceFiltered);
        assert_eq!(filtered.name(), "inference_filtered");
        assert_eq!(
            serde_json::to_string(&EndpointState::InferenceRefused).unwrap(),
            r#"{"state":"inference_refused"}"#
        );
    }
}
