//! The TCP + TLS baseline (tokio-rustls): the same identities, ALPN and
//! replication framing as the QUIC transport, over one TLS-over-TCP
//! connection. Used by the WAN benchmark to compare against QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::replication::{BoxFuture, Dialer, Link, Listener};
use super::{tls, Identity, TransportConfig, TransportError};

/// Makes the (unconnected) TCP socket of each dial, e.g. inside another
/// network namespace.
pub type SocketFactory = Arc<dyn Fn() -> std::io::Result<socket2::Socket> + Send + Sync>;

/// Dials a peer site over TLS-over-TCP.
#[derive(Clone)]
pub struct TcpTlsDialer {
    connector: TlsConnector,
    addr: SocketAddr,
    peer_site: String,
    timeout: Duration,
    factory: Option<SocketFactory>,
}

impl TcpTlsDialer {
    pub fn new(
        cfg: &TransportConfig,
        addr: SocketAddr,
        peer_site: &str,
    ) -> Result<Self, TransportError> {
        let id = Identity::load(&cfg.tls)?;
        let client = id.client_config(vec![super::alpn_for(cfg.protocol_version).into_bytes()])?;
        tls::server_name(peer_site)?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(client)),
            addr,
            peer_site: peer_site.to_string(),
            timeout: Duration::from_secs(10),
            factory: None,
        })
    }

    /// Dials with sockets made by `factory`.
    pub fn with_socket_factory(mut self, factory: SocketFactory) -> Self {
        self.factory = Some(factory);
        self
    }
}

impl Dialer for TcpTlsDialer {
    fn dial(&self) -> BoxFuture<'static, Result<Link, TransportError>> {
        let d = self.clone();
        Box::pin(async move {
            let peer = format!("site {} at {} (tcp)", d.peer_site, d.addr);
            let fut = async {
                let tcp = match &d.factory {
                    None => TcpStream::connect(d.addr).await?,
                    Some(f) => {
                        let s = f()?;
                        s.set_nonblocking(true)?;
                        let std: std::net::TcpStream = s.into();
                        tokio::net::TcpSocket::from_std_stream(std)
                            .connect(d.addr)
                            .await?
                    }
                };
                tcp.set_nodelay(true)?;
                let name = tls::server_name(&d.peer_site)?;
                d.connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| TransportError::Handshake {
                        peer: peer.clone(),
                        message: e.to_string(),
                    })
            };
            let tls = tokio::time::timeout(d.timeout, fut)
                .await
                .map_err(|_| TransportError::Timeout(format!("connecting to {peer}")))??;
            let (read, write) = tokio::io::split(tls);
            Ok(Link {
                read: Box::new(read),
                write: Box::new(write),
                quic: None,
                peer,
                fec: None,
            })
        })
    }
}

/// Accepts TLS-over-TCP connections from peer sites.
pub struct TcpTlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl TcpTlsListener {
    pub async fn bind(cfg: &TransportConfig, addr: SocketAddr) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TransportError::Bind { addr, source })?;
        Self::with_listener(cfg, listener)
    }

    /// On a listener made by the caller (e.g. inside another network namespace).
    pub fn with_listener(
        cfg: &TransportConfig,
        listener: TcpListener,
    ) -> Result<Self, TransportError> {
        let id = Identity::load(&cfg.tls)?;
        let server = id.server_config(
            &cfg.allowed_clients,
            vec![super::alpn_for(cfg.protocol_version).into_bytes()],
        )?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.listener.local_addr()?)
    }
}

impl Listener for TcpTlsListener {
    fn accept(&mut self) -> BoxFuture<'_, Result<Link, TransportError>> {
        Box::pin(async move {
            let (tcp, from) = self.listener.accept().await?;
            tcp.set_nodelay(true)?;
            let peer = format!("client at {from} (tcp)");
            let tls = tokio::time::timeout(Duration::from_secs(10), self.acceptor.accept(tcp))
                .await
                .map_err(|_| TransportError::Timeout(format!("TLS handshake with {peer}")))?
                .map_err(|e| TransportError::Handshake {
                    peer: peer.clone(),
                    message: e.to_string(),
                })?;
            let (read, write) = tokio::io::split(tls);
            Ok(Link {
                read: Box::new(read),
                write: Box::new(write),
                quic: None,
                peer,
                fec: None,
            })
        })
    }
}
