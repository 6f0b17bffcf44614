//! The running proxy: the current configuration generation (swapped atomically on
//! reload), the lifecycle flags the admin server reports, and start-up and shutdown in
//! the order DESIGN.md gives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::route::RouteTable;
use crate::seal::{KeyService, Sealer};
use crate::upstream::{self, health, Endpoint};

/// Everything one configuration generation needs to serve a request. A request holds
/// its generation for its whole life, so a reload never changes a request mid-way.
pub struct Generation {
    pub number: u64,
    pub config: Arc<Config>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub routes: RouteTable,
    pub sealer: Sealer,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("KMS is not usable: {0}")]
    Kms(#[from] crate::seal::KeyError),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error("cannot listen on {address} ({key}): {source}")]
    Bind {
        key: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Proxy {
    current: ArcSwap<Generation>,
    keys: KeyService,
    ready: AtomicBool,
    draining: AtomicBool,
    started: Instant,
}

impl Proxy {
    /// The generation new requests use.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn keys(&self) -> &KeyService {
        &self.keys
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

/// Builds the endpoints, routes and sealer of one configuration.
fn build_generation(
    number: u64,
    config: Config,
    keys: &KeyService,
) -> Result<Generation, StartError> {
    let endpoints = upstream::build_endpoints(&config)?;
    let routes = RouteTable::new(&config, &endpoints);
    let sealer = Sealer::new(&config, keys.clone());
    Ok(Generation {
        number,
        config: Arc::new(config),
        endpoints,
        routes,
        sealer,
    })
}

/// A started proxy. Dropping it does not stop it; call [`ProxyHandle::shutdown`].
pub struct ProxyHandle {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    proxy: Arc<Proxy>,
    stop_accepting: CancellationToken,
    stop_background: CancellationToken,
    ingress: JoinHandle<()>,
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
        let _ = self.ingress.await;
        self.stop_background.cancel();
        tracing::info!("shutdown complete");
    }
}

/// Starts the proxy: credentials, endpoints, a first health round, then the listeners.
pub async fn start(config: Config, keys: KeyService) -> Result<ProxyHandle, StartError> {
    keys.check_credentials().await?;
    let generation = Arc::new(build_generation(1, config, &keys)?);
    let proxy = Arc::new(Proxy {
        current: ArcSwap::new(generation.clone()),
        keys,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        started: Instant::now(),
    });
    let config = generation.config.clone();

    let listener = TcpListener::bind(config.listen.address)
        .await
        .map_err(|source| StartError::Bind {
            key: "listen.address",
            address: config.listen.address,
            source,
        })?;
    let admin_listener = TcpListener::bind(config.admin.address)
        .await
        .map_err(|source| StartError::Bind {
            key: "admin.address",
            address: config.admin.address,
            source,
        })?;
    let listen_addr = listener.local_addr().map_err(|source| StartError::Bind {
        key: "listen.address",
        address: config.listen.address,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            key: "admin.address",
            address: config.admin.address,
            source,
        })?;

    let stop_accepting = CancellationToken::new();
    let stop_background = CancellationToken::new();
    tokio::spawn(crate::admin::serve(
        admin_listener,
        proxy.clone(),
        stop_background.clone(),
    ));

    health::first_round(&generation.endpoints, &config.health).await;
    health::spawn_checkers(
        &generation.endpoints,
        &config.health,
        stop_background.clone(),
    );

    let ingress = tokio::spawn(crate::ingress::serve(
        listener,
        proxy.clone(),
        stop_accepting.clone(),
    ));
    proxy.ready.store(true, Ordering::Release);
    let serving = generation
        .endpoints
        .iter()
        .filter(|e| e.is_serving())
        .count();
    tracing::info!(
        listen = %listen_addr,
        admin = %admin_addr,
        generation = generation.number,
        phase = generation.routes.phase().as_str(),
        endpoints = generation.endpoints.len(),
        serving,
        "gpulink is ready"
    );
    Ok(ProxyHandle {
        listen_addr,
        admin_addr,
        proxy,
        stop_accepting,
        stop_background,
        ingress,
    })
}
