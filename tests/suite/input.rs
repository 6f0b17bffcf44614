//! Framing and input: what gpulink refuses before KMS (each refusal with the JSON error
//! body), what it never lets through to the cluster (identity-header look-alikes), and a
//! cluster 503 relayed whole and well-formed; an HTTP/1.1-only cluster endpoint sent the
//! origin form over one reused pooled connection. Raw sockets where client libraries
//! refuse to send the bad input.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::reliability::*;
use gpulink::config::Config;
use gpulink::proxy::ProxyHandle;
use gpulink::seal::{KeyService, KmsKeys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// moto, upstreams answering on `ips`, and an in-process proxy in front of them.
struct Setup {
    _moto: Moto,
    proxy: ProxyHandle,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(ips: &[IpAddr], moto: Moto, dir: tempfile::TempDir, pki: &Pki) -> Setup {
        let key_arn = moto.create_key().await;
        let text = upstream_config(ips, &moto.url, &key_arn, &pki.ca_file);
        let config = Config::from_toml(&text, std::path::Path::new("input.toml")).expect("config");
        let keys = KmsKeys::new("us-east-1", Some(&moto.url), Duration::from_secs(3)).await;
        let proxy = gpulink::proxy::start(config, KeyService::Kms(keys))
            .await
            .expect("proxy starts");
        let setup = Setup {
            _moto: moto,
            proxy,
            _dir: dir,
        };
        setup.wait_serving(ips).await;
        setup
    }

    /// moto, one recording upstream on a block of the test's own, and the proxy in front
    /// of it.
    async fn recorded() -> (RecordingUpstream, Setup) {
        let moto = Moto::get().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path());
        let ip = IpAddr::from([127, next_block(), 10, 50]);
        let upstream = RecordingUpstream::start(ip, &pki, CertFault::None).await;
        let setup = Setup::start(&[ip], moto, dir, &pki).await;
        (upstream, setup)
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.listen_addr
    }

    async fn wait_serving(&self, ips: &[IpAddr]) {
        for ip in ips {
            wait_serving(&self.proxy, *ip, true).await;
        }
    }
}

/// The status and JSON error code of a raw HTTP/1.1 answer.
fn status_and_code(raw: &str) -> (u16, String) {
    let status = statuses(raw).first().copied().unwrap_or(0);
    let (head, mut body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut dechunked = String::new();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        while let Some((size, rest)) = body.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || rest.len() < size {
                break;
            }
            dechunked.push_str(&rest[..size]);
            body = rest[size..].trim_start_matches("\r\n");
        }
        body = &dechunked;
    }
    let json: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {raw:?}"));
    let code = json["error"]["code"].as_str().unwrap_or("").to_string();
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "no message: {raw}"
    );
    (status, code)
}

fn post_raw(target: &str, request_id: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         X-Request-ID: {request_id}\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_kms_with_a_json_body() {
    let (upstream, setup) = Setup::recorded().await;
    let limit = Duration::from_secs(20);
    let body = GUIDE_REQUEST.as_bytes();

    // `POST *`: not a path.
    let raw = raw_exchange(setup.addr(), &post_raw("*", "star", "", body), limit, false).await;
    assert_eq!(status_and_code(&raw), (400, "bad_request".into()), "{raw}");

    // A 200 KB header: 431 here, not sealed and refused by the cluster.
    let big = format!("X-Padding: {}\r\n", "a".repeat(200_000));
    let raw = raw_exchange(
        setup.addr(),
        &post_raw("/inference", "big-head", &big, body),
        limit,
        false,
    )
    .await;
    assert_eq!(status_and_code(&raw), (431, "headers_too_large".into()));

    // Invalid UTF-8 inside a JSON string (RFC 8259 requires UTF-8).
    let bad_utf8 = b"{\"prompt\": \"caf\xe9 \xff\xfe\", \"max_tokens\": 5}";
    let raw = raw_exchange(
        setup.addr(),
        &post_raw("/inference", "latin1", "", bad_utf8),
        limit,
        false,
    )
    .await;
    assert_eq!(status_and_code(&raw), (400, "invalid_json".into()), "{raw}");

    // Absolute-form: forwarded as its path (to the cluster, whatever authority it names).
    let raw = raw_exchange(
        setup.addr(),
        &post_raw(
            "http://elsewhere.example/inference?x=1",
            "absolute",
            "",
            body,
        ),
        limit,
        false,
    )
    .await;
    assert_eq!(statuses(&raw).first(), Some(&200), "{raw}");

    let received = upstream.requests();
    for id in ["star", "big-head", "latin1"] {
        assert_eq!(upstream.with_request_id(id), 0, "{id} reached the cluster");
    }
    let absolute: Vec<_> = received
        .iter()
        .filter(|r| {
            r.headers
                .get("x-request-id")
                .is_some_and(|v| v == "absolute")
        })
        .collect();
    assert_eq!(absolute.len(), 1);
    assert_eq!(absolute[0].path, "/inference");
    setup.proxy.shutdown().await;
}

/// One HTTP/1.1 response: status, lower-cased headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// One HTTP/1.1 response off the front of `raw` (its body by its Content-Length, or
/// de-chunked), and the bytes after it.
fn one_response(raw: &[u8]) -> Option<(Answer, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.get(9..12)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut rest = &raw[end..];
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line]).ok()?.trim(), 16).ok()?;
            rest = &rest[line + 2..];
            if size == 0 {
                rest = rest.get(2..)?;
                break body;
            }
            body.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
    } else {
        let length: usize = header("content-length").map_or(Some(0), |v| v.parse().ok())?;
        let body = rest.get(..length)?.to_vec();
        rest = &rest[length..];
        body
    };
    Some((
        Answer {
            status,
            headers,
            body,
        },
        rest,
    ))
}

/// `raw` is exactly one refusal: the JSON error body, a `Content-Length` that matches it,
/// `Connection: close`, nothing after it. Returns its status and code.
fn json_refusal(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let (
        Answer {
            status,
            headers,
            body,
        },
        rest,
    ) = one_response(raw).unwrap_or_else(|| panic!("not one whole HTTP/1.1 response: {text:?}"));
    assert!(rest.is_empty(), "bytes after the refusal: {text:?}");
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        header("content-length"),
        Some(body.len().to_string().as_str()),
        "{text:?}"
    );
    assert_eq!(header("connection"), Some("close"), "{text:?}");
    assert_eq!(header("content-type"), Some("application/json"), "{text:?}");
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {text:?}"));
    let message = json["error"]["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "no message: {text:?}");
    (
        status,
        json["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

/// The refusals hyper made itself before gpulink saw a request (a bare 400 or 431 with
/// no body) now carry gpulink's JSON error body, on a fresh connection, after a served
/// request on the same keep-alive connection, and pipelined behind one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_hyper_cannot_parse_get_the_json_error_body() {
    let (upstream, setup) = Setup::recorded().await;
    let limit = Duration::from_secs(20);
    let body = GUIDE_REQUEST.as_bytes();
    let keep_alive = |id: &str, extra: &str| {
        let mut request = format!(
            "POST /inference HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             X-Request-ID: {id}\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    };
    let del = "X-Model-Pool: model\x7fa\r\n";

    // Each on a fresh connection.
    let many_fields: String = (0..101).map(|i| format!("X-Field-{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, (u16, &str))> = vec![
        (
            "a DEL byte in X-Model-Pool",
            post_raw("/inference", "del", del, body),
            (400, "bad_request"),
        ),
        (
            "a 500 KiB head",
            post_raw(
                "/inference",
                "huge",
                &format!("X-Padding: {}\r\n", "a".repeat(500 * 1024)),
                body,
            ),
            (431, "headers_too_large"),
        ),
        (
            "101 header fields",
            post_raw("/inference", "fields", &many_fields, body),
            (431, "headers_too_large"),
        ),
        (
            "a method that is no token",
            b"PO(ST /inference HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            (400, "bad_request"),
        ),
        (
            "HTTP/1.2",
            b"POST /inference HTTP/1.2\r\nHost: x\r\n\r\n".to_vec(),
            (400, "bad_request"),
        ),
        (
            "a target that is no URI",
            b"POST http://[::1/inference HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            (400, "bad_request"),
        ),
        (
            "a Content-Length list",
            post_raw("/inference", "cl-list", "Content-Length: 5, 5\r\n", body),
            (400, "bad_request"),
        ),
        (
            "Transfer-Encoding gzip",
            post_raw("/inference", "te", "Transfer-Encoding: gzip\r\n", body),
            (400, "bad_request"),
        ),
    ];
    for (case, bytes, (status, code)) in &cases {
        let raw = raw_exchange_bytes(setup.addr(), bytes, limit).await;
        assert_eq!(json_refusal(&raw), (*status, code.to_string()), "{case}");
    }

    // Keep-alive: a served request, then a bad head on the same connection.
    let mut stream = tokio::net::TcpStream::connect(setup.addr())
        .await
        .expect("connect");
    stream
        .write_all(&keep_alive("first", ""))
        .await
        .expect("send");
    let mut raw = Vec::new();
    let first = tokio::time::timeout(limit, async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed before the first answer: {:?}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&chunk[..n]);
            if let Some((answer, rest)) = one_response(&raw) {
                assert!(rest.is_empty());
                break answer.status;
            }
        }
    })
    .await
    .expect("the first answer");
    assert_eq!(first, 200, "{:?}", String::from_utf8_lossy(&raw));
    stream
        .write_all(&keep_alive("second", del))
        .await
        .expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut raw))
        .await
        .expect("answered")
        .expect("read");
    assert_eq!(json_refusal(&raw), (400, "bad_request".into()));

    // Pipelined: a good request and a bad head in one write: the good one is served first.
    let mut both = keep_alive("pipelined", "");
    both.extend_from_slice(&keep_alive("pipelined-bad", del));
    let raw = raw_exchange_bytes(setup.addr(), &both, limit).await;
    let (first, rest) = one_response(&raw).expect("the first answer");
    assert_eq!(first.status, 200, "{:?}", String::from_utf8_lossy(&raw));
    assert_eq!(json_refusal(rest), (400, "bad_request".into()));

    assert_eq!(upstream.with_request_id("first"), 1);
    assert_eq!(upstream.with_request_id("pipelined"), 1);
    for id in [
        "del",
        "huge",
        "fields",
        "cl-list",
        "te",
        "second",
        "pipelined-bad",
    ] {
        assert_eq!(upstream.with_request_id(id), 0, "{id} reached the cluster");
    }
    setup.proxy.shutdown().await;
}

/// Like `raw_exchange`, bytes kept as bytes.
async fn raw_exchange_bytes(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::time::timeout(limit, async {
        let _ = stream.write_all(bytes).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer
    })
    .await
    .unwrap_or_else(|_| panic!("neither answered nor closed within {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_header_look_alikes_never_reach_the_cluster() {
    let (upstream, setup) = Setup::recorded().await;
    let spoofed = "X_Tenant_ID: evil\r\nX_KMS_Key_ID: evil\r\nX_Model_Pool: evil\r\n\
                   X_Encryption_Format: none\r\nX_Gpulink_Route: public\r\n";
    let raw = raw_exchange(
        setup.addr(),
        &post_raw(
            "/inference",
            "look-alike",
            spoofed,
            GUIDE_REQUEST.as_bytes(),
        ),
        Duration::from_secs(20),
        false,
    )
    .await;
    assert_eq!(statuses(&raw).first(), Some(&200), "{raw}");
    let requests = upstream.requests();
    let request = requests
        .iter()
        .find(|r| {
            r.headers
                .get("x-request-id")
                .is_some_and(|v| v == "look-alike")
        })
        .expect("the request reached the cluster");
    for (name, _) in request.headers.iter() {
        assert!(!name.as_str().contains('_'), "{name} was forwarded");
    }
    assert_eq!(request.headers["x-tenant-id"], "tenant-123");
    assert_eq!(request.headers["x-model-pool"], "model-a");
    setup.proxy.shutdown().await;
}

/// A cluster endpoint speaking raw HTTP/1.1 over TLS, answering by path: `/big503` a
/// 100 kB 503 with an exact Content-Length, `/cut503` a 503 that promises 100 kB and
/// closes after 30 kB (inside the peek). Health on 8080 says healthy.
async fn start_503_upstream(ip: IpAddr, pki: &Pki) -> Vec<tokio::task::JoinHandle<()>> {
    gpulink::tls::install_crypto_provider();
    let (cert, key) = pki.leaf(CertFault::None);
    let mut config = (*gpulink::tls::server_config(&cert, &key).expect("server config")).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (inference, health) = bind_upstream_ports(ip).await;
    let inference_task = tokio::spawn(async move {
        while let Ok((stream, _)) = inference.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = tls.accept(stream).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let payload = format!(
                    r#"{{"error":{{"code":"overloaded","message":"{}"}}}}"#,
                    "x".repeat(100_000 - 44)
                );
                assert_eq!(payload.len(), 100_000);
                let sent = if head.starts_with("post /cut503") {
                    30_000
                } else {
                    100_000
                };
                let answer = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                     content-length: 100000\r\nconnection: close\r\n\r\n{}",
                    &payload[..sent]
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.flush().await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let health_task = serve_healthy(health, 5);
    vec![inference_task, health_task]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_503_is_relayed_whole_and_a_cut_one_is_replaced() {
    let moto = Moto::get().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let ip = IpAddr::from([127, next_block(), 10, 50]);
    let tasks = start_503_upstream(ip, &pki).await;
    let setup = Setup::start(&[ip], moto, dir, &pki).await;
    let client = http_client();

    // Longer than the no_capacity peek: relayed whole, its Content-Length true.
    let reply = send(
        &client,
        "POST",
        &format!("http://{}/big503", setup.addr()),
        GUIDE_REQUEST.into(),
        &[],
    )
    .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body.len(), 100_000);
    assert_eq!(reply.json()["error"]["code"], "overloaded");

    // Cut short by the cluster: never a body shorter than its Content-Length; gpulink's
    // own JSON error instead (raw, so a short body would show rather than be an error).
    let raw = raw_exchange(
        setup.addr(),
        &post_raw("/cut503", "cut", "", GUIDE_REQUEST.as_bytes()),
        Duration::from_secs(20),
        false,
    )
    .await;
    let (status, code) = status_and_code(&raw);
    assert_eq!((status, code.as_str()), (502, "upstream_connect"), "{raw}");
    setup.proxy.shutdown().await;
    for task in tasks {
        task.abort();
    }
}

/// A cluster endpoint that speaks HTTP/1.1 only (ALPN without h2, as the benchmark's
/// nginx): gpulink's pool sends the origin form with `Host` set to the TLS name, and
/// requests one after another on one app connection (one worker) reuse one pooled
/// connection: each response's lease puts it back once the answer is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_endpoint_gets_the_origin_form_and_one_reused_connection() {
    let moto = Moto::get().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let ip = IpAddr::from([127, next_block(), 10, 50]);
    let upstream = RecordingUpstream::start_with(ip, &pki, CertFault::None, Alpn::Http1Only).await;
    let setup = Setup::start(&[ip], moto, dir, &pki).await;
    // One app connection, so one worker and its pool (a pooling client might open a
    // second connection, which the kernel could give to the other worker).
    let tcp = tokio::net::TcpStream::connect(setup.addr())
        .await
        .expect("connect to gpulink");
    let (mut app, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    for n in 0..10 {
        let id = format!("h1-{n}");
        app.ready().await.expect("the app connection stays open");
        let request = http::Request::post(format!("/inference?n={n}"))
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("x-request-id", &id)
            .body(http_body_util::Full::new(bytes::Bytes::from(GUIDE_REQUEST)))
            .expect("request");
        let response = app.send_request(request).await.expect("an answer");
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("the whole answer")
            .to_bytes();
        assert_eq!(status, 200, "{id}: {}", String::from_utf8_lossy(&body));
    }
    let requests = upstream.requests();
    assert_eq!(requests.len(), 10);
    for request in &requests {
        assert_eq!(request.version, http::Version::HTTP_11);
        assert_eq!(request.path, "/inference");
        assert_eq!(request.headers["host"], format!("{SERVER_NAME}:8443"));
        assert_eq!(request.headers["x-tenant-id"], "tenant-123");
    }
    let connections: std::collections::BTreeSet<u64> =
        requests.iter().map(|r| r.connection).collect();
    assert_eq!(
        connections.len(),
        1,
        "one pooled connection, reused: {connections:?}"
    );
    setup.proxy.shutdown().await;
}
