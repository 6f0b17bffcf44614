//! One simulated endpoint: its two listeners (TLS inference, plain-HTTP health), its
//! counters, and its state transitions.
//!
//! `down` must look like a vanished ENI, so it really closes the listening sockets (a
//! connect is refused by the kernel) and every open connection; leaving `down` binds the
//! ports again. `inference_refused` and `inference_filtered` do the same to the inference
//! port alone while the health port keeps answering healthy (a security group that
//! allows 8080 and not 443): refused closes it; filtered replaces it with a [`Tarpit`], so
//! that connects time out as they do when packets are dropped. The other states only
//! change how the handlers answer, so they are a value that every handler reads (and
//! that a blackholed handler waits on).

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
    /// A request that reaches an endpoint going down, on a connection opened before, is
    /// not processed, and the stream says so (REFUSED_STREAM, RFC 9113 8.7), as a
    /// draining server does: a client may retry it. (A reset without that code would
    /// tell the client the request may have been started.)
    #[error("the endpoint is down; the request was not processed")]
    Refused(#[source] h2::Error),
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

/// One listener's accept loop, while its port is bound.
struct Serving {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Serving {
    /// Closes the listener and every connection it accepted, and waits until done.
    async fn close(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// What is bound on the endpoint's address right now.
#[derive(Default)]
struct Ports {
    inference: Option<Serving>,
    health: Option<Serving>,
    tarpit: Option<Tarpit>,
}

/// What a state wants of the inference port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InferencePort {
    Open,
    Closed,
    Filtered,
}

/// (inference port, health port bound) for a state.
fn layout(state: EndpointState) -> (InferencePort, bool) {
    match state {
        EndpointState::Down => (InferencePort::Closed, false),
        EndpointState::InferenceRefused => (InferencePort::Closed, true),
        EndpointState::InferenceFiltered => (InferencePort::Filtered, true),
        _ => (InferencePort::Open, true),
    }
}

/// A listening socket that never accepts, its accept queue filled by connections of its
/// own: the kernel then drops new SYNs, so a client's connect times out exactly as it
/// does when a security group or network ACL drops the packets. (Loopback has no
/// packet filter a test could use without privileges; a full queue is the same drop.)
struct Tarpit {
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

/// Most connections a backlog-0 queue holds before it drops SYNs (Linux: one).
const TARPIT_MAX_FILLERS: usize = 8;

impl Tarpit {
    async fn bind(addr: SocketAddr) -> Result<Tarpit, SimError> {
        let listener = listen_with_backlog(addr, 0)?;
        // Fill the queue until a connect no longer completes: from then on SYNs drop.
        let mut fillers = Vec::new();
        while fillers.len() < TARPIT_MAX_FILLERS {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => fillers.push(stream),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        Ok(Tarpit {
            _listener: listener,
            _fillers: fillers,
        })
    }
}

pub(crate) struct Endpoint {
    pub(crate) config: SimEndpointConfig,
    state: watch::Sender<EndpointState>,
    counters: Counters,
    /// Bumped after every counter change; `wait_for` listens to it.
    changes: watch::Sender<()>,
    /// What is bound. The async mutex also serialises transitions.
    ports: Mutex<Ports>,
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
            ports: Mutex::new(Ports::default()),
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
        let mut ports = self.ports.lock().await;
        self.arrange(&mut ports, shared, self.state()).await
    }

    /// Closes every port and connection (used at shutdown).
    pub(crate) async fn stop(&self) {
        let mut ports = self.ports.lock().await;
        Self::close_ports(&mut ports, true, true).await;
    }

    async fn close_ports(ports: &mut Ports, inference: bool, health: bool) {
        if inference {
            if let Some(serving) = ports.inference.take() {
                serving.close().await;
            }
            ports.tarpit = None;
        }
        if health {
            if let Some(serving) = ports.health.take() {
                serving.close().await;
            }
        }
    }

    /// Applies a new state; returns when it is in effect (see `Sim::set_state`).
    pub(crate) async fn transition(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        state: EndpointState,
    ) -> Result<(), SimError> {
        let mut ports = self.ports.lock().await;
        // Published first, so that a request racing with `down` is hung up on rather than
        // answered, and blackholed handlers wake up before their connections go.
        let previous = self.state.send_replace(state);
        if let Err(e) = self.arrange(&mut ports, shared, state).await {
            self.state.send_replace(previous);
            return Err(e);
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

    /// Closes what `state` does not want bound, then binds what it wants and is missing
    /// (listeners first, tasks after, so a bind failure leaves nothing half-started).
    async fn arrange(
        self: &Arc<Self>,
        ports: &mut Ports,
        shared: &Arc<Shared>,
        state: EndpointState,
    ) -> Result<(), SimError> {
        let (inference, health) = layout(state);
        if inference != InferencePort::Open {
            if let Some(serving) = ports.inference.take() {
                serving.close().await;
            }
        }
        if inference != InferencePort::Filtered {
            ports.tarpit = None;
        }
        if !health {
            if let Some(serving) = ports.health.take() {
                serving.close().await;
            }
        }
        if *shared.shutdown.borrow() {
            return Ok(());
        }
        let health_listener = match (health, &ports.health) {
            (true, None) => Some(listen(self.config.health_addr())?),
            _ => None,
        };
        let inference_listener = match (inference, &ports.inference) {
            (InferencePort::Open, None) => Some(listen(self.config.tls_addr())?),
            _ => None,
        };
        if inference == InferencePort::Filtered && ports.tarpit.is_none() {
            ports.tarpit = Some(Tarpit::bind(self.config.tls_addr()).await?);
        }
        if let Some(listener) = health_listener {
            ports.health = Some(self.spawn_accept(listener, Port::Health, shared));
        }
        if let Some(listener) = inference_listener {
            ports.inference = Some(self.spawn_accept(listener, Port::Inference, shared));
        }
        Ok(())
    }

    fn spawn_accept(
        self: &Arc<Self>,
        listener: TcpListener,
        port: Port,
        shared: &Arc<Shared>,
    ) -> Serving {
        let (stop, receiver) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            port,
            shared.clone(),
            self.clone(),
            receiver,
        ));
        Serving { stop, task }
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
    listen_with_backlog(addr, LISTEN_BACKLOG)
}

/// [`listen`] with an accept queue of `backlog` (the tarpit's is 0).
fn listen_with_backlog(addr: SocketAddr, backlog: u32) -> Result<TcpListener, SimError> {
    let bind_error = |source| SimError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(backlog).map_err(bind_error)
}

impl Hangup {
    pub(crate) fn refused() -> Self {
        Hangup::Refused(h2::Error::from(h2::Reason::REFUSED_STREAM))
    }
}

/// How long `down` lets requests already being served finish before cutting them.
const DOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a closed inference connection keeps reading what the client still sends
/// (nginx's `lingering_close`), so that closing with unread data does not make the
/// kernel reset the connection and destroy the GOAWAY and answers the client has not
/// read yet.
const LINGER: Duration = Duration::from_secs(2);

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
        // Each connection task ends with its lingering close: let those finish.
        let _ = tokio::time::timeout(LINGER, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
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
    // A second handle on the socket, for the lingering close: hyper closes its own.
    let (stream, mut linger) = match duplicate(stream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "cannot duplicate an inference socket");
            return;
        }
    };
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
    // The protocol ALPN chose, as a TLS server does: left to sniffing, a connection
    // that `down` shuts down before its first bytes arrive is dropped without a word,
    // where HTTP/2 can still tell the client (GOAWAY) that nothing was processed.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => builder = builder.http2_only(),
        Some(b"http/1.1") => builder = builder.http1_only(),
        _ => {}
    }
    let connection = builder
        .serve_connection(TokioIo::new(tls), service)
        .into_owned();
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%error, "inference connection ended with an error");
    }
    // Our side is done (a FIN, if hyper has not sent one); read and discard until the
    // client closes too, for at most LINGER.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut linger).await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut linger, &mut buffer).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn duplicate(stream: TcpStream) -> std::io::Result<(TcpStream, TcpStream)> {
    let stream = stream.into_std()?;
    let clone = stream.try_clone()?;
    Ok((TcpStream::from_std(stream)?, TcpStream::from_std(clone)?))
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
