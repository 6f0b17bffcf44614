//! The request head: arbitrary bytes from an app, as one connection, into hyper's server
//! (HTTP/1.1 or HTTP/2 prior knowledge, as the listener serves them) and gpulink's request
//! handler ([`gpulink::forward::handle`]) with the development key provider and one
//! endpoint that refuses connections, so every request that passes ingress is sealed and
//! then answered `no_endpoint` without anything leaving the process.
//!
//! Checked for every request: the inbound header hygiene leaves no identity, gpulink or
//! hop-by-hop header, and every error gpulink answers is its JSON error with a request id.
#![no_main]

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use gpulink::proxy::{Proxy, ProxyHandle};
use gpulink::seal::{DevKeys, KeyService};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// The fuzz block of the test address plan (127.199.x.y is the fuzz block of the reliability
// suite): nothing listens on the endpoint, so connections to it are refused at once.
const CONFIG: &str = r#"
[listen]
address = "127.199.0.1:0"
max_body = "64KiB"
[admin]
address = "127.199.0.1:0"
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
privatelink = ["127.199.0.2:9"]
"#;

struct World {
    runtime: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
    _handle: ProxyHandle,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        gpulink::tls::install_crypto_provider();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let handle = runtime.block_on(async {
            let config = gpulink::config::Config::from_toml(CONFIG, Path::new("fuzz.toml"))
                .expect("the fuzz config is valid");
            let keys = KeyService::Dev(Arc::new(DevKeys::new().expect("development keys")));
            gpulink::proxy::start(config, keys)
                .await
                .expect("proxy starts")
        });
        World {
            runtime,
            proxy: handle.proxy().clone(),
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

async fn serve(proxy: Arc<Proxy>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    assert_sanitized(request.headers());
    let response = gpulink::forward::handle(proxy, request).await;
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

fuzz_target!(|data: &[u8]| {
    let world = world();
    let proxy = world.proxy.clone();
    let input = data.to_vec();
    world.runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(serve(proxy, request).await) }
        });
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(server), service)
            .into_owned();
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let io = async {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), io).await;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(3), connection).await;
    });
});
