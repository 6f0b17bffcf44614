//! Connection supervision shared by the app listener and the admin listener: what makes
//! every client bounded in time and the connection limit impossible to exhaust for good.
//!
//! * **A connection limit** per listener. When it is reached, the connection that has
//!   been idle (no request in flight) the longest is closed to admit the new one; only
//!   when every connection is busy does the new one wait.
//! * **Time bounds hyper does not give**: a new connection must complete a request head
//!   within `header_read_timeout` (this also bounds a connection that sends nothing or a
//!   partial HTTP/2 preface, which hyper waits on forever), and a connection with no
//!   request in flight is closed after `idle_timeout`. HTTP/2 connections are pinged.
//!   A write to a client may wait at most `send_timeout` (a client that stops reading).
//! * **File descriptors**: the soft `RLIMIT_NOFILE` is raised to the hard limit at start,
//!   and the app listener's limit is capped so that it, the admin limit, the upstream
//!   pools and a reserve all fit ([`fit_file_descriptors`]).
//! * **Graceful shutdown**: on stop, connections finish their in-flight requests.
//!
//! Body read time is bounded where bodies are read ([`crate::body`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::h1guard::H1Guard;

/// How long a connection being closed (idle, evicted, shutting down) may take to say
/// goodbye (HTTP/2 GOAWAY) once it has no request in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// While waiting for a slot at the limit, how often to look again for an idle connection
/// to close (one that finished its request since the last look).
const EVICT_RETRY: Duration = Duration::from_millis(100);

/// File descriptors kept for everything that is not a client or upstream connection:
/// the log, the configuration watch, KMS, DNS, the runtime itself.
const FD_RESERVE: u64 = 128;

/// Upstream descriptors budgeted per endpoint: its pooled connections and health checks.
const FD_PER_ENDPOINT: u64 = 8;

/// hyper's own default (8 KiB + 100 × 4 KiB), stated so the limit is ours; request heads
/// never reach it: [`crate::h1guard`] refuses one over its 64 KiB first (JSON 431).
const H1_MAX_BUF_SIZE: usize = 8192 + 4096 * 100;

/// Per-connection settings, read from the current configuration at each accept so a
/// reload applies to new connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    /// The longest one write to the client may wait.
    pub send_timeout: Duration,
    /// HTTP/2 streams at once per connection.
    pub h2_max_streams: u32,
    /// HTTP/2 flow-control windows: how much unread request body one stream and one
    /// connection may have in flight, so a stalled reader stops the client.
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 counts 32 bytes per field on top
    /// of name and value); a larger header block gets the h2 library's bare 431.
    pub h2_max_header_list_size: u32,
    /// HTTP/1.1: bytes hyper buffers while reading a head (and body chunks); above the
    /// head guard's own limit ([`crate::h1guard::MAX_HEAD`]).
    pub h1_max_buf_size: usize,
    pub nodelay: bool,
}

impl ConnectionSettings {
    /// The app listener: windows sized for 10 MB bodies (a few round trips each on
    /// loopback) while bounding what a connection can buffer unread to 4 MiB.
    pub fn app(listen: &crate::config::Listen) -> Self {
        Self {
            header_read_timeout: listen.header_read_timeout.get(),
            idle_timeout: listen.idle_timeout.get(),
            h2_keepalive_interval: listen.h2_keepalive_interval.get(),
            h2_keepalive_timeout: listen.h2_keepalive_timeout.get(),
            send_timeout: listen.send_timeout.get(),
            h2_max_streams: 128,
            h2_stream_window: 1024 * 1024,
            h2_connection_window: 4 * 1024 * 1024,
            // Twice the head gpulink forwards: every head the handler would accept
            // reaches it (h2 counts 32 bytes per field, the handler 4), and heads between
            // the two limits get the handler's JSON 431 `headers_too_large`, as on h1.
            h2_max_header_list_size: 2 * crate::forward::MAX_REQUEST_HEAD as u32,
            h1_max_buf_size: H1_MAX_BUF_SIZE,
            nodelay: true,
        }
    }

    /// The admin listener: GETs with small answers.
    /// Its own timeouts; the HTTP/2 pings and the send bound are `[listen]`'s.
    pub fn admin(admin: &crate::config::Admin, listen: &crate::config::Listen) -> Self {
        Self {
            header_read_timeout: admin.header_read_timeout.get(),
            idle_timeout: admin.idle_timeout.get(),
            h2_keepalive_interval: listen.h2_keepalive_interval.get(),
            h2_keepalive_timeout: listen.h2_keepalive_timeout.get(),
            send_timeout: listen.send_timeout.get(),
            h2_max_streams: 16,
            h2_stream_window: 64 * 1024,
            h2_connection_window: 256 * 1024,
            h2_max_header_list_size: 16 * 1024,
            h1_max_buf_size: H1_MAX_BUF_SIZE,
            nodelay: false,
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper starts this timer as soon as it waits for a head, so on a keep-alive
        // connection it also runs while idle: make it the longer of the two bounds, which
        // the supervisor enforces precisely (first head, then idle time).
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout.max(self.idle_timeout))
            // A client that shuts down its sending side after a whole request still
            // reads: it gets its response (hyper's default closes at once on EOF).
            .half_close(true)
            .max_buf_size(self.h1_max_buf_size);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_streams)
            .initial_stream_window_size(self.h2_stream_window)
            .initial_connection_window_size(self.h2_connection_window)
            .max_header_list_size(self.h2_max_header_list_size)
            .keep_alive_interval(self.h2_keepalive_interval)
            .keep_alive_timeout(self.h2_keepalive_timeout);
        builder
    }
}

/// What the supervisor knows of one connection.
#[derive(Debug, Clone, Copy)]
struct Activity {
    in_flight: usize,
    requests: u64,
    /// Since when nothing has been in flight (the accept, or the end of the last request).
    idle_since: Instant,
}

struct Connection {
    activity: watch::Sender<Activity>,
    evict: CancellationToken,
}

/// One listener's connections and their limit.
pub struct Listener {
    name: &'static str,
    limit: usize,
    permits: Arc<Semaphore>,
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    evicted: AtomicU64,
    /// Connections accepted since start, by request-path worker (one entry when the
    /// listener is not served by workers): how `SO_REUSEPORT` spread them.
    accepted: Box<[AtomicU64]>,
    /// Seconds (since `epoch`) of the last "limit reached" warning, to log it rarely.
    last_warning: AtomicU64,
    epoch: Instant,
}

impl Listener {
    pub fn new(name: &'static str, limit: usize) -> Arc<Self> {
        Self::for_workers(name, limit, 1)
    }

    /// A listener whose sockets `workers` request-path workers serve, one each; the
    /// limit is shared by all of them.
    pub fn for_workers(name: &'static str, limit: usize, workers: usize) -> Arc<Self> {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            name,
            limit,
            permits: Arc::new(Semaphore::new(limit)),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            accepted: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
            last_warning: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn open(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    /// Idle connections closed to admit new ones since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Connections accepted since start, by worker (see [`crate::runtime`]).
    pub fn accepted_by_worker(&self) -> Vec<u64> {
        self.accepted
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// Accepts until `stop` is cancelled. Then, with `grace`, lets connections finish
    /// their in-flight requests for up to that long; without, closes them at once.
    pub async fn serve<H, F>(
        self: Arc<Self>,
        listener: TcpListener,
        settings: impl Fn() -> ConnectionSettings,
        handler: H,
        stop: CancellationToken,
        grace: impl FnOnce() -> Option<Duration>,
    ) where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let tracker = TaskTracker::new();
        let close_now = CancellationToken::new();
        'accept: loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        // EMFILE and friends: pause briefly rather than spin.
                        tracing::warn!(listener = self.name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // At the limit the accepted socket waits here (one at most; the rest stay in
            // the kernel's backlog) while an idle connection makes room.
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => loop {
                    self.evict_idlest();
                    tokio::select! {
                        _ = stop.cancelled() => break 'accept,
                        permit = self.permits.clone().acquire_owned() => match permit {
                            Ok(permit) => break permit,
                            Err(_) => break 'accept,
                        },
                        _ = tokio::time::sleep(EVICT_RETRY) => {}
                    }
                },
            };
            let worker = crate::runtime::current_worker().unwrap_or(0);
            if let Some(accepted) = self.accepted.get(worker.min(self.accepted.len() - 1)) {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            let settings = settings();
            if settings.nodelay {
                let _ = stream.set_nodelay(true);
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let connection = Arc::new(Connection {
                activity: watch::Sender::new(Activity {
                    in_flight: 0,
                    requests: 0,
                    idle_since: Instant::now(),
                }),
                evict: CancellationToken::new(),
            });
            self.lock().insert(id, connection.clone());
            let this = self.clone();
            let handler = handler.clone();
            let (stop, close_now) = (stop.clone(), close_now.clone());
            tracker.spawn(async move {
                let outcome = supervise(
                    stream,
                    &connection,
                    &settings,
                    handler,
                    &stop,
                    &close_now,
                )
                .await;
                if let Err(error) = outcome {
                    tracing::debug!(listener = this.name, %peer, %error, "client connection ended with an error");
                }
                this.lock().remove(&id);
                drop(permit);
            });
        }
        drop(listener);
        tracker.close();
        match grace() {
            Some(grace) => {
                tracing::info!(
                    listener = self.name,
                    ?grace,
                    "stopped accepting; waiting for in-flight requests"
                );
                tokio::select! {
                    _ = tracker.wait() => tracing::info!(listener = self.name, "all client connections closed"),
                    _ = tokio::time::sleep(grace) => {
                        tracing::warn!(listener = self.name, ?grace, "shutdown grace elapsed with requests still in flight");
                        close_now.cancel();
                    }
                }
            }
            None => close_now.cancel(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the connection idle the longest to close, unless one asked before is still
    /// closing (it frees its slot within [`CLOSE_GRACE`]).
    fn evict_idlest(&self) {
        let connections = self.lock();
        if connections.values().any(|c| c.evict.is_cancelled()) {
            return;
        }
        let idlest = connections
            .values()
            .filter_map(|c| {
                let activity = *c.activity.borrow();
                (activity.in_flight == 0).then_some((activity.idle_since, c))
            })
            .min_by_key(|(since, _)| *since);
        if let Some((_, connection)) = idlest {
            connection.evict.cancel();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        drop(connections);
        let now = self.epoch.elapsed().as_secs();
        let last = self.last_warning.load(Ordering::Relaxed);
        if last == u64::MAX || now >= last + 10 {
            self.last_warning.store(now, Ordering::Relaxed);
            tracing::warn!(
                listener = self.name,
                limit = self.limit,
                evicted_so_far = self.evicted(),
                "connection limit reached: closing idle connections first; new connections wait while all are busy"
            );
        }
    }
}

/// Serves one connection and closes it when its time bounds say so. An HTTP/1.1 head
/// hyper would refuse with its bare answer is refused with the JSON body instead, once
/// hyper is done with the connection ([`crate::h1guard`]).
async fn supervise<H, F>(
    stream: TcpStream,
    connection: &Arc<Connection>,
    settings: &ConnectionSettings,
    handler: H,
    stop: &CancellationToken,
    close_now: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let (guarded, mut refused) = H1Guard::new(stream);
    let io = SendBound::new(guarded, settings.send_timeout);
    let result = serve_until_closed(io, connection, settings, handler, stop, close_now).await;
    // hyper has dropped the socket: a refused head is answered now.
    if let Ok((stream, why)) = refused.try_recv() {
        crate::h1guard::answer(stream, why, settings.send_timeout).await;
        return Ok(());
    }
    result
}

async fn serve_until_closed<H, F>(
    io: SendBound<H1Guard<TcpStream>>,
    connection: &Arc<Connection>,
    settings: &ConnectionSettings,
    handler: H,
    stop: &CancellationToken,
    close_now: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let tracked = connection.clone();
    let service = service_fn(move |request| {
        let guard = RequestGuard::start(tracked.clone());
        let response = handler(request);
        async move {
            let response = response.await;
            // The request counts as in flight until its answer's last byte is written.
            Ok::<_, Infallible>(response.map(|body| {
                body.map_frame(move |frame| {
                    let _in_flight = &guard;
                    frame
                })
                .boxed()
            }))
        }
    });
    let builder = settings.builder();
    let serving = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    tokio::pin!(serving);
    let mut activity = connection.activity.subscribe();
    // When this connection was asked to close; from then on it only finishes what is in
    // flight.
    let mut closing: Option<Instant> = None;
    loop {
        let now = *activity.borrow_and_update();
        let idle_deadline = (now.in_flight == 0).then(|| {
            let allowed = if now.requests == 0 {
                settings.header_read_timeout
            } else {
                settings.idle_timeout
            };
            now.idle_since + allowed
        });
        let far = Instant::now() + Duration::from_secs(86_400);
        let close_deadline = match (closing, now.in_flight) {
            (Some(since), 0) => Some(since.max(now.idle_since) + CLOSE_GRACE),
            _ => None,
        };
        tokio::select! {
            result = serving.as_mut() => return result,
            _ = close_now.cancelled() => return Ok(()),
            _ = stop.cancelled(), if closing.is_none() => {
                serving.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = connection.evict.cancelled(), if closing.is_none() => {
                serving.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(idle_deadline.unwrap_or(far)), if closing.is_none() && idle_deadline.is_some() => {
                serving.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(close_deadline.unwrap_or(far)), if close_deadline.is_some() => {
                return Ok(());
            }
            changed = activity.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// A client socket whose writes may wait at most `timeout` each: a client that stops
/// reading its answer (its receive window stays full) loses the connection instead of
/// holding it, and the upstream stream behind it, for good.
struct SendBound<T> {
    inner: T,
    timeout: Duration,
    /// Armed while a write waits; cleared by any write that completes.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> SendBound<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    fn on_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read nothing for {timeout:?} (listen.send_timeout)"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendBound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendBound<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.on_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.on_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.on_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.on_write(cx, polled)
    }
}

/// Counts a request as in flight on its connection for as long as it lives.
struct RequestGuard(Arc<Connection>);

impl RequestGuard {
    fn start(connection: Arc<Connection>) -> Self {
        connection.activity.send_modify(|a| {
            a.in_flight += 1;
            a.requests += 1;
        });
        Self(connection)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.activity.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            if a.in_flight == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the file descriptor limit (RLIMIT_NOFILE {limit}) leaves no room for client connections: admin.max_connections ({admin}), the upstream pools ({upstream}) and a reserve ({FD_RESERVE}) take it all; raise the limit (LimitNOFILE= in the systemd unit, ulimit -n)")]
pub struct NoFileDescriptors {
    limit: u64,
    admin: u64,
    upstream: u64,
}

/// Raises the soft file-descriptor limit to the hard one and returns how many app
/// connections fit beside the admin limit, the upstream pools and a reserve: the
/// configured `listen.max_connections`, or fewer (with a warning) when the limit is
/// too low for it.
pub fn fit_file_descriptors(
    listen: &crate::config::Listen,
    admin: &crate::config::Admin,
    endpoints: usize,
    workers: usize,
) -> Result<usize, NoFileDescriptors> {
    let limit = crate::rlimit::raise_nofile_limit();
    let wanted = listen.max_connections as u64;
    let admin = admin.max_connections as u64;
    // Each worker has its own pool per endpoint.
    let upstream = endpoints as u64 * FD_PER_ENDPOINT * workers.max(1) as u64;
    let Some(limit) = limit else {
        return Ok(listen.max_connections);
    };
    let room = limit.saturating_sub(admin + upstream + FD_RESERVE);
    if room == 0 {
        return Err(NoFileDescriptors {
            limit,
            admin,
            upstream,
        });
    }
    if wanted > room {
        tracing::warn!(
            rlimit_nofile = limit,
            configured = wanted,
            capped = room,
            "listen.max_connections does not fit the file descriptor limit beside admin.max_connections, the upstream pools and a reserve; using the lower value (raise LimitNOFILE= or ulimit -n to get the configured one)"
        );
        return Ok(room as usize);
    }
    Ok(listen.max_connections)
}
