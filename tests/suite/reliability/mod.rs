//! Tools of the reliability suite (`tests/suite/adversarial.rs`, `tests/suite/soak.rs`): what an
//! outsider uses against gpulink where client libraries refuse to misbehave.
//!
//! * [`raw_exchange`]: bytes in, bytes out over a raw TCP socket (HTTP/1.1 framing tricks).
//! * [`H2`]: a hand-written HTTP/2 frame client with prior knowledge (h2c), able to send
//!   what no conforming client sends: resets in bulk, HPACK bombs, endless CONTINUATION.
//! * [`RecordingUpstream`]: a TLS "cluster" endpoint that records every request head it
//!   receives (to prove what reached the cluster) and can serve a faulty certificate.
//! * [`Deployment`]: the real binaries, `gpulink sim` and `gpulink run`, with moto as KMS,
//!   for SIGHUP storms and the soak.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{
    assert_eventually, config_with_regions, http_client, proxy_config, proxy_log, read_request,
    toml_text, HttpClient, Layout, Moto, ProxyOptions, Reply,
};

/// The TLS name the proxy verifies in these tests.
pub const SERVER_NAME: &str = "gpu-cluster.yourcompany.internal";

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1

/// Sends `bytes` on a fresh connection and returns everything the server sent back
/// until it closed the connection; panics if it did neither within `limit`.
///
/// With `half_close`, the client's side is shut after the bytes, so that a server that
/// refuses the head closes at once. hyper closes a connection whose client half-closed
/// without answering requests still in progress, so a request that should be served
/// must instead ask for `Connection: close`.
pub async fn raw_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    limit: Duration,
    half_close: bool,
) -> String {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let exchange = async {
        // The server may close before reading everything (it refused the head).
        let _ = stream.write_all(bytes).await;
        if half_close {
            let _ = stream.shutdown().await;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        answer
    };
    let answer = tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| panic!("the proxy neither answered nor closed within {limit:?}"));
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status codes of the HTTP/1.1 responses in `raw`, in order.
pub fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------
// HTTP/2 frames, by hand

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// One frame as read from the server.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// "Literal header field without indexing, new name" (RFC 7541 6.2.2).
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_string(out, name.as_bytes());
    hpack_string(out, value);
}

/// "Literal header field with incremental indexing, new name" (RFC 7541 6.2.1): the
/// entry lands at dynamic index 62.
pub fn literal_indexed(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    hpack_string(out, name.as_bytes());
    hpack_string(out, value);
}

/// "Indexed header field" (RFC 7541 6.1).
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    hpack_int(out, 0x80, 7, index);
}

/// The header block of `POST /inference` over h2c.
pub fn request_block(request_id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", b"POST");
    literal(&mut b, ":scheme", b"http");
    literal(&mut b, ":path", b"/inference");
    literal(&mut b, ":authority", b"127.0.0.1");
    literal(&mut b, "content-type", b"application/json");
    literal(&mut b, "x-request-id", request_id.as_bytes());
    b
}

/// The reading side of an HTTP/2 connection: frames as the server sends them.
pub struct FrameReader {
    reader: tokio::net::tcp::OwnedReadHalf,
    buffer: Vec<u8>,
}

impl FrameReader {
    /// The next frame, `None` once the server has closed the connection (or reset it),
    /// or after `limit` of silence.
    pub async fn read_frame(&mut self, limit: Duration) -> Option<Frame> {
        loop {
            if self.buffer.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buffer[0], self.buffer[1], self.buffer[2]])
                    as usize;
                if self.buffer.len() >= 9 + len {
                    let head: Vec<u8> = self.buffer.drain(..9 + len).collect();
                    return Some(Frame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]])
                            & 0x7fff_ffff,
                        payload: head[9..].to_vec(),
                    });
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout(limit, self.reader.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until the server closes the connection or sends GOAWAY. `Some(code)` when
    /// it did (the GOAWAY error code, if one came), `None` if still open after `limit`.
    pub async fn wait_closed(&mut self, limit: Duration) -> Option<Option<u32>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.read_frame(left).await {
                None if tokio::time::Instant::now() >= deadline => return None,
                None => return Some(None),
                Some(f) if f.kind == GOAWAY && f.payload.len() >= 8 => {
                    let code = u32::from_be_bytes([
                        f.payload[4],
                        f.payload[5],
                        f.payload[6],
                        f.payload[7],
                    ]);
                    return Some(Some(code));
                }
                Some(_) => {}
            }
        }
    }
}

/// A client connection speaking HTTP/2 with prior knowledge, frame by frame.
pub struct H2 {
    pub frames: FrameReader,
    pub writer: tokio::net::tcp::OwnedWriteHalf,
}

impl H2 {
    /// Connects and sends the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> H2 {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let mut h2 = H2 {
            frames: FrameReader {
                reader,
                buffer: Vec::new(),
            },
            writer,
        };
        h2.write_raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface");
        h2.frame(SETTINGS, 0, 0, &[]).await.expect("settings");
        h2
    }

    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub async fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.write_raw(&Self::encode(kind, flags, stream, payload))
            .await
    }

    pub async fn read_frame(&mut self, limit: Duration) -> Option<Frame> {
        self.frames.read_frame(limit).await
    }

    pub async fn wait_closed(&mut self, limit: Duration) -> Option<Option<u32>> {
        self.frames.wait_closed(limit).await
    }

    /// Sends one complete request on `stream` and returns the response's `:status`
    /// (HPACK-decoded from the static table or a literal), acknowledging SETTINGS and
    /// answering flow control as needed. `None` if the stream was reset or the
    /// connection closed.
    pub async fn request(&mut self, stream: u32, request_id: &str, body: &[u8]) -> Option<u16> {
        let block = request_block(request_id);
        self.frame(HEADERS, END_HEADERS, stream, &block)
            .await
            .ok()?;
        self.frame(DATA, END_STREAM, stream, body).await.ok()?;
        loop {
            let f = self.read_frame(Duration::from_secs(20)).await?;
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => {
                    self.frame(SETTINGS, ACK, 0, &[]).await.ok()?;
                }
                PING if f.flags & ACK == 0 => {
                    self.frame(PING, ACK, 0, &f.payload).await.ok()?;
                }
                RST_STREAM if f.stream == stream => return None,
                GOAWAY => return None,
                HEADERS if f.stream == stream => return status_of(&f.payload),
                _ => {}
            }
        }
    }
}

/// `:status` from the first field of a response header block: hyper/h2 encode it as an
/// indexed static entry (8..=14) or a literal with a static name index (8).
fn status_of(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    let from_static = |i: u8| match i {
        8 => Some(200),
        9 => Some(204),
        10 => Some(206),
        11 => Some(304),
        12 => Some(400),
        13 => Some(404),
        14 => Some(500),
        _ => None,
    };
    if first & 0x80 != 0 {
        return from_static(first & 0x7f);
    }
    // Literal with a static name index (any of the three literal forms), then a plain
    // (or Huffman-coded) value.
    let value = block.get(1..)?;
    let len = usize::from(*value.first()? & 0x7f);
    let raw = value.get(1..1 + len)?;
    if value[0] & 0x80 == 0 {
        return std::str::from_utf8(raw).ok()?.parse().ok();
    }
    // Huffman: digits 0-9 are 5-bit codes 0x0..0x9 for '0','1','2' and 6-bit after;
    // decoding the whole table is not worth it here: report "some status".
    Some(0)
}

// ---------------------------------------------------------------------------------------
// A recording TLS upstream

/// What the certificate an upstream presents is wrong about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertFault {
    /// Signed by the trusted CA, for the right name, valid now.
    None,
    /// Signed by the trusted CA, for the right name, expired a year ago.
    Expired,
    /// Signed by the trusted CA, valid, for another name.
    WrongName,
    /// Valid and for the right name, but self-signed: not from the trusted CA.
    SelfSigned,
}

/// A throw-away CA; [`Pki::leaf`] issues leaves with a chosen fault.
pub struct Pki {
    ca_key: KeyPair,
    ca: rcgen::Certificate,
    pub ca_file: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "reliability suite CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).expect("CA certificate");
        let ca_file = dir.join("reliability-ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        Pki {
            ca_key,
            ca,
            ca_file,
        }
    }

    /// PEM certificate and key for a leaf with `fault`.
    pub fn leaf(&self, fault: CertFault) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let name = match fault {
            CertFault::WrongName => "somebody-else.example.com",
            _ => SERVER_NAME,
        };
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if fault == CertFault::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = if fault == CertFault::SelfSigned {
            params.self_signed(&key).expect("self-signed leaf")
        } else {
            params
                .signed_by(&key, &self.ca, &self.ca_key)
                .expect("leaf signed by the CA")
        };
        (cert.pem(), key.serialize_pem())
    }
}

/// One request head as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    /// Which of the upstream's accepted connections carried it (numbered from 0).
    pub connection: u64,
    pub headers: http::HeaderMap,
    pub body_len: usize,
}

/// A cluster endpoint's two ports on `ip`: inference (8443) and health (8080).
pub async fn bind_upstream_ports(ip: IpAddr) -> (TcpListener, TcpListener) {
    let inference = TcpListener::bind(SocketAddr::new(ip, 8443))
        .await
        .expect("bind the upstream's inference port");
    let health = TcpListener::bind(SocketAddr::new(ip, 8080))
        .await
        .expect("bind the upstream's health port");
    (inference, health)
}

/// Answers every request on `health` as the cluster's health service does for a
/// healthy endpoint with `capacity` free (a fresh timestamp each time).
pub fn serve_healthy(health: TcpListener, capacity: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = health.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_request| async move {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let body = format!(
                        r#"{{"status":"healthy","region":"us-east-1","available_capacity":{capacity},"timestamp":{now}}}"#
                    );
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .expect("response"),
                    )
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// What a recording upstream offers by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// h2 and HTTP/1.1 (a client offering h2 gets it).
    H2AndHttp1,
    /// HTTP/1.1 only, as the cluster's nginx on :8443 in the benchmark.
    Http1Only,
}

/// A cluster endpoint on `ip`: TLS inference on 8443 (h2 and HTTP/1.1), plain health on
/// 8080 answering healthy. Answers every inference request 200 with a small JSON body.
pub struct RecordingUpstream {
    pub ip: IpAddr,
    pub received: Arc<Mutex<Vec<Recorded>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RecordingUpstream {
    pub async fn start(ip: IpAddr, pki: &Pki, fault: CertFault) -> RecordingUpstream {
        Self::start_with(ip, pki, fault, Alpn::H2AndHttp1).await
    }

    pub async fn start_with(
        ip: IpAddr,
        pki: &Pki,
        fault: CertFault,
        alpn: Alpn,
    ) -> RecordingUpstream {
        gpulink::tls::install_crypto_provider();
        let (cert, key) = pki.leaf(fault);
        let mut config =
            (*gpulink::tls::server_config(&cert, &key).expect("server config")).clone();
        if alpn == Alpn::Http1Only {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (inference, health) = bind_upstream_ports(ip).await;
        let log = received.clone();
        let inference_task = tokio::spawn(async move {
            let mut accepted = 0u64;
            while let Ok((stream, _)) = inference.accept().await {
                let tls = tls.clone();
                let log = log.clone();
                let connection = accepted;
                accepted += 1;
                tokio::spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(5), tls.accept(stream)).await
                    else {
                        return;
                    };
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            async move {
                                let (parts, body) = read_request(request).await;
                                log.lock().expect("log").push(Recorded {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_string(),
                                    version: parts.version,
                                    connection,
                                    headers: parts.headers,
                                    body_len: body.len(),
                                });
                                let answer = http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(br#"{"ok":true}"#)))
                                    .expect("response");
                                Ok::<_, std::convert::Infallible>(answer)
                            }
                        });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let health_task = serve_healthy(health, 45);
        RecordingUpstream {
            ip,
            received,
            tasks: vec![inference_task, health_task],
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.received.lock().expect("log").clone()
    }

    /// How many received requests carried this `X-Request-ID`.
    pub fn with_request_id(&self, id: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.headers.get_all("x-request-id").iter().any(|v| v == id))
            .count()
    }
}

/// A proxy configuration with one PrivateLink endpoint per `ip` (port 8443, health 8080),
/// moto as KMS and `ca_file` as the cluster CA.
pub fn upstream_config(ips: &[IpAddr], moto_url: &str, key_arn: &str, ca_file: &Path) -> String {
    let endpoints: Vec<String> = ips.iter().map(|ip| format!("{ip}:8443")).collect();
    let regions = vec![serde_json::json!({ "name": "us-east-1", "privatelink": endpoints })];
    // The name the leaves of [`Pki`] carry.
    let options = ProxyOptions::default().set("upstream.server_name", SERVER_NAME);
    toml_text(&config_with_regions(
        regions, moto_url, key_arn, ca_file, &options,
    ))
}

// ---------------------------------------------------------------------------------------
// The real binaries

/// A child process, killed and reaped when the test lets go of it (also when it fails).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} failed");
}

/// Starts `command`, which runs `gpulink run` (perhaps behind a shell or in a namespace
/// of its own), with `RUST_LOG` at `rust_log`, stdout discarded and stderr to `stderr`.
pub fn spawn_proxy(command: &mut Command, rust_log: &str, stderr: Stdio) -> Child {
    command
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("gpulink run")
}

/// `gpulink sim` as a process: the `layout`'s three ENIs in us-east-1 and its public
/// endpoint, its CA written to `ca_dir`, bodies opened with KMS at `kms_url`. Returns once
/// its control API (`127.<block>.0.1:9950`) listens.
pub async fn spawn_sim(layout: &Layout, ca_dir: &Path, kms_url: &str) -> (Guard, SocketAddr) {
    let control = SocketAddr::from(([127, layout.block, 0, 1], 9950));
    let mut sim = Command::new(env!("CARGO_BIN_EXE_gpulink"));
    sim.arg("sim")
        .arg("--ca-dir")
        .arg(ca_dir)
        .arg("--control")
        .arg(control.to_string())
        .arg("--kms-endpoint-url")
        .arg(kms_url);
    for ip in layout.enis() {
        sim.arg("--endpoint").arg(format!("{ip}=us-east-1"));
    }
    sim.arg("--endpoint")
        .arg(format!("{}=us-east-1:public", layout.public()));
    let sim = Guard(
        sim.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gpulink sim"),
    );
    crate::common::wait_for_listener(control, Duration::from_secs(30)).await;
    (sim, control)
}

/// Puts the simulated endpoint `ip` into `state` (the JSON of its control API at
/// `control`).
pub async fn set_sim_state(client: &HttpClient, control: SocketAddr, ip: IpAddr, state: &str) {
    let request = http::Request::put(format!("http://{control}/endpoints/{ip}/state"))
        .body(Full::new(Bytes::from(state.to_string())))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
        .await
        .expect("the sim answers its control API")
        .expect("sim control");
    assert_eq!(response.status(), 200, "the sim refused {state} for {ip}");
}

/// Resident set size of a process in KiB (Linux `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `gpulink sim` as a process on `127.<block>.x.y` (the layout's three ENIs in us-east-1
/// and its public endpoint), with moto as KMS and a fresh key: the cluster of the tests
/// that run the real binaries.
pub struct SimProcess {
    pub guard: Guard,
    /// The simulator's control API.
    pub control: SocketAddr,
    pub layout: Layout,
    pub moto: Moto,
    pub key_arn: String,
    /// The CA the simulator's certificates chain to, for the proxy's `upstream.ca_file`.
    pub ca_file: PathBuf,
    pub dir: tempfile::TempDir,
}

impl SimProcess {
    pub async fn start(block: u8) -> SimProcess {
        let moto = Moto::get().await;
        let key_arn = moto.create_key().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(block);
        let (guard, control) = spawn_sim(&layout, &dir.path().join("ca"), &moto.url).await;
        let ca_file = dir.path().join("ca/ca.pem");
        SimProcess {
            guard,
            control,
            layout,
            moto,
            key_arn,
            ca_file,
            dir,
        }
    }

    /// The shared configuration ([`proxy_config`]) for this cluster with `options`.
    pub fn config_toml(&self, options: &ProxyOptions) -> String {
        toml_text(&proxy_config(
            &self.layout,
            &self.moto.url,
            &self.key_arn,
            &self.ca_file,
            options,
        ))
    }

    /// The proxy's two fixed addresses on this cluster's block: (listen, admin).
    pub fn proxy_addresses(&self) -> (SocketAddr, SocketAddr) {
        let ip = self.layout.ip(0, 2);
        (SocketAddr::new(ip, 8000), SocketAddr::new(ip, 9901))
    }
}

/// `GET http://{addr}{path}` with `client`: the whole answer, or `None` when nothing
/// answered within 10 s (the process is starting, or gone).
pub async fn get_within(client: &HttpClient, addr: SocketAddr, path: &str) -> Option<Reply> {
    let request = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .ok()?
        .ok()?;
    Reply::read(response).await.ok()
}

/// `gpulink sim` and `gpulink run` as separate processes ([`SimProcess`]), the proxy in
/// `phase` with canary routing at 50 %.
pub struct Deployment {
    pub cluster: SimProcess,
    pub proxy: Guard,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub client: HttpClient,
}

impl Deployment {
    pub async fn start(block: u8, phase: &str) -> Deployment {
        let cluster = SimProcess::start(block).await;
        let (listen, admin) = cluster.proxy_addresses();
        let config_path = cluster.dir.path().join("gpulink.toml");
        let text = Self::config_text_for(&cluster, listen, admin, phase);
        std::fs::write(&config_path, text).expect("write config");
        let mut run = Command::new(env!("CARGO_BIN_EXE_gpulink"));
        run.arg("run").arg("--config").arg(&config_path);
        let proxy = spawn_proxy(&mut run, &proxy_log("error"), Stdio::inherit());
        let deployment = Deployment {
            cluster,
            proxy: Guard(proxy),
            listen,
            admin,
            config_path,
            client: http_client(),
        };
        deployment.wait_ready().await;
        // Ready does not wait for the cluster: under load the first health round may
        // have failed, and a request now would rightly get `no_endpoint`.
        deployment.wait_all_serving().await;
        deployment
    }

    /// Waits (bounded) until `/status` shows every endpoint serving.
    pub async fn wait_all_serving(&self) {
        assert_eventually!(
            within = Duration::from_secs(60),
            self.status().await,
            |status| {
                let endpoints = status["endpoints"].as_array().cloned().unwrap_or_default();
                endpoints.len() == 4 && endpoints.iter().all(|e| e["serving"] == true)
            },
            "not every endpoint became serving"
        );
    }

    fn config_text_for(
        cluster: &SimProcess,
        listen: SocketAddr,
        admin: SocketAddr,
        phase: &str,
    ) -> String {
        cluster.config_toml(
            &ProxyOptions::default()
                .set("listen.address", listen)
                .set("admin.address", admin)
                .set("upstream.server_name", SERVER_NAME)
                .set("upstream.request_timeout", "2s")
                .set("health.timeout", "1s")
                .set("migration.phase", phase)
                .set("migration.canary_percent", 50),
        )
    }

    /// Rewrites the configuration with another phase (write to a temporary file, then
    /// rename, as deployment tools do).
    pub fn write_phase(&self, phase: &str) {
        self.write_phase_noted(phase, "");
    }

    /// As [`Deployment::write_phase`], with a comment line that makes the file differ
    /// (gpulink applies a reload only when the file's content changed).
    pub fn write_phase_noted(&self, phase: &str, note: &str) {
        let mut text = Self::config_text_for(&self.cluster, self.listen, self.admin, phase);
        text.push_str(&format!("# {note}\n"));
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config");
    }

    pub fn pid(&self) -> u32 {
        self.proxy.0.id()
    }

    pub async fn get(&self, addr: SocketAddr, path: &str) -> Option<Reply> {
        get_within(&self.client, addr, path).await
    }

    pub async fn wait_ready(&self) {
        assert_eventually!(
            within = Duration::from_secs(60),
            self.get(self.admin, "/ready").await.map(|r| r.status),
            |status| *status == Some(200),
            "the proxy never became ready"
        );
    }

    pub async fn status(&self) -> serde_json::Value {
        self.get(self.admin, "/status")
            .await
            .expect("/status")
            .json()
    }

    /// Applied reloads as `/status` counts them.
    pub async fn reloads_applied(&self) -> u64 {
        self.status().await["reloads"]["applied"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits (bounded) until `/status` shows at least `n` applied reloads.
    pub async fn wait_reloads(&self, n: u64) {
        assert_eventually!(
            self.reloads_applied().await,
            |applied| *applied >= n,
            "reload {n} was never applied"
        );
    }

    /// Puts a simulated endpoint into `state` (the control API's JSON) and waits for it
    /// to be in effect.
    pub async fn set_state(&self, ip: IpAddr, state: &str) {
        set_sim_state(&self.client, self.cluster.control, ip, state).await;
    }

    /// How many times the cluster received the request with this id.
    pub async fn deliveries(&self, request_id: &str) -> u64 {
        self.get(self.cluster.control, &format!("/deliveries/{request_id}"))
            .await
            .map(|r| r.json()["deliveries"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    }

    /// One inference request with its own id: the answer, or why none came (a
    /// connection error, or no answer within 30 s).
    pub async fn post(&self, request_id: &str) -> Result<Reply, String> {
        let request = http::Request::post(format!("http://{}/inference", self.listen))
            .header("content-type", "application/json")
            .header("x-request-id", request_id)
            .body(Full::new(Bytes::from_static(
                crate::common::GUIDE_REQUEST.as_bytes(),
            )))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("no answer: {e}"))?;
            Reply::read(response)
                .await
                .map_err(|e| format!("answer cut short: {e}"))
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| "no answer within 30 s".to_string())?
    }
}
