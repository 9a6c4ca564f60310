//! The tokio shell around [`Session`]: one task per peer, one listener for
//! passive peers, TCP-MD5, and a handle to change announcements and read
//! the status.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use super::md5::set_md5_key;
use super::route::Route;
use super::session::{Action, ConnId, PeerMode, Session, SessionConfig, SessionStats, State};

/// One BGP neighbour.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub address: IpAddr,
    /// TCP port of the peer (179).
    pub port: u16,
    pub remote_as: u32,
    pub mode: PeerMode,
    /// Next hop for IPv4 prefixes (default: our address on the session).
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Next hop for IPv6 prefixes (default: our address on the session if
    /// it is IPv6; IPv6 prefixes over an IPv4 session need this).
    pub next_hop_v6: Option<Ipv6Addr>,
    /// RFC 2385 TCP-MD5 password.
    pub md5_password: Option<String>,
    /// Source address for the connections we open (default: by routing).
    pub local_address: Option<IpAddr>,
}

impl PeerConfig {
    /// A peer with the defaults: port 179, active, no MD5.
    pub fn new(address: IpAddr, remote_as: u32) -> Self {
        Self {
            address,
            port: 179,
            remote_as,
            mode: PeerMode::Active,
            next_hop_v4: None,
            next_hop_v6: None,
            md5_password: None,
            local_address: None,
        }
    }
}

/// One site's BGP speaker.
#[derive(Debug, Clone)]
pub struct SpeakerConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Hold time we propose (0, or 3..=65535 seconds).
    pub hold_time_s: u16,
    pub connect_retry: Duration,
    /// Where passive peers connect to (default `0.0.0.0:179`). Only bound
    /// when some peer is passive or both.
    pub listen: Option<SocketAddr>,
    pub peers: Vec<PeerConfig>,
}

/// A route change under a fencing token older than one already applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routes of {group:?} not changed: fencing token {token} is older than {current}")]
pub struct StaleFencingToken {
    pub group: String,
    pub token: u64,
    pub current: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("invalid BGP configuration: {0}")]
    Config(String),
    #[error("cannot listen for BGP connections on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TCP-MD5 for peer {peer}: {source}")]
    Md5 {
        peer: IpAddr,
        source: std::io::Error,
    },
}

/// Status of one peer, for `remus-wan bgp status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub remote_as: u32,
    pub mode: PeerMode,
    pub state: State,
    pub peer_router_id: Option<Ipv4Addr>,
    pub negotiated_hold_s: Option<u16>,
    pub established_for: Option<Duration>,
    pub announced: Vec<IpNet>,
    pub not_announceable: Vec<IpNet>,
    pub received_prefixes: usize,
    pub last_error: Option<String>,
    pub stats: SessionStats,
}

/// Status of the whole speaker (serialisable for the status endpoint).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeakerStatus {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub peers: Vec<PeerStatus>,
}

impl fmt::Display for SpeakerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "BGP speaker AS{} router-id {}",
            self.local_as, self.router_id
        )?;
        writeln!(
            f,
            "{:<40} {:>10} {:<8} {:<12} {:>10} {:>9} {:>9}",
            "peer", "AS", "mode", "state", "up", "announced", "received"
        )?;
        for p in &self.peers {
            let up = p
                .established_for
                .map(|d| format!("{}s", d.as_secs()))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<40} {:>10} {:<8} {:<12} {:>10} {:>9} {:>9}",
                p.address.to_string(),
                p.remote_as,
                format!("{:?}", p.mode).to_lowercase(),
                p.state.to_string(),
                up,
                p.announced.len(),
                p.received_prefixes
            )?;
            for a in &p.announced {
                writeln!(f, "    announced {a}")?;
            }
            for a in &p.not_announceable {
                writeln!(
                    f,
                    "    NOT announced {a} (no next hop / family not negotiated)"
                )?;
            }
            if let Some(e) = &p.last_error {
                writeln!(f, "    last error: {e}")?;
            }
        }
        Ok(())
    }
}

enum Cmd {
    SetRoutes(Vec<Route>),
    Announce(Vec<Route>),
    Withdraw(Vec<IpNet>),
    Status(oneshot::Sender<PeerStatus>),
    Shutdown(oneshot::Sender<()>),
    Incoming(TcpStream, IpAddr),
}

enum Io {
    Connected { gen: u64, stream: TcpStream },
    ConnectFailed { gen: u64, error: String },
    Bytes { gen: u64, data: Vec<u8> },
    Closed { gen: u64 },
}

struct PeerHandle {
    address: IpAddr,
    tx: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
}

/// A running BGP speaker. Dropping it aborts every session abruptly (as a
/// crash would: the peers see the TCP connections close); call
/// [`Speaker::shutdown`] for a clean CEASE.
pub struct Speaker {
    local_as: u32,
    router_id: Ipv4Addr,
    peers: Vec<PeerHandle>,
    groups: std::sync::Mutex<std::collections::BTreeMap<String, (u64, Vec<Route>)>>,
    listener: Option<JoinHandle<()>>,
    listen_addr: Option<SocketAddr>,
}

impl Drop for Speaker {
    fn drop(&mut self) {
        for p in &self.peers {
            p.task.abort();
        }
        if let Some(l) = &self.listener {
            l.abort();
        }
    }
}

fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl Speaker {
    /// Validates the configuration, binds the listener if a peer is passive,
    /// and starts every session. Must be called inside a tokio runtime.
    pub async fn start(cfg: SpeakerConfig) -> Result<Speaker, SpeakerError> {
        if cfg.hold_time_s == 1 || cfg.hold_time_s == 2 {
            return Err(SpeakerError::Config(format!(
                "hold time {} s: must be 0 or at least 3",
                cfg.hold_time_s
            )));
        }
        if cfg.local_as == 0 || cfg.router_id.is_unspecified() {
            return Err(SpeakerError::Config(
                "local AS and router id must be non-zero".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &cfg.peers {
            if !seen.insert(normalize(p.address)) {
                return Err(SpeakerError::Config(format!(
                    "peer {} is configured twice",
                    p.address
                )));
            }
            if p.md5_password
                .as_ref()
                .is_some_and(|k| k.len() > super::md5::MAX_KEY_LEN)
            {
                return Err(SpeakerError::Config(format!(
                    "peer {}: TCP-MD5 password longer than 80 bytes",
                    p.address
                )));
            }
        }

        let mut peers = Vec::new();
        let mut routes_by_ip: HashMap<IpAddr, mpsc::UnboundedSender<Cmd>> = HashMap::new();
        for p in &cfg.peers {
            let (tx, rx) = mpsc::unbounded_channel();
            let scfg = SessionConfig {
                local_as: cfg.local_as,
                router_id: cfg.router_id,
                remote_as: p.remote_as,
                hold_time: cfg.hold_time_s,
                connect_retry: cfg.connect_retry,
                mode: p.mode,
                next_hop_v4: p.next_hop_v4,
                next_hop_v6: p.next_hop_v6,
            };
            let span = tracing::info_span!("bgp_peer", peer = %p.address);
            let task = tokio::spawn(peer_task(p.clone(), scfg, rx).instrument(span));
            if p.mode != PeerMode::Active {
                routes_by_ip.insert(normalize(p.address), tx.clone());
            }
            peers.push(PeerHandle {
                address: p.address,
                tx,
                task,
            });
        }

        let mut listener = None;
        let mut listen_addr = None;
        if !routes_by_ip.is_empty() {
            let addr = cfg
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 179)));
            let l = bind_listener(addr, &cfg.peers)?;
            listen_addr = l.local_addr().ok();
            let map = Arc::new(routes_by_ip);
            listener = Some(tokio::spawn(accept_loop(l, map)));
        }
        Ok(Speaker {
            local_as: cfg.local_as,
            router_id: cfg.router_id,
            peers,
            groups: Default::default(),
            listener,
            listen_addr,
        })
    }

    /// The address the listener is bound to, if any peer is passive.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// Replaces the full set of announced routes on every session (do not
    /// mix with [`Speaker::set_group_routes`], which calls this with the
    /// union of the groups).
    pub fn set_routes(&self, routes: Vec<Route>) {
        for p in &self.peers {
            let _ = p.tx.send(Cmd::SetRoutes(routes.clone()));
        }
    }

    /// Replaces the routes of one group (an opaque key chosen by the
    /// caller, e.g. one per protected service) and announces the union of
    /// all groups on every session. An empty list removes the group's
    /// routes. When two groups announce the same prefix, the group whose
    /// key sorts last decides its attributes.
    ///
    /// `fencing_token` is the witness lease token the decision was taken
    /// under: a call with a token lower than the last one accepted for the
    /// group is refused, so a stale decision can never re-announce.
    pub fn set_group_routes(
        &self,
        group: &str,
        fencing_token: u64,
        routes: Vec<Route>,
    ) -> Result<(), StaleFencingToken> {
        let union = {
            let mut g = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((last, _)) = g.get(group) {
                if fencing_token < *last {
                    warn!(
                        group,
                        fencing_token,
                        last = *last,
                        "stale fencing token: routes not changed"
                    );
                    return Err(StaleFencingToken {
                        group: group.to_owned(),
                        token: fencing_token,
                        current: *last,
                    });
                }
            }
            g.insert(group.to_owned(), (fencing_token, routes));
            let mut all: std::collections::BTreeMap<IpNet, Route> = Default::default();
            for r in g.values().flat_map(|(_, r)| r) {
                all.insert(r.prefix, r.clone());
            }
            all.into_values().collect::<Vec<_>>()
        };
        self.set_routes(union);
        Ok(())
    }

    /// Adds or replaces these announcements on every session.
    pub fn announce(&self, routes: Vec<Route>) {
        for p in &self.peers {
            let _ = p.tx.send(Cmd::Announce(routes.clone()));
        }
    }

    /// Withdraws these prefixes on every session.
    pub fn withdraw(&self, prefixes: Vec<IpNet>) {
        for p in &self.peers {
            let _ = p.tx.send(Cmd::Withdraw(prefixes.clone()));
        }
    }

    /// Sessions and announced prefixes (what `remus-wan bgp status` shows).
    pub async fn status(&self) -> SpeakerStatus {
        let mut peers = Vec::new();
        for p in &self.peers {
            let (tx, rx) = oneshot::channel();
            if p.tx.send(Cmd::Status(tx)).is_ok() {
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), rx).await {
                    peers.push(s);
                    continue;
                }
            }
            warn!(peer = %p.address, "peer task does not answer");
        }
        SpeakerStatus {
            local_as: self.local_as,
            router_id: self.router_id,
            peers,
        }
    }

    /// Sends CEASE (administrative shutdown) on every session and stops.
    pub async fn shutdown(mut self) {
        let mut acks = Vec::new();
        for p in &self.peers {
            let (tx, rx) = oneshot::channel();
            if p.tx.send(Cmd::Shutdown(tx)).is_ok() {
                acks.push(rx);
            }
        }
        for a in acks {
            let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
        }
        if let Some(l) = self.listener.take() {
            l.abort();
        }
    }
}

fn bind_listener(addr: SocketAddr, peers: &[PeerConfig]) -> Result<TcpListener, SpeakerError> {
    let err = |source| SpeakerError::Listen { addr, source };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    for p in peers {
        if p.mode == PeerMode::Active {
            continue;
        }
        if let Some(key) = &p.md5_password {
            set_md5_key(&sock, p.address, key.as_bytes()).map_err(|source| SpeakerError::Md5 {
                peer: p.address,
                source,
            })?;
        }
    }
    sock.bind(addr).map_err(err)?;
    sock.listen(64).map_err(err)
}

async fn accept_loop(l: TcpListener, peers: Arc<HashMap<IpAddr, mpsc::UnboundedSender<Cmd>>>) {
    loop {
        match l.accept().await {
            Ok((stream, from)) => {
                let local = stream
                    .local_addr()
                    .map(|a| normalize(a.ip()))
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                match peers.get(&normalize(from.ip())) {
                    Some(tx) => {
                        let _ = tx.send(Cmd::Incoming(stream, local));
                    }
                    None => {
                        warn!(%from, "BGP connection from an unknown address refused");
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connect(p: &PeerConfig, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = if p.address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(key) = &p.md5_password {
        set_md5_key(&sock, p.address, key.as_bytes())?;
    }
    if let Some(local) = p.local_address {
        sock.bind(SocketAddr::new(local, 0))?;
    }
    let addr = SocketAddr::new(p.address, p.port);
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting to {addr} timed out"),
        )),
    }
}

struct ConnIo {
    gen: u64,
    writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn spawn_reader(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    gen: u64,
    io_tx: mpsc::UnboundedSender<(ConnId, Io)>,
    id: ConnId,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = io_tx.send((id, Io::Closed { gen }));
                    return;
                }
                Ok(n) => {
                    if io_tx
                        .send((
                            id,
                            Io::Bytes {
                                gen,
                                data: buf[..n].to_vec(),
                            },
                        ))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    })
}

struct PeerRunner {
    cfg: PeerConfig,
    session: Session,
    conns: HashMap<ConnId, ConnIo>,
    connecting: Option<(u64, JoinHandle<()>)>,
    gen: u64,
    io_tx: mpsc::UnboundedSender<(ConnId, Io)>,
}

impl PeerRunner {
    fn attach(&mut self, id: ConnId, stream: TcpStream) -> u64 {
        let _ = stream.set_nodelay(true);
        self.gen += 1;
        let gen = self.gen;
        let (rd, wr) = stream.into_split();
        let reader = spawn_reader(rd, gen, self.io_tx.clone(), id);
        self.conns.insert(
            id,
            ConnIo {
                gen,
                writer: wr,
                reader,
            },
        );
        gen
    }

    async fn run_actions(&mut self) {
        while let Some(a) = self.session.poll() {
            match a {
                Action::Connect => {
                    self.gen += 1;
                    let gen = self.gen;
                    let cfg = self.cfg.clone();
                    let tx = self.io_tx.clone();
                    let timeout = self
                        .session
                        .config()
                        .connect_retry
                        .max(Duration::from_secs(1));
                    if let Some((_, h)) = self.connecting.take() {
                        h.abort();
                    }
                    let h = tokio::spawn(async move {
                        let msg = match connect(&cfg, timeout).await {
                            Ok(stream) => Io::Connected { gen, stream },
                            Err(e) => Io::ConnectFailed {
                                gen,
                                error: e.to_string(),
                            },
                        };
                        let _ = tx.send((ConnId::Outbound, msg));
                    });
                    self.connecting = Some((gen, h));
                }
                Action::Send { conn, bytes } => {
                    let failed = match self.conns.get_mut(&conn) {
                        Some(c) => !matches!(
                            tokio::time::timeout(
                                Duration::from_secs(10),
                                c.writer.write_all(&bytes)
                            )
                            .await,
                            Ok(Ok(()))
                        ),
                        None => false,
                    };
                    if failed {
                        self.conns.remove(&conn);
                        self.session.tcp_closed(Instant::now(), conn);
                    }
                }
                Action::Close { conn } => {
                    if let Some(mut c) = self.conns.remove(&conn) {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(2), c.writer.shutdown()).await;
                    }
                    if conn == ConnId::Outbound {
                        if let Some((_, h)) = self.connecting.take() {
                            h.abort();
                        }
                    }
                }
                Action::Established { peer_router_id } => {
                    info!(%peer_router_id, "session established");
                }
                Action::Down { reason } => {
                    warn!(%reason, "session down");
                }
                Action::Routes {
                    announced,
                    withdrawn,
                } => {
                    debug!(
                        announced = announced.len(),
                        withdrawn = withdrawn.len(),
                        "routes received from peer"
                    );
                }
            }
        }
    }

    fn status(&self) -> PeerStatus {
        let s = self.session.status();
        PeerStatus {
            address: self.cfg.address,
            remote_as: self.cfg.remote_as,
            mode: self.cfg.mode,
            state: s.state,
            peer_router_id: s.peer_router_id,
            negotiated_hold_s: s.negotiated_hold_s,
            established_for: s.established_since.map(|t| t.elapsed()),
            announced: s.announced,
            not_announceable: s.not_announceable,
            received_prefixes: s.received_prefixes,
            last_error: s.last_error,
            stats: s.stats,
        }
    }
}

async fn peer_task(cfg: PeerConfig, scfg: SessionConfig, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let (io_tx, mut io_rx) = mpsc::unbounded_channel();
    let mut r = PeerRunner {
        cfg,
        session: Session::new(scfg),
        conns: HashMap::new(),
        connecting: None,
        gen: 0,
        io_tx,
    };
    r.session.start(Instant::now());
    loop {
        r.run_actions().await;
        let deadline = r.session.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = rx.recv() => {
                let now = Instant::now();
                match cmd {
                    None => {
                        r.session.stop(now);
                        r.run_actions().await;
                        return;
                    }
                    Some(Cmd::SetRoutes(routes)) => r.session.set_routes(now, routes),
                    Some(Cmd::Announce(routes)) => r.session.announce(now, routes),
                    Some(Cmd::Withdraw(p)) => r.session.withdraw(now, &p),
                    Some(Cmd::Status(tx)) => { let _ = tx.send(r.status()); }
                    Some(Cmd::Shutdown(ack)) => {
                        r.session.stop(now);
                        r.run_actions().await;
                        let _ = ack.send(());
                        return;
                    }
                    Some(Cmd::Incoming(stream, local)) => {
                        if r.session.tcp_accepted(now, local) {
                            r.conns.remove(&ConnId::Inbound);
                            r.attach(ConnId::Inbound, stream);
                        } else {
                            debug!("incoming connection refused by the session state");
                        }
                    }
                }
            }
            io = io_rx.recv() => {
                let Some((id, io)) = io else { continue };
                let now = Instant::now();
                match io {
                    Io::Connected { gen, stream } => {
                        if r.connecting.as_ref().map(|c| c.0) == Some(gen) {
                            r.connecting = None;
                            let local = stream
                                .local_addr()
                                .map(|a| normalize(a.ip()))
                                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                            r.attach(id, stream);
                            r.session.tcp_connected(now, id, local);
                        }
                    }
                    Io::ConnectFailed { gen, error } => {
                        if r.connecting.as_ref().map(|c| c.0) == Some(gen) {
                            r.connecting = None;
                            debug!(%error, "connect failed");
                            r.session.tcp_failed(now, id, &error);
                        }
                    }
                    Io::Bytes { gen, data } => {
                        if r.conns.get(&id).map(|c| c.gen) == Some(gen) {
                            r.session.received(now, id, &data);
                        }
                    }
                    Io::Closed { gen } => {
                        if r.conns.get(&id).map(|c| c.gen) == Some(gen) {
                            r.conns.remove(&id);
                            r.session.tcp_closed(now, id);
                        }
                    }
                }
            }
            _ = sleep => {
                r.session.handle_timeout(Instant::now());
            }
        }
    }
}
