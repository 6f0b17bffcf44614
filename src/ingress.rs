//! The app-facing listener: accepts connections up to `listen.max_connections` (idle ones
//! make room for new ones, see [`crate::listener`]), serves HTTP/1.1 and HTTP/2 (prior
//! knowledge) on each with the `[listen]` time bounds, hands every request to
//! [`crate::forward`], and on shutdown stops accepting and lets in-flight requests finish
//! within `listen.shutdown_grace`.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::listener::ConnectionSettings;
use crate::proxy::Proxy;

/// Accepts until `stop` is cancelled, then waits for open connections to finish their
/// in-flight requests, up to the shutdown grace.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let connections = proxy.app_connections().clone();
    let settings = {
        let proxy = proxy.clone();
        move || ConnectionSettings::app(&proxy.current().config.listen)
    };
    let grace = {
        let proxy = proxy.clone();
        move || Some(proxy.current().config.listen.shutdown_grace.get())
    };
    let handler = move |request| crate::forward::handle(proxy.clone(), request);
    connections
        .serve(listener, settings, handler, stop, grace)
        .await;
}
