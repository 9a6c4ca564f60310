//! QUIC between sites (quinn + rustls/ring, mutual TLS), tuned for a high
//! bandwidth-delay product, plus a TCP + TLS baseline carrying the same
//! framing for the benchmark.
//!
//! * [`Endpoint`] — one UDP socket (enlarged buffers) that both accepts and
//!   dials site-to-site connections.
//! * [`replication`] — the async shells that drive a
//!   [`crate::session::Sender`] / [`crate::session::Receiver`] over a
//!   connection, reconnecting as the session asks.
//! * [`tcp`] — the TCP + TLS baseline (tokio-rustls).
//!
//! See `docs/transport.md` for the protocol, identities and tuning.

pub mod bench;
pub mod congestion;
pub mod fec;
pub mod replication;
pub mod tcp;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

/// The stream types a [`Connection`] hands out, for callers that route
/// streams themselves (the site daemon).
pub use quinn::{RecvStream, SendStream};
pub use tls::{Identity, TlsPaths};

/// ALPN family name; the protocol id is `remus-wan/<version>`.
pub const ALPN_NAME: &str = "remus-wan";

/// ALPN protocol id of a protocol version, e.g. `remus-wan/1`.
pub fn alpn_for(version: u8) -> String {
    format!("{ALPN_NAME}/{version}")
}

/// Application close code: ALPN version negotiation failed.
pub const CLOSE_VERSION_MISMATCH: u32 = 0x52_01;
/// Application close code: the session ended with an error (reason attached).
pub const CLOSE_SESSION_ERROR: u32 = 0x52_02;
/// Application close code: the peer's FEC datagrams or stream offsets
/// were refused ([`fec::FecError`]).
pub const CLOSE_FEC_ERROR: u32 = 0x52_03;
/// Application close code: normal end.
pub const CLOSE_NORMAL: u32 = 0;

/// Congestion controller used by QUIC connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CongestionControl {
    /// quinn's default; RFC 9438.
    Cubic,
    /// RFC 9002's NewReno.
    NewReno,
    /// quinn's experimental BBR (v1-like). The default until 2026-12-03:
    /// it shrinks its window on every loss, even one FEC repaired.
    Bbr,
    /// quinn's BBR with the bytes in flight bounded by 1.25x the measured
    /// bandwidth-delay product ([`congestion::BoundedBbr`]): no standing
    /// queue at the bottleneck, but it can lock in low under heavy loss
    /// (docs/transport.md), so it is opt-in.
    BoundedBbr,
    /// Our model-based controller ([`congestion::LossTolerant`]), the
    /// default: window 1.5x the measured bandwidth-delay product, no
    /// reaction to random loss below 3 % of a round (FEC repairs it), a
    /// cut when a round loses more (a queue overflowing) or the delivery
    /// rate falls.
    LossTolerant,
}

impl CongestionControl {
    pub const ALL: [CongestionControl; 5] = [
        Self::Cubic,
        Self::NewReno,
        Self::Bbr,
        Self::BoundedBbr,
        Self::LossTolerant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cubic => "cubic",
            Self::NewReno => "newreno",
            Self::Bbr => "bbr",
            Self::BoundedBbr => "bbr-bounded",
            Self::LossTolerant => "loss-tolerant",
        }
    }
}

impl std::str::FromStr for CongestionControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Self::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Self::NewReno),
            "bbr" => Ok(Self::Bbr),
            "bbr-bounded" | "bounded-bbr" => Ok(Self::BoundedBbr),
            "loss-tolerant" => Ok(Self::LossTolerant),
            _ => Err(format!(
                "unknown congestion controller {s:?}: expected cubic, newreno, bbr, bbr-bounded or loss-tolerant"
            )),
        }
    }
}

impl std::fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Transport settings of a site.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// CA, certificate and key.
    pub tls: TlsPaths,
    /// Sites allowed to connect to us (checked against the client
    /// certificate's DNS subjectAltName); empty: any site of our CA.
    pub allowed_clients: Vec<String>,
    /// Congestion controller. Default `loss-tolerant`, chosen by
    /// `benches/wan_transport.rs` (see docs/benchmarks.md and
    /// docs/transport.md): under random loss the loss-based controllers
    /// collapse on a long path (quinn's and Linux's alike); quinn's BBR
    /// keeps a standing queue and shrinks its window after every loss, so
    /// with FEC at 50 ms / 0.5 % loss its p99 commit latency was 146-413 ms
    /// over 100 epochs where `loss-tolerant` gave 103-173 ms. `bbr`,
    /// `bbr-bounded`, `cubic` and `newreno` stay selectable.
    pub congestion: CongestionControl,
    /// Connection-level receive window (bytes). Default 64 MiB: above
    /// 1 Gbit/s x 100 ms (12.5 MB) with room for loss recovery.
    pub receive_window: u64,
    /// Per-stream receive window (bytes). Default 32 MiB: one stream carries
    /// all epochs, so it must cover the BDP on its own.
    pub stream_receive_window: u64,
    /// Send window (bytes of unacknowledged stream data). Default 64 MiB.
    pub send_window: u64,
    /// Requested SO_RCVBUF / SO_SNDBUF of the UDP socket (bytes). The kernel
    /// caps them at net.core.rmem_max / wmem_max.
    pub socket_buffer: usize,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// QUIC keep-alive (PING) interval, below the idle timeout.
    pub keep_alive: Duration,
    /// First RTT estimate before any sample.
    pub initial_rtt: Duration,
    /// Largest ACK delay we ask the peer to use (QUIC ACK frequency
    /// extension; quinn then also uses it in the probe timeout). `None`:
    /// the peer's own `max_ack_delay` (25 ms in quinn). A short one lets
    /// the sender see a lost packet, and a lost tail, sooner.
    pub ack_delay: Option<Duration>,
    /// `bbr-bounded`: in-flight bound as a multiple of the measured
    /// bandwidth-delay product.
    pub bbr_headroom: f64,
    /// Forward error correction of the replication stream ([`fec`]):
    /// Reed-Solomon repair datagrams sized to the measured loss, so an
    /// epoch that lost a few packets commits without waiting for their
    /// retransmission. Default on: at 50 ms / 0.5 % loss it took the
    /// median commit latency from ~148 to ~118 ms for 4-5 % of the link
    /// (benches/wan_transport.rs, docs/transport.md). Each side decides
    /// for itself (the receiving side asks for the repairs), so sites with
    /// and without it interoperate.
    pub fec: bool,
    /// How much redundancy FEC sends (defaults: see [`fec::FecParams`]).
    pub fec_params: fec::FecParams,
    /// quinn's datagram send / receive buffers (bytes): room for the
    /// repairs of several epochs, so none is dropped while queued.
    pub datagram_buffer: usize,
    /// Protocol version put in ALPN. Leave at
    /// [`crate::session::PROTOCOL_VERSION`]; tests change it to check
    /// version negotiation.
    pub protocol_version: u8,
}

impl TransportConfig {
    pub fn new(tls: TlsPaths) -> Self {
        Self {
            tls,
            allowed_clients: Vec::new(),
            congestion: CongestionControl::LossTolerant,
            receive_window: 64 << 20,
            stream_receive_window: 32 << 20,
            send_window: 64 << 20,
            socket_buffer: 8 << 20,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            initial_rtt: Duration::from_millis(100),
            ack_delay: None,
            bbr_headroom: 1.25,
            fec: true,
            fec_params: fec::FecParams::default(),
            datagram_buffer: 16 << 20,
            protocol_version: crate::session::PROTOCOL_VERSION,
        }
    }

    fn alpn(&self) -> Vec<Vec<u8>> {
        vec![
            alpn_for(self.protocol_version).into_bytes(),
            ALPN_NAME.as_bytes().to_vec(),
        ]
    }

    /// quinn transport parameters for this configuration.
    pub fn quinn_transport(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        let v = |x: u64| quinn::VarInt::from_u64(x).unwrap_or(quinn::VarInt::MAX);
        t.receive_window(v(self.receive_window))
            .stream_receive_window(v(self.stream_receive_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(v(8))
            .max_concurrent_uni_streams(v(8))
            .initial_rtt(self.initial_rtt)
            .datagram_send_buffer_size(self.datagram_buffer)
            .datagram_receive_buffer_size(Some(self.datagram_buffer))
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(self.idle_timeout)
                    .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))),
            ));
        if let Some(d) = self.ack_delay {
            let mut af = quinn::AckFrequencyConfig::default();
            af.max_ack_delay(Some(d));
            t.ack_frequency_config(Some(af));
        }
        match self.congestion {
            CongestionControl::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            CongestionControl::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            CongestionControl::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            CongestionControl::BoundedBbr => {
                t.congestion_controller_factory(Arc::new(congestion::BoundedBbrConfig::default()))
            }
            CongestionControl::LossTolerant => {
                t.congestion_controller_factory(Arc::new(congestion::LossTolerantConfig::default()))
            }
        };
        t
    }
}

/// Everything that can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read the {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {what} {path} is not valid PEM: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to site {site} at {addr}: {message}")]
    Connect {
        site: String,
        addr: SocketAddr,
        message: String,
    },
    /// The TLS handshake failed: a certificate was refused (either side), or
    /// the peer is unreachable.
    #[error("handshake with {peer} failed: {message}")]
    Handshake { peer: String, message: String },
    /// The two sites speak different protocol versions.
    #[error("protocol version mismatch with {peer}: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        peer: String,
        ours: String,
        theirs: String,
    },
    #[error("connection to {peer}: {message}")]
    Connection { peer: String, message: String },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("the endpoint is closed")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Link statistics of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Smallest RTT seen.
    pub min_rtt: Duration,
    /// Congestion window (bytes).
    pub cwnd: u64,
    /// Bytes sent and not yet acknowledged or declared lost. quinn 0.11
    /// does not expose the transport's own figure, so this is the
    /// session's un-acknowledged epoch payload (filled in by the
    /// replication shell; 0 from [`Connection::stats`]).
    pub bytes_in_flight: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    pub lost_bytes: u64,
    pub sent_packets: u64,
    pub congestion_events: u64,
    /// UDP payload bytes sent / received.
    pub udp_tx_bytes: u64,
    pub udp_rx_bytes: u64,
    /// Current path MTU.
    pub mtu: u16,
}

impl LinkStats {
    pub fn from_quinn(s: &quinn::ConnectionStats) -> Self {
        Self {
            rtt: s.path.rtt,
            min_rtt: s.path.min_rtt,
            cwnd: s.path.cwnd,
            bytes_in_flight: 0,
            lost_packets: s.path.lost_packets,
            lost_bytes: s.path.lost_bytes,
            sent_packets: s.path.sent_packets,
            congestion_events: s.path.congestion_events,
            udp_tx_bytes: s.udp_tx.bytes,
            udp_rx_bytes: s.udp_rx.bytes,
            mtu: s.path.current_mtu,
        }
    }
}

/// A site's QUIC endpoint: accepts connections from allowed sites and dials
/// peer sites, on one UDP socket.
#[derive(Clone, Debug)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    client: quinn::ClientConfig,
    cfg: Arc<TransportConfig>,
    socket_buffers: (usize, usize),
    fec: Arc<fec::link::FecCounters>,
}

impl Endpoint {
    /// Binds `addr` (use port 0 for an ephemeral port) with the TLS
    /// identity and tuning of `cfg`.
    pub fn bind(addr: SocketAddr, cfg: TransportConfig) -> Result<Self, TransportError> {
        let socket = udp_socket(addr, cfg.socket_buffer)?;
        Self::with_socket(socket, cfg)
    }

    /// Like [`Endpoint::bind`], on a socket made by the caller (e.g. with
    /// [`udp_socket`] inside another network namespace).
    pub fn with_socket(
        socket: std::net::UdpSocket,
        cfg: TransportConfig,
    ) -> Result<Self, TransportError> {
        let addr = socket.local_addr()?;
        let bufs = {
            let s = socket2::SockRef::from(&socket);
            (
                s.recv_buffer_size().unwrap_or(0),
                s.send_buffer_size().unwrap_or(0),
            )
        };
        let id = Identity::load(&cfg.tls)?;
        let transport = Arc::new(cfg.quinn_transport());
        let server_tls = id.server_config(&cfg.allowed_clients, cfg.alpn())?;
        let server_crypto = QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_tls = id.client_config(cfg.alpn())?;
        let client_crypto = QuicClientConfig::try_from(client_tls)
            .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        // Linux reports twice the size it grants (bookkeeping overhead).
        let granted = |b: usize| if cfg!(target_os = "linux") { b / 2 } else { b };
        if granted(bufs.0) < cfg.socket_buffer || granted(bufs.1) < cfg.socket_buffer {
            warn!(
                requested = cfg.socket_buffer,
                rcvbuf = bufs.0,
                sndbuf = bufs.1,
                "UDP socket buffers capped by the kernel; raise net.core.rmem_max and net.core.wmem_max"
            );
        }
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::TlsConfig("no async runtime".into()))?;
        let inner = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(Self {
            inner,
            client,
            cfg: Arc::new(cfg),
            socket_buffers: bufs,
            fec: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.inner.local_addr()?)
    }

    /// Effective (SO_RCVBUF, SO_SNDBUF) of the socket as the kernel reports them.
    pub fn socket_buffers(&self) -> (usize, usize) {
        self.socket_buffers
    }

    pub fn config(&self) -> &TransportConfig {
        &self.cfg
    }

    /// FEC counters of every replication link of this endpoint.
    pub fn fec_totals(&self) -> fec::link::FecTotals {
        self.fec.totals()
    }

    /// A replication [`replication::Link`] over a stream pair of `conn`:
    /// FEC-protected when the configuration says so.
    pub fn replication_link(
        &self,
        conn: Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer: String,
    ) -> replication::Link {
        self.replication_link_after(conn, send, recv, Vec::new(), peer)
    }

    /// [`Self::replication_link`] for a stream whose first bytes, `read`,
    /// were already read in order (to route it): they are handed back in
    /// front of the link's reader.
    pub fn replication_link_after(
        &self,
        conn: Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        read: Vec<u8>,
        peer: String,
    ) -> replication::Link {
        let mut link = if self.cfg.fec {
            fec::link::quic_link(
                conn,
                (send, recv),
                read.len() as u64,
                peer,
                fec::link::FecSetup {
                    params: self.cfg.fec_params.clone(),
                    limits: fec::Limits::for_stream_window(self.cfg.stream_receive_window),
                    counters: self.fec.clone(),
                },
            )
        } else {
            replication::Link {
                read: Box::new(recv),
                write: Box::new(send),
                quic: Some(conn),
                peer,
                fec: None,
            }
        };
        if !read.is_empty() {
            link.read = Box::new(std::io::Cursor::new(read).chain(link.read));
        }
        link
    }

    /// Dials `peer_site` at `addr`; the server's certificate must chain to
    /// our CA and carry `peer_site` as DNS subjectAltName.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer_site: &str,
    ) -> Result<Connection, TransportError> {
        tls::server_name(peer_site)?;
        let connecting = self
            .inner
            .connect_with(self.client.clone(), addr, peer_site)
            .map_err(|e| TransportError::Connect {
                site: peer_site.to_string(),
                addr,
                message: e.to_string(),
            })?;
        let peer = format!("site {peer_site} at {addr}");
        let conn = connecting.await.map_err(|e| {
            let e = handshake_error(&peer, e);
            warn!(error = %e, "outgoing site connection refused");
            e
        })?;
        let conn = Connection {
            inner: conn,
            peer_site: Some(peer_site.to_string()),
        };
        self.check_version(&conn, &peer).await?;
        info!(peer = %peer, "connected to peer site");
        Ok(conn)
    }

    /// Waits for the next incoming connection and completes its handshake.
    /// A refused peer (wrong CA, wrong site, wrong version) is an error;
    /// call again to keep listening.
    pub async fn accept(&self) -> Result<Connection, TransportError> {
        let incoming = self.inner.accept().await.ok_or(TransportError::Closed)?;
        let peer = format!("client at {}", incoming.remote_address());
        let conn = incoming.await.map_err(|e| {
            let e = handshake_error(&peer, e);
            warn!(error = %e, "incoming site connection refused");
            e
        })?;
        let site = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| {
                chain
                    .first()
                    .and_then(|c| tls::cert_site(c, &self.cfg.allowed_clients))
            });
        let peer = match &site {
            Some(s) => format!("site {s} at {}", conn.remote_address()),
            None => peer,
        };
        let conn = Connection {
            inner: conn,
            peer_site: site,
        };
        self.check_version(&conn, &peer).await?;
        info!(peer = %peer, "accepted peer site connection");
        Ok(conn)
    }

    /// After the handshake: if the peer did not share our `remus-wan/N`
    /// but only the bare `remus-wan` fallback, both sides trade their
    /// versions and end the connection with an error naming both.
    async fn check_version(&self, conn: &Connection, peer: &str) -> Result<(), TransportError> {
        let ours = alpn_for(self.cfg.protocol_version);
        let proto = conn
            .inner
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol)
            .unwrap_or_default();
        if proto == ours.as_bytes() {
            return Ok(());
        }
        let timeout = Duration::from_secs(5);
        let theirs = if conn.inner.side().is_server() {
            // Tell the client our version on a uni stream, then learn its
            // version from its CONNECTION_CLOSE reason.
            if let Ok(mut s) = conn.inner.open_uni().await {
                let _ = s.write_all(ours.as_bytes()).await;
                let _ = s.finish();
            }
            match tokio::time::timeout(timeout, conn.inner.closed()).await {
                Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                    String::from_utf8_lossy(&c.reason).into_owned()
                }
                _ => "an unknown version".to_string(),
            }
        } else {
            let theirs = tokio::time::timeout(timeout, async {
                let mut s = conn.inner.accept_uni().await.ok()?;
                let mut buf = Vec::new();
                (&mut s).take(64).read_to_end(&mut buf).await.ok()?;
                Some(String::from_utf8_lossy(&buf).into_owned())
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| "an unknown version".to_string());
            conn.inner
                .close(CLOSE_VERSION_MISMATCH.into(), ours.as_bytes());
            theirs
        };
        conn.inner
            .close(CLOSE_VERSION_MISMATCH.into(), ours.as_bytes());
        let e = TransportError::VersionMismatch {
            peer: peer.to_string(),
            ours,
            theirs,
        };
        warn!(error = %e, "site connection refused");
        Err(e)
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.inner.close(CLOSE_NORMAL.into(), b"endpoint closed");
    }

    /// Waits until every connection is closed (bounded by `timeout`).
    pub async fn wait_idle(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.inner.wait_idle()).await;
    }
}

fn handshake_error(peer: &str, e: quinn::ConnectionError) -> TransportError {
    let message = match &e {
        quinn::ConnectionError::TransportError(t) => {
            format!("{t} (our side refused the peer or its certificate)")
        }
        quinn::ConnectionError::ConnectionClosed(c) => {
            let alert = u64::from(c.error_code).wrapping_sub(0x100);
            let hint = match alert {
                42 | 43 | 44 | 45 | 46 | 48 | 116 => "the peer refused our certificate",
                120 => "no common protocol (ALPN): the peer is not a remus-wan site",
                _ => "the peer closed the handshake",
            };
            format!("{c} ({hint})")
        }
        quinn::ConnectionError::TimedOut => "no answer (timed out)".to_string(),
        other => other.to_string(),
    };
    TransportError::Handshake {
        peer: peer.to_string(),
        message,
    }
}

/// An authenticated connection to a peer site.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer_site: Option<String>,
}

impl Connection {
    /// The peer's site name, as its certificate proves (for accepted
    /// connections: when `allowed_clients` names it).
    pub fn peer_site(&self) -> Option<&str> {
        self.peer_site.as_deref()
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// RTT, congestion window, losses...
    pub fn stats(&self) -> LinkStats {
        LinkStats::from_quinn(&self.inner.stats())
    }

    /// The underlying quinn connection (for other protocols, e.g. failover
    /// heartbeats on their own streams).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.inner
    }

    pub async fn open_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        self.inner.open_bi().await.map_err(|e| self.conn_err(e))
    }

    pub async fn accept_bi(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        self.inner.accept_bi().await.map_err(|e| self.conn_err(e))
    }

    fn conn_err(&self, e: quinn::ConnectionError) -> TransportError {
        TransportError::Connection {
            peer: self
                .peer_site
                .clone()
                .unwrap_or_else(|| self.inner.remote_address().to_string()),
            message: e.to_string(),
        }
    }

    pub fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(code.into(), reason);
    }
}

/// A bound UDP socket with buffers enlarged to `buffer` bytes (capped by
/// the kernel at net.core.rmem_max / wmem_max).
pub fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| TransportError::Bind { addr, source };
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    // Best effort: the kernel silently caps at rmem_max / wmem_max.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    s.bind(&addr.into()).map_err(bind_err)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_parse_from_their_names_and_loss_tolerant_is_the_default() {
        for cc in CongestionControl::ALL {
            assert_eq!(cc.name().parse::<CongestionControl>(), Ok(cc));
            assert_eq!(cc.to_string(), cc.name());
        }
        assert!("vegas".parse::<CongestionControl>().is_err());
        let cfg = TransportConfig::new(TlsPaths::in_dir(".", "x"));
        assert_eq!(cfg.congestion, CongestionControl::LossTolerant);
        assert_eq!(cfg.ack_delay, None);
        assert!(cfg.fec, "FEC is on by default (docs/transport.md)");
    }

    #[test]
    fn every_controller_and_an_ack_delay_make_a_transport_config() {
        for cc in CongestionControl::ALL {
            let mut cfg = TransportConfig::new(TlsPaths::in_dir(".", "x"));
            cfg.congestion = cc;
            cfg.ack_delay = Some(Duration::from_millis(5));
            cfg.bbr_headroom = 1.5;
            let _ = cfg.quinn_transport();
        }
    }
}
