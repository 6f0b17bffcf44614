//! One simulated endpoint: its two listeners (TLS inference, plain-HTTP health), its
//! counters, and its state transitions.
//!
//! `down` must look like a vanished ENI, so it really closes the listening sockets (a
//! connect is refused by the kernel) and every open connection; leaving `down` binds the
//! ports again. The other states only change how the handlers answer, so they are a
//! value that every handler reads (and that a blackholed handler waits on).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::task::{JoinHandle, JoinSet};

use super::{health, inference, EndpointState, EndpointStats, Shared, SimEndpointConfig, SimError};

/// A client that connects and never finishes the TLS handshake must not pin a task forever.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pending connections the kernel may queue per listener: enough for benchmark bursts.
const LISTEN_BACKLOG: u32 = 1024;

/// Why a handler hangs up instead of answering. hyper turns a service error into a
/// closed connection (HTTP/1.1) or a reset stream (HTTP/2), which is the point: these
/// are the failures a real endpoint shows without an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Hangup {
    #[error("the request was held by a blackhole and is dropped now that the state changed")]
    Blackholed,
    #[error("the endpoint is down")]
    Down,
    #[error("the request body could not be read: {0}")]
    Body(String),
}

/// Per-endpoint counters. Each change also bumps `Endpoint::changes` so that waiters
/// re-check their condition.
#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub decrypt_failures: AtomicU64,
    pub plaintext_seen: AtomicU64,
    pub context_none: AtomicU64,
    pub in_flight: AtomicU64,
    pub health_checks: AtomicU64,
}

/// The listeners of one bound period (between two `down`s).
struct Serving {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Serving {
    /// Closes both listeners and every connection they accepted, and waits until done.
    async fn close(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

pub(crate) struct Endpoint {
    pub(crate) config: SimEndpointConfig,
    state: watch::Sender<EndpointState>,
    counters: Counters,
    /// Bumped after every counter change; `wait_for` listens to it.
    changes: watch::Sender<()>,
    /// `Some` while the ports are bound. The async mutex also serialises transitions.
    serving: Mutex<Option<Serving>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    Inference,
    Health,
}

impl Endpoint {
    pub(crate) fn new(config: SimEndpointConfig) -> Self {
        Self {
            config,
            state: watch::Sender::new(EndpointState::Healthy),
            counters: Counters::default(),
            changes: watch::Sender::new(()),
            serving: Mutex::new(None),
        }
    }

    pub(crate) fn state(&self) -> EndpointState {
        *self.state.borrow()
    }

    /// `ip:port` of the inference port, as the proxy reports it in `X-Gpulink-Endpoint`.
    pub(crate) fn tls_addr(&self) -> SocketAddr {
        self.config.tls_addr()
    }

    /// Adds one to a counter and wakes the waiters.
    pub(crate) fn count(&self, counter: fn(&Counters) -> &AtomicU64) {
        counter(&self.counters).fetch_add(1, Ordering::Relaxed);
        self.changed();
    }

    fn changed(&self) {
        self.changes.send_modify(|()| {});
    }

    /// Waits until the endpoint leaves the blackhole state. Held requests are dropped by
    /// the caller afterwards: a blackhole loses what it swallowed.
    pub(crate) async fn until_not_blackholed(&self) {
        let mut state = self.state.subscribe();
        // Err means the sender is gone, i.e. the simulator is being torn down; the
        // connection task is about to be aborted anyway.
        let _ = state.wait_for(|s| *s != EndpointState::Blackhole).await;
    }

    pub(crate) fn stats(&self) -> EndpointStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        EndpointStats {
            ip: self.config.ip.to_string(),
            region: self.config.region.clone(),
            state: self.state().name().to_string(),
            requests: get(&c.requests),
            ok: get(&c.ok),
            decrypt_failures: get(&c.decrypt_failures),
            plaintext_seen: get(&c.plaintext_seen),
            context_none: get(&c.context_none),
            in_flight: get(&c.in_flight),
            health_checks: get(&c.health_checks),
        }
    }

    /// Zeroes the counters; `in_flight` is a gauge of live requests and stays.
    pub(crate) fn reset(&self) {
        let c = &self.counters;
        for counter in [
            &c.requests,
            &c.ok,
            &c.decrypt_failures,
            &c.plaintext_seen,
            &c.context_none,
            &c.health_checks,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.changed();
    }

    pub(crate) async fn wait_for(
        &self,
        condition: impl Fn(&EndpointStats) -> bool,
    ) -> EndpointStats {
        // Subscribing first marks the current version as seen, and counters are updated
        // before the version is bumped, so a change between the check and the wait is
        // never missed.
        let mut changes = self.changes.subscribe();
        loop {
            let stats = self.stats();
            if condition(&stats) {
                return stats;
            }
            if changes.changed().await.is_err() {
                // The sender lives as long as `self`; this cannot happen while borrowed.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Binds both ports at start (every endpoint starts healthy).
    pub(crate) async fn start(self: &Arc<Self>, shared: &Arc<Shared>) -> Result<(), SimError> {
        let mut serving = self.serving.lock().await;
        if serving.is_none() {
            *serving = Some(self.bind(shared)?);
        }
        Ok(())
    }

    /// Closes both ports and every connection (used at shutdown).
    pub(crate) async fn stop(&self) {
        if let Some(serving) = self.serving.lock().await.take() {
            serving.close().await;
        }
    }

    /// Applies a new state; returns when it is in effect (see `Sim::set_state`).
    pub(crate) async fn transition(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        state: EndpointState,
    ) -> Result<(), SimError> {
        let mut serving = self.serving.lock().await;
        // Published first, so that a request racing with `down` is hung up on rather than
        // answered, and blackholed handlers wake up before their connections go.
        let previous = self.state.send_replace(state);
        let stopping = *shared.shutdown.borrow();
        if state == EndpointState::Down {
            if let Some(old) = serving.take() {
                old.close().await;
            }
        } else if serving.is_none() && !stopping {
            match self.bind(shared) {
                Ok(bound) => *serving = Some(bound),
                Err(e) => {
                    self.state.send_replace(previous);
                    return Err(e);
                }
            }
        }
        self.changed();
        tracing::info!(
            endpoint = %self.config.ip,
            from = previous.name(),
            to = state.name(),
            "simulated endpoint changed state"
        );
        Ok(())
    }

    /// Binds both listeners before spawning anything, so that a failure leaves nothing
    /// half-bound.
    fn bind(self: &Arc<Self>, shared: &Arc<Shared>) -> Result<Serving, SimError> {
        let inference = listen(self.config.tls_addr())?;
        let health = listen(self.config.health_addr())?;
        let (stop, _) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(accept_loop(
                inference,
                Port::Inference,
                shared.clone(),
                self.clone(),
                stop.subscribe(),
            )),
            tokio::spawn(accept_loop(
                health,
                Port::Health,
                shared.clone(),
                self.clone(),
                stop.subscribe(),
            )),
        ];
        Ok(Serving { stop, tasks })
    }
}

/// Keeps `in_flight` right however a request ends, including when hyper drops the
/// handler because the client went away or the connection was closed by `down`.
pub(crate) struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub(crate) fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.count(|c| &c.in_flight);
        Self(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.changed();
    }
}

/// SO_REUSEADDR, so that leaving `down` can bind again while old connections sit in
/// TIME_WAIT.
pub(crate) fn listen(addr: SocketAddr) -> Result<TcpListener, SimError> {
    let bind_error = |source| SimError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(LISTEN_BACKLOG).map_err(bind_error)
}

/// How long `down` lets requests already being served finish before cutting them.
const DOWN_GRACE: Duration = Duration::from_secs(30);

/// Accepts until `stop` or the simulator's shutdown, then closes the listener. Inference
/// connections are shut down gracefully, as an ENI that goes away does: idle ones close
/// at once (HTTP/2 says GOAWAY), requests already being served finish. Whatever is left
/// after the grace, and every health connection, is aborted; `down` is in effect on
/// return.
async fn accept_loop(
    listener: TcpListener,
    port: Port,
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    mut stop: watch::Receiver<bool>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut connections = JoinSet::new();
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let endpoint = endpoint.clone();
                    let watcher = graceful.watcher();
                    connections.spawn(async move {
                        match port {
                            Port::Inference => serve_inference(stream, shared, endpoint, watcher).await,
                            Port::Health => serve_health(stream, endpoint).await,
                        }
                    });
                }
                Err(error) => {
                    // Usually EMFILE or a connection reset before accept: back off a
                    // little rather than spin, and keep serving.
                    tracing::debug!(%error, endpoint = %endpoint.config.ip, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = raised(&mut stop) => break,
            () = raised(&mut shutdown) => break,
        }
    }
    drop(listener);
    let simulator_stopping = *shared.shutdown.borrow();
    if port == Port::Inference && !simulator_stopping {
        let _ = tokio::time::timeout(DOWN_GRACE, graceful.shutdown()).await;
    }
    connections.shutdown().await;
}

/// Resolves once `flag` is true, or its sender is gone (which also means: stop).
pub(crate) async fn raised(flag: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await (it is not `Send`).
    let _ = flag.wait_for(|raised| *raised).await.map(|_| ());
}

async fn serve_inference(
    stream: TcpStream,
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    watcher: Watcher,
) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, shared.tls.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, endpoint = %endpoint.config.ip, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let service =
        service_fn(move |request| inference::handle(shared.clone(), endpoint.clone(), request));
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder
        .serve_connection(TokioIo::new(tls), service)
        .into_owned();
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%error, "inference connection ended with an error");
    }
}

async fn serve_health(stream: TcpStream, endpoint: Arc<Endpoint>) {
    let service = service_fn(move |request| health::handle(endpoint.clone(), request));
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(error) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%error, "health connection ended with an error");
    }
}
