//! The app-facing listener: accepts connections up to `listen.max_connections`, serves
//! HTTP/1.1 and HTTP/2 (prior knowledge) on each, hands every request to
//! [`crate::forward`], and on shutdown stops accepting and lets in-flight requests finish
//! within `listen.shutdown_grace`. Also the bounded body reader the forwarder uses.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;

/// After a 413, at most this much of the rest of the body is read and discarded so that
/// ordinary clients (which send the whole body before reading) see the answer rather
/// than a connection reset.
const DRAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);

/// Accepts until `stop` is cancelled, then waits for open connections to finish their
/// in-flight requests, up to the shutdown grace.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let config = proxy.current().config.clone();
    let permits = Arc::new(Semaphore::new(config.listen.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(Duration::from_secs(30));

    loop {
        // Waiting for a permit before accepting leaves excess connections in the kernel's
        // backlog: back-pressure instead of unbounded tasks.
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // EMFILE and friends: pause briefly rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(crate::forward::handle(proxy, request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let grace = proxy.current().config.listen.shutdown_grace.get();
    tracing::info!(?grace, "stopped accepting; waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all client connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown grace elapsed with requests still in flight"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than listen.max_body ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Read(String),
}

/// Reads the whole body, refusing it as soon as it passes `limit`. The body is copied at
/// most once: a body that arrives in a single frame is passed on as it is.
pub async fn read_body(
    body: &mut Incoming,
    limit: usize,
    expected_len: Option<u64>,
) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut buffer: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we forward
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(BodyError::TooLarge { limit });
        }
        match (&mut first, &mut buffer) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                let capacity = expected_len
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(total)
                    .clamp(total, limit);
                let mut b = BytesMut::with_capacity(capacity);
                b.extend_from_slice(head);
                b.extend_from_slice(&data);
                first = None;
                buffer = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&data),
        }
    }
    Ok(match (first, buffer) {
        (_, Some(b)) => b.freeze(),
        (Some(head), None) => head,
        (None, None) => Bytes::new(),
    })
}

/// Reads and discards up to a bounded amount of the rest of a refused body in the
/// background, so the client gets to read the error answer.
pub fn drain_in_background(mut body: Incoming) {
    tokio::spawn(async move {
        let drain = async {
            let mut drained = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    drained += data.len() as u64;
                    if drained > DRAIN_MAX_BYTES {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, drain).await;
    });
}
