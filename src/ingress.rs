//! The app-facing listener: accepts connections up to `listen.max_connections` (idle ones
//! make room for new ones, see [`crate::listener`]), serves HTTP/1.1 and HTTP/2 (prior
//! knowledge) on each with the `[listen]` time bounds, hands every request to its
//! [`Handler`] ([`crate::forward::Forwarder`] in gpulink), and on shutdown stops accepting
//! and lets in-flight requests finish within `listen.shutdown_grace`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::listener::{ConnectionSettings, Listener};

/// What answers the app's requests, and the bounds its connections are held to (read at
/// each accept, so a reload applies to new connections).
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Never fails: an error is an answer too.
    fn handle(
        &self,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send;

    /// The time bounds and HTTP/2 settings for a new connection.
    fn connection_settings(&self) -> ConnectionSettings;

    /// How long in-flight requests may take to finish once accepting stops.
    fn shutdown_grace(&self) -> Duration;
}

/// Accepts until `stop` is cancelled, then waits for open connections to finish their
/// in-flight requests, up to the handler's shutdown grace.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    connections: Arc<Listener>,
    handler: Arc<H>,
    stop: CancellationToken,
) {
    let settings = {
        let handler = handler.clone();
        move || handler.connection_settings()
    };
    let grace = {
        let handler = handler.clone();
        move || Some(handler.shutdown_grace())
    };
    let handle = move |request| {
        let handler = handler.clone();
        async move { handler.handle(request).await }
    };
    connections
        .serve(listener, settings, handle, stop, grace)
        .await;
}
