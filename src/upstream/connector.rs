//! The TLS connector behind each endpoint's pool ([`super::pool`]): it dials the
//! endpoint's own address and verifies the certificate against the endpoint's TLS name.
//! Errors name the phase that failed (resolve, TCP, TLS) for the operator.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The connection a response came over; attached to every response's extensions.
#[derive(Debug, Clone)]
pub struct ConnectedPeer {
    /// The peer's address as the `X-Gpulink-Endpoint` value, made once per connection.
    pub header: http::HeaderValue,
    /// When the connection was ready, and how long TCP + TLS took: a request that had
    /// to open its own connection subtracts this from its latency sample, so that one
    /// handshake does not make an endpoint look slow.
    pub established: tokio::time::Instant,
    pub setup: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("TCP connect to {addr} failed: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
    #[error("TCP connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS handshake with {addr} did not finish within {timeout:?}")]
    TlsTimeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS handshake with {addr} (verifying `{server_name}`) failed: {source}")]
    Tls {
        addr: SocketAddr,
        server_name: String,
        source: io::Error,
    },
}

/// Connects to one endpoint. Cheap to clone.
#[derive(Clone)]
pub struct EndpointConnector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl EndpointConnector {
    pub fn new(
        host: &str,
        port: u16,
        server_name: ServerName<'static>,
        tls: Arc<ClientConfig>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(ConnectorInner {
                host: host.to_string(),
                port,
                server_name,
                tls: TlsConnector::from(tls),
                connect_timeout,
            }),
        }
    }
}

impl EndpointConnector {
    /// A new connection for the pool: TCP, then TLS, each within `connect_timeout`.
    pub(crate) async fn connect(&self) -> Result<TlsConnection, ConnectError> {
        self.inner.connect().await
    }

    /// One fresh connection exactly as the pool would make it (same address, TLS name,
    /// trust and timeouts), dropped at once: the data-path health check.
    pub async fn check(&self) -> Result<Duration, ConnectError> {
        let mut connection = self.inner.connect().await?;
        // Say goodbye (TLS close_notify, then FIN) so the cluster's TLS front logs a
        // clean close rather than an aborted connection, once per endpoint per round.
        let _ = tokio::time::timeout(
            self.inner.connect_timeout,
            tokio::io::AsyncWriteExt::shutdown(connection.io.inner_mut()),
        )
        .await;
        Ok(connection.peer.setup)
    }
}

impl ConnectorInner {
    async fn connect(&self) -> Result<TlsConnection, ConnectError> {
        let started = tokio::time::Instant::now();
        let addr = self.resolve().await?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        // Inference requests are small writes that wait for an answer: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let handshake = self.tls.connect(self.server_name.clone(), tcp);
        let tls = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| ConnectError::TlsTimeout {
                addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| ConnectError::Tls {
                addr,
                server_name: server_name_text(&self.server_name),
                source,
            })?;
        let established = tokio::time::Instant::now();
        Ok(TlsConnection {
            io: TokioIo::new(tls),
            peer: ConnectedPeer {
                header: http::HeaderValue::from_str(&addr.to_string())
                    .unwrap_or_else(|_| http::HeaderValue::from_static("unknown")),
                established,
                setup: established - started,
            },
        })
    }

    async fn resolve(&self) -> Result<SocketAddr, ConnectError> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| ConnectError::Resolve {
                host: self.host.clone(),
                source,
            })?;
        addrs.next().ok_or_else(|| ConnectError::NoAddress {
            host: self.host.clone(),
        })
    }
}

pub fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => "?".to_string(),
    }
}

/// A TLS connection, with what the pool needs to know about it.
pub struct TlsConnection {
    io: TokioIo<TlsStream<TcpStream>>,
    peer: ConnectedPeer,
}

impl TlsConnection {
    /// Whether ALPN chose HTTP/2.
    pub(crate) fn is_h2(&self) -> bool {
        self.io.inner().get_ref().1.alpn_protocol() == Some(b"h2")
    }

    pub(crate) fn peer(&self) -> &ConnectedPeer {
        &self.peer
    }
}

impl Read for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
