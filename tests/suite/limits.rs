//! Clients that hold on: every connection is bounded in time (a silent connection, a
//! partial HTTP/2 preface or request head, a stalled or trickled body, an idle keep-alive
//! connection, an HTTP/2 peer that stops answering pings are all closed), idle sockets
//! cannot exhaust `listen.max_connections` or the admin listener's limit, and the
//! file-descriptor limit is shared so admin clients cannot starve the data path.
//!
//! Raw sockets throughout: the point is clients that no library would be.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any close is awaited: a bound so a broken build fails instead of hanging,
/// not a timing assertion (the configured timeouts are well under a second).
const CLOSE_BOUND: Duration = Duration::from_secs(30);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// The proxy's configuration for this test: the shared one with `options`' settings and
/// both listeners on the test's block (`listen`, `admin`).
fn config_text(
    cluster: &Cluster,
    listen: SocketAddr,
    admin: SocketAddr,
    options: &ProxyOptions,
) -> String {
    let options = options
        .clone()
        .set("listen.address", listen)
        .set("admin.address", admin);
    cluster.config_toml(&options)
}

/// moto, the simulator and an in-process proxy whose listeners are on the test's block.
async fn world(block: u8, options: ProxyOptions) -> World {
    let ip = Layout::new(block).ip(0, 2);
    let options = options
        .set("listen.address", SocketAddr::new(ip, 0))
        .set("admin.address", SocketAddr::new(ip, 0));
    World::start(block, options).await
}

/// Reads until the server closes the connection (EOF or reset); returns what it sent.
async fn await_close(stream: &mut (impl AsyncReadExt + Unpin), what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let read = async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    if tokio::time::timeout(CLOSE_BOUND, read).await.is_err() {
        panic!("{what}: the connection was never closed");
    }
    received
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

fn head_with_length(length: usize) -> Vec<u8> {
    format!(
        "POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .into_bytes()
}

fn assert_body_timeout(answer: &[u8], what: &str) {
    let text = String::from_utf8_lossy(answer);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "{what}: expected a 408, got {text}"
    );
    assert!(
        text.contains(r#""code":"body_timeout""#),
        "{what}: no JSON error: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_partial_and_slow_clients_are_closed() {
    let world = world(
        next_block(),
        ProxyOptions::default()
            .set("listen.header_read_timeout", "300ms")
            .set("listen.body_read_timeout", "500ms")
            .set("listen.body_min_rate", "1KiB")
            .set("listen.idle_timeout", "300ms")
            .set("admin.header_read_timeout", "300ms")
            .set("admin.idle_timeout", "300ms"),
    )
    .await;
    let listen = world.proxy().listen_addr;
    let admin = world.proxy().admin_addr;

    for (addr, name) in [(listen, "app"), (admin, "admin")] {
        let mut silent = connect(addr).await;
        await_close(
            &mut silent,
            &format!("{name}: a connection that sends nothing"),
        )
        .await;

        let mut preface = connect(addr).await;
        preface.write_all(&H2_PREFACE[..10]).await.expect("write");
        await_close(&mut preface, &format!("{name}: a partial HTTP/2 preface")).await;

        let mut h2_silent = connect(addr).await;
        h2_silent.write_all(H2_PREFACE).await.expect("write");
        h2_silent.write_all(H2_SETTINGS).await.expect("write");
        await_close(&mut h2_silent, &format!("{name}: HTTP/2 without a request")).await;

        let mut head = connect(addr).await;
        head.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        await_close(&mut head, &format!("{name}: a partial request head")).await;

        // Served, then idle on keep-alive.
        let mut idle = connect(addr).await;
        idle.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answer =
            await_close(&mut idle, &format!("{name}: an idle keep-alive connection")).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 "),
            "{name}: the request before the idle time was not answered"
        );
    }

    // A body that stops.
    let mut stalled = connect(listen).await;
    stalled
        .write_all(&head_with_length(1000))
        .await
        .expect("write");
    stalled.write_all(b"{\"prompt\": ").await.expect("write");
    let answer = await_close(&mut stalled, "a stalled body").await;
    assert_body_timeout(&answer, "a stalled body");

    // A body that keeps coming, one byte at a time, each silence well within
    // body_read_timeout: only the minimum rate can end it.
    let trickle = connect(listen).await;
    let (mut reader, mut writer) = trickle.into_split();
    writer
        .write_all(&head_with_length(1000))
        .await
        .expect("write");
    let dripping = tokio::spawn(async move {
        for _ in 0..1000 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let answer = await_close(&mut reader, "a trickled body").await;
    assert_body_timeout(&answer, "a trickled body");
    dripping.abort();

    // And ordinary requests are still served.
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    reply.assert_status(200);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_that_stops_answering_pings_is_closed() {
    // Long head and idle bounds on both listeners: only the keep-alive ping (the admin
    // listener uses `[listen]`'s) can close these connections.
    let world = world(
        next_block(),
        ProxyOptions::default()
            .set("listen.header_read_timeout", "5m")
            .set("listen.idle_timeout", "1h")
            .set("listen.h2_keepalive_interval", "200ms")
            .set("listen.h2_keepalive_timeout", "200ms")
            .set("admin.header_read_timeout", "5m")
            .set("admin.idle_timeout", "1h"),
    )
    .await;
    for (addr, name) in [
        (world.proxy().listen_addr, "app"),
        (world.proxy().admin_addr, "admin"),
    ] {
        let mut peer = connect(addr).await;
        peer.write_all(H2_PREFACE).await.expect("write");
        peer.write_all(H2_SETTINGS).await.expect("write");
        let received = await_close(
            &mut peer,
            &format!("{name}: an HTTP/2 peer that never acknowledges a ping"),
        )
        .await;
        // Frame type 6 is PING: the server asked before giving up.
        let mut offset = 0;
        let mut pinged = false;
        while offset + 9 <= received.len() {
            let length = usize::from(received[offset]) << 16
                | usize::from(received[offset + 1]) << 8
                | usize::from(received[offset + 2]);
            pinged |= received[offset + 3] == 6;
            offset += 9 + length;
        }
        assert!(pinged, "{name}: the server closed without pinging");
    }
    world.stop().await;
}

/// `/status`'s count of open connections on a listener (`listen` or `admin`).
async fn open_connections(world: &World, listener: &str) -> u64 {
    world.status().await["connections"][listener]["open"]
        .as_u64()
        .unwrap_or(0)
}

async fn wait_open(world: &World, listener: &str, at_least: u64) {
    assert_eventually!(
        within = CLOSE_BOUND,
        open_connections(world, listener).await,
        |open| *open >= at_least,
        "{listener}: never saw {at_least} open connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_lock_out_the_listeners() {
    // Head timeouts far beyond the test: only closing idle connections first can admit
    // the requests below.
    let world = world(
        next_block(),
        ProxyOptions::default()
            .set("listen.max_connections", 40)
            .set("listen.header_read_timeout", "5m")
            .set("listen.idle_timeout", "1h")
            .set("admin.max_connections", 8)
            .set("admin.header_read_timeout", "5m")
            .set("admin.idle_timeout", "1h"),
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(connect(world.proxy().listen_addr).await);
    }
    wait_open(&world, "listen", 40).await;
    let reply = tokio::time::timeout(CLOSE_BOUND, world.post("/inference", GUIDE_REQUEST, &[]))
        .await
        .expect("a request with 40 silent connections at max_connections = 40 was never served");
    reply.assert_status(200);

    // The admin listener: a crowd far past its limit.
    let mut crowd = Vec::new();
    for _ in 0..50 {
        crowd.push(connect(world.proxy().admin_addr).await);
    }
    let reply = tokio::time::timeout(CLOSE_BOUND, world.admin("/ready"))
        .await
        .expect("/ready was never answered with the admin listener crowded");
    assert_eq!(reply.status, 200);
    let connections = &world.status().await["connections"];
    assert!(
        connections["admin"]["open"].as_u64() <= Some(8),
        "{connections}"
    );
    assert!(
        connections["admin"]["evicted"].as_u64() >= Some(1),
        "{connections}"
    );
    assert!(
        connections["listen"]["evicted"].as_u64() >= Some(1),
        "{connections}"
    );
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(reply.status, 200);
    drop((silent, crowd));
    world.stop().await;
}

/// `gpulink run` as a child process with `extra` shell before the exec (e.g. `ulimit`).
struct Proxy {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    _config: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    async fn start(cluster: &Cluster, options: ProxyOptions, shell: &str) -> Proxy {
        let ip = cluster.layout.ip(0, 2);
        let (listen_addr, admin_addr) = (SocketAddr::new(ip, 8000), SocketAddr::new(ip, 9901));
        let text = config_text(cluster, listen_addr, admin_addr, &options);
        let path = cluster.dir.path().join("gpulink.toml");
        std::fs::write(&path, text).expect("write config");
        let mut run = Command::new("sh");
        run.arg("-c")
            .arg(format!("{shell}\nexec \"$0\" run --config \"$1\""))
            .arg(env!("CARGO_BIN_EXE_gpulink"))
            .arg(&path);
        let child = crate::reliability::spawn_proxy(&mut run, &proxy_log("warn"), Stdio::inherit());
        let proxy = Proxy {
            child,
            listen: listen_addr,
            admin: admin_addr,
            _config: path,
        };
        let client = http_client();
        assert_eventually!(
            within = Duration::from_secs(60),
            {
                let request = http::Request::get(format!("http://{admin_addr}/ready"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("request");
                client
                    .request(request)
                    .await
                    .map(|r| r.status().as_u16())
                    .ok()
            },
            |status| *status == Some(200),
            "gpulink run never became ready"
        );
        proxy
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_crowd_cannot_take_file_descriptors_from_the_data_path() {
    let cluster = Cluster::start(next_block()).await;
    // 300 descriptors and 400 admin clients: without an admin limit and a reserve, the
    // admin listener takes them all and the app listener cannot accept.
    let proxy = Proxy::start(
        &cluster,
        ProxyOptions::default()
            .set("admin.header_read_timeout", "5m")
            .set("admin.idle_timeout", "1h"),
        "ulimit -n 300 || exit 99",
    )
    .await;
    let mut crowd = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect(proxy.admin).await {
            Ok(stream) => crowd.push(stream),
            Err(_) => break,
        }
    }
    let client = http_client();
    let url = format!("http://{}/inference", proxy.listen);
    for _ in 0..5 {
        let reply = tokio::time::timeout(
            CLOSE_BOUND,
            send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]),
        )
        .await
        .expect("an app request was never answered with the admin listener crowded");
        reply.assert_status(200);
    }
    let ready = format!("http://{}/ready", proxy.admin);
    let reply = tokio::time::timeout(CLOSE_BOUND, send(&client, "GET", &ready, Vec::new(), &[]))
        .await
        .expect("/ready was never answered");
    assert_eq!(reply.status, 200);
    drop(crowd);
}

/// The proxy process's resident set, in bytes.
fn rss(child: &Child) -> u64 {
    crate::reliability::rss_kib(child.id()).expect("VmRSS in /proc/<pid>/status") * 1024
}

/// What `/status` says the requests in flight hold.
async fn held_bytes(client: &HttpClient, admin: SocketAddr) -> u64 {
    let url = format!("http://{admin}/status");
    let reply = send(client, "GET", &url, Vec::new(), &[]).await;
    reply.json()["request_bodies"]["held_bytes"]
        .as_u64()
        .expect("request_bodies.held_bytes")
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response(stream: &mut TcpStream) -> String {
    let read = async {
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&received).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if received.len() >= end + 4 + length {
                    return text;
                }
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&received).into_owned(),
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(CLOSE_BOUND, read)
        .await
        .expect("no response")
}

const DECLARED: usize = 10_000_000;
const SENT: usize = 4_000_000;

/// An HTTP/2 stream that declares a 10 MB body and sends 4 MB of it as flow control
/// allows; returns once sent (or refused), keeping the stream open.
async fn h2_upload(
    client: &mut h2::client::SendRequest<Bytes>,
    url: &str,
) -> tokio::task::JoinHandle<(h2::SendStream<Bytes>, h2::client::ResponseFuture)> {
    let request = http::Request::post(url)
        .header("content-length", DECLARED.to_string())
        .header("content-type", "application/json")
        .body(())
        .expect("request");
    let (response, mut stream) = client.send_request(request, false).expect("send_request");
    tokio::spawn(async move {
        let mut left = SENT;
        while left > 0 {
            stream.reserve_capacity(left.min(64 * 1024));
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(left);
                    if stream.send_data(Bytes::from(vec![b' '; n]), false).is_err() {
                        break;
                    }
                    left -= n;
                }
                _ => break,
            }
        }
        (stream, response)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_cannot_hold_more_than_the_in_flight_budget() {
    const BUDGET: u64 = 48 * 1024 * 1024;
    /// What the process may use beyond its size before the uploads and the budget: HTTP/2
    /// windows, HTTP/1.1 read buffers, allocator slack.
    const OVERHEAD: u64 = 64 * 1024 * 1024;
    let cluster = Cluster::start(next_block()).await;
    let proxy = Proxy::start(
        &cluster,
        ProxyOptions::default()
            .set("listen.max_in_flight_bytes", "48MiB")
            .set("listen.body_read_timeout", "5m")
            .set("listen.body_min_rate", 0),
        "",
    )
    .await;
    let client = http_client();
    let url = format!("http://{}/inference", proxy.listen);
    let reply = send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]).await;
    reply.assert_status(200);
    let baseline = rss(&proxy.child);

    // 32 HTTP/1.1 uploads and 32 HTTP/2 streams on one connection, each declaring 10 MB
    // and sending 4 MB: 256 MB if all were held.
    let mut h1 = Vec::new();
    for _ in 0..32 {
        let mut stream = connect(proxy.listen).await;
        h1.push(tokio::spawn(async move {
            let _ = stream.write_all(&head_with_length(DECLARED)).await;
            let _ = stream.write_all(&vec![b' '; SENT]).await;
            stream
        }));
    }
    let (mut h2_client, h2_connection) = h2::client::handshake(connect(proxy.listen).await)
        .await
        .expect("h2 handshake");
    let h2_task = tokio::spawn(h2_connection);
    let mut h2_streams = Vec::new();
    for _ in 0..32 {
        h2_client = h2_client.ready().await.expect("h2 ready");
        h2_streams.push(h2_upload(&mut h2_client, &url).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut h1_streams = Vec::new();
    for task in h1 {
        let stream = tokio::time::timeout_at(deadline, task)
            .await
            .expect("an HTTP/1.1 upload never got its 4 MB out")
            .expect("task");
        h1_streams.push(stream);
    }
    let mut held_streams = Vec::new();
    for task in h2_streams {
        let stream = tokio::time::timeout_at(deadline, task)
            .await
            .expect("an HTTP/2 upload never got its 4 MB out (flow control stuck)")
            .expect("task");
        held_streams.push(stream);
    }

    // (a) The budget is spent: a new request is refused with JSON, on both protocols.
    let held = held_bytes(&client, proxy.admin).await;
    assert!(
        held <= BUDGET,
        "held {held} bytes over a {BUDGET}-byte budget"
    );
    assert!(
        held + 2 * DECLARED as u64 > BUDGET,
        "the stalled uploads should have spent the budget, yet only {held} bytes are held"
    );
    let mut fresh = connect(proxy.listen).await;
    fresh
        .write_all(&head_with_length(DECLARED))
        .await
        .expect("write");
    let answer = read_response(&mut fresh).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"overloaded""#), "{answer}");
    h2_client = h2_client.ready().await.expect("h2 ready");
    let request = http::Request::post(&url)
        .header("content-length", DECLARED.to_string())
        .body(())
        .expect("request");
    let (response, _open) = h2_client.send_request(request, false).expect("send");
    let response = tokio::time::timeout(CLOSE_BOUND, response)
        .await
        .expect("no HTTP/2 answer")
        .expect("HTTP/2 response");
    assert_eq!(response.status(), 503);
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    let json: serde_json::Value = serde_json::from_slice(&text).expect("JSON error body");
    assert_eq!(json["error"]["code"], "overloaded");

    // (b) What the process holds stays within the budget and a fixed overhead.
    let now = rss(&proxy.child);
    assert!(
        now <= baseline + BUDGET + OVERHEAD,
        "RSS grew from {baseline} to {now} bytes holding 64 stalled uploads with a {BUDGET}-byte budget"
    );

    // (c) Once the uploads go away, requests are served again.
    drop((h1_streams, held_streams, fresh, h2_client));
    h2_task.abort();
    assert_eventually!(
        within = CLOSE_BOUND,
        held_bytes(&client, proxy.admin).await,
        |held| *held == 0,
        "the uploads' reservations were never released"
    );
    let reply = send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]).await;
    reply.assert_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answers_is_closed() {
    // Long head and idle bounds: only the send bound can end this connection.
    let world = world(
        next_block(),
        ProxyOptions::default()
            .set("listen.send_timeout", "300ms")
            .set("listen.header_read_timeout", "5m")
            .set("listen.idle_timeout", "1h")
            .set("admin.header_read_timeout", "5m")
            .set("admin.idle_timeout", "1h"),
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket
        .connect(world.proxy().admin_addr)
        .await
        .expect("connect");
    let (_unread, mut writer) = stream.into_split();
    // Pipelined requests whose answers are never read: once the socket buffers are full,
    // the server's writes wait, then it gives up and closes; the next writes fail.
    let writing = tokio::spawn(async move {
        let request = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
        for _ in 0..100_000 {
            if writer.write_all(&request).await.is_err() {
                return true;
            }
        }
        false
    });
    let closed = tokio::time::timeout(CLOSE_BOUND, writing)
        .await
        .expect("a client that reads nothing was never disconnected")
        .expect("task");
    assert!(
        closed,
        "the server answered 10 million requests nobody read"
    );
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(reply.status, 200);
    world.stop().await;
}
