//! End-to-end benchmark (`cargo bench --bench proxy`): what gpulink costs on the request
//! path, as ratios against a baseline measured in the same run.
//!
//! Three ways to get the same inference request to the simulated cluster (`gpulink_sim`,
//! with `skip_open`, so it only counts bodies and is never the bottleneck):
//!
//! * **baseline**: the app talks to the cluster itself, as the setup guide's
//!   `random.choice(PRIVATE_IPS)` example does, minus KMS: a hyper-util legacy client per
//!   ENI with a rustls connector (the simulator's `ca.pem`, HTTP/2 by ALPN, verifying
//!   `gpu-cluster.yourcompany.internal`, dialing the ENI address), sending a body sealed
//!   once before the run, with the tenant headers the cluster requires.
//! * **null sidecar**: a minimal HTTP/1.1 pass-through on loopback that forwards the
//!   pre-sealed body with fixed headers through the same kind of pooled h2 client and
//!   streams the answer back. No validation, sealing, routing or metrics: what the extra
//!   loopback hop alone costs, so gpulink's own work can be told apart from it.
//! * **gpulink**: the app sends plain JSON to gpulink over HTTP/1.1 keep-alive on
//!   loopback; gpulink (development key provider, `format = "auto"`: the 96 B body takes
//!   the `kms-direct` path, the 64 KiB body the `aws-esdk` envelope with a warm data-key
//!   cache) validates, seals, adds the tenant headers, routes and forwards over its pool.
//!
//! The simulator, gpulink, the null sidecar and the client each run on their own
//! multi-threaded runtime (2 workers, named threads), as separate processes would, so
//! what each one uses can be told apart: CPU time and context switches per thread from
//! `/proc/self/task/*/{schedstat,status}`, heap allocations from a counting global
//! allocator that knows each thread's component. A last section times pieces of
//! gpulink's work alone (JSON validation, sealing, the request id) and prints the size
//! of its per-request future.
//!
//! Fixed request counts: per cell (body size × concurrency) each path gets a warm-up of
//! [`WARM_UP`] requests, then [`REQUESTS`] measured ones in [`ROUNDS`] interleaved rounds
//! (baseline, null sidecar, gpulink, baseline, ...) so that drift in the machine hits all
//! three alike. Everything stays on loopback: the simulator on 127.110.x.y, gpulink and
//! the null sidecar on 127.0.0.1 with ports from the kernel. `GPULINK_BENCH_LOG=info`
//! installs a log subscriber (writing to a sink) to see what gpulink's per-request log
//! line costs; by default no subscriber is installed. Results: BENCHMARKS.md.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use gpulink::config::Config;
use gpulink::headers::{
    X_ENCRYPTION_FORMAT, X_GPULINK_ROUTE, X_KMS_KEY_ID, X_MODEL_POOL, X_REQUEST_ID, X_TENANT_ID,
};
use gpulink::seal::{DevKeys, KeyService, Sealer, DEV_KEY_ARN};
use gpulink::seal_settings;
use gpulink_sim::{Sim, SimConfig, SimEndpointConfig, DEFAULT_SERVER_NAME};

/// Requests per path before each cell is measured (pools warm, data key cached).
const WARM_UP: usize = 500;
/// Measured requests per path and cell.
const REQUESTS: usize = 5_000;
/// The measured requests of a cell come in this many interleaved rounds per path.
const ROUNDS: usize = 10;
const CONCURRENCY: [usize; 2] = [1, 16];
/// Runtime workers per component (the machine the numbers in BENCHMARKS.md come from
/// has 2 cores; `gpulink run` starts one worker per core).
const WORKERS: usize = 2;
/// The loopback block of this benchmark's simulated cluster (tests use other blocks).
const BLOCK: u8 = 110;
const TENANT: &str = "tenant-bench";
const MODEL_POOL: &str = "model-a";
/// The simulator's TLS port (8443 stands in for 443).
const TLS_PORT: u16 = 8443;
/// Thread names of the components, in the order of [`Usage`] arrays.
const COMPONENTS: [&str; 4] = ["gl-client", "gl-null", "gl-proxy", "gl-sim"];
const CLIENT: usize = 0;
const NULL: usize = 1;
const PROXY: usize = 2;
const SIM: usize = 3;

// ---------------------------------------------------------------------------------------
// Allocation counting: every thread knows its component (set when a runtime starts the
// thread); the allocator counts allocations and bytes per component.
// ---------------------------------------------------------------------------------------

struct AllocationCounters {
    count: AtomicU64,
    bytes: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AllocationCounters = AllocationCounters {
    count: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};
static ALLOCATIONS: [AllocationCounters; COMPONENTS.len()] = [ZERO; COMPONENTS.len()];

thread_local! {
    static COMPONENT: std::cell::Cell<usize> = const { std::cell::Cell::new(CLIENT) };
}

/// The system allocator, counting. `realloc` counts as an allocation of the new size.
struct CountingAllocator;

fn count_allocation(bytes: usize) {
    // gpulink's request-path workers are its own threads ([runtime] workers).
    let component = if gpulink::current_worker().is_some() {
        PROXY
    } else {
        COMPONENT.try_with(|c| c.get()).unwrap_or(CLIENT)
    };
    let counters = &ALLOCATIONS[component];
    counters.count.fetch_add(1, Ordering::Relaxed);
    counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
}

// SAFETY: every call is passed on to the system allocator unchanged; the counting touches
// only atomics and a const-initialised thread-local without destructor (no allocation).
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation(layout.size());
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count_allocation(new_size);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Baseline,
    Null,
    Gpulink,
}

const VIAS: [Via; 3] = [Via::Baseline, Via::Null, Via::Gpulink];

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Baseline => "baseline: app → cluster, TLS h2",
            Via::Null => "null sidecar: HTTP/1.1 hop, no work",
            Via::Gpulink => "gpulink: plain JSON over HTTP/1.1",
        }
    }
}

/// One request body, plain (what the app has) and sealed once before the run (what the
/// baseline and the null sidecar send).
struct Body {
    label: &'static str,
    plain: Bytes,
    sealed: Bytes,
    format: &'static str,
    key_arn: HeaderValue,
}

/// 96 bytes in the shape of the guide's request (`{"prompt": "Hello", "max_tokens": 50}`).
fn small_body() -> Bytes {
    let body = r#"{"prompt": "Hello, please summarise the PrivateLink setup guide in one line.", "max_tokens": 50}"#;
    assert_eq!(body.len(), 96);
    Bytes::from_static(body.as_bytes())
}

/// A 64 KiB JSON request: a long prompt of ordinary text, exactly 65,536 bytes.
fn large_body() -> Bytes {
    const LEN: usize = 64 * 1024;
    let (head, tail) = (r#"{"prompt": ""#, r#"", "max_tokens": 50}"#);
    let words = "the quick brown fox jumps over the lazy dog while the cluster answers ";
    let mut prompt = String::with_capacity(LEN);
    while prompt.len() < LEN - head.len() - tail.len() {
        prompt.push_str(words);
    }
    prompt.truncate(LEN - head.len() - tail.len());
    let body = format!("{head}{prompt}{tail}");
    assert_eq!(body.len(), LEN);
    Bytes::from(body)
}

fn proxy_toml(enis: &[IpAddr], ca_file: &Path) -> String {
    let enis: Vec<String> = enis
        .iter()
        .map(|ip| format!("\"{ip}:{TLS_PORT}\""))
        .collect();
    format!(
        r#"
[listen]
address = "127.0.0.1:0"
drain_delay = "0s"
shutdown_grace = "5s"

[admin]
address = "127.0.0.1:0"

[tenant]
id = "{TENANT}"
model_pool = "{MODEL_POOL}"

[kms]
key_id = "{DEV_KEY_ARN}"
region = "local"
format = "auto"

[upstream]
server_name = "{DEFAULT_SERVER_NAME}"
ca_file = "{ca}"

[[regions]]
name = "us-east-1"
privatelink = [{enis}]

[migration]
phase = "privatelink-only"
"#,
        ca = ca_file.display(),
        enis = enis.join(", "),
    )
}

// ---------------------------------------------------------------------------------------
// The baseline client: one pooled hyper-util client per ENI, TLS by rustls, h2 by ALPN.
// ---------------------------------------------------------------------------------------

/// Dials one ENI and verifies the cluster's TLS name, whatever the request URI says.
#[derive(Clone)]
struct EniConnector {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl tower_service::Service<Uri> for EniConnector {
    type Response = TokioIo<TlsIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsIo>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.server_name, tcp).await?;
            Ok(TokioIo::new(TlsIo(tls)))
        })
    }
}

/// A client TLS stream that tells the pool when HTTP/2 was negotiated.
struct TlsIo(tokio_rustls::client::TlsStream<TcpStream>);

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.0.get_ref().1.alpn_protocol() == Some(b"h2") {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

type TlsClient = Client<EniConnector, Full<Bytes>>;

/// What an app that talks to the cluster itself holds: a pool per ENI, the request URI
/// (the TLS name, so it is also the `:authority`), and the tenant headers.
#[derive(Clone)]
struct Direct {
    clients: Arc<Vec<TlsClient>>,
    uri: Uri,
    headers: HeaderMap,
}

impl Direct {
    fn new(enis: &[IpAddr], ca_file: &Path) -> Direct {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file).expect("the simulator's ca.pem") {
            roots
                .add(cert.expect("a CA certificate"))
                .expect("CA added");
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tls = TlsConnector::from(Arc::new(config));
        let server_name = ServerName::try_from(DEFAULT_SERVER_NAME).expect("TLS name");
        let clients = enis
            .iter()
            .map(|ip| {
                let connector = EniConnector {
                    addr: SocketAddr::new(*ip, TLS_PORT),
                    server_name: server_name.clone(),
                    tls: tls.clone(),
                };
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(connector)
            })
            .collect();
        let uri = format!("https://{DEFAULT_SERVER_NAME}:{TLS_PORT}/inference")
            .parse()
            .expect("URI");
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(X_TENANT_ID, HeaderValue::from_static(TENANT));
        headers.insert(X_MODEL_POOL, HeaderValue::from_static(MODEL_POOL));
        Direct {
            clients: Arc::new(clients),
            uri,
            headers,
        }
    }

    /// A random ENI (the guide's `random.choice`).
    fn choose(&self, rng: &mut impl Rng) -> usize {
        rng.gen_range(0..self.clients.len())
    }

    /// Sends a sealed body to the ENI `eni`.
    async fn send(
        &self,
        body: &Body,
        eni: usize,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let mut request = Request::new(Full::new(body.sealed.clone()));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.uri.clone();
        let mut headers = self.headers.clone();
        headers.insert(X_KMS_KEY_ID, body.key_arn.clone());
        headers.insert(X_ENCRYPTION_FORMAT, HeaderValue::from_static(body.format));
        // gpulink always sends a request id and the simulator records each one, so the
        // baseline sends one too: the cluster's work is then the same on every path.
        headers.insert(X_REQUEST_ID, next_request_id());
        *request.headers_mut() = headers;
        self.clients[eni].request(request).await
    }
}

fn next_request_id() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::try_from(format!("bench-{n:016x}")).expect("request id")
}

// ---------------------------------------------------------------------------------------
// The null sidecar: an HTTP/1.1 hop that does nothing but forward.
// ---------------------------------------------------------------------------------------

/// Serves HTTP/1.1 on `listener`: reads the body, forwards the pre-sealed body of the
/// same size class through `direct`, and streams the answer back.
async fn serve_null_sidecar(listener: TcpListener, direct: Direct, bodies: Arc<[Body; 2]>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (direct, bodies) = (direct.clone(), bodies.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (direct, bodies) = (direct.clone(), bodies.clone());
                let eni = direct.choose(&mut rand::thread_rng());
                async move {
                    let plain = request
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let body = if plain.len() > 4096 {
                        &bodies[1]
                    } else {
                        &bodies[0]
                    };
                    let response = match direct.send(body, eni).await {
                        Ok(response) => response.map(|b| b.boxed()),
                        Err(error) => {
                            let mut response = Response::new(
                                Full::new(Bytes::from(error.to_string()))
                                    .map_err(|never| match never {})
                                    .boxed(),
                            );
                            *response.status_mut() = StatusCode::BAD_GATEWAY;
                            response
                        }
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// The workload.
// ---------------------------------------------------------------------------------------

/// The app's side: the direct client, and a plain HTTP/1.1 keep-alive client for the
/// two sidecars.
#[derive(Clone)]
struct App {
    direct: Direct,
    local: Client<HttpConnector, Full<Bytes>>,
    gpulink_uri: Uri,
    null_uri: Uri,
}

impl App {
    async fn one(&self, path: Via, body: &Body, rng: &mut StdRng) -> Result<Bytes, String> {
        let response = match path {
            Via::Baseline => self.direct.send(body, self.direct.choose(rng)).await,
            Via::Null | Via::Gpulink => {
                let uri = if path == Via::Gpulink {
                    &self.gpulink_uri
                } else {
                    &self.null_uri
                };
                let mut request = Request::new(Full::new(body.plain.clone()));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = uri.clone();
                request
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                self.local.request(request).await
            }
        }
        .map_err(|e| format!("{path:?}: {e}"))?;
        let status = response.status();
        if path == Via::Gpulink && !response.headers().contains_key(X_GPULINK_ROUTE) {
            return Err("gpulink answered without X-Gpulink-Route".into());
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{path:?}: reading the answer: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!(
                "{path:?}: {status} {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        Ok(bytes)
    }
}

/// What one path did in one cell.
#[derive(Default)]
struct Measured {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// What each component used over the measured rounds.
    usage: [Usage; COMPONENTS.len()],
}

impl Measured {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        // Nearest rank.
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    /// Per request: CPU µs, context switches, allocations, KiB allocated.
    fn per_request(&self, component: usize) -> (f64, f64, f64, f64) {
        let u = &self.usage[component];
        let n = self.requests as f64;
        (
            u.cpu.as_secs_f64() * 1e6 / n,
            u.switches as f64 / n,
            u.allocs as f64 / n,
            u.alloc_bytes as f64 / 1024.0 / n,
        )
    }

    fn cpu_total_per_request(&self) -> f64 {
        let cpu: Duration = self.usage.iter().map(|u| u.cpu).sum();
        cpu.as_secs_f64() * 1e6 / self.requests as f64
    }
}

/// Sends `count` requests on `path`, `concurrency` at a time; returns the wall time and,
/// when `record`, every request's latency.
async fn run(
    app: &App,
    body: &Arc<Body>,
    path: Via,
    count: usize,
    concurrency: usize,
    seed: u64,
) -> Result<(Duration, Vec<Duration>), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (app, body, next) = (app.clone(), body.clone(), next.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ ((worker as u64) << 32));
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(count / concurrency + 1);
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let sent = Instant::now();
                app.one(path, &body, &mut rng).await?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined.map_err(|e| e.to_string())??);
    }
    Ok((started.elapsed(), latencies))
}

/// What a component has used so far: CPU time and context switches of its threads
/// (from `/proc/self/task`), allocations made on them (from [`CountingAllocator`]).
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu: Duration,
    switches: u64,
    allocs: u64,
    alloc_bytes: u64,
}

impl Usage {
    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(before.cpu),
            switches: self.switches.saturating_sub(before.switches),
            allocs: self.allocs.saturating_sub(before.allocs),
            alloc_bytes: self.alloc_bytes.saturating_sub(before.alloc_bytes),
        }
    }
}

fn usage_by_component() -> [Usage; COMPONENTS.len()] {
    let mut usage = [Usage::default(); COMPONENTS.len()];
    for (i, counters) in ALLOCATIONS.iter().enumerate() {
        usage[i].allocs = counters.count.load(Ordering::Relaxed);
        usage[i].alloc_bytes = counters.bytes.load(Ordering::Relaxed);
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return usage;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        // The client's workers and the main thread that drives it count as the client.
        // gpulink's request-path workers (`gpulink-worker-N`) are the proxy's.
        let component = if name.starts_with("gpulink-worker") {
            PROXY
        } else {
            COMPONENTS
                .iter()
                .position(|prefix| name.starts_with(prefix))
                .unwrap_or(CLIENT)
        };
        let ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let switches: u64 = std::fs::read_to_string(dir.join("status"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        usage[component].cpu += Duration::from_nanos(ns);
        usage[component].switches += switches;
    }
    usage
}

/// One cell: warm-up on every path, then interleaved measured rounds.
async fn cell(
    app: &App,
    body: &Arc<Body>,
    concurrency: usize,
) -> Result<BTreeMap<Via, Measured>, String> {
    let mut seed = concurrency as u64 * 1_000;
    for path in VIAS {
        // Check once that the cluster got what this path should deliver.
        let answer = app
            .one(path, body, &mut StdRng::seed_from_u64(seed))
            .await?;
        let answer: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|e| format!("{path:?}: {e}"))?;
        if answer["format"] != body.format || answer["tenant_id"] != TENANT {
            return Err(format!(
                "{path:?} delivered {answer} for a {} body",
                body.label
            ));
        }
        seed += 1;
        run(app, body, path, WARM_UP, concurrency, seed).await?;
    }
    let mut results: BTreeMap<Via, Measured> = BTreeMap::new();
    for _ in 0..ROUNDS {
        for path in VIAS {
            seed += 1;
            let before = usage_by_component();
            let (elapsed, latencies) =
                run(app, body, path, REQUESTS / ROUNDS, concurrency, seed).await?;
            let after = usage_by_component();
            let measured = results.entry(path).or_default();
            measured.requests += latencies.len();
            measured.elapsed += elapsed;
            measured.latencies.extend(latencies);
            for (total, (after, before)) in measured.usage.iter_mut().zip(after.iter().zip(&before))
            {
                let used = after.since(*before);
                total.cpu += used.cpu;
                total.switches += used.switches;
                total.allocs += used.allocs;
                total.alloc_bytes += used.alloc_bytes;
            }
        }
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------
// Pieces of gpulink's work, timed alone for the reading of the table.
// ---------------------------------------------------------------------------------------

/// The size of the future an async fn of two arguments returns, without calling it.
fn size_of_return<A, B, F>(_: impl Fn(A, B) -> F) -> usize {
    std::mem::size_of::<F>()
}

/// Mean time of `f` over `iterations` runs, after a tenth as many unmeasured ones.
fn time_per_call(iterations: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..iterations / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..iterations {
        f();
    }
    started.elapsed() / iterations
}

fn components(config: &Config, keys: &KeyService, bodies: &[Arc<Body>]) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sealer = Sealer::new(seal_settings(config), keys.clone());
    let mut lines = Vec::new();
    for body in bodies {
        let iterations = if body.plain.len() > 4096 {
            5_000
        } else {
            50_000
        };
        let validate = time_per_call(iterations, || {
            std::hint::black_box(
                serde_json::from_slice::<serde::de::IgnoredAny>(&body.plain).expect("JSON"),
            );
        });
        let seal = time_per_call(iterations, || {
            std::hint::black_box(
                runtime
                    .block_on(sealer.seal(&body.plain, MODEL_POOL))
                    .expect("seal"),
            );
        });
        lines.push(format!(
            "{}: JSON validation {:.2} µs, seal ({}) {:.2} µs",
            body.label,
            validate.as_secs_f64() * 1e6,
            body.format,
            seal.as_secs_f64() * 1e6,
        ));
    }
    // Futures live inline in the task that polls them: every request's service future
    // is as large as `forward::handle`'s, and is moved (copied) as a whole.
    let handle = size_of_return(|forwarder: &'static gpulink::forward::Forwarder, request| {
        gpulink::forward::handle(forwarder, request)
    });
    let seal = sealer.seal(b"{}", MODEL_POOL);
    let seal_size = std::mem::size_of_val(&seal);
    drop(seal);
    let context = sealer.context_for(MODEL_POOL);
    let encrypt = keys.encrypt(DEV_KEY_ARN, b"{}", &context);
    let encrypt_size = std::mem::size_of_val(&encrypt);
    drop(encrypt);
    lines.push(format!(
        "size of the per-request future `forward::handle`: {handle} bytes; of \
         `Sealer::seal`: {seal_size} bytes; of `KeyService::encrypt`: {encrypt_size} bytes"
    ));
    let request_id = time_per_call(100_000, || {
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        std::hint::black_box(HeaderValue::from_str(&id).expect("header"));
    });
    lines.push(format!(
        "request id (UUIDv4 → header value): {:.2} µs",
        request_id.as_secs_f64() * 1e6
    ));
    lines
}

// ---------------------------------------------------------------------------------------
// Set-up and report.
// ---------------------------------------------------------------------------------------

fn runtime(component: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name(COMPONENTS[component])
        .on_thread_start(move || COMPONENT.with(|c| c.set(component)))
        .enable_all()
        .build()
        .expect("runtime")
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} CPUs, {model}")
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One body's cells: by concurrency, by path.
type Cells = BTreeMap<usize, BTreeMap<Via, Measured>>;

fn report(results: &[(Arc<Body>, Cells)]) {
    let [c1, c16] = CONCURRENCY;
    println!(
        "| body | path | req/s, c={c1} | req/s, c={c16} | p50, c={c1} | p99, c={c1} |\n\
         | ---: | --- | ---: | ---: | ---: | ---: |"
    );
    for (body, cells) in results {
        let get = |c: usize, p: Via| &cells[&c][&p];
        for path in VIAS {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                body.label,
                path.label(),
                thousands(get(c1, path).throughput()),
                thousands(get(c16, path).throughput()),
                micros(get(c1, path).percentile(50.0)),
                micros(get(c1, path).percentile(99.0)),
            );
        }
        for (over, name) in [
            (Via::Baseline, "**gpulink / baseline**"),
            (Via::Null, "gpulink / null sidecar"),
        ] {
            let ratio = |c: usize| get(c, Via::Gpulink).throughput() / get(c, over).throughput();
            let latency = |p: f64| {
                let (g, b) = (
                    get(c1, Via::Gpulink).percentile(p),
                    get(c1, over).percentile(p),
                );
                format!(
                    "{:.2}× (+{:.0} µs)",
                    g.as_secs_f64() / b.as_secs_f64(),
                    (g.as_secs_f64() - b.as_secs_f64()) * 1e6
                )
            };
            println!(
                "| {} | {name} | {:.2}× | {:.2}× | {} | {} |",
                body.label,
                ratio(c1),
                ratio(c16),
                latency(50.0),
                latency(99.0),
            );
        }
    }

    println!(
        "\nPer request, by component (all threads of each; measured rounds): CPU µs; for \
         the sidecar also context switches and heap allocations (count, KiB):\n\n\
         | body | c | path | client CPU | sidecar CPU | simulator CPU | total CPU | sidecar switches | sidecar allocations |\n\
         | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (body, cells) in results {
        for (concurrency, paths) in cells {
            for (path, m) in paths {
                let (sidecar, switches, allocations) = match path {
                    Via::Baseline => ("–".to_string(), "–".to_string(), "–".to_string()),
                    Via::Null | Via::Gpulink => {
                        let component = if *path == Via::Null { NULL } else { PROXY };
                        let (cpu, switches, allocs, kib) = m.per_request(component);
                        (
                            format!("{cpu:.1}"),
                            format!("{switches:.1}"),
                            format!("{allocs:.0} ({kib:.1} KiB)"),
                        )
                    }
                };
                println!(
                    "| {} | {concurrency} | {} | {:.1} | {sidecar} | {:.1} | {:.1} | {switches} | {allocations} |",
                    body.label,
                    path.label(),
                    m.per_request(CLIENT).0,
                    m.per_request(SIM).0,
                    m.cpu_total_per_request(),
                );
            }
        }
    }
}

fn main() {
    gpulink::tls::install_crypto_provider();
    if let Ok(level) = std::env::var("GPULINK_BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_writer(io::sink)
            .try_init();
    }
    let started = Instant::now();
    let (sim_rt, proxy_rt, null_rt, client_rt) =
        (runtime(SIM), runtime(PROXY), runtime(NULL), runtime(CLIENT));
    let scratch = tempfile::tempdir().expect("temporary directory");
    let keys = KeyService::Dev(Arc::new(DevKeys::new().expect("development keys")));

    let enis: Vec<IpAddr> = (10..=12)
        .map(|c| IpAddr::from([127, BLOCK, c, 50]))
        .collect();
    let mut sim_config = SimConfig::default_layout(scratch.path().join("ca"));
    sim_config.endpoints = enis
        .iter()
        .map(|ip| SimEndpointConfig::new(*ip, "us-east-1"))
        .collect();
    sim_config.control_addr = SocketAddr::from(([127, BLOCK, 0, 1], 0));
    sim_config.skip_open = true;
    let sim = sim_rt
        .block_on(Sim::start(sim_config, keys.clone()))
        .expect("the simulator starts (it needs 127.110.x.y, ports 8443 and 8080)");

    let config = Config::from_toml(
        &proxy_toml(&enis, &sim.ca_file()),
        Path::new("benches/proxy.toml"),
    )
    .expect("valid configuration");
    let options = gpulink::proxy::StartOptions {
        random_seed: Some(u64::from(BLOCK)),
        ..Default::default()
    };
    let proxy = proxy_rt
        .block_on(gpulink::proxy::start_with(
            config.clone(),
            keys.clone(),
            options,
        ))
        .expect("gpulink starts");

    // Seal each body once, with gpulink's own sealer, for the baseline to send as is.
    let sealer = Sealer::new(seal_settings(&config), keys.clone());
    let bodies: Vec<Arc<Body>> = [("96 B", small_body()), ("64 KiB", large_body())]
        .into_iter()
        .map(|(label, plain)| {
            let sealed = client_rt
                .block_on(sealer.seal(&plain, MODEL_POOL))
                .expect("seal");
            Arc::new(Body {
                label,
                plain,
                sealed: sealed.body,
                format: sealed.format.as_str(),
                key_arn: HeaderValue::try_from(sealed.key_arn).expect("key ARN"),
            })
        })
        .collect();

    let direct = Direct::new(&enis, &sim.ca_file());
    let null_listener = null_rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind the null sidecar");
    let null_addr = null_listener.local_addr().expect("address");
    let seal_copy = |b: &Body| Body {
        label: b.label,
        plain: b.plain.clone(),
        sealed: b.sealed.clone(),
        format: b.format,
        key_arn: b.key_arn.clone(),
    };
    let null_bodies = Arc::new([seal_copy(&bodies[0]), seal_copy(&bodies[1])]);
    // Pools of its own: hyper-util spawns each connection's task on the runtime that
    // opened it, so sharing the app's pools would bill the hop's upstream work to the app.
    let null_direct = Direct::new(&enis, &sim.ca_file());
    null_rt.spawn(serve_null_sidecar(null_listener, null_direct, null_bodies));

    let mut local = HttpConnector::new();
    local.set_nodelay(true);
    let app = App {
        direct,
        local: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(local),
        gpulink_uri: format!("http://{}/inference", proxy.listen_addr)
            .parse()
            .expect("URI"),
        null_uri: format!("http://{null_addr}/inference")
            .parse()
            .expect("URI"),
    };

    let mut results = Vec::new();
    for body in &bodies {
        let mut cells = BTreeMap::new();
        for concurrency in CONCURRENCY {
            let measured = client_rt
                .block_on(cell(&app, body, concurrency))
                .unwrap_or_else(|error| panic!("{} at c={concurrency}: {error}", body.label));
            cells.insert(concurrency, measured);
        }
        results.push((body.clone(), cells));
    }

    let stats = sim.all_stats();
    let delivered: u64 = stats.iter().map(|s| s.ok).sum();
    let plaintext: u64 = stats.iter().map(|s| s.plaintext_seen).sum();
    let per_eni: Vec<String> = stats
        .iter()
        .map(|s| format!("{} {}", s.ip, s.requests))
        .collect();
    let sent = bodies.len() * CONCURRENCY.len() * VIAS.len() * (1 + WARM_UP + REQUESTS);
    assert_eq!(delivered, sent as u64, "the cluster answered every request");
    assert_eq!(plaintext, 0, "no plaintext reached the cluster");

    println!(
        "# gpulink end to end: warm-up {WARM_UP}, then {REQUESTS} requests per path and \
         cell in {ROUNDS} interleaved rounds"
    );
    println!(
        "machine: {}; runtimes: {WORKERS} workers each for client, gpulink, null sidecar, \
         simulator; logging: {}\n",
        machine(),
        std::env::var("GPULINK_BENCH_LOG").unwrap_or_else(|_| "off".into()),
    );
    report(&results);
    println!("\nPieces of gpulink's work alone (one thread, mean per call):\n");
    for line in components(&config, &keys, &bodies) {
        println!("- {line}");
    }
    println!(
        "\nthe cluster answered {delivered} requests (per ENI: {}), no plaintext; whole run {:.1} s",
        per_eni.join(", "),
        started.elapsed().as_secs_f64()
    );

    client_rt.block_on(async {
        drop(app);
    });
    proxy_rt.block_on(proxy.shutdown());
    sim_rt.block_on(sim.shutdown());
}
