//! The adversarial cases that held when gpulink was attacked as an outsider would, kept
//! as regression tests so that they keep holding: HTTP/1.1 request smuggling and framing
//! tricks over raw sockets, hop-by-hop and identity-header spoofing, HTTP/2 abuse with a
//! hand-written frame client (rapid reset, HPACK bomb, CONTINUATION flood), certificate
//! faults on the cluster's side, and a storm of SIGHUPs under load. Every test ends by
//! showing that the proxy still serves an ordinary request.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::reliability::*;
use gpulink::config::Config;
use gpulink::proxy::ProxyHandle;
use gpulink::seal::{KeyService, KmsKeys};

const TENANT: &str = "tenant-123";

/// moto, recording upstreams and an in-process proxy in front of them.
struct Recorded {
    moto: Moto,
    key_arn: String,
    pki: Pki,
    upstreams: Vec<RecordingUpstream>,
    proxy: Option<ProxyHandle>,
    _dir: tempfile::TempDir,
}

impl Recorded {
    async fn start(block: u8, faults: &[CertFault]) -> Recorded {
        let moto = Moto::get().await;
        let key_arn = moto.create_key().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path());
        let mut upstreams = Vec::new();
        for (i, fault) in faults.iter().enumerate() {
            let ip = IpAddr::from([127, block, 10 + i as u8, 50]);
            upstreams.push(RecordingUpstream::start(ip, &pki, *fault).await);
        }
        let mut world = Recorded {
            moto,
            key_arn,
            pki,
            upstreams,
            proxy: None,
            _dir: dir,
        };
        let ips: Vec<IpAddr> = world.upstreams.iter().map(|u| u.ip).collect();
        world.proxy = Some(world.start_proxy(&ips).await);
        world
    }

    fn config(&self, ips: &[IpAddr]) -> Config {
        let text = upstream_config(ips, &self.moto.url, &self.key_arn, &self.pki.ca_file);
        Config::from_toml(&text, std::path::Path::new("adversarial.toml")).expect("valid config")
    }

    async fn start_proxy(&self, ips: &[IpAddr]) -> ProxyHandle {
        let keys = KmsKeys::new("us-east-1", Some(&self.moto.url), Duration::from_secs(3)).await;
        gpulink::proxy::start(self.config(ips), KeyService::Kms(keys))
            .await
            .expect("proxy starts")
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.as_ref().expect("proxy").listen_addr
    }

    fn upstream(&self) -> &RecordingUpstream {
        &self.upstreams[0]
    }

    /// Waits until the proxy's health checks let `ip` serve.
    async fn wait_serving(&self, ip: IpAddr) {
        wait_serving(self.proxy.as_ref().expect("proxy"), ip, true).await;
    }

    /// One well-behaved upstream on a block of its own, serving through the proxy: where
    /// each attack starts.
    async fn serving_one() -> Recorded {
        let world = Recorded::start(next_block(), &[CertFault::None]).await;
        world.wait_serving(world.upstream().ip).await;
        world
    }

    async fn stop(mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.shutdown().await;
        }
    }
}

/// After `what`, an ordinary request is served over HTTP/1.1 and over a fresh HTTP/2
/// connection.
async fn assert_still_serves(addr: SocketAddr, what: &str) {
    assert_serves(addr, what).await;
    assert_serves_h2(addr, what).await;
}

/// An ordinary request over HTTP/1.1 (hyper's client) is answered 200 by the cluster.
async fn assert_serves(addr: SocketAddr, what: &str) {
    let client = http_client();
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        send(
            &client,
            "POST",
            &format!("http://{addr}/inference"),
            GUIDE_REQUEST.into(),
            &[("x-request-id", "ordinary")],
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("after {what}: an ordinary request got no answer"));
    assert_eq!(
        reply.status,
        200,
        "after {what}: an ordinary request failed: {}",
        String::from_utf8_lossy(&reply.body)
    );
}

/// An ordinary request on a fresh HTTP/2 connection is answered 200.
async fn assert_serves_h2(addr: SocketAddr, what: &str) {
    let mut h2 = H2::connect(addr).await;
    let status = h2.request(1, "ordinary-h2", GUIDE_REQUEST.as_bytes()).await;
    assert_eq!(
        status,
        Some(200),
        "after {what}: an ordinary HTTP/2 request was not served"
    );
}

/// Nothing the attacker marked reached the cluster: no request id starting with
/// `hidden`, no header value containing `evil`, and the tenant headers are the config's.
fn assert_nothing_smuggled(upstream: &RecordingUpstream, key_arn: &str, case: &str) {
    for r in upstream.requests() {
        for (name, value) in &r.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains("evil") && !value.starts_with("hidden"),
                "{case}: the cluster received {name}: {value}"
            );
            assert!(
                !name.as_str().starts_with("x-gpulink-"),
                "{case}: the cluster received {name}"
            );
        }
        let all = |name: &str| -> Vec<String> {
            r.headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect()
        };
        assert_eq!(all("x-tenant-id"), [TENANT], "{case}");
        assert_eq!(all("x-kms-key-id"), [key_arn], "{case}");
        assert_eq!(all("x-encryption-format"), ["kms-direct-v1"], "{case}");
    }
}

fn hidden_request(id: &str) -> String {
    format!(
        "POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: {id}\r\nX-Tenant-ID: evil\r\nContent-Length: 2\r\n\r\n{{}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_smuggling_and_framing_tricks_never_reach_the_cluster() {
    let world = Recorded::serving_one().await;
    let addr = world.addr();
    let head = "POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";

    // Each case: the bytes, and which statuses a correct server may answer with. A hidden
    // request sits where one reading of the framing puts the end of the first message.
    let cl_te_body = format!("0\r\n\r\n{}", hidden_request("hidden-cl-te"));
    let cases: Vec<(&str, String, &[u16])> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "{head}X-Request-ID: outer-cl-te\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{cl_te_body}",
                cl_te_body.len()
            ),
            &[400],
        ),
        (
            "Transfer-Encoding before Content-Length",
            format!(
                "{head}X-Request-ID: outer-te-cl\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{cl_te_body}",
                cl_te_body.len()
            ),
            &[400],
        ),
        (
            "two conflicting Content-Length headers",
            format!(
                "{head}X-Request-ID: outer-cl-cl\r\nContent-Length: 2\r\nContent-Length: {}\r\n\r\n{{}}{}",
                2 + hidden_request("hidden-cl-cl").len(),
                hidden_request("hidden-cl-cl")
            ),
            &[400],
        ),
        (
            "a Content-Length list",
            format!(
                "{head}X-Request-ID: outer-cl-list\r\nContent-Length: 2, {}\r\n\r\n{{}}{}",
                2 + hidden_request("hidden-cl-list").len(),
                hidden_request("hidden-cl-list")
            ),
            &[400],
        ),
        (
            "an obfuscated Transfer-Encoding",
            format!(
                "{head}X-Request-ID: outer-te-obf\r\nContent-Length: {}\r\nTransfer-Encoding: xchunked\r\n\r\n{cl_te_body}",
                cl_te_body.len()
            ),
            &[400, 501],
        ),
        (
            "obs-fold continuing an identity header",
            format!(
                "{head}X-Request-ID: outer-fold\r\nX-Model-Pool: model-a\r\n X-Tenant-ID: evil\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
            &[400],
        ),
        (
            "obs-fold hiding Transfer-Encoding",
            format!(
                "{head}X-Request-ID: outer-fold-te\r\nContent-Length: {}\r\nX-Pad: a\r\n Transfer-Encoding: chunked\r\n\r\n{cl_te_body}",
                cl_te_body.len()
            ),
            &[400],
        ),
        (
            "a bare LF before Transfer-Encoding",
            format!(
                "{head}X-Request-ID: outer-lf\r\nContent-Length: {}\r\nX-Pad: a\nTransfer-Encoding: chunked\r\n\r\n{cl_te_body}",
                cl_te_body.len()
            ),
            &[400],
        ),
        (
            "a bare CR in a header",
            format!(
                "{head}X-Request-ID: outer-cr\r\nX-Pad: a\rX-Tenant-ID: evil\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
            &[400],
        ),
        (
            "a chunk size with a bare LF and a hidden request in the chunk",
            format!(
                "{head}X-Request-ID: outer-chunk-lf\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\n{}\r\n0\r\n\r\n",
                hidden_request("hidden-chunk-lf").len(),
                hidden_request("hidden-chunk-lf")
            ),
            &[400],
        ),
    ];
    for (case, bytes, allowed) in &cases {
        let before = world.upstream().requests().len();
        let answer = raw_exchange(addr, bytes.as_bytes(), Duration::from_secs(20), true).await;
        let statuses = statuses(&answer);
        eprintln!("{case}: {statuses:?}");
        assert!(
            !statuses.is_empty() && statuses.iter().all(|s| allowed.contains(s)),
            "{case}: answered {statuses:?}, expected one of {allowed:?}:\n{answer}"
        );
        assert_eq!(
            world.upstream().requests().len(),
            before,
            "{case}: a refused request reached the cluster"
        );
        assert_nothing_smuggled(world.upstream(), &world.key_arn, case);
    }
    // What did reach the cluster had the config's identity only.
    assert_eq!(world.upstream().with_request_id("ordinary"), 0);
    assert_serves(addr, "the framing tricks").await;
    assert_nothing_smuggled(world.upstream(), &world.key_arn, "ordinary");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_and_identity_headers_from_the_app_never_reach_the_cluster() {
    let world = Recorded::serving_one().await;
    let addr = world.addr();

    // HTTP/1.1 over a raw socket, so that no client library tidies anything up.
    let body = GUIDE_REQUEST;
    let request = format!(
        "POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Request-ID: spoof-h1\r\n\
         Connection: close, X-Tenant-ID, X-Hop-Secret\r\n\
         Keep-Alive: timeout=5\r\nX-Hop-Secret: evil-hop\r\n\
         Proxy-Authorization: Basic evil\r\nProxy-Connection: evil\r\nTE: trailers\r\n\
         X-Tenant-ID: evil-tenant\r\nx-tenant-id: evil-tenant-2\r\nX-KMS-Key-ID: evil-key\r\n\
         X-Encryption-Format: evil-none\r\nX-Gpulink-Route: evil-route\r\n\
         X-Gpulink-Endpoint: evil-endpoint\r\nX-GPULINK-Anything: evil\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(addr, request.as_bytes(), Duration::from_secs(20), false).await;
    assert_eq!(statuses(&answer), [200], "{answer}");
    assert_eq!(world.upstream().with_request_id("spoof-h1"), 1);
    assert_nothing_smuggled(world.upstream(), &world.key_arn, "HTTP/1.1 spoofing");
    let received = world.upstream().requests();
    let r = received.last().expect("a request");
    for name in [
        "connection",
        "keep-alive",
        "x-hop-secret",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(
            !r.headers.contains_key(name),
            "the cluster received the hop-by-hop header {name}"
        );
    }
    assert!(r.body_len > 0);

    // The same over HTTP/2: identity and gpulink headers as the app's own fields.
    let mut h2 = H2::connect(addr).await;
    let mut block = request_block("spoof-h2");
    literal(&mut block, "x-tenant-id", b"evil-tenant");
    literal(&mut block, "x-kms-key-id", b"evil-key");
    literal(&mut block, "x-encryption-format", b"evil-none");
    literal(&mut block, "x-gpulink-route", b"evil-route");
    h2.frame(HEADERS, END_HEADERS, 1, &block)
        .await
        .expect("headers");
    h2.frame(DATA, END_STREAM, 1, GUIDE_REQUEST.as_bytes())
        .await
        .expect("data");
    assert_eventually!(
        world.upstream().with_request_id("spoof-h2"),
        |seen| *seen > 0,
        "the HTTP/2 request never reached the cluster"
    );
    assert_nothing_smuggled(world.upstream(), &world.key_arn, "HTTP/2 spoofing");

    // A connection-specific header is malformed in HTTP/2 (RFC 9113 8.2.2): refused.
    let before = world.upstream().requests().len();
    let mut block = request_block("hidden-h2-connection");
    literal(&mut block, "connection", b"x-tenant-id");
    let status = {
        let mut h2 = H2::connect(addr).await;
        h2.frame(HEADERS, END_HEADERS, 1, &block).await.ok();
        h2.frame(DATA, END_STREAM, 1, GUIDE_REQUEST.as_bytes())
            .await
            .ok();
        let mut status = None;
        while let Some(f) = h2.read_frame(Duration::from_secs(10)).await {
            if (f.kind == RST_STREAM && f.stream == 1) || f.kind == GOAWAY {
                status = Some("reset");
                break;
            }
            if f.kind == HEADERS && f.stream == 1 {
                status = Some("answered");
                break;
            }
        }
        status
    };
    assert_ne!(
        status,
        Some("answered"),
        "a Connection header over h2 was served"
    );
    assert_eq!(world.upstream().requests().len(), before);

    assert_still_serves(addr, "header spoofing").await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_does_not_change_what_the_cluster_opens() {
    let world = World::with(ProxyOptions::default()).await;
    for ip in world.layout.enis() {
        world.wait_serving(ip, true).await;
    }
    let reply = world
        .post(
            "/inference",
            GUIDE_REQUEST,
            &[
                ("x-tenant-id", "evil-tenant"),
                (
                    "x-kms-key-id",
                    "arn:aws:kms:us-east-1:111122223333:key/evil",
                ),
                ("x-encryption-format", "none"),
                ("x-gpulink-route", "public"),
            ],
        )
        .await;
    reply.assert_status(200);
    let answer = reply.json();
    // The simulated cluster opened the body under the configured tenant and key.
    assert_eq!(answer["tenant_id"], TENANT);
    assert_eq!(answer["key_id"], world.key_arn.as_str());
    assert_eq!(answer["format"], "kms-direct-v1");
    assert_eq!(answer["opened"], true);
    assert_eq!(answer["sha256"], sha256_hex(GUIDE_REQUEST.as_bytes()));
    assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    let plaintext: u64 = world.sim.all_stats().iter().map(|s| s.plaintext_seen).sum();
    assert_eq!(plaintext, 0);
    world.stop().await;
}

/// Reads frames until the connection is closed or goes quiet; whether it was closed.
async fn closed_within(h2: &mut H2, limit: Duration) -> bool {
    h2.wait_closed(limit).await.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_reaches_nothing_and_others_are_served() {
    let world = Recorded::serving_one().await;
    let addr = world.addr();

    // CVE-2023-44487: open streams and cancel them at once, as fast as the socket takes.
    let mut h2 = H2::connect(addr).await;
    let mut burst = Vec::new();
    let mut sent = 0u32;
    let block = request_block("hidden-rapid-reset");
    for i in 0..5_000u32 {
        let stream = 1 + 2 * i;
        burst.extend(H2::encode(HEADERS, END_HEADERS, stream, &block));
        burst.extend(H2::encode(RST_STREAM, 0, stream, &8u32.to_be_bytes())); // CANCEL
        if burst.len() > 256 * 1024 {
            if h2.write_raw(&burst).await.is_err() {
                break;
            }
            burst.clear();
        }
        sent = i + 1;
    }
    let _ = h2.write_raw(&burst).await;
    eprintln!("rapid reset: {sent} streams opened and cancelled");
    // Bounded either way: the proxy may answer GOAWAY (ENHANCE_YOUR_CALM) or keep up.
    let closed = closed_within(&mut h2, Duration::from_secs(10)).await;
    eprintln!("rapid reset: connection closed by the proxy: {closed}");
    // None of the cancelled requests had a body: none may reach the cluster.
    assert_eq!(world.upstream().with_request_id("hidden-rapid-reset"), 0);
    assert_still_serves(addr, "a rapid reset").await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_closes_that_connection_only() {
    let world = Recorded::serving_one().await;
    let addr = world.addr();

    // One 4 KB entry in the dynamic table, then referenced with one byte each: 16 KB on
    // the wire per frame, 64 MB of headers once decoded, over a handful of frames.
    let mut h2 = H2::connect(addr).await;
    let mut first = request_block("hidden-hpack-bomb");
    literal_indexed(&mut first, "x-bomb", &[b'a'; 4000]);
    while first.len() < 16_000 {
        indexed(&mut first, 62);
    }
    let mut closed_while_sending = h2.frame(HEADERS, 0, 1, &first).await.is_err();
    let more = vec![0xbeu8; 16_000]; // indexed(62)
    for _ in 0..64 {
        if closed_while_sending {
            break;
        }
        closed_while_sending = h2.frame(CONTINUATION, 0, 1, &more).await.is_err();
    }
    if !closed_while_sending {
        let _ = h2.frame(CONTINUATION, END_HEADERS, 1, &more).await;
    }
    let closed = closed_while_sending || closed_within(&mut h2, Duration::from_secs(20)).await;
    assert!(closed, "the HPACK bomb's connection stayed open");
    assert_eq!(world.upstream().with_request_id("hidden-hpack-bomb"), 0);
    assert_still_serves(addr, "an HPACK bomb").await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_closes_that_connection_only() {
    let world = Recorded::serving_one().await;
    let addr = world.addr();

    // CVE-2024-27316 and friends: a header block that never ends, fresh literal headers
    // in every CONTINUATION frame. Bounded at 64 MB; the proxy must hang up long before.
    let mut h2 = H2::connect(addr).await;
    let block = request_block("hidden-continuation");
    h2.frame(HEADERS, 0, 1, &block).await.expect("headers");
    let H2 { mut frames, writer } = h2;
    let (tx, mut closed_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(async move {
        let closed = frames.wait_closed(Duration::from_secs(60)).await;
        let _ = tx.send(closed);
    });
    let mut writer = writer;
    let mut sent = 0usize;
    let mut n = 0u64;
    let limit = 64 * 1024 * 1024;
    while sent < limit {
        if closed_rx.try_recv().is_ok() {
            break;
        }
        let mut payload = Vec::with_capacity(16_384);
        while payload.len() < 16_000 {
            literal(
                &mut payload,
                &format!("x-flood-{n}"),
                b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            );
            n += 1;
        }
        let frame = H2::encode(CONTINUATION, 0, 1, &payload);
        if tokio::io::AsyncWriteExt::write_all(&mut writer, &frame)
            .await
            .is_err()
        {
            break;
        }
        sent += frame.len();
    }
    eprintln!("continuation flood: {sent} bytes sent before the proxy hung up");
    assert!(sent < limit, "the proxy took 64 MB of one header block");
    let _ = tokio::time::timeout(Duration::from_secs(60), watcher).await;
    assert_eq!(world.upstream().with_request_id("hidden-continuation"), 0);
    assert_still_serves(addr, "a CONTINUATION flood").await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_faults_on_the_cluster_side_refuse_the_request_and_send_nothing() {
    let faults = [
        CertFault::Expired,
        CertFault::WrongName,
        CertFault::SelfSigned,
        CertFault::None,
    ];
    let mut world = Recorded::start(next_block(), &faults).await;
    let good = world.upstreams[3].ip;
    world.proxy.take().expect("proxy").shutdown().await;
    for (i, fault) in faults[..3].iter().enumerate() {
        let upstream = &world.upstreams[i];
        let proxy = world.start_proxy(&[upstream.ip]).await;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        for n in 0..3 {
            let reply = send(
                &client,
                "POST",
                &format!("http://{}/inference", proxy.listen_addr),
                GUIDE_REQUEST.into(),
                &[("x-request-id", &format!("cert-{i}-{n}"))],
            )
            .await;
            assert!(
                reply.status == 502 || reply.status == 503,
                "{fault:?}: answered {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
            let code = reply.error_code();
            assert!(
                code == "upstream_connect" || code == "no_endpoint",
                "{fault:?}: error code {code}"
            );
        }
        assert!(
            upstream.requests().is_empty(),
            "{fault:?}: the cluster received a request over an unverified connection"
        );
        // The same proxy serves once its configuration names a verifiable endpoint.
        proxy
            .proxy()
            .reload(world.config(&[good]))
            .await
            .expect("reload to the good endpoint");
        wait_serving(&proxy, good, true).await;
        assert_serves(proxy.listen_addr, &format!("{fault:?}")).await;
        assert!(upstream.requests().is_empty());
        proxy.shutdown().await;
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_sighups_under_load_fail_no_request() {
    let d = Arc::new(Deployment::start(next_block(), "privatelink").await);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (d, stop, ok) = (d.clone(), stop.clone(), ok.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            // Bounded: at most 20,000 requests per worker even if never told to stop.
            for n in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match d.post(&format!("sighup-{w}-{n}")).await {
                    Ok(reply) if reply.status == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(reply) => failures.push(format!(
                        "{} {}",
                        reply.status,
                        String::from_utf8_lossy(&reply.body)
                    )),
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }
    let phases = ["privatelink", "canary", "public"];
    let mut changes = 0;
    for i in 0..100u64 {
        let before = ok.load(Ordering::SeqCst);
        // Every other SIGHUP comes with an edited file (every third edit changes the
        // phase) and must apply it once; the others find the file unchanged and must
        // change nothing (gpulink compares the content).
        if i % 2 == 0 {
            d.write_phase_noted(
                phases[(i / 6) as usize % phases.len()],
                &format!("edit {i}"),
            );
            changes += 1;
        }
        signal(&d.proxy.0, "HUP");
        d.wait_reloads(changes).await;
        // Some requests between SIGHUPs, so the storm really is under load.
        assert_eventually!(
            ok.load(Ordering::SeqCst),
            |ok| *ok >= before + 2,
            "no request succeeded after SIGHUP {i}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.expect("worker"));
    }
    let served = ok.load(Ordering::SeqCst);
    eprintln!("100 SIGHUPs: {served} requests served");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during 100 SIGHUPs: {:?}",
        failures.len(),
        served + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    let status = d.status().await;
    assert_eq!(status["reloads"]["applied"], changes, "{status}");
    assert_eq!(status["reloads"]["rejected"], 0);
    let reply = d.post("after-sighups").await.expect("answer");
    assert_eq!(reply.status, 200);
}
