//! Ingress behaviour seen by real clients: a 413 that ordinary clients read instead of a
//! reset, HTTP/2 with prior knowledge (and its header list limit, consistent with
//! HTTP/1.1's), a client that half-closes after its request, and a streamed
//! (server-sent events) answer.

use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_reads_the_413_for_a_huge_body() {
    let world = World::with(ProxyOptions::default()).await;
    let url = world.url("/inference");
    // 30 MB, three times listen.max_body: far more than socket buffers hold, so a
    // server that closed without draining would make `requests` fail with a reset.
    let script = format!(
        "import requests\n\
         r = requests.post('{url}', data=b'{{' + b' ' * 30_000_000 + b'}}', timeout=60)\n\
         print(r.status_code, r.json()['error']['code'])\n"
    );
    let output = tokio::process::Command::new(venv_bin("python"))
        .arg("-c")
        .arg(script)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_success(&output, "python failed");
    assert_eq!(stdout.trim(), "413 body_too_large");
    assert_eq!(world.total_requests(), 0);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::with(ProxyOptions::default().set("listen.max_body", "1KB")).await;
    // A chunked body has no Content-Length: the limit is enforced while reading.
    let mut stream = tokio::net::TcpStream::connect(world.proxy().listen_addr)
        .await
        .expect("connect");
    let mut request = b"POST /inference HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..8 {
        request.extend_from_slice(b"200\r\n");
        request.extend_from_slice(&[b' '; 512]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    assert_eq!(world.total_requests(), 0);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge() {
    let world = World::with(ProxyOptions::default()).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let reply = send(
        &client,
        "POST",
        &world.url("/inference"),
        GUIDE_REQUEST.into(),
        &[],
    )
    .await;
    reply.assert_status(200);
    assert_eq!(reply.json()["sha256"], sha256_hex(GUIDE_REQUEST.as_bytes()));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_are_relayed_as_a_stream() {
    let world = World::with(ProxyOptions::default()).await;
    let request = http::Request::post(world.url("/inference"))
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::from_static(
            br#"{"prompt": "Hello", "max_tokens": 5, "stream": true}"#,
        )))
        .expect("request");
    let response = world.client.request(request).await.expect("answer");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut body = response.into_body();
    let mut frames = 0;
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Some(data) = frame.data_ref() {
            frames += 1;
            text.push_str(&String::from_utf8_lossy(data));
        }
    }
    assert!(frames > 1, "the answer arrived as {frames} frame(s)");
    assert_eq!(text.matches("data: ").count(), 6, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    world.stop().await;
}

/// Reads a streamed answer to the end; returns (events, whether it ended cleanly).
async fn read_stream(world: &World, body: &'static str) -> (String, bool) {
    let request = http::Request::post(world.url("/inference"))
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let response = world.client.request(request).await.expect("answer");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    text.push_str(&String::from_utf8_lossy(data));
                }
            }
            Err(_) => return (text, false),
        }
    }
    (text, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_generation_is_not_cut_but_a_stalled_one_is() {
    let world = World::with(ProxyOptions::default().set("upstream.idle_timeout", "500ms")).await;
    // 12 tokens 100 ms apart: longer than the idle timeout in total, never silent for it.
    let (text, clean) = read_stream(
        &world,
        r#"{"prompt": "Hello", "max_tokens": 12, "stream": true, "token_delay_ms": 100}"#,
    )
    .await;
    assert!(clean, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Silent for 3 s between tokens: cut after the first token.
    let (text, clean) = read_stream(
        &world,
        r#"{"prompt": "Hello", "max_tokens": 3, "stream": true, "token_delay_ms": 3000}"#,
    )
    .await;
    assert!(!clean, "a stalled stream ended cleanly: {text}");
    assert!(text.starts_with("data: {\"token\": 0}"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    world.stop().await;
}

/// The HTTP/2 header list limit lets every head gpulink forwards through, and a head
/// over gpulink's 32 KiB limit gets the same JSON 431 `headers_too_large` as on h1, not
/// the h2 library's bare 431 (hyper's default list limit was 16 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_header_list_limit_matches_the_http1_head_limit() {
    let world = World::start(242, ProxyOptions::default()).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // The guide request with an `X-Padding` header of `n` bytes.
    let padded = |n: usize| {
        let (client, url) = (client.clone(), world.url("/inference"));
        async move {
            let padding = "a".repeat(n);
            let headers = [("x-padding", padding.as_str())];
            send(&client, "POST", &url, GUIDE_REQUEST.into(), &headers).await
        }
    };
    // (The simulated cluster's own h2 list limit is hyper's default 16 KiB.)
    let reply = padded(12_000).await;
    assert_eq!(
        reply.status,
        200,
        "a 12 KB head is under the limit: {}",
        String::from_utf8_lossy(&reply.body)
    );
    let before = world.total_requests();
    let reply = padded(40_000).await;
    assert_eq!(reply.status, 431);
    assert_eq!(reply.error_code(), "headers_too_large");
    assert_eq!(world.total_requests(), before, "refused before the cluster");
    world.stop().await;
}

/// A client that shuts down its sending side once its request is sent (`shutdown(SHUT_WR)`,
/// as `nc -N` and some scripts do) still gets its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_client_that_half_closes_after_its_request_gets_the_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::start(243, ProxyOptions::default()).await;
    let body = GUIDE_REQUEST;
    let request = format!(
        "POST /inference HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(world.proxy().listen_addr)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream.shutdown().await.expect("shutdown write");
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the proxy answers or closes")
    .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.contains(&sha256_hex(body.as_bytes())),
        "the cluster's answer: {answer:?}"
    );
    world.stop().await;
}
