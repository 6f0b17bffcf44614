//! The running proxy: it owns the generation in service (`crate::generation`) and the
//! lifecycle flags, starts the listeners and the background tasks, and applies reloads
//! and shutdown in the order `docs/design.md` gives. Only `main`, the demo and the reload
//! triggers see it: the request path gets a [`Forwarder`], the admin server the
//! `admin::Source` this type implements.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Readiness};
use crate::config::{Config, ConfigError};
use crate::config::{Discovery, Found};
use crate::forward::Forwarder;
use crate::generation::{Current, Generation};
use crate::listener::ConnectionSettings;
use crate::metrics::{Format, Snapshot};
use crate::placement::{HostZone, Imds};
use crate::seal::{KeyService, KmsKeys, KmsProof};
use crate::upstream::discovery::{self, Ec2Clients, RegionStatus, Resolved};
use crate::upstream::{self, health, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("KMS is not usable: {0}")]
    Kms(#[from] crate::seal::KeyError),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error(transparent)]
    FileDescriptors(#[from] crate::listener::NoFileDescriptors),
    #[error("cannot start the request-path workers (runtime.workers): {0}")]
    Workers(std::io::Error),
    #[error("cannot listen on {address} ({key}): {source}")]
    Bind {
        key: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Knobs for embedding the proxy (tests, the demo); `run` uses the defaults.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Seeds canary membership and the balancer's random choices.
    pub random_seed: Option<u64>,
    /// Where to ask for the host's zone when `[placement] zone` is unset; `None`: as
    /// the environment says ([`crate::placement::Imds::from_env`]).
    pub imds: Option<crate::placement::Imds>,
}

pub struct Proxy {
    current: Arc<Current>,
    next_generation: AtomicU64,
    options: StartOptions,
    ready: AtomicBool,
    draining: AtomicBool,
    started: Instant,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// One reload at a time: two racing reloads could otherwise publish out of order.
    reload_lock: tokio::sync::Mutex<()>,
    /// Addresses found for the discovered regions, as of their last good round.
    resolved: std::sync::Mutex<Resolved>,
    /// Each discovered region's last rounds, for `/status`, `/metrics` and `/ready`.
    discovery_status: Arc<StatusByRegion>,
    /// The EC2 clients of `privatelink_endpoint_id` regions.
    ec2: Arc<Ec2Clients>,
    /// What the instance metadata service said about the host's zone, asked at most once
    /// per process (at start, or at the first reload without `[placement] zone`).
    imds_zone: tokio::sync::OnceCell<HostZone>,
    /// Wakes background loops that depend on the configuration when it changes.
    generation_changed: Arc<tokio::sync::Notify>,
    stop_background: CancellationToken,
    /// Every background task (and the request path's body drains), so that shutdown
    /// can wait for them to end.
    tasks: TaskTracker,
    this: Weak<Proxy>,
    /// Prometheus metrics; owned here so they outlive every configuration generation.
    metrics: Arc<crate::metrics::Metrics>,
    /// The last 15 minutes of request outcomes for `/status` (outlives generations too).
    history: Arc<crate::history::History>,
    /// The app and admin listeners' connections and limits (fixed at start).
    app_connections: Arc<crate::listener::Listener>,
    admin_connections: Arc<crate::listener::Listener>,
    /// Request bytes held across every request (`listen.max_in_flight_bytes`).
    in_flight_bytes: Arc<crate::inflight::InFlightBytes>,
    /// Whether KMS has been proven with the configured key (see [`KmsProof`]).
    kms_proof: tokio::sync::watch::Sender<KmsProof>,
    /// Request-path workers ([`crate::runtime`]), fixed at start, and the app listener
    /// sockets bound for them.
    workers: usize,
    listener_sockets: std::sync::atomic::AtomicUsize,
}

/// How long shutdown waits for the background tasks once they are told to stop.
const BACKGROUND_STOP: Duration = Duration::from_secs(5);

/// Backoff between start-up proof attempts: doubling from the first to the last.
const PROOF_RETRY_FIRST: Duration = Duration::from_millis(500);
const PROOF_RETRY_MAX: Duration = Duration::from_secs(30);

impl Proxy {
    /// What the request path needs of this proxy (the ingress gets one; the
    /// request_head fuzz target calls [`crate::forward::handle`] with another).
    pub fn forwarder(&self) -> Forwarder {
        Forwarder::new(
            self.current.clone(),
            self.metrics.clone(),
            self.history.clone(),
            self.in_flight_bytes.clone(),
            self.tasks.clone(),
        )
    }

    /// The host's zone for `config`: `[placement] zone`, else what IMDS said (asked once).
    async fn host_zone(&self, config: &Config) -> HostZone {
        if let Some(configured) = HostZone::configured(&config.placement) {
            return configured;
        }
        self.imds_zone
            .get_or_init(|| async {
                let imds = self.options.imds.clone().unwrap_or_else(Imds::from_env);
                crate::placement::learn(&config.placement, &imds).await
            })
            .await
            .clone()
    }

    /// The generation new requests use.
    pub fn current(&self) -> Arc<Generation> {
        self.current.get()
    }

    /// Completes at the next reload. Registered before it returns, so a loop that calls
    /// it before reading the configuration is woken by a reload in between too.
    fn next_reload(&self) -> Pin<Box<tokio::sync::futures::OwnedNotified>> {
        let mut notified = Box::pin(self.generation_changed.clone().notified_owned());
        notified.as_mut().enable();
        notified
    }

    /// The cell holding the generation in service, for readers that outlive one.
    pub fn generations(&self) -> &Arc<Current> {
        &self.current
    }

    pub fn keys(&self) -> KeyService {
        self.current().sealer.keys().clone()
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.kms_proof.borrow().proven && !self.is_draining()
    }

    /// The start-up proof of KMS, for `/ready` and `/status`.
    fn kms_proof(&self) -> KmsProof {
        self.kms_proof.borrow().clone()
    }

    /// Returns once KMS has been proven (at once if it has been).
    pub async fn kms_proven(&self) {
        let mut proof = self.kms_proof.subscribe();
        // The sender lives as long as `self`: this cannot fail while we borrow it.
        let _ = proof.wait_for(|p| p.proven).await;
    }

    /// Returns once the first proof attempt has finished, whatever its outcome (tests).
    pub async fn kms_proof_attempted(&self) {
        let mut proof = self.kms_proof.subscribe();
        let _ = proof.wait_for(|p| p.proven || p.failures > 0).await;
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Reloads by result: (applied, rejected).
    fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// Reads, validates and applies a configuration file. An invalid file changes
    /// nothing: the old configuration keeps serving.
    pub async fn reload_from_file(&self, path: &Path) -> Result<u64, ReloadError> {
        let result = match Config::load_off_thread(path).await {
            Ok(config) => self.reload(config).await,
            Err(error) => Err(ReloadError::Config(error)),
        };
        match &result {
            Ok(generation) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(generation, path = %path.display(), "configuration reloaded");
            }
            Err(error) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, path = %path.display(), "configuration reload rejected; the previous configuration keeps serving");
            }
        }
        result
    }

    /// Applies a validated configuration. Endpoints whose settings did not change keep
    /// their health state and pooled connections; new ones get a first health check
    /// before they can receive traffic.
    pub async fn reload(&self, mut config: Config) -> Result<u64, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.current();
        warn_about_restart_only_changes(&old.config, &config);
        // The workers started with the process; the generation says what is in effect
        // (and builds its endpoints' pools for them).
        config.runtime = old.config.runtime;
        let keys = keys_for(&old, &config).await?;
        let kms_changed = kms_settings_changed(&old.config, &config);
        let resolved = self.resolve_new_names(&config).await;
        let host_zone = self.host_zone(&config).await;
        let number = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let generation = Generation::build(
            number,
            config,
            keys,
            Some(&old),
            self.options.random_seed,
            &resolved,
            host_zone,
        )
        .map_err(StartError::from)?;
        // New KMS settings must work before they replace working ones; while the start-up
        // proof has not succeeded there is nothing working to protect, and the proof loop
        // tries the new settings at once.
        if kms_changed && self.kms_proof.borrow().proven {
            let pool = &generation.config.tenant.model_pool;
            if let Err(error) = generation.sealer.prove(pool).await {
                tracing::error!(
                    kms.key_id = %generation.config.kms.key_id,
                    %error,
                    "the reloaded kms settings failed their proof seal; the previous settings keep serving"
                );
                return Err(ReloadError::Start(StartError::Kms(error)));
            }
        }
        let fresh: Vec<Arc<Endpoint>> = generation
            .endpoints
            .iter()
            .filter(|e| !old.contains(e))
            .cloned()
            .collect();
        health::first_round(&fresh, &generation.config.health).await;
        let generation = Arc::new(generation);
        self.current.replace(generation.clone());
        self.generation_changed.notify_waiters();
        for endpoint in fresh {
            self.spawn_health_checker(endpoint);
        }
        let (kept, total) = (
            generation
                .endpoints
                .iter()
                .filter(|e| old.contains(e))
                .count(),
            generation.endpoints.len(),
        );
        tracing::info!(
            generation = generation.number,
            phase = generation.routes.phase().as_str(),
            endpoints = total,
            kept,
            "new configuration generation in service"
        );
        Ok(generation.number)
    }

    /// The found addresses for `config`'s discovered regions: those already known, and
    /// a first round for regions (or sources) not seen before.
    async fn resolve_new_names(&self, config: &Config) -> Resolved {
        let known = self.resolved.lock().map(|r| r.clone()).unwrap_or_default();
        let mut resolved = Resolved::new();
        for d in &config.discovery {
            let same_source = self.discovery_status.same_source(d);
            let found = match known.get(&d.region) {
                Some(found) if same_source => found.clone(),
                _ => self.discover_logged(d).await.unwrap_or_default(),
            };
            resolved.insert(d.region.clone(), found);
        }
        self.discovery_status.retain(&config.discovery);
        if let Ok(mut r) = self.resolved.lock() {
            *r = resolved.clone();
        }
        resolved
    }

    /// One discovery round for `d`, recorded in the region's status and logged.
    async fn discover_logged(&self, d: &Discovery) -> Option<Vec<Found>> {
        discover_logged(d, &self.ec2, &self.discovery_status, &self.metrics).await
    }

    /// Runs discovery for every due region and, when an address set changed, builds a
    /// new generation from the same configuration (unchanged addresses keep their
    /// endpoints). A failed round keeps the region's last good addresses.
    async fn rediscover(&self, due: &[Discovery]) {
        let mut changed = false;
        for d in due {
            let Some(found) = self.discover_logged(d).await else {
                continue; // keep the last known addresses
            };
            if let Ok(mut resolved) = self.resolved.lock() {
                if resolved.get(&d.region) != Some(&found) {
                    let addresses: Vec<String> = found.iter().map(|f| f.ip.to_string()).collect();
                    tracing::info!(
                        region = %d.region,
                        source = d.source.kind(),
                        target = d.source.target(),
                        ?addresses,
                        "PrivateLink addresses changed"
                    );
                    resolved.insert(d.region.clone(), found);
                    changed = true;
                }
            }
        }
        if changed {
            let config = (*self.current().config).clone();
            if let Err(error) = self.reload(config).await {
                tracing::error!(%error, "could not apply the new PrivateLink addresses");
            }
        }
    }

    /// Checks one endpoint every `health.interval` (read afresh each round, so a reload
    /// that changes it takes effect) until the endpoint leaves the configuration.
    fn spawn_health_checker(&self, endpoint: Arc<Endpoint>) {
        let proxy = self.this.clone();
        let stop = self.stop_background.clone();
        self.tasks.spawn(async move {
            loop {
                let Some(settings) = proxy.upgrade().and_then(|p| {
                    let generation = p.current();
                    generation
                        .contains(&endpoint)
                        .then(|| generation.config.health.clone())
                }) else {
                    return;
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(settings.interval.get()) => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    () = health::round(&endpoint, &settings) => {}
                }
            }
        });
    }
}

/// The admin server's view of the proxy.
impl admin::Source for Proxy {
    fn readiness(&self) -> Readiness {
        if self.is_draining() {
            return Readiness::Draining;
        }
        if self.is_ready() {
            return Readiness::Ready;
        }
        let proof = self.kms_proof();
        if proof.proven {
            Readiness::Starting
        } else {
            Readiness::WaitingForKms {
                reason: proof.last_error,
            }
        }
    }

    fn status(&self) -> Value {
        let generation = self.current();
        admin::status::document(&admin::status::Inputs {
            state: self.snapshot(&generation),
            uptime: self.uptime(),
            app_connections: &self.app_connections,
            admin_connections: &self.admin_connections,
            workers: self.workers,
            listener_sockets: self.listener_sockets.load(Ordering::Relaxed),
            held_bytes: self.in_flight_bytes.held(),
            metrics: &self.metrics,
            history: &self.history,
            kms_proof: self.kms_proof(),
            discovery: self
                .discovery_status
                .all()
                .iter()
                .map(|(region, status)| status.to_json(region))
                .collect(),
        })
    }

    fn metrics(&self, format: Format) -> Result<String, std::fmt::Error> {
        let generation = self.current();
        self.metrics.render(&self.snapshot(&generation), format)
    }

    fn connection_settings(&self) -> ConnectionSettings {
        let config = &self.current().config;
        ConnectionSettings::admin(&config.admin, &config.listen)
    }
}

impl Proxy {
    /// The lifecycle state the metrics and `/status` report, with `generation`.
    fn snapshot<'a>(&self, generation: &'a Generation) -> Snapshot<'a> {
        Snapshot {
            generation,
            ready: self.is_ready(),
            draining: self.is_draining(),
            reloads: self.reload_counts(),
        }
    }
}

fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    for (key, changed) in [
        ("listen.address", old.listen.address != new.listen.address),
        ("admin.address", old.admin.address != new.admin.address),
        (
            "listen.max_connections",
            old.listen.max_connections != new.listen.max_connections,
        ),
        (
            "admin.max_connections",
            old.admin.max_connections != new.admin.max_connections,
        ),
        ("log.format", old.log.format != new.log.format),
        ("runtime.workers", old.runtime != new.runtime),
    ] {
        if changed {
            tracing::warn!(
                key,
                "this setting changes only on restart; the rest of the reload applies"
            );
        }
    }
}

/// Whether a reload changes what a seal does (key, context, format or the KMS client).
fn kms_settings_changed(old: &Config, new: &Config) -> bool {
    let (a, b) = (&old.kms, &new.kms);
    a.key_id != b.key_id
        || a.region != b.region
        || a.endpoint_url != b.endpoint_url
        || a.format != b.format
        || a.context != b.context
        || old.tenant.id != new.tenant.id
        || old.tenant.model_pool != new.tenant.model_pool
}

/// Proves KMS ([`crate::seal::Sealer::prove`]) with the current generation until it
/// works, backing off from 0.5 s to 30 s, and trying again at once after a reload (which
/// may fix the key). Each failure is one log line naming `kms.key_id`.
async fn prove_kms(proxy: Weak<Proxy>, stop: CancellationToken) {
    let mut delay = PROOF_RETRY_FIRST;
    loop {
        let Some(proxy_now) = proxy.upgrade() else {
            return;
        };
        let reloaded = proxy_now.next_reload();
        let generation = proxy_now.current();
        let kms = &generation.config.kms;
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = generation.sealer.prove(&generation.config.tenant.model_pool) => result,
        };
        match result {
            Ok(()) => {
                proxy_now.kms_proof.send_modify(|p| {
                    p.proven = true;
                    p.last_error = None;
                });
                tracing::info!(
                    kms.key_id = %kms.key_id,
                    kms.format = kms.format.as_str(),
                    "KMS proven: a seal with the configured key and context succeeded"
                );
                return;
            }
            Err(error) => {
                let failures = proxy_now.kms_proof.borrow().failures.saturating_add(1);
                proxy_now.kms_proof.send_modify(|p| {
                    p.failures = failures;
                    p.last_error = Some(error.to_string());
                });
                let what = if error.is_key_refusal() {
                    "KMS refuses kms.key_id"
                } else {
                    "KMS is not usable yet"
                };
                tracing::warn!(
                    kms.key_id = %kms.key_id,
                    kms.region = %kms.region,
                    attempt = failures,
                    retry_in = ?delay,
                    %error,
                    "{what}: not ready until a seal with the configured key succeeds"
                );
            }
        }
        drop(generation);
        drop(proxy_now);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = reloaded => {}
        }
        delay = delay.saturating_mul(2).min(PROOF_RETRY_MAX);
    }
}

/// The key service for a new configuration: the current one unless the KMS client
/// settings changed.
async fn keys_for(old: &Generation, config: &Config) -> Result<KeyService, StartError> {
    let current = old.sealer.keys().clone();
    let same = old.config.kms.region == config.kms.region
        && old.config.kms.endpoint_url == config.kms.endpoint_url
        && old.config.kms.timeout == config.kms.timeout;
    if same || current.is_development() {
        return Ok(current);
    }
    let keys = KeyService::Kms(KmsKeys::from_config(&config.kms).await);
    keys.check_credentials().await?;
    Ok(keys)
}

/// A started proxy. Dropping it does not stop it; call [`ProxyHandle::shutdown`].
pub struct ProxyHandle {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    proxy: Arc<Proxy>,
    stop_accepting: CancellationToken,
    /// The request-path workers, each serving one app listener socket.
    workers: crate::runtime::Workers,
}

impl ProxyHandle {
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// SIGTERM behaviour: `/ready` turns 503 at once, the listener keeps accepting for
    /// `listen.drain_delay` (the app may not have noticed yet), then stops; in-flight
    /// requests get up to `listen.shutdown_grace` to finish.
    pub async fn shutdown(self) {
        self.proxy.draining.store(true, Ordering::Release);
        let drain_delay = self.proxy.current().config.listen.drain_delay.get();
        tracing::info!(
            ?drain_delay,
            "draining: /ready is 503, still accepting for the drain delay"
        );
        tokio::time::sleep(drain_delay).await;
        self.stop_accepting.cancel();
        // Each worker stops accepting, lets its connections finish within the grace,
        // then ends with its runtime.
        self.workers.join().await;
        self.proxy.stop_background.cancel();
        self.proxy.tasks.close();
        // Each task stops at its next await on the token; the bound keeps one stuck in a
        // health check or a reload from holding the exit.
        let generation = self.proxy.current();
        let stopped = async {
            tokio::join!(self.proxy.tasks.wait(), generation.sealer.shut_down());
        };
        if tokio::time::timeout(BACKGROUND_STOP, stopped)
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.proxy.tasks.len(),
                "background tasks still running after {BACKGROUND_STOP:?}; exiting without them"
            );
        }
        tracing::info!("shutdown complete");
    }
}

/// Starts the proxy: endpoints, the listeners, a first health round, and the KMS proof
/// in the background (`/ready` waits for it: [`Proxy::kms_proven`]).
pub async fn start(config: Config, keys: KeyService) -> Result<ProxyHandle, StartError> {
    start_with(config, keys, StartOptions::default()).await
}

pub async fn start_with(
    config: Config,
    keys: KeyService,
    options: StartOptions,
) -> Result<ProxyHandle, StartError> {
    // Credentials and the key are proven by `prove_kms` below, retried until they work:
    // a KMS problem keeps gpulink unready (and says why), it does not stop it.
    let ec2 = Arc::new(Ec2Clients::default());
    let discovery_status = Arc::new(StatusByRegion::default());
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let mut resolved = Resolved::new();
    for d in &config.discovery {
        let found = discover_logged(d, &ec2, &discovery_status, &metrics)
            .await
            .unwrap_or_default();
        resolved.insert(d.region.clone(), found);
    }
    let imds_zone = tokio::sync::OnceCell::new();
    let host_zone = match HostZone::configured(&config.placement) {
        Some(configured) => configured,
        None => {
            let imds = options.imds.clone().unwrap_or_else(Imds::from_env);
            let learned = crate::placement::learn(&config.placement, &imds).await;
            // Set on a fresh cell: cannot fail.
            let _ = imds_zone.set(learned.clone());
            learned
        }
    };
    let generation = Arc::new(Generation::build(
        1,
        config,
        keys,
        None,
        options.random_seed,
        &resolved,
        host_zone,
    )?);
    let workers = crate::runtime::worker_count(generation.config.runtime.workers);
    let max_connections = crate::listener::fit_file_descriptors(
        &generation.config.listen,
        &generation.config.admin,
        generation.endpoints.len(),
        workers,
    )?;
    let app_connections =
        crate::listener::Listener::for_workers("listen", max_connections, workers);
    let admin_connections =
        crate::listener::Listener::new("admin", generation.config.admin.max_connections);
    let stop_background = CancellationToken::new();
    let tasks = TaskTracker::new();
    let proxy = Arc::new_cyclic(|this| Proxy {
        current: Current::new(generation.clone()),
        next_generation: AtomicU64::new(2),
        options,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        started: Instant::now(),
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        reload_lock: tokio::sync::Mutex::new(()),
        resolved: std::sync::Mutex::new(resolved),
        discovery_status,
        ec2,
        imds_zone,
        generation_changed: Arc::new(tokio::sync::Notify::new()),
        stop_background: stop_background.clone(),
        tasks: tasks.clone(),
        this: this.clone(),
        metrics,
        history: Arc::new(crate::history::History::new()),
        app_connections,
        admin_connections,
        in_flight_bytes: crate::inflight::InFlightBytes::new(),
        kms_proof: tokio::sync::watch::Sender::new(KmsProof::default()),
        workers,
        listener_sockets: std::sync::atomic::AtomicUsize::new(0),
    });
    let config = generation.config.clone();

    let bind = |key: &'static str, address: SocketAddr| async move {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::Bind {
                key,
                address,
                source,
            })?;
        let local = listener.local_addr().map_err(|source| StartError::Bind {
            key,
            address,
            source,
        })?;
        Ok::<_, StartError>((listener, local))
    };
    for (key, address) in config.exposed_listeners() {
        tracing::warn!(
            key,
            %address,
            "not a loopback address: other hosts can reach it (the app-facing listener takes plaintext JSON)"
        );
    }
    let listen_error = |source| StartError::Bind {
        key: "listen.address",
        address: config.listen.address,
        source,
    };
    let listeners =
        crate::runtime::bind_listeners(config.listen.address, workers).map_err(listen_error)?;
    let listen_addr = match listeners.first() {
        Some(first) => first.local_addr().map_err(listen_error)?,
        None => return Err(listen_error(std::io::Error::other("no worker to listen"))),
    };
    proxy
        .listener_sockets
        .store(listeners.len(), Ordering::Relaxed);
    let (admin_listener, admin_addr) = bind("admin.address", config.admin.address).await?;

    tasks.spawn(admin::serve(
        admin_listener,
        proxy.admin_connections.clone(),
        proxy.clone(),
        stop_background.clone(),
    ));

    tasks.spawn(prove_kms(Arc::downgrade(&proxy), stop_background.clone()));
    health::first_round(&generation.endpoints, &config.health).await;
    for endpoint in &generation.endpoints {
        proxy.spawn_health_checker(endpoint.clone());
    }

    tasks.spawn(rediscover_periodically(
        Arc::downgrade(&proxy),
        stop_background.clone(),
    ));
    tasks.spawn(watch_fallback_window(
        Arc::downgrade(&proxy),
        stop_background.clone(),
    ));

    let stop_accepting = CancellationToken::new();
    let forwarder = Arc::new(proxy.forwarder());
    let connections = proxy.app_connections.clone();
    let stop = stop_accepting.clone();
    let serve = move |_worker, listener| {
        crate::ingress::serve(
            listener,
            connections.clone(),
            forwarder.clone(),
            stop.clone(),
        )
    };
    // The workers live as long as the runtime that started them: when it goes away
    // without a shutdown (a test's runtime ending, a panic), this task is dropped with it
    // and the workers drop everything at once, as the runtime's own tasks would be. A
    // shutdown ends it after the workers have ended.
    let abandon = CancellationToken::new();
    let running = match crate::runtime::Workers::start(listeners, serve, abandon.clone()).await {
        Ok(running) => running,
        Err(error) => {
            abandon.cancel();
            return Err(StartError::Workers(error));
        }
    };
    let abandon_with_this_runtime = abandon.drop_guard();
    let workers_ended = stop_background.clone();
    tasks.spawn(async move {
        let _abandon = abandon_with_this_runtime;
        workers_ended.cancelled().await
    });
    proxy.ready.store(true, Ordering::Release);
    let serving = generation.serving();
    tracing::info!(
        listen = %listen_addr,
        admin = %admin_addr,
        workers,
        generation = generation.number,
        phase = generation.routes.phase().as_str(),
        endpoints = generation.endpoints.len(),
        serving,
        kms_proven = proxy.kms_proof.borrow().proven,
        "gpulink is serving (ready once KMS is proven)"
    );
    Ok(ProxyHandle {
        listen_addr,
        admin_addr,
        proxy,
        stop_accepting,
        workers: running,
    })
}

/// Tells the operator, in the log, when the public fallback window is about to close
/// (hourly during its last day) and when it has closed (once per generation): after
/// that, phase `privatelink` never uses public, and the rollback plan is gone.
async fn watch_fallback_window(proxy: Weak<Proxy>, stop: CancellationToken) {
    use crate::route::WindowNotice;
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);
    const HOURLY: std::time::Duration = std::time::Duration::from_secs(3600);
    let mut last_warning: Option<Instant> = None;
    let mut closed_told_for = 0;
    loop {
        let Some(generation) = proxy.upgrade().map(|p| p.current()) else {
            return;
        };
        match generation.routes.fallback_window_notice(chrono::Utc::now()) {
            Some(WindowNotice::Closing(until, left))
                if last_warning.is_none_or(|t| t.elapsed() >= HOURLY) =>
            {
                tracing::warn!(
                    public_fallback_until = %until.to_rfc3339(),
                    hours_left = left.num_minutes() as f64 / 60.0,
                    "the public fallback window closes soon: after it, phase `privatelink` never falls back to public; extend migration.public_fallback_until to keep the rollback plan"
                );
                last_warning = Some(Instant::now());
            }
            Some(WindowNotice::Closed(until)) if closed_told_for != generation.number => {
                tracing::warn!(
                    public_fallback_until = %until.to_rfc3339(),
                    "the public fallback window has closed: public endpoints are no longer used"
                );
                closed_told_for = generation.number;
            }
            _ => {}
        }
        drop(generation);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Each discovered region's status, by region name.
#[derive(Default)]
pub struct StatusByRegion(std::sync::Mutex<std::collections::BTreeMap<String, RegionStatus>>);

impl StatusByRegion {
    fn update(&self, d: &Discovery, f: impl FnOnce(&mut RegionStatus)) {
        if let Ok(mut map) = self.0.lock() {
            let status = map
                .entry(d.region.clone())
                .or_insert_with(|| RegionStatus::new(d));
            if status.source != d.source.kind() || status.target != d.source.target() {
                *status = RegionStatus::new(d);
            }
            f(status);
        }
    }

    /// Whether the region's status is about `d`'s source (a reload may change it).
    fn same_source(&self, d: &Discovery) -> bool {
        self.0.lock().is_ok_and(|map| {
            map.get(&d.region)
                .is_some_and(|s| s.source == d.source.kind() && s.target == d.source.target())
        })
    }

    /// Forgets regions the configuration no longer discovers.
    fn retain(&self, discovery: &[Discovery]) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|region, _| discovery.iter().any(|d| &d.region == region));
        }
    }

    /// Every region's status, by region name.
    pub fn all(&self) -> Vec<(String, RegionStatus)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// One discovery round for `d`: the addresses to use, or None (the last good ones stay)
/// when it failed. Recorded in `statuses`; failures and states that give no traffic are
/// logged as warnings with what to do.
async fn discover_logged(
    d: &Discovery,
    ec2: &Ec2Clients,
    statuses: &StatusByRegion,
    metrics: &crate::metrics::Metrics,
) -> Option<Vec<Found>> {
    let result = discovery::discover(d, ec2).await;
    let addresses = result.as_ref().ok().map(|o| o.found.len());
    metrics.discovery_round(&d.region, d.source.kind(), addresses);
    match result {
        Ok(outcome) => {
            let mut was = None;
            statuses.update(d, |s| {
                was = s.state.clone();
                s.succeeded(&outcome);
            });
            if let Some(state) = &outcome.state {
                let now = state.as_str().to_string();
                if was.as_deref() != Some(now.as_str()) {
                    match state.advice() {
                        Some(advice) => tracing::warn!(
                            region = %d.region,
                            vpc_endpoint_id = d.source.target(),
                            state = %now,
                            "the VPC endpoint is not available, so no traffic goes to it: {advice}"
                        ),
                        None => tracing::info!(
                            region = %d.region,
                            vpc_endpoint_id = d.source.target(),
                            state = %now,
                            interfaces = outcome.interfaces,
                            "the VPC endpoint is available"
                        ),
                    }
                }
            }
            Some(outcome.found)
        }
        Err(error) => {
            statuses.update(d, |s| s.failed(&error));
            tracing::warn!(
                region = %d.region,
                source = d.source.kind(),
                target = d.source.target(),
                %error,
                "PrivateLink discovery failed; keeping the last known addresses"
            );
            None
        }
    }
}

/// Runs each region's discovery every `dns_refresh` / `discovery_refresh` (read from
/// the current configuration each round, so reloads take effect).
async fn rediscover_periodically(proxy: Weak<Proxy>, stop: CancellationToken) {
    let mut last: std::collections::BTreeMap<String, Instant> = Default::default();
    loop {
        let Some(proxy_now) = proxy.upgrade() else {
            return;
        };
        // Before the configuration is read, so a reload in between still wakes this loop.
        let reloaded = proxy_now.next_reload();
        let regions = proxy_now.current().config.discovery.clone();
        let due: Vec<_> = regions
            .iter()
            .filter(|d| last.get(&d.region).is_none_or(|t| t.elapsed() >= d.refresh))
            .cloned()
            .collect();
        if !due.is_empty() {
            for d in &due {
                last.insert(d.region.clone(), Instant::now());
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                () = proxy_now.rediscover(&due) => {}
            }
        }
        let next = regions
            .iter()
            .map(|d| {
                last.get(&d.region)
                    .map_or(d.refresh, |t| d.refresh.saturating_sub(t.elapsed()))
            })
            .min()
            .unwrap_or(std::time::Duration::from_secs(3600))
            .max(std::time::Duration::from_millis(100));
        drop(proxy_now);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
            // A reload may add a DNS region or change its refresh interval.
            _ = reloaded => {}
        }
    }
}
