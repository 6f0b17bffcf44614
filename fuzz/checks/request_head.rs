//! The request head: arbitrary bytes from an app, as one connection, into hyper's server
//! (HTTP/1.1 or HTTP/2 prior knowledge, as the listener serves them) and gpulink's request
//! handler ([`gpulink::forward::handle`]) with the development key provider and one
//! endpoint that refuses connections, so every request that passes ingress is sealed and
//! then answered `no_endpoint` without anything leaving the process.
//!
//! Checked for every request: the inbound header hygiene leaves no identity, gpulink or
//! hop-by-hop header, and every error gpulink answers is its JSON error with a request id.
//! The connection is served under the HTTP/1.1 head guard ([`gpulink::h1guard`]), as the
//! listener serves it, and checked for any bare refusal of hyper's (a head the guard let
//! through that hyper could not parse: the two parsers disagreeing).
//!
//! Shared by the cargo-fuzz target and the stable replay in `tests/suite/fuzz_replay.rs`;
//! each names the loopback block (`127.<block>.x.y`) its proxy uses.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use gpulink::forward::Forwarder;
use gpulink::h1guard::H1Guard;
use gpulink::proxy::ProxyHandle;
use gpulink::seal::{DevKeys, KeyService};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The proxy's configuration inside `127.<block>.x.y`: nothing listens on the endpoint,
/// so connections to it are refused at once.
fn config(block: u8) -> String {
    format!(
        r#"
[listen]
address = "127.{block}.0.1:0"
max_body = "64KiB"
[admin]
address = "127.{block}.0.1:0"
[tenant]
id = "tenant-fuzz"
model_pool = "model-a"
model_pools = ["model-a", "model-b"]
[kms]
key_id = "arn:aws:kms:local:000000000000:key/gpulink-development-key"
region = "us-east-1"
format = "kms-direct"
[upstream]
server_name = "gpu-cluster.fuzz.internal"
connect_timeout = "200ms"
[health]
port = 9
[[regions]]
name = "us-east-1"
privatelink = ["127.{block}.0.2:9"]
"#
    )
}

struct World {
    runtime: tokio::runtime::Runtime,
    forwarder: Arc<Forwarder>,
    _handle: ProxyHandle,
}

/// One proxy per process, started in `block` by the first call.
fn world(block: u8) -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        gpulink::tls::install_crypto_provider();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let handle = runtime.block_on(async {
            let config = gpulink::config::Config::from_toml(&config(block), Path::new("fuzz.toml"))
                .expect("the fuzz config is valid");
            let keys = KeyService::Dev(Arc::new(DevKeys::new().expect("development keys")));
            gpulink::proxy::start(config, keys)
                .await
                .expect("proxy starts")
        });
        World {
            runtime,
            forwarder: Arc::new(handle.proxy().forwarder()),
            _handle: handle,
        }
    })
}

/// What the inbound hygiene must leave out of the headers the cluster would get.
fn assert_sanitized(headers: &HeaderMap) {
    let mut cleaned = headers.clone();
    let named_by_connection: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    gpulink::headers::sanitize_inbound(&mut cleaned);
    for name in cleaned.keys() {
        let name = name.as_str();
        assert!(
            !matches!(
                name,
                "x-tenant-id"
                    | "x-kms-key-id"
                    | "x-encryption-format"
                    | "connection"
                    | "transfer-encoding"
                    | "te"
                    | "upgrade"
                    | "host"
                    | "content-length"
            ) && !name.starts_with("x-gpulink-"),
            "`{name}` survived the inbound hygiene"
        );
        assert!(
            !named_by_connection.iter().any(|n| n == name),
            "`{name}` is named by Connection but was kept"
        );
    }
}

async fn serve(forwarder: Arc<Forwarder>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    assert_sanitized(request.headers());
    let response = gpulink::forward::handle(&forwarder, request).await;
    let (parts, body) = response.into_parts();
    // gpulink's own answers are small; nothing is relayed (no endpoint serves).
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if parts.status.as_u16() >= 400 {
        assert_eq!(
            parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/json"[..]),
            "error {} without a JSON content type",
            parts.status
        );
        let json: serde_json::Value = serde_json::from_slice(&body).expect("an error body is JSON");
        assert!(json["error"]["code"].is_string(), "no error code: {json}");
        assert!(
            json["error"]["message"].is_string(),
            "no error message: {json}"
        );
    }
    assert!(
        parts.headers.contains_key("x-request-id"),
        "an answer without X-Request-ID"
    );
    Response::from_parts(parts, Full::new(body))
}

/// Feeds `data` to the proxy as one client connection. A panic in the handler (one of
/// the checks above) is raised here, on the caller's thread, whichever task it ran on.
pub fn check(block: u8, data: &[u8]) {
    let world = world(block);
    let forwarder = world.forwarder.clone();
    let input = data.to_vec();
    let panicked = world.runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let panicked: Arc<Mutex<Option<String>>> = Arc::default();
        let seen = panicked.clone();
        let service = service_fn(move |request| {
            let (forwarder, seen) = (forwarder.clone(), seen.clone());
            async move {
                // Its own task, so that a failed check is seen even when hyper runs
                // the service on a task of its own (HTTP/2 streams).
                match tokio::spawn(serve(forwarder, request)).await {
                    Ok(response) => Ok::<_, Infallible>(response),
                    Err(error) => {
                        let message = match error.try_into_panic() {
                            Ok(payload) => panic_message(payload),
                            Err(error) => error.to_string(),
                        };
                        if let Ok(mut slot) = seen.lock() {
                            slot.get_or_insert(message);
                        }
                        Ok(Response::new(Full::new(Bytes::new())))
                    }
                }
            }
        });
        // As the listener serves it: under the HTTP/1.1 head guard, which answers the
        // heads hyper would refuse bare once hyper is done.
        let (guarded, mut refused) = H1Guard::new(server);
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(guarded), service)
            .into_owned();
        let connection = tokio::spawn(async move {
            let _ = connection.await;
            if let Ok((stream, why)) = refused.try_recv() {
                gpulink::h1guard::answer(stream, why, Duration::from_secs(1)).await;
            }
        });
        let io = async {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        };
        let answer = tokio::time::timeout(Duration::from_secs(3), io)
            .await
            .unwrap_or_default();
        if let Some(bare) = bare_refusal(&answer) {
            if let Ok(mut slot) = panicked.lock() {
                slot.get_or_insert(format!(
                    "hyper answered a head the guard let through with its bare {bare}"
                ));
            }
        }
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(3), connection).await;
        let taken = panicked.lock().ok().and_then(|mut slot| slot.take());
        taken
    });
    if let Some(message) = panicked {
        panic!("the request handler failed a check: {message}");
    }
}

/// The status of an answer hyper made itself for a head it could not parse (a 400, 414 or
/// 431 with an empty body: gpulink's own refusals all have a JSON body), if `answer` has
/// one.
fn bare_refusal(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer).to_ascii_lowercase();
    text.match_indices("http/1.1 ").find_map(|(at, _)| {
        let status: u16 = text.get(at + 9..at + 12)?.parse().ok()?;
        let head = &text[at..at + text[at..].find("\r\n\r\n")? + 2];
        (matches!(status, 400 | 414 | 431) && head.contains("\r\ncontent-length: 0\r\n"))
            .then_some(status)
    })
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => payload
            .downcast::<&'static str>()
            .map(|text| text.to_string())
            .unwrap_or_else(|_| "a panic".to_string()),
    }
}
