//! The lean upstream pool: per request-path worker and endpoint, a short free list of
//! idle HTTP/1.1 connections and one shared HTTP/2 connection (when ALPN says `h2`),
//! made by the endpoint's own [`EndpointConnector`], their connection tasks spawned on
//! the runtime of the thread that opened them.
//!
//! Why not hyper-util's legacy `Client`: on every checkout and put it hashes its pool key
//! (scheme and authority, SipHash) into a map that here always holds one key, runs a
//! checkout future and, for HTTP/1.1, spawns a task per response that waits for the
//! connection to be ready again (issue 11's profile; BENCHMARKS.md). A pool is only ever
//! one endpoint's, so a `Vec` and an `Option` under an uncontended lock say everything.
//!
//! Retry safety is the legacy client's, exactly: a request hyper hands back unsent
//! (`TrySendError::take_message`: the connection closed before the request was written)
//! is tried again here on the next connection when the one it met was reused, and
//! reported as [`SendError::Canceled`] when it was fresh. Nothing else is retried here;
//! [`crate::forward`] decides the rest from [`SendError`]'s causes.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connector::{ConnectError, ConnectedPeer, EndpointConnector};

type Body = Full<Bytes>;

/// At most this many idle HTTP/1.1 connections per pool; one returned to a full list is
/// closed. The legacy client had no bound; a pool holds about as many as its worker had
/// requests in flight to the endpoint at once. Each holds a file descriptor, and
/// `listener::fit_file_descriptors` reserves only 8 per pool (`FD_PER_ENDPOINT`), so a
/// burst of HTTP/1.1 concurrency beyond that is paid from the reserve until the idle
/// timeout closes the extra connections.
const MAX_IDLE: usize = 256;

/// Why a request got no response headers from the pool. The `Display` texts are the
/// legacy client's, so that `/status` and logs read as before.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: TCP or TLS failed (the request was never sent).
    #[error("client error (Connect)")]
    Connect(#[source] ConnectError),
    /// A fresh connection closed before the request was written (hyper handed it back).
    #[error("client error (Canceled)")]
    Canceled(#[source] hyper::Error),
    /// The HTTP/1.1 or HTTP/2 handshake on a new connection failed, or the request failed
    /// once written (or perhaps written): what the cluster saw is not known.
    #[error("client error (SendRequest)")]
    Send(#[source] hyper::Error),
}

impl SendError {
    /// The connector's error when the connection (TCP or TLS) was never made.
    pub fn connect_error(&self) -> Option<&ConnectError> {
        match self {
            SendError::Connect(error) => Some(error),
            _ => None,
        }
    }
}

/// A response with headers, the connection it came over and, for HTTP/1.1, the
/// connection itself until the response body is done.
pub struct Pooled {
    pub response: Response<Incoming>,
    /// Made once per connection; shared so that a response carries 8 bytes, not 72.
    pub peer: Arc<ConnectedPeer>,
    /// Hand this back (drop it) after the response body: it returns the HTTP/1.1
    /// connection to the free list once hyper can take the next request on it.
    pub lease: Lease,
}

/// One endpoint's connections for one thread (see [`crate::runtime::pool_index`]).
pub struct Pool {
    connector: EndpointConnector,
    /// `server_name[:port]`: HTTP/2's `:authority` and HTTP/1.1's `Host`.
    authority: http::uri::Authority,
    host: HeaderValue,
    idle_timeout: Duration,
    h2: http2::Builder<TokioExecutor>,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// Last in, first out: the most recently used connection is the warmest.
    http1: Vec<IdleHttp1>,
    http2: Option<Shared>,
    /// Whether a task closes idle connections after `idle_timeout` (one at a time).
    reaper: bool,
    next_id: u64,
}

struct IdleHttp1 {
    sender: http1::SendRequest<Body>,
    peer: Arc<ConnectedPeer>,
    since: Instant,
}

struct Shared {
    id: u64,
    sender: http2::SendRequest<Body>,
    peer: Arc<ConnectedPeer>,
    last_used: Instant,
}

enum Conn {
    Http1(http1::SendRequest<Body>),
    Http2 {
        id: u64,
        sender: http2::SendRequest<Body>,
    },
}

impl Pool {
    pub fn new(
        connector: EndpointConnector,
        authority: http::uri::Authority,
        idle_timeout: Duration,
    ) -> Result<Self, String> {
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("`{authority}` is not a valid Host header"))?;
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            // Bodies reach 10 MB: let HTTP/2 flow control grow with the bandwidth-delay
            // product instead of stalling on the default 64 KiB windows.
            .adaptive_window(true)
            // Pings while a stream is open find a connection that died silently (an ENI
            // lost under an open connection) before request_timeout does.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        Ok(Self {
            connector,
            authority,
            host,
            idle_timeout,
            h2,
            idle: Mutex::new(Idle::default()),
        })
    }

    /// Sends `request` (its URI the path, its body full) on an idle connection or a new
    /// one, and waits for the response headers.
    pub async fn send(self: &Arc<Self>, mut request: Request<Body>) -> Result<Pooled, SendError> {
        loop {
            let (conn, peer, reused) = match self.checkout() {
                Some((conn, peer)) => (conn, peer, true),
                None => {
                    // Boxed: the TCP, TLS and HTTP handshakes' state is kilobytes, and
                    // held inline it would grow every request's future (moved by hyper
                    // and the timeout) for the rare request that connects.
                    let (conn, peer) = Box::pin(self.connect()).await?;
                    (conn, peer, false)
                }
            };
            match conn {
                Conn::Http1(mut sender) => {
                    self.for_http1(&mut request);
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            let lease = Lease {
                                http1: Some((sender, peer.clone(), Arc::downgrade(self))),
                            };
                            return Ok(Pooled {
                                response,
                                peer,
                                lease,
                            });
                        }
                        Err(mut error) => match error.take_message() {
                            Some(unsent) if reused => request = unsent,
                            Some(_) => return Err(SendError::Canceled(error.into_error())),
                            None => return Err(SendError::Send(error.into_error())),
                        },
                    }
                }
                Conn::Http2 { id, mut sender } => {
                    self.for_http2(&mut request);
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            return Ok(Pooled {
                                response,
                                peer,
                                lease: Lease { http1: None },
                            })
                        }
                        Err(mut error) => {
                            let unsent = error.take_message();
                            // A connection that handed a request back, closed or said
                            // GOAWAY takes no more: the next request opens a fresh one
                            // rather than meeting the same refusal (and this loop ends).
                            if unsent.is_some() || !sender.is_ready() || goes_away(error.error()) {
                                self.forget_http2(id);
                            }
                            match unsent {
                                Some(unsent) if reused => request = unsent,
                                Some(_) => return Err(SendError::Canceled(error.into_error())),
                                None => return Err(SendError::Send(error.into_error())),
                            }
                        }
                    }
                }
            }
        }
    }

    /// HTTP/1.1 takes the origin form and a `Host` header (as the legacy client did).
    fn for_http1(&self, request: &mut Request<Body>) {
        if request.uri().authority().is_some() {
            let path = request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *request.uri_mut() = Uri::from(path);
        }
        request.headers_mut().insert(HOST, self.host.clone());
    }

    /// HTTP/2 takes the absolute form: `:scheme` and `:authority` come from the URI.
    fn for_http2(&self, request: &mut Request<Body>) {
        request.headers_mut().remove(HOST);
        if request.uri().authority().is_none() {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTPS);
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = request.uri().path_and_query().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }

    /// An idle connection that can take a request now, if there is one. Connections
    /// idle for longer than `idle_timeout`, or closed meanwhile, are dropped on the way.
    fn checkout(&self) -> Option<(Conn, Arc<ConnectedPeer>)> {
        let mut idle = self.idle.lock().ok()?;
        let now = Instant::now();
        if let Some(shared) = &mut idle.http2 {
            if shared.sender.is_ready()
                && now.saturating_duration_since(shared.last_used) < self.idle_timeout
            {
                shared.last_used = now;
                let conn = Conn::Http2 {
                    id: shared.id,
                    sender: shared.sender.clone(),
                };
                return Some((conn, shared.peer.clone()));
            }
            idle.http2 = None;
        }
        // From the most recently returned down. One whose response hyper has not yet
        // seen to its end is left for later, not waited for: waiting could stall this
        // request behind another's.
        let mut i = idle.http1.len();
        while i > 0 {
            i -= 1;
            let entry = &idle.http1[i];
            let expired = now.saturating_duration_since(entry.since) >= self.idle_timeout;
            if !expired && entry.sender.is_ready() {
                let entry = idle.http1.remove(i);
                return Some((Conn::Http1(entry.sender), entry.peer));
            }
            if expired || entry.sender.is_closed() {
                idle.http1.remove(i);
            }
        }
        None
    }

    /// A new connection: TCP, TLS, then the HTTP/2 or HTTP/1.1 handshake as ALPN said,
    /// its task spawned on this thread's runtime.
    async fn connect(self: &Arc<Self>) -> Result<(Conn, Arc<ConnectedPeer>), SendError> {
        let connection = self.connector.connect().await.map_err(SendError::Connect)?;
        let peer = Arc::new(connection.peer().clone());
        if connection.is_h2() {
            let (mut sender, conn) = self
                .h2
                .handshake(connection)
                .await
                .map_err(SendError::Send)?;
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "upstream HTTP/2 connection ended");
                }
            });
            sender.ready().await.map_err(SendError::Send)?;
            let Ok(mut idle) = self.idle.lock() else {
                return Ok((Conn::Http2 { id: 0, sender }, peer));
            };
            // Requests that connected at the same time share whichever connection is
            // shared by now; the others close when their one request is done.
            if let Some(shared) = idle.http2.as_ref().filter(|s| s.sender.is_ready()) {
                let conn = Conn::Http2 {
                    id: shared.id,
                    sender: shared.sender.clone(),
                };
                return Ok((conn, shared.peer.clone()));
            }
            idle.next_id += 1;
            let id = idle.next_id;
            idle.http2 = Some(Shared {
                id,
                sender: sender.clone(),
                peer: peer.clone(),
                last_used: Instant::now(),
            });
            let start_reaper = !std::mem::replace(&mut idle.reaper, true);
            drop(idle);
            if start_reaper {
                self.start_reaper();
            }
            Ok((Conn::Http2 { id, sender }, peer))
        } else {
            let (mut sender, conn) = http1::handshake(connection)
                .await
                .map_err(SendError::Send)?;
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "upstream HTTP/1.1 connection ended");
                }
            });
            sender.ready().await.map_err(SendError::Send)?;
            Ok((Conn::Http1(sender), peer))
        }
    }

    fn forget_http2(&self, id: u64) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.http2.as_ref().is_some_and(|s| s.id == id) {
                idle.http2 = None;
            }
        }
    }

    /// Puts an HTTP/1.1 connection whose response is done back on the list. hyper may
    /// not have seen it idle yet; checkout takes it once it has (no task per response
    /// to wait for that, as the legacy client spawned).
    fn put(self: &Arc<Self>, sender: http1::SendRequest<Body>, peer: Arc<ConnectedPeer>) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.http1.len() >= MAX_IDLE {
            return;
        }
        idle.http1.push(IdleHttp1 {
            sender,
            peer,
            since: Instant::now(),
        });
        let start_reaper = !std::mem::replace(&mut idle.reaper, true);
        drop(idle);
        if start_reaper {
            self.start_reaper();
        }
    }

    /// Closes idle connections once they have been idle for `idle_timeout` (the NLB
    /// drops them silently at 350 s), checking every `idle_timeout` (at least 90 ms); it
    /// ends when the pool is empty or gone. Spawned on the runtime of the thread that
    /// filled the pool.
    fn start_reaper(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (a drop on some other thread): checkout prunes instead.
            if let Ok(mut idle) = self.idle.lock() {
                idle.reaper = false;
            }
            return;
        };
        let weak = Arc::downgrade(self);
        // Not more often than every 90 ms (as hyper-util's idle task): `pool_idle_timeout`
        // may be as short as 1 ms, and checkout drops expired connections anyway.
        let every = self.idle_timeout.max(Duration::from_millis(90));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { return };
                let Ok(mut idle) = pool.idle.lock() else {
                    return;
                };
                let now = Instant::now();
                let timeout = pool.idle_timeout;
                idle.http1.retain(|e| {
                    !e.sender.is_closed() && now.saturating_duration_since(e.since) < timeout
                });
                if idle.http2.as_ref().is_some_and(|s| {
                    !s.sender.is_ready() || now.saturating_duration_since(s.last_used) >= timeout
                }) {
                    idle.http2 = None;
                }
                if idle.http1.is_empty() && idle.http2.is_none() {
                    idle.reaper = false;
                    return;
                }
            }
        });
    }
}

/// An HTTP/1.1 connection lent to one request until its response body is done.
pub struct Lease {
    http1: Option<(http1::SendRequest<Body>, Arc<ConnectedPeer>, Weak<Pool>)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some((sender, peer, pool)) = self.http1.take() else {
            return;
        };
        // A response dropped before its end closes the connection: hyper sees the body's
        // receiver gone. Such a connection is dropped at checkout or by the reaper.
        if let Some(pool) = pool.upgrade().filter(|_| !sender.is_closed()) {
            pool.put(sender, peer);
        }
    }
}

/// Whether `error` is HTTP/2's GOAWAY from the server: the connection takes no new
/// streams.
fn goes_away(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_go_away();
        }
        source = cause.source();
    }
    false
}
