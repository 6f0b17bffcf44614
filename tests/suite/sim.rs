//! The cluster simulator from the outside: real sockets on loopback, a TLS client that
//! trusts only what the simulator wrote to `ca.pem`, and the development key provider
//! standing in for KMS. Each test owns a loopback block (`next_block`), so the tests run in
//! parallel with each other and with the rest of the suite.
//!
//! Nothing here sleeps to synchronise: tests await the simulator's own events
//! (`wait_in_flight`, `wait_for`, `set_state` returning once in effect).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gpulink::seal::{DevKeys, EncryptionContext, KeyService, FORMAT_AWS_ESDK, FORMAT_KMS_DIRECT};
use gpulink_sim::{EndpointState, Sim, SimConfig, SimEndpointConfig, SimError};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::common::next_block;

const SERVER_NAME: &str = "gpu-cluster.yourcompany.internal";
const TENANT: &str = "tenant-123";
const POOL: &str = "model-a";
const KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/test";

fn ip(block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, block, 0, host))
}

struct Harness {
    sim: Sim,
    keys: KeyService,
    _ca_dir: tempfile::TempDir,
}

/// A simulator with `n` endpoints at 127.`block`.0.1..=n, all in us-east-1 except the
/// second, which is in us-west-2.
async fn start(block: u8, n: u8) -> Harness {
    let ca_dir = tempfile::tempdir().expect("temp dir");
    let endpoints = (1..=n)
        .map(|host| {
            let region = if host == 2 { "us-west-2" } else { "us-east-1" };
            SimEndpointConfig::new(ip(block, host), region)
        })
        .collect();
    let mut config = SimConfig::default_layout(ca_dir.path().join("ca"));
    config.endpoints = endpoints;
    let keys = KeyService::Dev(Arc::new(DevKeys::new().expect("dev keys")));
    let sim = Sim::start(config, keys.clone())
        .await
        .expect("simulator starts");
    Harness {
        sim,
        keys,
        _ca_dir: ca_dir,
    }
}

fn tenant_context() -> EncryptionContext {
    let mut context = EncryptionContext::new();
    context.insert("tenant_id".into(), TENANT.into());
    context.insert("model_pool".into(), POOL.into());
    context
}

impl Harness {
    fn tls_addr(&self, ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, 8443)
    }

    async fn seal(&self, plaintext: &[u8], context: &EncryptionContext) -> Bytes {
        let sealed = self
            .keys
            .encrypt(KEY_ARN, plaintext, context)
            .await
            .expect("dev keys seal");
        Bytes::from(sealed.ciphertext)
    }

    /// A TLS connection to `ip`'s inference port, HTTP/2 or HTTP/1.1 as ALPN chooses.
    async fn connect(&self, ip: IpAddr, alpn: &[&[u8]]) -> Conn {
        Conn::open(
            self.tls_addr(ip),
            &self.sim.ca_file(),
            ServerName::try_from(SERVER_NAME).unwrap(),
            alpn,
        )
        .await
        .expect("TLS connection")
    }
}

/// An open client connection to an inference port.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Conn {
    async fn open(
        addr: SocketAddr,
        ca_file: &std::path::Path,
        name: ServerName<'static>,
        alpn: &[&[u8]],
    ) -> Result<Conn, Box<dyn std::error::Error + Send + Sync>> {
        gpulink::tls::install_crypto_provider();
        let mut config = (*gpulink::tls::client_config(&[ca_file])?).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Ok(Conn::H2(send))
        } else {
            let (send, connection) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(connection);
            Ok(Conn::H1(send))
        }
    }

    fn is_h2(&self) -> bool {
        matches!(self, Conn::H2(_))
    }

    async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let response = match self {
            Conn::H1(send) => {
                send.ready().await?;
                send.send_request(request).await?
            }
            Conn::H2(send) => {
                send.ready().await?;
                send.send_request(request).await?
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// An inference request as gpulink sends it.
fn inference(body: Bytes, request_id: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("https://{SERVER_NAME}/inference"))
        .header("content-type", "application/octet-stream")
        .header("x-tenant-id", TENANT)
        .header("x-kms-key-id", KEY_ARN)
        .header("x-model-pool", POOL)
        .header("x-encryption-format", FORMAT_KMS_DIRECT)
        .header("x-request-id", request_id)
        .body(Full::new(body))
        .unwrap()
}

/// A plain-HTTP/1.1 request on a fresh connection (health port, control API).
async fn plain(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = send.send_request(request).await?;
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

async fn health(ip: IpAddr) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    plain(SocketAddr::new(ip, 8080), Method::GET, "/health", "").await
}

fn sha256_hex(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn health_reports_the_guides_format() {
    let block = next_block();
    let h = start(block, 2).await;
    let answer = health(ip(block, 2)).await.expect("health answers");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "application/json");
    let json = answer.json();
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["region"], "us-west-2");
    assert_eq!(json["available_capacity"], 45);
    assert!(json["timestamp"].as_u64().unwrap() > 1_699_564_800);
    assert_eq!(json.as_object().unwrap().len(), 4, "{json}");
    assert_eq!(h.sim.stats(ip(block, 2)).unwrap().health_checks, 1);
    assert_eq!(h.sim.stats(ip(block, 1)).unwrap().health_checks, 0);

    let missing = plain(
        SocketAddr::new(ip(block, 1), 8080),
        Method::GET,
        "/nope",
        "",
    )
    .await
    .unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn a_sealed_body_opens_over_http2_and_http1() {
    let block = next_block();
    let h = start(block, 1).await;
    let ep = ip(block, 1);
    let plaintext = br#"{"prompt":"Hello","max_tokens":50}"#;

    let mut h2 = h.connect(ep, &[b"h2", b"http/1.1"]).await;
    assert!(h2.is_h2(), "the simulator offers HTTP/2 by ALPN");
    let body = h.seal(plaintext, &tenant_context()).await;
    let answer = h2.send(inference(body, "req-h2")).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.headers["x-region"], "us-east-1");
    assert_eq!(answer.headers["content-type"], "application/json");
    let json = answer.json();
    assert_eq!(json["region"], "us-east-1");
    assert_eq!(json["endpoint"], format!("{}:8443", ip(block, 1)));
    assert_eq!(json["tenant_id"], TENANT);
    assert_eq!(json["model_pool"], POOL);
    assert_eq!(json["request_id"], "req-h2");
    assert_eq!(json["format"], FORMAT_KMS_DIRECT);
    assert_eq!(json["bytes"], plaintext.len());
    assert_eq!(json["sha256"], sha256_hex(plaintext));
    assert_eq!(json["output"], "Hello from the simulated cluster");
    assert!(uuid::Uuid::parse_str(json["id"].as_str().unwrap()).is_ok());

    let mut h1 = h.connect(ep, &[b"http/1.1"]).await;
    assert!(!h1.is_h2());
    for i in 0..2 {
        // Two requests on one keep-alive connection.
        let body = h.seal(plaintext, &tenant_context()).await;
        let answer = h1
            .send(inference(body, &format!("req-h1-{i}")))
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["sha256"], sha256_hex(plaintext));
    }

    let stats = h.sim.stats(ep).unwrap();
    assert_eq!((stats.requests, stats.ok), (3, 3));
    assert_eq!(
        stats.decrypt_failures + stats.plaintext_seen + stats.context_none,
        0
    );
    assert_eq!(stats.in_flight, 0);
    assert_eq!(h.sim.deliveries("req-h2"), 1);
    assert_eq!(h.sim.deliveries("req-h1-1"), 1);
    assert_eq!(h.sim.deliveries("never-sent"), 0);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn the_certificate_names_the_endpoint_ips_too() {
    let block = next_block();
    let h = start(block, 1).await;
    let ca = h.sim.ca_file();
    assert!(ca.ends_with("ca.pem") && ca.exists());
    let mut conn = Conn::open(
        h.tls_addr(ip(block, 1)),
        &ca,
        ServerName::IpAddress(ip(block, 1).into()),
        &[b"h2"],
    )
    .await
    .expect("the leaf has an IP SAN");
    let body = h.seal(b"{}", &tenant_context()).await;
    assert_eq!(
        conn.send(inference(body, "r")).await.unwrap().status,
        StatusCode::OK
    );
    // The other name in the default list verifies as well; a foreign one does not.
    let public = ServerName::try_from("gpu-cluster.public.example.com").unwrap();
    assert!(Conn::open(h.tls_addr(ip(block, 1)), &ca, public, &[b"h2"])
        .await
        .is_ok());
    let foreign = ServerName::try_from("example.org").unwrap();
    assert!(Conn::open(h.tls_addr(ip(block, 1)), &ca, foreign, &[b"h2"])
        .await
        .is_err());
    h.sim.shutdown().await;
}

#[tokio::test]
async fn plaintext_wrong_context_and_no_context_are_told_apart() {
    let block = next_block();
    let h = start(block, 1).await;
    let ep = ip(block, 1);
    let mut conn = h.connect(ep, &[b"h2"]).await;

    let leak = conn
        .send(inference(
            Bytes::from_static(br#"{"prompt":"secret"}"#),
            "leak",
        ))
        .await
        .unwrap();
    assert_eq!(leak.status, StatusCode::BAD_REQUEST);
    assert_eq!(leak.error_code(), "plaintext_body");

    let mut other = tenant_context();
    other.insert("tenant_id".into(), "someone-else".into());
    let wrong = h.seal(b"{}", &other).await;
    let answer = conn.send(inference(wrong, "wrong")).await.unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error_code(), "decrypt_failed");

    let garbage = conn
        .send(inference(
            Bytes::from_static(b"\x01\x02not sealed"),
            "garbage",
        ))
        .await
        .unwrap();
    assert_eq!(garbage.error_code(), "decrypt_failed");

    // kms.context = "none": sealed without a context, as the guide's example does.
    let none = h.seal(b"{\"a\":1}", &EncryptionContext::new()).await;
    let answer = conn.send(inference(none, "none")).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["sha256"], sha256_hex(b"{\"a\":1}"));

    let stats = h.sim.stats(ep).unwrap();
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.plaintext_seen, 1);
    assert_eq!(stats.decrypt_failures, 2);
    assert_eq!(stats.context_none, 1);
    assert_eq!(stats.ok, 1);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn missing_headers_and_unsupported_formats_get_clear_codes() {
    let block = next_block();
    let h = start(block, 1).await;
    let mut conn = h.connect(ip(block, 1), &[b"h2"]).await;
    let body = h.seal(b"{}", &tenant_context()).await;
    for (header, code) in [
        ("x-tenant-id", "missing_tenant_id"),
        ("x-model-pool", "missing_model_pool"),
        ("x-kms-key-id", "missing_kms_key_id"),
        ("x-encryption-format", "missing_encryption_format"),
    ] {
        let mut request = inference(body.clone(), "h");
        request.headers_mut().remove(header);
        let answer = conn.send(request).await.unwrap();
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{header}");
        assert_eq!(answer.error_code(), code);
    }
    let mut request = inference(body.clone(), "f");
    request
        .headers_mut()
        .insert("x-encryption-format", "rot13".parse().unwrap());
    let answer = conn.send(request).await.unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error_code(), "unsupported_format");
    // aws-esdk is supported: a kms-direct body under that label is not an ESDK message.
    let mut request = inference(body.clone(), "e");
    request
        .headers_mut()
        .insert("x-encryption-format", FORMAT_AWS_ESDK.parse().unwrap());
    let answer = conn.send(request).await.unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error_code(), "decrypt_failed");
    let mut get = inference(body, "g");
    *get.method_mut() = Method::GET;
    let answer = conn.send(get).await.unwrap();
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn a_stream_request_gets_server_sent_events() {
    let block = next_block();
    let h = start(block, 1).await;
    let mut conn = h.connect(ip(block, 1), &[b"h2"]).await;
    let body = h
        .seal(
            br#"{"prompt":"hi","stream":true,"max_tokens":3}"#,
            &tenant_context(),
        )
        .await;
    let answer = conn.send(inference(body, "s")).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "text/event-stream");
    assert_eq!(answer.headers["x-region"], "us-east-1");
    assert_eq!(
        std::str::from_utf8(&answer.body).unwrap(),
        "data: {\"token\": 0}\n\ndata: {\"token\": 1}\n\ndata: {\"token\": 2}\n\ndata: [DONE]\n\n"
    );
    // The request stays in flight until the stream ends, then the gauge returns to 0.
    h.sim
        .wait_for(ip(block, 1), |s| s.in_flight == 0 && s.ok == 1)
        .await;
    h.sim.shutdown().await;
}

#[tokio::test]
async fn down_refuses_connects_closes_open_ones_and_comes_back() {
    let block = next_block();
    let h = start(block, 2).await;
    let ep = ip(block, 1);
    let mut open = h.connect(ep, &[b"h2"]).await;
    let body = h.seal(b"{}", &tenant_context()).await;
    assert_eq!(
        open.send(inference(body.clone(), "a"))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );

    h.sim.set_state(ep, EndpointState::Down).await.unwrap();
    assert_eq!(h.sim.stats(ep).unwrap().state, "down");
    let refused = TcpStream::connect(h.tls_addr(ep)).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let refused = TcpStream::connect(SocketAddr::new(ep, 8080))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        open.send(inference(body.clone(), "b")).await.is_err(),
        "the open connection was closed"
    );
    // The other endpoint is unaffected.
    assert_eq!(health(ip(block, 2)).await.unwrap().status, StatusCode::OK);

    h.sim.set_state(ep, EndpointState::Healthy).await.unwrap();
    assert_eq!(health(ep).await.unwrap().json()["status"], "healthy");
    let mut again = h.connect(ep, &[b"h2"]).await;
    assert_eq!(
        again.send(inference(body, "c")).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(h.sim.deliveries("b"), 0);
    // Down twice, and up twice, are no-ops.
    h.sim.set_state(ep, EndpointState::Down).await.unwrap();
    h.sim.set_state(ep, EndpointState::Down).await.unwrap();
    h.sim.set_state(ep, EndpointState::Healthy).await.unwrap();
    h.sim.set_state(ep, EndpointState::Failing).await.unwrap();
    assert_eq!(health(ep).await.unwrap().json()["status"], "unhealthy");
    h.sim.shutdown().await;
}

#[tokio::test]
async fn full_refuses_with_no_capacity_without_delivering() {
    let block = next_block();
    let h = start(block, 1).await;
    let ep = ip(block, 1);
    h.sim.set_state(ep, EndpointState::Full).await.unwrap();
    let json = health(ep).await.unwrap().json();
    assert_eq!(json["available_capacity"], 0);
    assert_eq!(json["status"], "healthy");

    let mut conn = h.connect(ep, &[b"h2"]).await;
    let body = h.seal(b"{}", &tenant_context()).await;
    let answer = conn.send(inference(body, "full-1")).await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.error_code(), "no_capacity");
    assert_eq!(h.sim.deliveries("full-1"), 0);
    let stats = h.sim.stats(ep).unwrap();
    assert_eq!(
        (stats.requests, stats.ok, stats.state.as_str()),
        (1, 0, "full")
    );
    h.sim.shutdown().await;
}

#[tokio::test]
async fn failing_answers_500_and_reports_unhealthy() {
    let block = next_block();
    let h = start(block, 1).await;
    let ep = ip(block, 1);
    h.sim.set_state(ep, EndpointState::Failing).await.unwrap();
    assert_eq!(health(ep).await.unwrap().json()["status"], "unhealthy");
    let mut conn = h.connect(ep, &[b"http/1.1"]).await;
    let body = h.seal(b"{}", &tenant_context()).await;
    let answer = conn.send(inference(body, "fail-1")).await.unwrap();
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.error_code(), "internal");
    // The cluster may have started it: it counts as delivered.
    assert_eq!(h.sim.deliveries("fail-1"), 1);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn slow_still_answers() {
    let block = next_block();
    let h = start(block, 1).await;
    let ep = ip(block, 1);
    h.sim
        .set_state(ep, EndpointState::Slow { delay_ms: 20 })
        .await
        .unwrap();
    assert_eq!(h.sim.stats(ep).unwrap().state, "slow");
    assert_eq!(health(ep).await.unwrap().status, StatusCode::OK);
    let mut conn = h.connect(ep, &[b"h2"]).await;
    let body = h.seal(b"{}", &tenant_context()).await;
    assert_eq!(
        conn.send(inference(body, "slow")).await.unwrap().status,
        StatusCode::OK
    );
    h.sim.shutdown().await;
}

#[tokio::test]
async fn blackhole_holds_requests_on_open_and_new_connections() {
    let block = next_block();
    let h = start(block, 1).await;
    let ep = ip(block, 1);
    let body = h.seal(b"{}", &tenant_context()).await;
    let mut open = h.connect(ep, &[b"h2"]).await;
    assert_eq!(
        open.send(inference(body.clone(), "warm"))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );

    h.sim.set_state(ep, EndpointState::Blackhole).await.unwrap();
    let held_open = {
        let request = inference(body.clone(), "held-1");
        tokio::spawn(async move { open.send(request).await.map(|a| a.status) })
    };
    h.sim.wait_in_flight(ep, 1).await;
    // A connection opened during the blackhole completes TLS, then hears nothing.
    let mut fresh = h.connect(ep, &[b"http/1.1"]).await;
    let held_fresh = {
        let request = inference(body.clone(), "held-2");
        tokio::spawn(async move { fresh.send(request).await.map(|a| a.status) })
    };
    h.sim.wait_in_flight(ep, 2).await;
    assert_eq!(
        h.sim.deliveries("held-1"),
        1,
        "a held request counts as delivered"
    );

    // The health check arrives (awaited as an event), and then the event under test is
    // its timing out.
    let mut check = tokio::spawn(health(ep));
    h.sim.wait_for(ep, |s| s.health_checks == 1).await;
    let answered = tokio::time::timeout(Duration::from_millis(300), &mut check).await;
    assert!(answered.is_err(), "a blackholed health check never answers");
    check.abort();

    // Leaving the blackhole drops what it held (no late answers) and the gauge empties.
    h.sim.set_state(ep, EndpointState::Healthy).await.unwrap();
    assert!(held_open.await.unwrap().is_err());
    assert!(held_fresh.await.unwrap().is_err());
    h.sim.wait_for(ep, |s| s.in_flight == 0).await;
    assert_eq!(h.sim.stats(ep).unwrap().ok, 1);
    assert_eq!(health(ep).await.unwrap().status, StatusCode::OK);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn the_control_api_reads_counters_and_changes_states() {
    let block = next_block();
    let h = start(block, 2).await;
    let control = h.sim.control_addr();
    assert!(control.ip().is_loopback() && control.port() != 0);

    let list = plain(control, Method::GET, "/endpoints", "").await.unwrap();
    assert_eq!(list.status, StatusCode::OK);
    let list = list.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["ip"], ip(block, 2).to_string());
    assert_eq!(list[1]["region"], "us-west-2");
    assert_eq!(list[1]["state"], "healthy");

    let set = plain(
        control,
        Method::PUT,
        &format!("/endpoints/{}/state", ip(block, 1)),
        r#"{"state":"full"}"#,
    )
    .await
    .unwrap();
    assert_eq!(set.status, StatusCode::OK);
    assert_eq!(set.json()["state"], "full");
    assert_eq!(h.sim.state(ip(block, 1)), Some(EndpointState::Full));
    assert_eq!(
        health(ip(block, 1)).await.unwrap().json()["available_capacity"],
        0
    );

    let slow = plain(
        control,
        Method::PUT,
        &format!("/endpoints/{}/state", ip(block, 2)),
        r#"{"state":"slow","delay_ms":1}"#,
    )
    .await
    .unwrap();
    assert_eq!(slow.status, StatusCode::OK);
    let state = plain(
        control,
        Method::GET,
        &format!("/endpoints/{}/state", ip(block, 2)),
        "",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(state, serde_json::json!({"state": "slow", "delay_ms": 1}));

    let down = plain(
        control,
        Method::PUT,
        &format!("/endpoints/{}/state", ip(block, 2)),
        r#"{"state":"down"}"#,
    )
    .await
    .unwrap();
    assert_eq!(down.status, StatusCode::OK);
    assert!(health(ip(block, 2)).await.is_err());

    let bad = plain(
        control,
        Method::PUT,
        &format!("/endpoints/{}/state", ip(block, 1)),
        r#"{"state":"on fire"}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        (bad.status, bad.error_code().as_str()),
        (StatusCode::BAD_REQUEST, "bad_state")
    );
    let unknown = plain(
        control,
        Method::PUT,
        &format!("/endpoints/127.{block}.99.1/state"),
        r#"{"state":"down"}"#,
    )
    .await
    .unwrap();
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // Deliveries and reset.
    h.sim
        .set_state(ip(block, 1), EndpointState::Healthy)
        .await
        .unwrap();
    let mut conn = h.connect(ip(block, 1), &[b"h2"]).await;
    let body = h.seal(b"{}", &tenant_context()).await;
    assert_eq!(
        conn.send(inference(body, "ctl/1")).await.unwrap().status,
        StatusCode::OK
    );
    let deliveries = plain(control, Method::GET, "/deliveries/ctl%2F1", "")
        .await
        .unwrap()
        .json();
    assert_eq!(
        deliveries,
        serde_json::json!({"request_id": "ctl/1", "deliveries": 1})
    );

    let reset = plain(control, Method::POST, "/reset", "").await.unwrap();
    assert_eq!(reset.status, StatusCode::OK);
    let stats = h.sim.stats(ip(block, 1)).unwrap();
    assert_eq!((stats.requests, stats.ok, stats.health_checks), (0, 0, 0));
    assert_eq!(h.sim.deliveries("ctl/1"), 0);
    h.sim.shutdown().await;
}

#[tokio::test]
async fn bad_configurations_are_refused() {
    let block = next_block();
    let keys = KeyService::Dev(Arc::new(DevKeys::new().unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::default_layout(dir.path().to_owned());
    config.endpoints = vec![
        SimEndpointConfig::new(ip(block, 1), "us-east-1"),
        SimEndpointConfig::new(ip(block, 1), "us-west-2"),
    ];
    assert!(matches!(
        Sim::start(config.clone(), keys.clone()).await,
        Err(SimError::DuplicateEndpoint(_))
    ));
    config.endpoints.truncate(1);
    config.control_addr = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        Sim::start(config.clone(), keys.clone()).await,
        Err(SimError::ControlNotLoopback(_))
    ));
    config.endpoints.clear();
    assert!(matches!(
        Sim::start(config, keys).await,
        Err(SimError::NoEndpoints)
    ));
}

#[tokio::test]
async fn a_busy_port_is_reported_and_nothing_stays_bound() {
    let block = next_block();
    let taken = tokio::net::TcpListener::bind(SocketAddr::new(ip(block, 2), 8080))
        .await
        .unwrap();
    let keys = KeyService::Dev(Arc::new(DevKeys::new().unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::default_layout(dir.path().to_owned());
    config.endpoints = vec![
        SimEndpointConfig::new(ip(block, 1), "us-east-1"),
        SimEndpointConfig::new(ip(block, 2), "us-east-1"),
    ];
    let error = Sim::start(config.clone(), keys.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(error, SimError::Bind { .. }), "{error}");
    drop(taken);
    // The first endpoint's ports were released, so a second start succeeds.
    let sim = Sim::start(config, keys).await.expect("ports were released");
    sim.shutdown().await;
}
