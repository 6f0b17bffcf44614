//! Shared test harness: a real KMS-API server (moto), the cluster simulator on a loopback
//! block of the test's own, a proxy configured for both, and a small HTTP client.
//!
//! Every test takes its own `127.<block>.0.0/16` from [`next_block`] so that tests run in
//! parallel without sharing a port. moto comes from `GPULINK_TEST_MOTO_URL` (the test script starts one)
//! or is started here from `.venv` for the duration of the test.

#![allow(dead_code)]

pub mod ec2;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use gpulink::config::Config;
use gpulink::proxy::ProxyHandle;
use gpulink::seal::{KeyService, KmsKeys};
use gpulink_sim::{Sim, SimConfig, SimEndpointConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

static ENV: Once = Once::new();

/// Dummy credentials for moto, set once before any SDK client exists.
pub fn init() {
    ENV.call_once(|| {
        gpulink::tls::install_crypto_provider();
        for (key, value) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            if std::env::var_os(key).is_none() {
                std::env::set_var(key, value);
            }
        }
        if std::env::var_os("RUST_LOG").is_some() {
            gpulink::telemetry::init(gpulink::config::LogFormat::Text);
        }
    });
}

/// The machine, shared by the tests that run at once. Most tests hold a share for their
/// whole run (every [`Moto`] carries one); the few that load the machine so much that
/// health checks of other tests' proxies time out (the soak, a booted systemd) take it
/// [`alone`], and run while no other harness test does (as they did when each had a test
/// binary of its own).
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

thread_local! {
    /// Shares held by the test on this thread (libtest runs each test on a thread of its
    /// own, and `#[tokio::test]` polls it there): a test that starts a second harness
    /// must not queue behind a waiting [`alone`] test while it holds the first.
    static HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How long a test waits for its share of the machine before failing.
const MACHINE_WAIT: Duration = Duration::from_secs(20 * 60);

/// A test's hold on the machine; released when dropped.
pub struct MachineGuard {
    _guard: Option<MachineLock>,
}

enum MachineLock {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'static, ()>),
}

impl Drop for MachineGuard {
    fn drop(&mut self) {
        HELD.with(|held| held.set(held.get().saturating_sub(1)));
    }
}

fn held() -> bool {
    HELD.with(|held| {
        let before = held.get();
        held.set(before + 1);
        before > 0
    })
}

/// A share of the machine: waits while an [`alone`] test runs.
pub async fn share_machine() -> MachineGuard {
    if held() {
        return MachineGuard { _guard: None };
    }
    let guard = tokio::time::timeout(MACHINE_WAIT, MACHINE.read())
        .await
        .expect("a test that runs alone held the machine for 20 minutes");
    MachineGuard {
        _guard: Some(MachineLock::Shared(guard)),
    }
}

/// The machine alone: waits until no other harness test runs, and keeps new ones waiting.
pub async fn alone() -> MachineGuard {
    assert!(!held(), "take the machine alone before any share of it");
    let guard = tokio::time::timeout(MACHINE_WAIT, MACHINE.write())
        .await
        .expect("the other tests held the machine for 20 minutes");
    MachineGuard {
        _guard: Some(MachineLock::Alone(guard)),
    }
}

/// [`alone`] for a test that is not async.
pub fn alone_blocking() -> MachineGuard {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime to wait in")
        .block_on(alone())
}

/// A moto server: shared (from the environment) or owned by this test.
pub struct Moto {
    pub url: String,
    child: Option<Child>,
    _machine: MachineGuard,
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The repository's root (the package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn venv_bin(name: &str) -> PathBuf {
    repo_root().join(".venv/bin").join(name)
}

impl Moto {
    pub async fn get() -> Moto {
        init();
        let machine = share_machine().await;
        if let Ok(url) = std::env::var("GPULINK_TEST_MOTO_URL") {
            return Moto {
                url,
                child: None,
                _machine: machine,
            };
        }
        let port = free_port();
        let child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server from .venv (run scripts/test.sh, which installs it)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for_listener(addr, Duration::from_secs(60)).await;
        Moto {
            url: format!("http://{addr}"),
            child: Some(child),
            _machine: machine,
        }
    }

    pub async fn keys(&self) -> KmsKeys {
        KmsKeys::new("us-east-1", Some(&self.url), Duration::from_secs(5)).await
    }

    /// Creates a fresh symmetric key and returns its ARN.
    pub async fn create_key(&self) -> String {
        let keys = self.keys().await;
        let out = keys
            .client()
            .create_key()
            .description("gpulink test key")
            .send()
            .await
            .expect("CreateKey on moto");
        out.key_metadata()
            .and_then(|m| m.arn())
            .expect("key ARN")
            .to_string()
    }
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// How long [`assert_eventually!`] waits unless told otherwise: far above what any event
/// here takes on a loaded CI machine, so that only a real failure reaches it.
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// How often [`assert_eventually!`] looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `$observe` (any expression; `.await` allowed) until `$accept` (a closure taking a
/// reference to the observed value) holds, and returns the value it accepted. Past the
/// deadline ([`EVENTUALLY`], or `within = <Duration>` first) it fails with the message and
/// the last value observed (which must be `Debug`). Waits in tests go through it: every
/// wait has a deadline, and a failure says what was seen instead.
///
/// ```ignore
/// let status = assert_eventually!(p.status().await, |s| s["phase"] == "public", "reload applied");
/// ```
macro_rules! assert_eventually {
    (within = $limit:expr, $observe:expr, $accept:expr, $($message:tt)+) => {{
        let limit: ::std::time::Duration = $limit;
        let deadline = ::tokio::time::Instant::now() + limit;
        loop {
            let observed = $observe;
            if $crate::common::accepts($accept, &observed) {
                break observed;
            }
            if ::tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} (not within {limit:?}; last observed: {observed:?})",
                    format_args!($($message)+)
                );
            }
            ::tokio::time::sleep($crate::common::POLL).await;
        }
    }};
    ($observe:expr, $accept:expr, $($message:tt)+) => {
        $crate::common::assert_eventually!(
            within = $crate::common::EVENTUALLY, $observe, $accept, $($message)+
        )
    };
}
pub(crate) use assert_eventually;

/// [`assert_eventually!`]'s test of a value: a function, so that the closure's argument
/// type comes from the value.
pub fn accepts<T>(accept: impl FnOnce(&T) -> bool, value: &T) -> bool {
    accept(value)
}

/// Waits until something listens on `addr` (the event is the listener appearing).
pub async fn wait_for_listener(addr: SocketAddr, limit: Duration) {
    assert_eventually!(
        within = limit,
        tokio::net::TcpStream::connect(addr).await.is_ok(),
        |listening| *listening,
        "nothing listens on {addr}"
    );
}

/// The last loopback block [`next_block`] hands out. Blocks above it are fixed blocks that
/// tests may take by hand (220..=252) and the benchmarks' (253, 254): the allocator never
/// hands them out, so those tests stay safe while every test runs in one process.
pub const LAST_ALLOCATED_BLOCK: u8 = 219;

static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A loopback block `127.<block>.0.0/16` of the caller's own for the rest of the process
/// (blocks are never handed out twice: a closed listener's port may linger).
///
/// The first block depends on the process id, and the rest follow it round 1..=219: two
/// test runs at once on one machine (two worktrees) then rarely hold the same block at
/// the same moment, as they would if both counted up from 1.
pub fn next_block() -> u8 {
    let blocks = u32::from(LAST_ALLOCATED_BLOCK);
    let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
    assert!(
        n < blocks,
        "the suite asked for more than {blocks} loopback blocks: share a block between \
         the servers of one test (Layout::ip) before adding blocks"
    );
    let block = (std::process::id() + n) % blocks + 1;
    u8::try_from(block).expect("at most LAST_ALLOCATED_BLOCK")
}

/// A seed for the proxy's randomness that is the same in every run of a test, whatever
/// block it got: a hash of the test's name (libtest names the thread a test runs on, and
/// `#[tokio::test]` polls the test on that thread).
pub fn test_seed() -> u64 {
    let name = std::thread::current().name().unwrap_or("").to_string();
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The addresses of one test's simulated cluster: three ENIs in the local region, one
/// in another region, and one public endpoint.
pub struct Layout {
    pub block: u8,
}

impl Layout {
    pub fn new(block: u8) -> Self {
        Self { block }
    }
    pub fn ip(&self, c: u8, d: u8) -> IpAddr {
        IpAddr::from([127, self.block, c, d])
    }
    pub fn enis(&self) -> [IpAddr; 3] {
        [self.ip(10, 50), self.ip(11, 50), self.ip(12, 50)]
    }
    pub fn remote_eni(&self) -> IpAddr {
        self.ip(13, 50)
    }
    pub fn public(&self) -> IpAddr {
        self.ip(20, 1)
    }
    pub fn sim_config(&self, ca_dir: PathBuf) -> SimConfig {
        let mut endpoints: Vec<SimEndpointConfig> = self
            .enis()
            .iter()
            .map(|ip| SimEndpointConfig::new(*ip, "us-east-1"))
            .collect();
        endpoints.push(SimEndpointConfig::new(self.remote_eni(), "us-west-2"));
        endpoints.push(SimEndpointConfig::new(self.public(), "us-east-1"));
        let mut config = SimConfig::default_layout(ca_dir);
        config.endpoints = endpoints;
        config.control_addr = SocketAddr::from(([127, self.block, 0, 1], 0));
        config
    }
}

/// What a test changes in the proxy: settings over the shared configuration
/// ([`proxy_config`]), and where the proxy's KMS traffic goes.
#[derive(Clone, Default)]
pub struct ProxyOptions {
    changes: Vec<(String, Change)>,
    remote_region: bool,
    count_kms: bool,
    kms_url: Option<String>,
    seed: Option<u64>,
    imds: Option<gpulink::placement::Imds>,
}

#[derive(Clone)]
enum Change {
    Set(toml::Value),
    Push(toml::Value),
    Remove,
}

impl ProxyOptions {
    /// Sets `key`, a dotted path (`migration.phase`, `kms.cache.max_messages`,
    /// `regions.0.dns_refresh`), to `value`, making the tables on the way.
    pub fn set(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.changes
            .push((key.into(), Change::Set(toml_value(value))));
        self
    }

    /// Appends `value` to the array at `key` (`regions`).
    pub fn push(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.changes
            .push((key.into(), Change::Push(toml_value(value))));
        self
    }

    /// Removes `key` (`regions.0.privatelink`).
    pub fn remove(mut self, key: &str) -> Self {
        self.changes.push((key.into(), Change::Remove));
        self
    }

    /// Adds the region `us-west-2` with the layout's remote ENI.
    pub fn remote_region(mut self) -> Self {
        self.remote_region = true;
        self
    }

    /// Counts the proxy's KMS connections ([`World::kms_relay`]).
    pub fn count_kms(mut self) -> Self {
        self.count_kms = true;
        self
    }

    /// Seeds the proxy's randomness with `seed` instead of [`test_seed`].
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Asks the instance metadata service at `url` for the host's zone (else, as the
    /// harness's environment says, IMDS is disabled).
    pub fn imds_url(mut self, url: impl Into<String>) -> Self {
        self.imds = Some(gpulink::placement::Imds {
            endpoint: Some(url.into()),
            disabled: false,
        });
        self
    }

    /// Sends the proxy's KMS traffic to `url` instead of moto.
    pub fn kms_url(mut self, url: impl Into<String>) -> Self {
        self.kms_url = Some(url.into());
        self
    }

    fn apply(&self, config: &mut toml::Value) {
        for (key, change) in &self.changes {
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().unwrap_or_default();
            let mut node = &mut *config;
            for part in parts {
                node = match node {
                    toml::Value::Array(items) => {
                        let index: usize = part
                            .parse()
                            .unwrap_or_else(|_| panic!("{key}: `{part}` is not an index"));
                        &mut items[index]
                    }
                    toml::Value::Table(table) => table
                        .entry(part)
                        .or_insert_with(|| toml::Value::Table(toml::Table::new())),
                    other => panic!("{key}: `{other}` is not a table"),
                };
            }
            let table = node
                .as_table_mut()
                .unwrap_or_else(|| panic!("{key}: the parent is not a table"));
            match change {
                Change::Set(value) => {
                    table.insert(last.into(), value.clone());
                }
                Change::Push(value) => table
                    .entry(last)
                    .or_insert_with(|| toml::Value::Array(Vec::new()))
                    .as_array_mut()
                    .unwrap_or_else(|| panic!("{key} is not an array"))
                    .push(value.clone()),
                Change::Remove => {
                    table.remove(last);
                }
            }
        }
    }
}

fn toml_value(value: impl serde::Serialize) -> toml::Value {
    toml::Value::try_from(value).expect("a value TOML can hold")
}

/// The configuration every test starts from, as typed values: listeners on port 0, the
/// layout's three ENIs and its public endpoint in us-east-1, fast health checks, KMS at
/// `kms_url`; then `options`' changes in order.
pub fn proxy_config(
    layout: &Layout,
    kms_url: &str,
    key_id: &str,
    ca_file: &std::path::Path,
    options: &ProxyOptions,
) -> toml::Table {
    let authority = |ip: IpAddr| format!("{ip}:8443");
    let mut regions = vec![serde_json::json!({
        "name": "us-east-1",
        "privatelink": layout.enis().map(authority),
        "public": [{
            "address": authority(layout.public()),
            "server_name": "gpu-cluster.public.example.com",
        }],
    })];
    if options.remote_region {
        regions.push(serde_json::json!({
            "name": "us-west-2",
            "privatelink": [authority(layout.remote_eni())],
        }));
    }
    config_with_regions(regions, kms_url, key_id, ca_file, options)
}

/// [`proxy_config`] around `regions` (the `[[regions]]` tables) instead of a layout's:
/// for tests whose cluster is not the simulator's layout (their own upstreams, or
/// per-endpoint settings). `options` still apply last, and may change any key.
pub fn config_with_regions(
    regions: Vec<serde_json::Value>,
    kms_url: &str,
    key_id: &str,
    ca_file: &std::path::Path,
    options: &ProxyOptions,
) -> toml::Table {
    let config = serde_json::json!({
        "listen": {
            "address": "127.0.0.1:0",
            "max_body": "10MB",
            "drain_delay": "0s",
            "shutdown_grace": "5s",
        },
        "admin": { "address": "127.0.0.1:0" },
        "tenant": {
            "id": "tenant-123",
            "model_pool": "model-a",
            "model_pools": ["model-a", "model-b"],
        },
        "kms": {
            "key_id": key_id,
            "region": "us-east-1",
            "format": "kms-direct",
            "context": "tenant",
            "timeout": "3s",
            "endpoint_url": kms_url,
        },
        "upstream": {
            "server_name": "gpu-cluster.yourcompany.internal",
            "ca_file": ca_file,
            "connect_timeout": "1s",
            "request_timeout": "10s",
            "idle_timeout": "60s",
        },
        "health": {
            "interval": "200ms",
            "timeout": "500ms",
            "healthy_threshold": 1,
            "unhealthy_threshold": 1,
        },
        "regions": regions,
        "migration": { "phase": "privatelink" },
    });
    let mut config = toml_value(config);
    options.apply(&mut config);
    match config {
        toml::Value::Table(config) => config,
        _ => unreachable!("a JSON object is a table"),
    }
}

/// A configuration table as the text of a configuration file.
pub fn toml_text(config: &toml::Table) -> String {
    toml::to_string(config).expect("a table serialises")
}

/// [`proxy_config`] as the text of a configuration file.
pub fn proxy_toml(
    layout: &Layout,
    kms_url: &str,
    key_id: &str,
    ca_file: &std::path::Path,
    options: &ProxyOptions,
) -> String {
    toml_text(&proxy_config(layout, kms_url, key_id, ca_file, options))
}

/// moto with a fresh key, and the simulator on `127.<block>.x.y` opening bodies through
/// it: everything a test needs before it starts a proxy of its own.
pub struct Cluster {
    pub moto: Moto,
    pub key_arn: String,
    pub layout: Layout,
    pub dir: tempfile::TempDir,
    pub sim: Sim,
}

impl Cluster {
    pub async fn start(block: u8) -> Cluster {
        let moto = Moto::get().await;
        let key_arn = moto.create_key().await;
        let layout = Layout::new(block);
        let dir = tempfile::tempdir().expect("tempdir");
        let sim_keys = KeyService::Kms(moto.keys().await);
        let sim = Sim::start(layout.sim_config(dir.path().join("ca")), sim_keys)
            .await
            .expect("sim starts");
        Cluster {
            moto,
            key_arn,
            layout,
            dir,
            sim,
        }
    }
}

/// An in-process proxy running `config` with KMS at `kms_url`, its randomness seeded as
/// `options` say ([`test_seed`] unless told) and the instance metadata they name.
pub async fn start_proxy(config: Config, kms_url: &str, options: &ProxyOptions) -> ProxyHandle {
    let keys = KmsKeys::new("us-east-1", Some(kms_url), Duration::from_secs(3)).await;
    let options = gpulink::proxy::StartOptions {
        random_seed: Some(options.seed.unwrap_or_else(test_seed)),
        imds: options.imds.clone(),
    };
    gpulink::proxy::start_with(config, KeyService::Kms(keys), options)
        .await
        .expect("proxy starts")
}

/// What `RUST_LOG` a proxy started as a process gets: `GPULINK_TEST_PROXY_LOG` when set
/// (to see a failing test's proxy), else `quiet`, the level the test reads or ignores.
pub fn proxy_log(quiet: &str) -> String {
    std::env::var("GPULINK_TEST_PROXY_LOG").unwrap_or_else(|_| quiet.into())
}

/// Sends `total` copies of the guide request to `url`, `concurrency` at a time, and
/// returns the answers in the order they came.
pub async fn load(client: &HttpClient, url: &str, total: u64, concurrency: usize) -> Vec<Reply> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        workers.spawn(async move {
            let mut replies = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                replies.push(send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]).await);
            }
            replies
        });
    }
    let mut replies = Vec::new();
    while let Some(answered) = workers.join_next().await {
        replies.extend(answered.expect("a load worker"));
    }
    replies
}

impl Cluster {
    /// The shared configuration ([`proxy_toml`]) for this cluster with `options`' changes.
    pub fn config_toml(&self, options: &ProxyOptions) -> String {
        proxy_toml(
            &self.layout,
            &self.moto.url,
            &self.key_arn,
            &self.sim.ca_file(),
            options,
        )
    }
}

/// Puts `sim`'s endpoint `ip` into `state`.
pub async fn put_state(sim: &Sim, ip: IpAddr, state: gpulink_sim::EndpointState) {
    sim.set_state(ip, state)
        .await
        .unwrap_or_else(|e| panic!("the simulator refused {state:?} for {ip}: {e}"));
}

/// Waits until `proxy`'s health checks agree with `serving` for `ip`'s endpoint.
pub async fn wait_serving(proxy: &ProxyHandle, ip: IpAddr, serving: bool) {
    let authority = format!("{ip}:8443");
    assert_eventually!(
        proxy
            .proxy()
            .current()
            .endpoints
            .iter()
            .find(|e| e.authority == authority)
            .map(|e| e.is_serving()),
        |state| *state == Some(serving),
        "{authority} never became serving={serving}"
    );
}

/// One test's world: moto, the simulator, and a proxy between them.
pub struct World {
    pub moto: Moto,
    pub key_arn: String,
    pub sim: Sim,
    pub proxy: Option<ProxyHandle>,
    pub layout: Layout,
    pub dir: tempfile::TempDir,
    pub client: HttpClient,
    pub kms_relay: Option<CountingRelay>,
}

impl World {
    /// [`World::start`] on a loopback block of its own.
    pub async fn with(options: ProxyOptions) -> World {
        World::start(next_block(), options).await
    }

    pub async fn start(block: u8, options: ProxyOptions) -> World {
        let Cluster {
            moto,
            key_arn,
            layout,
            dir,
            sim,
        } = Cluster::start(block).await;
        let moto_addr: SocketAddr = moto
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("moto URL is http://ip:port");
        let kms_relay = if options.count_kms {
            Some(CountingRelay::start(moto_addr).await)
        } else {
            None
        };
        let kms_url = match (&options.kms_url, &kms_relay) {
            (Some(url), _) => url.clone(),
            (None, Some(relay)) => format!("http://{}", relay.addr),
            (None, None) => moto.url.clone(),
        };
        let text = proxy_toml(&layout, &kms_url, &key_arn, &sim.ca_file(), &options);
        let config =
            Config::from_toml(&text, std::path::Path::new("test.toml")).expect("valid config");
        let proxy = start_proxy(config, &kms_url, &options).await;
        // The start-up KMS proof runs in the background: wait for its first outcome, so
        // that KMS call counts and cache states are the same in every run.
        tokio::time::timeout(Duration::from_secs(30), proxy.proxy().kms_proof_attempted())
            .await
            .expect("the first KMS proof attempt finishes");
        World {
            moto,
            key_arn,
            sim,
            proxy: Some(proxy),
            layout,
            dir,
            client: http_client(),
            kms_relay,
        }
    }

    pub fn proxy(&self) -> &ProxyHandle {
        self.proxy.as_ref().expect("proxy running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy().listen_addr, path)
    }

    /// `path` on the admin server.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy().admin_addr, path)
    }

    /// `GET path` on the admin server.
    pub async fn admin(&self, path: &str) -> Reply {
        send(&self.client, "GET", &self.admin_url(path), Vec::new(), &[]).await
    }

    /// The admin server's `/status` document.
    pub async fn status(&self) -> serde_json::Value {
        let reply = self.admin("/status").await;
        reply.assert_status(200);
        reply.json()
    }

    pub async fn post(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        send(
            &self.client,
            "POST",
            &self.url(path),
            body.as_bytes().to_vec(),
            headers,
        )
        .await
    }

    /// Sends `total` guide requests to `/inference`, `concurrency` at a time: (ok, failed).
    pub async fn load(&self, total: u64, concurrency: usize) -> (u64, u64) {
        let replies = load(&self.client, &self.url("/inference"), total, concurrency).await;
        let ok = replies.iter().filter(|r| r.status == 200).count() as u64;
        (ok, replies.len() as u64 - ok)
    }

    /// Waits until the proxy's health checks agree with `serving` for `ip`.
    pub async fn wait_serving(&self, ip: IpAddr, serving: bool) {
        wait_serving(self.proxy(), ip, serving).await;
    }

    /// Puts the simulated endpoint `ip` into `state`.
    pub async fn set_state(&self, ip: IpAddr, state: gpulink_sim::EndpointState) {
        put_state(&self.sim, ip, state).await;
    }

    pub fn requests_at(&self, ip: IpAddr) -> u64 {
        self.sim.stats(ip).map(|s| s.requests).unwrap_or(0)
    }

    /// The requests the simulator received at any of `ips`.
    pub fn requests_to(&self, ips: &[IpAddr]) -> u64 {
        ips.iter().map(|ip| self.requests_at(*ip)).sum()
    }

    pub fn total_requests(&self) -> u64 {
        self.sim.all_stats().iter().map(|s| s.requests).sum()
    }

    pub async fn stop(mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.shutdown().await;
        }
        self.sim.shutdown().await;
    }
}

/// The plain-HTTP client the tests talk to the proxy, its admin server and the
/// simulator's control API with.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The whole of `response`: its status, headers and body (an error if the body was
    /// cut short).
    pub async fn read<B: hyper::body::Body>(
        response: http::Response<B>,
    ) -> Result<Reply, B::Error> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Fails unless the answer's status is `status`, showing the body.
    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut builder = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(Full::new(Bytes::from(body))).expect("request");
    let response = client.request(request).await.expect("proxy answers");
    Reply::read(response).await.expect("body")
}

/// Fails the test unless `output` is that of a command that exited 0; the message is
/// `what`, then how it exited and everything it printed.
#[track_caller]
pub fn assert_success(output: &std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The entry for `address` among the `endpoints` of a `/status` document or a probe
/// report.
#[track_caller]
pub fn endpoint_in<'a>(doc: &'a serde_json::Value, address: &str) -> &'a serde_json::Value {
    doc["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["address"] == address)
        .unwrap_or_else(|| panic!("{address} is not among the endpoints of: {doc:#}"))
}

/// Serves `stream` over HTTP/1.1 with `service`, in a task of its own: how the tests'
/// stand-in servers (KMS, IMDS, EC2) answer each connection they accept.
pub fn spawn_http1<S, B>(stream: tokio::net::TcpStream, service: S)
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
}

/// A request's head and whole body (empty if the body was cut short): what the stand-in
/// servers of the tests look at.
pub async fn read_request(
    request: http::Request<hyper::body::Incoming>,
) -> (http::request::Parts, Bytes) {
    let (parts, body) = request.into_parts();
    (parts, body_bytes(body).await)
}

/// All of `body`, or nothing if it was cut short.
pub async fn body_bytes<B: hyper::body::Body>(body: B) -> Bytes {
    body.collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// The guide's example request.
pub const GUIDE_REQUEST: &str = r#"{"prompt": "Hello", "max_tokens": 50}"#;

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A TCP relay that counts the connections it accepts: put in front of a server to
/// prove that nothing reached it.
pub struct CountingRelay {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicU64>,
}

impl CountingRelay {
    pub async fn start(target: SocketAddr) -> CountingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        CountingRelay { addr, connections }
    }

    pub fn count(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}
