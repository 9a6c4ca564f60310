//! The WAN transport benchmark: synthetic epochs through the emulated link,
//! QUIC against a TCP + TLS baseline carrying the same framing, measured in
//! the same run and printed side by side.
//!
//! Both transports cross the same IP-level relay ([`NetnsLink`]: two
//! network namespaces joined through TUN devices, shaped by the emulator's
//! link model), so kernel TCP sees the same delay, loss and bottleneck as
//! QUIC. Needs root. `remus-wan bench wan` and `benches/wan_transport.rs`
//! call [`run`].

use std::collections::VecDeque;
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::replication::{
    spawn_receiver, spawn_sender, QuicDialer, QuicListener, ReceiverHandle, SenderHandle,
};
use super::tcp::{TcpTlsDialer, TcpTlsListener};
use super::{udp_socket, CongestionControl, Endpoint, TlsPaths, TransportConfig};
use crate::emulator::netns::{in_netns, NetnsLink, ADDR_A, ADDR_B};
use crate::emulator::LinkParams;
use crate::session::{EpochKind, ReceiverConfig, ReceiverEvent, SenderConfig, SenderEvent};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Round-trip times of the emulated link.
    pub rtts: Vec<Duration>,
    /// Packet loss rates (0..=1), applied in both directions.
    pub losses: Vec<f64>,
    /// Bottleneck rate in bits per second.
    pub rate_bps: u64,
    /// QUIC congestion controller of the main table.
    pub congestion: CongestionControl,
    /// Run QUIC without FEC in the main table.
    pub quic: bool,
    /// Also run the TCP + TLS baseline.
    pub tcp: bool,
    /// Also run QUIC with forward error correction (same controller).
    pub fec: bool,
    /// Also run QUIC+FEC with this controller in every main cell (when it
    /// differs from `congestion`), in the same run: the previous default
    /// beside the new one. `None`: not.
    pub fec_baseline: Option<CongestionControl>,
    /// Linux congestion controller of the TCP + TLS baseline.
    pub tcp_congestion: TcpCc,
    /// quinn controllers compared in the controller cells.
    pub quic_controllers: Vec<CongestionControl>,
    /// Linux controllers compared in the controller cells.
    pub tcp_controllers: Vec<TcpCc>,
    /// QUIC transport overrides for experiments: requested ACK delay
    /// (`Some(None)`: quinn's default) and `bbr-bounded` headroom.
    pub ack_delay: Option<Option<Duration>>,
    pub bbr_headroom: Option<f64>,
    /// Print each QUIC cell's transport counters every 100 ms (cwnd, RTT,
    /// losses, congestion events) after the tables.
    pub trace: bool,
    /// Cells (rtt, loss) where every congestion controller is compared.
    pub controller_cells: Vec<(Duration, f64)>,
    /// Size of each synthetic epoch.
    pub epoch_bytes: usize,
    /// Goodput phase: epochs kept outstanding, and duration.
    pub saturate_in_flight: usize,
    pub saturate_for: Duration,
    /// Commits in the first part of the goodput phase are not counted
    /// (slow start); goodput is measured over `saturate_for - warmup`.
    pub warmup: Duration,
    /// Latency phase: one epoch every `interval`, `count` of them.
    pub paced_interval: Duration,
    pub paced_count: usize,
    /// Seed of the link's loss generator.
    pub seed: u64,
    /// Queue of the bottleneck in bytes (`None`: max(BDP, 256 KiB)).
    pub queue_bytes: Option<usize>,
}

impl BenchOptions {
    /// The full grid of the issue: RTT 0/20/50/100 ms x loss 0/0.5/2 %, at
    /// 200 Mbit/s; every controller compared at 50 ms/0.5 % and 100 ms/2 %.
    pub fn full() -> Self {
        Self {
            rtts: [0, 20, 50, 100].map(Duration::from_millis).to_vec(),
            losses: vec![0.0, 0.005, 0.02],
            rate_bps: 200_000_000,
            congestion: TransportConfig::new(TlsPaths::in_dir(".", "x")).congestion,
            quic: true,
            tcp: true,
            fec: true,
            fec_baseline: Some(CongestionControl::Bbr),
            tcp_congestion: TcpCc::Bbr,
            quic_controllers: CongestionControl::ALL.to_vec(),
            tcp_controllers: vec![TcpCc::Cubic, TcpCc::Bbr],
            trace: false,
            ack_delay: None,
            bbr_headroom: None,
            controller_cells: vec![
                (Duration::from_millis(50), 0.005),
                (Duration::from_millis(100), 0.02),
            ],
            epoch_bytes: 1 << 20,
            saturate_in_flight: 8,
            saturate_for: Duration::from_secs(3),
            warmup: Duration::from_secs(1),
            paced_interval: Duration::from_millis(100),
            paced_count: 15,
            seed: 7,
            queue_bytes: None,
        }
    }

    /// A smoke run: two cells, short phases.
    pub fn quick() -> Self {
        Self {
            rtts: vec![Duration::ZERO, Duration::from_millis(50)],
            losses: vec![0.0, 0.005],
            controller_cells: vec![],
            saturate_for: Duration::from_secs(1),
            warmup: Duration::ZERO,
            paced_count: 5,
            ..Self::full()
        }
    }
}

/// Linux TCP congestion controller of the baseline, set per socket
/// (`TCP_CONGESTION`). Set explicitly: a network namespace inherits the
/// host's `net.ipv4.tcp_congestion_control`, which on the development
/// machine is `bbr`, not CUBIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpCc {
    Cubic,
    Reno,
    Bbr,
}

impl TcpCc {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cubic => "cubic",
            Self::Reno => "reno",
            Self::Bbr => "bbr",
        }
    }
}

impl std::str::FromStr for TcpCc {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Self::Cubic),
            "reno" => Ok(Self::Reno),
            "bbr" => Ok(Self::Bbr),
            _ => Err(format!(
                "unknown TCP congestion controller {s:?}: expected cubic, reno or bbr"
            )),
        }
    }
}

/// Which transport a row measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic(CongestionControl),
    /// QUIC with FEC repair datagrams ([`super::fec`]).
    QuicFec(CongestionControl),
    TcpTls(TcpCc),
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Quic(cc) => write!(f, "QUIC/{cc}"),
            Self::QuicFec(cc) => write!(f, "QUIC+FEC/{cc}"),
            Self::TcpTls(cc) => write!(f, "TCP+TLS/{}", cc.name()),
        }
    }
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Cell {
    pub transport: Transport,
    pub rtt: Duration,
    pub loss: f64,
    /// Committed epoch bytes per second during the goodput phase, in bit/s.
    pub goodput_bps: f64,
    /// Commit latency (push to ack) of the paced phase.
    pub p50: Duration,
    pub p99: Duration,
    /// Packets the QUIC stack declared lost (0 for TCP: not visible here).
    pub lost_packets: u64,
    /// Congestion events of the QUIC stack (0 for TCP).
    pub congestion_events: u64,
    /// Mean QUIC congestion window over the goodput phase (bytes; 0 for TCP).
    pub mean_cwnd: u64,
    /// QUIC transport counters every 100 ms (seconds since the cell began).
    pub trace: Vec<(f64, super::LinkStats)>,
    /// Epochs that did not commit within the phase's deadline.
    pub incomplete: usize,
    /// The five longest commit latencies of the paced phase, longest
    /// first, with the epoch's place in the phase (0-based).
    pub slowest: Vec<(usize, Duration)>,
    /// Paced epochs whose commit took longer than the latency target.
    pub over_target: usize,
    /// What the emulated link did during the cell (both directions):
    /// packets delivered, dropped by random loss, dropped by the full queue.
    pub link_packets: u64,
    pub link_lost: u64,
    pub link_queue_drops: u64,
    /// Largest IP packet the link carried (checks that no offload merged
    /// segments: loss is per packet).
    pub link_max_packet: u64,
    /// FEC counters of both sites (QUIC+FEC only): the primary's redundancy
    /// sent and stream bytes written, the backup's rebuilt shards.
    pub fec_primary: super::fec::link::FecTotals,
    pub fec_backup: super::fec::link::FecTotals,
}

/// The benchmark's result; `Display` prints the side-by-side table.
#[derive(Debug, Clone)]
pub struct Table {
    pub opts: BenchOptions,
    pub cells: Vec<Cell>,
    pub controller_cells: Vec<Cell>,
}

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot create the emulated link (needs root and iproute2): {0}")]
    Netns(std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] super::TransportError),
    #[error("certificates: {0}")]
    Certs(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes a throw-away site CA and dc1/dc2 certificates into `dir`.
pub fn write_test_pki(dir: &Path) -> Result<(), BenchError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let e = |e: rcgen::Error| BenchError::Certs(e.to_string());
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.distinguished_name
        .push(DnType::CommonName, "remus-wan site CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(
        dir.join("ca.pem"),
        ca.self_signed(&ca_key).map_err(e)?.pem(),
    )?;
    let issuer = Issuer::new(ca, ca_key);
    for site in ["dc1", "dc2"] {
        let key = KeyPair::generate().map_err(e)?;
        let mut p = CertificateParams::new(vec![site.to_string()]).map_err(e)?;
        p.distinguished_name.push(DnType::CommonName, site);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).map_err(e)?;
        std::fs::write(dir.join(format!("{site}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{site}.key")), key.serialize_pem())?;
    }
    Ok(())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark (blocking; it makes its own tokio runtime).
pub fn run(opts: &BenchOptions) -> Result<Table, BenchError> {
    let tmp = TempDir(std::env::temp_dir().join(format!(
        "remus-wan-bench-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    )));
    write_test_pki(&tmp.0)?;
    let link = NetnsLink::create(LinkParams::default(), opts.seed).map_err(BenchError::Netns)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut cells = Vec::new();
        for &rtt in &opts.rtts {
            for &loss in &opts.losses {
                if opts.quic {
                    cells.push(
                        cell(
                            &link,
                            &tmp.0,
                            Transport::Quic(opts.congestion),
                            rtt,
                            loss,
                            opts,
                        )
                        .await?,
                    );
                }
                if opts.fec {
                    cells.push(
                        cell(
                            &link,
                            &tmp.0,
                            Transport::QuicFec(opts.congestion),
                            rtt,
                            loss,
                            opts,
                        )
                        .await?,
                    );
                }
                if opts.tcp {
                    cells.push(
                        cell(
                            &link,
                            &tmp.0,
                            Transport::TcpTls(opts.tcp_congestion),
                            rtt,
                            loss,
                            opts,
                        )
                        .await?,
                    );
                }
                if let Some(b) = opts
                    .fec_baseline
                    .filter(|&b| opts.fec && b != opts.congestion)
                {
                    cells.push(cell(&link, &tmp.0, Transport::QuicFec(b), rtt, loss, opts).await?);
                }
            }
        }
        let mut controller_cells = Vec::new();
        for &(rtt, loss) in &opts.controller_cells {
            for &cc in &opts.quic_controllers {
                controller_cells
                    .push(cell(&link, &tmp.0, Transport::Quic(cc), rtt, loss, opts).await?);
            }
            for &cc in &opts.tcp_controllers {
                controller_cells
                    .push(cell(&link, &tmp.0, Transport::TcpTls(cc), rtt, loss, opts).await?);
            }
        }
        Ok(Table {
            opts: opts.clone(),
            cells,
            controller_cells,
        })
    })
}

fn payload(size: usize, salt: u64) -> Bytes {
    // Incompressible-looking bytes (the codec has already compressed epochs).
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    Bytes::from(v)
}

async fn cell(
    link: &NetnsLink,
    pki: &Path,
    transport: Transport,
    rtt: Duration,
    loss: f64,
    opts: &BenchOptions,
) -> Result<Cell, BenchError> {
    let mut params = LinkParams::symmetric(rtt, loss, Some(opts.rate_bps));
    params.queue_bytes = opts
        .queue_bytes
        .unwrap_or(params.queue_bytes.max(256 << 10));
    link.handle().set_link(params);
    let before = link.handle().stats();
    let mut cfg_b = TransportConfig::new(TlsPaths::in_dir(pki, "dc2"));
    cfg_b.allowed_clients = vec!["dc1".into()];
    let mut cfg_a = TransportConfig::new(TlsPaths::in_dir(pki, "dc1"));
    if let Transport::Quic(cc) | Transport::QuicFec(cc) = transport {
        for c in [&mut cfg_a, &mut cfg_b] {
            c.congestion = cc;
            c.fec = matches!(transport, Transport::QuicFec(_));

            if let Some(d) = opts.ack_delay {
                c.ack_delay = d;
            }
            if let Some(h) = opts.bbr_headroom {
                c.bbr_headroom = h;
            }
        }
    }
    let mut rcfg = ReceiverConfig::new("dc2", "bench");
    rcfg.max_epoch_size = 1 << 30;
    let mut scfg = SenderConfig::new("dc1", "bench");
    scfg.max_in_flight = opts.saturate_in_flight;
    scfg.window_epochs = opts.saturate_in_flight * 4;
    scfg.peer_timeout = Duration::from_secs(10);

    let ns_a = link.ns_a().to_string();
    let ns_b = link.ns_b().to_string();
    let (sender, sev, receiver, quic) = match transport {
        Transport::Quic(_) | Transport::QuicFec(_) => {
            let buf = cfg_b.socket_buffer;
            let sb = in_netns(&ns_b, move || {
                udp_socket(SocketAddr::from((ADDR_B, 0)), buf)
            })??;
            let eb = Endpoint::with_socket(sb, cfg_b)?;
            let addr_b = SocketAddr::V4(SocketAddrV4::new(ADDR_B, eb.local_addr()?.port()));
            let (rh, rev) = spawn_receiver(QuicListener::new(eb.clone()), rcfg, 0);
            let buf = cfg_a.socket_buffer;
            let sa = in_netns(&ns_a, move || {
                udp_socket(SocketAddr::from((ADDR_A, 0)), buf)
            })??;
            let ea = Endpoint::with_socket(sa, cfg_a)?;
            let (sh, sev) = spawn_sender(
                QuicDialer {
                    endpoint: ea.clone(),
                    addr: addr_b,
                    peer_site: "dc2".into(),
                },
                scfg,
                1,
            );
            spawn_committer(rh.clone(), rev);
            (sh, sev, rh, Some((ea, eb)))
        }
        Transport::TcpTls(tcp_cc) => {
            let l = in_netns(&ns_b, || {
                let l = std::net::TcpListener::bind(SocketAddr::from((ADDR_B, 0)))?;
                l.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(l)
            })??;
            let addr_b = l.local_addr()?;
            let listener =
                TcpTlsListener::with_listener(&cfg_b, tokio::net::TcpListener::from_std(l)?)?;
            let (rh, rev) = spawn_receiver(listener, rcfg, 0);
            let ns = ns_a.clone();
            let dialer = TcpTlsDialer::new(&cfg_a, addr_b, "dc2")?.with_socket_factory(Arc::new(
                move || {
                    let s = in_netns(&ns, || {
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    })??;
                    s.set_tcp_congestion(tcp_cc.name().as_bytes())?;
                    Ok(s)
                },
            ));
            let (sh, sev) = spawn_sender(dialer, scfg, 1);
            spawn_committer(rh.clone(), rev);
            (sh, sev, rh, None)
        }
    };
    let sampler = spawn_sampler(sender.clone());
    let r = measure(&sender, sev, opts).await;
    let last = sender.status().link.unwrap_or_default();
    let trace = sampler.stop().await;
    let lost_packets = last.lost_packets;
    let congestion_events = last.congestion_events;
    let goodput_phase: Vec<u64> = trace
        .iter()
        .filter(|(t, _)| *t <= opts.saturate_for.as_secs_f64())
        .map(|(_, l)| l.cwnd)
        .collect();
    let mean_cwnd = if goodput_phase.is_empty() {
        0
    } else {
        goodput_phase.iter().sum::<u64>() / goodput_phase.len() as u64
    };
    sender.close().await;
    receiver.close().await;
    let (fec_primary, fec_backup) = quic
        .as_ref()
        .map(|(a, b)| (a.fec_totals(), b.fec_totals()))
        .unwrap_or_default();
    if let Some((a, b)) = quic {
        a.close();
        b.close();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (goodput_bps, p50, p99, incomplete, latencies) = r;
    let target =
        2 * rtt + Duration::from_secs_f64(opts.epoch_bytes as f64 * 8.0 / opts.rate_bps as f64);
    let over_target = latencies.iter().filter(|&&l| l > target).count();
    let mut by_length: Vec<(usize, Duration)> = latencies.iter().copied().enumerate().collect();
    by_length.sort_by_key(|&(_, d)| std::cmp::Reverse(d));
    let slowest = by_length.into_iter().take(5).collect();
    let after = link.handle().stats();
    let d = |f: fn(&crate::emulator::DirectionStats) -> u64| {
        f(&after.forward) + f(&after.backward) - f(&before.forward) - f(&before.backward)
    };
    Ok(Cell {
        link_packets: d(|s| s.packets),
        link_lost: d(|s| s.lost),
        link_queue_drops: d(|s| s.queue_drops),
        link_max_packet: after.forward.max_packet.max(after.backward.max_packet),
        transport,
        rtt,
        loss,
        goodput_bps,
        p50,
        p99,
        lost_packets,
        congestion_events,
        mean_cwnd,
        trace: if opts.trace { trace } else { Vec::new() },
        incomplete,
        slowest,
        over_target,
        fec_primary,
        fec_backup,
    })
}

/// Samples the sender's transport counters every 100 ms.
struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(f64, super::LinkStats)>>,
}

impl Sampler {
    async fn stop(self) -> Vec<(f64, super::LinkStats)> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

fn spawn_sampler(sender: SenderHandle) -> Sampler {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = &mut stopped => return out,
                _ = tick.tick() => {
                    if let Some(l) = sender.status().link {
                        out.push((start.elapsed().as_secs_f64(), l));
                    }
                }
            }
        }
    });
    Sampler { stop, task }
}

fn spawn_committer(rh: ReceiverHandle, mut rev: mpsc::UnboundedReceiver<ReceiverEvent>) {
    tokio::spawn(async move {
        while let Some(ev) = rev.recv().await {
            if let ReceiverEvent::Epoch { epoch, .. } = ev {
                if rh.commit(epoch).await.is_err() {
                    return;
                }
            }
        }
    });
}

/// Tracks pushed epochs and their commits.
struct Tracker {
    pushed: VecDeque<(u64, Instant, usize)>,
    committed_bytes: u64,
    count_from: Instant,
    latencies: Vec<Duration>,
}

impl Tracker {
    fn on_event(&mut self, ev: &SenderEvent, now: Instant) {
        if let SenderEvent::Committed { epoch } = ev {
            while self.pushed.front().is_some_and(|(e, _, _)| e <= epoch) {
                let (_, t, n) = self.pushed.pop_front().expect("non-empty");
                self.latencies.push(now - t);
                if now >= self.count_from {
                    self.committed_bytes += n as u64;
                }
            }
        }
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

async fn push(sender: &SenderHandle, t: &mut Tracker, size: usize, first: bool) -> bool {
    let kind = if first {
        EpochKind::Full
    } else {
        EpochKind::Delta
    };
    let now = Instant::now();
    let salt = t.pushed.back().map_or(0, |p| p.0 + 1);
    match sender.push_epoch(kind, payload(size, salt)).await {
        Ok(e) => {
            t.pushed.push_back((e, now, size));
            true
        }
        Err(_) => false,
    }
}

async fn measure(
    sender: &SenderHandle,
    mut sev: mpsc::UnboundedReceiver<SenderEvent>,
    opts: &BenchOptions,
) -> (f64, Duration, Duration, usize, Vec<Duration>) {
    let start = Instant::now();
    let mut t = Tracker {
        pushed: VecDeque::new(),
        committed_bytes: 0,
        count_from: start + opts.warmup,
        latencies: Vec::new(),
    };
    // Goodput: keep the pipe full for `saturate_for`.
    let end = start + opts.saturate_for;
    let mut first = true;
    while Instant::now() < end {
        while t.pushed.len() < opts.saturate_in_flight {
            if !push(sender, &mut t, opts.epoch_bytes, first).await {
                break;
            }
            first = false;
        }
        match tokio::time::timeout_at(end.into(), sev.recv()).await {
            Ok(Some(ev)) => t.on_event(&ev, Instant::now()),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    let goodput = t.committed_bytes as f64 * 8.0 / (start + opts.warmup).elapsed().as_secs_f64();
    // Drain (bounded) before the latency phase.
    let drain_end = Instant::now() + Duration::from_secs(8);
    while !t.pushed.is_empty() {
        match tokio::time::timeout_at(drain_end.into(), sev.recv()).await {
            Ok(Some(ev)) => t.on_event(&ev, Instant::now()),
            _ => break,
        }
    }
    t.pushed.clear();
    t.latencies.clear();
    // Latency: one epoch every interval.
    let mut next = Instant::now();
    for _ in 0..opts.paced_count {
        push(sender, &mut t, opts.epoch_bytes, false).await;
        next += opts.paced_interval;
        while let Ok(Some(ev)) = tokio::time::timeout_at(next.into(), sev.recv()).await {
            t.on_event(&ev, Instant::now());
        }
    }
    let drain_end = Instant::now() + Duration::from_secs(8);
    while !t.pushed.is_empty() {
        match tokio::time::timeout_at(drain_end.into(), sev.recv()).await {
            Ok(Some(ev)) => t.on_event(&ev, Instant::now()),
            _ => break,
        }
    }
    let incomplete = t.pushed.len();
    let in_order = t.latencies.clone();
    let p50 = percentile(&mut t.latencies, 0.50);
    let p99 = percentile(&mut t.latencies, 0.99);
    (goodput, p50, p99, incomplete, in_order)
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// "188.7 (94%)" of a `limit` Mbit/s link, "*" when epochs did not commit.
fn goodput(c: Option<&Cell>, limit: f64) -> String {
    c.map_or("-".to_string(), |c| {
        format!(
            "{:.1} ({:.0}%){}",
            c.goodput_bps / 1e6,
            c.goodput_bps / 1e6 / limit * 100.0,
            if c.incomplete > 0 { "*" } else { "" }
        )
    })
}

fn latency(c: Option<&Cell>) -> String {
    c.map_or("-".to_string(), |c| {
        format!("{} / {}", ms(c.p50), ms(c.p99))
    })
}

fn link_drops(c: Option<&Cell>) -> String {
    c.map_or("-".to_string(), |c| {
        format!(
            "{}+{} of {}",
            c.link_lost, c.link_queue_drops, c.link_packets
        )
    })
}

impl Table {
    /// 2 RTT + serialization of one epoch at the link rate.
    pub fn latency_target(&self, rtt: Duration) -> Duration {
        2 * rtt
            + Duration::from_secs_f64(
                self.opts.epoch_bytes as f64 * 8.0 / self.opts.rate_bps as f64,
            )
    }

    fn find(&self, tr: Transport, rtt: Duration, loss: f64) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.transport == tr && c.rtt == rtt && c.loss == loss)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.opts;
        let limit = o.rate_bps as f64 / 1e6;
        writeln!(
            f,
            "WAN transport: {limit:.0} Mbit/s bottleneck, loss both ways, queue = max(BDP, 256 KiB); epochs of {} KiB",
            o.epoch_bytes / 1024
        )?;
        writeln!(
            f,
            "goodput: {} epochs outstanding for {:.1} s, the first {:.1} s not counted; commit latency (push -> ack): one epoch every {} ms, {} epochs",
            o.saturate_in_flight,
            o.saturate_for.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.paced_interval.as_millis(),
            o.paced_count
        )?;
        let q = Transport::Quic(o.congestion);
        let qf = Transport::QuicFec(o.congestion);
        let t = Transport::TcpTls(o.tcp_congestion);
        writeln!(f)?;
        writeln!(
            f,
            "| RTT ms | loss % | {q} goodput Mbit/s | {qf} goodput Mbit/s | {t} goodput Mbit/s | {q} p50/p99 ms | {qf} p50/p99 ms | {t} p50/p99 ms | target p99 ms | link drops QUIC (loss+queue) | link drops QUIC+FEC | link drops TCP |"
        )?;
        writeln!(
            f,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for &rtt in &o.rtts {
            for &loss in &o.losses {
                let gp = |c: Option<&Cell>| goodput(c, limit);
                let lat = latency;
                let qc = self.find(q, rtt, loss);
                let fc = self.find(qf, rtt, loss);
                let tc = self.find(Transport::TcpTls(o.tcp_congestion), rtt, loss);
                let drops = link_drops;
                writeln!(
                    f,
                    "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    rtt.as_millis(),
                    loss * 100.0,
                    gp(qc),
                    gp(fc),
                    gp(tc),
                    lat(qc),
                    lat(fc),
                    lat(tc),
                    ms(self.latency_target(rtt)),
                    drops(qc),
                    drops(fc),
                    drops(tc)
                )?;
            }
        }
        if let Some(b) = o.fec_baseline.filter(|&b| b != o.congestion) {
            let base = Transport::QuicFec(b);
            if self.cells.iter().any(|c| c.transport == base) {
                writeln!(f, "\nQUIC+FEC with {b} (the same run's cells, after the main table's; goodput Mbit/s, p50/p99 ms):\n")?;
                writeln!(f, "| RTT ms | loss % | {base} goodput | {qf} goodput | {base} p50/p99 | {qf} p50/p99 | target p99 ms | link drops {base} | link drops {qf} |")?;
                writeln!(f, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
                for &rtt in &o.rtts {
                    for &loss in &o.losses {
                        let (bc, fc) = (self.find(base, rtt, loss), self.find(qf, rtt, loss));
                        writeln!(
                            f,
                            "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
                            rtt.as_millis(),
                            loss * 100.0,
                            goodput(bc, limit),
                            goodput(fc, limit),
                            latency(bc),
                            latency(fc),
                            ms(self.latency_target(rtt)),
                            link_drops(bc),
                            link_drops(fc)
                        )?;
                    }
                }
            }
        }
        let fec: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| matches!(c.transport, Transport::QuicFec(_)))
            .collect();
        if !fec.is_empty() {
            writeln!(f, "\nFEC (QUIC+FEC cells): redundancy = repair + mirror payload the primary sent / stream bytes it wrote; rebuilt = data shards the backup decoded (windows); unused = repairs that came too late or were dropped\n")?;
            writeln!(f, "| RTT ms | loss % | controller | redundancy | datagrams sent | rebuilt shards (windows) | mirror bytes used (primary) | unused repairs |")?;
            writeln!(f, "|---:|---:|---|---:|---:|---:|---:|---:|")?;
            for c in fec {
                let (a, b) = (&c.fec_primary, &c.fec_backup);
                let Transport::QuicFec(cc) = c.transport else {
                    continue;
                };
                writeln!(
                    f,
                    "| {} | {:.1} | {cc} | {:.1} % | {} | {} ({}) | {} | {} |",
                    c.rtt.as_millis(),
                    c.loss * 100.0,
                    a.redundant_bytes_sent as f64 * 100.0 / a.stream_bytes_written.max(1) as f64,
                    a.datagrams_sent,
                    b.recovered_shards,
                    b.decoded_windows,
                    a.mirrored_bytes,
                    b.unused_repairs
                )?;
            }
        }
        if let Some(m) = self.cells.iter().map(|c| c.link_max_packet).max() {
            writeln!(f, "\nlargest IP packet carried by the emulated link: {m} bytes (loss applies per packet)")?;
        }
        let paced: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| !c.slowest.is_empty())
            .collect();
        if !paced.is_empty() {
            writeln!(f, "\nslowest commits of the paced phase (ms@epoch, longest first) and how many of the {} exceeded the target:\n", o.paced_count)?;
            writeln!(
                f,
                "| RTT ms | loss % | transport | slowest 5 | over target |"
            )?;
            writeln!(f, "|---:|---:|---|---|---:|")?;
            for c in paced {
                let slow: Vec<String> = c
                    .slowest
                    .iter()
                    .map(|&(i, d)| format!("{}@{i}", ms(d)))
                    .collect();
                writeln!(
                    f,
                    "| {} | {:.1} | {} | {} | {} |",
                    c.rtt.as_millis(),
                    c.loss * 100.0,
                    c.transport,
                    slow.join(" "),
                    c.over_target
                )?;
            }
        }
        if !self.controller_cells.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "Congestion controllers (QUIC: quinn's; TCP: Linux's, set per socket):"
            )?;
            writeln!(f)?;
            writeln!(f, "| RTT ms | loss % | controller | goodput Mbit/s | p50/p99 ms | QUIC lost pkts | QUIC congestion events | QUIC mean cwnd KiB | link drops (loss+queue) |")?;
            writeln!(f, "|---:|---:|---|---:|---:|---:|---:|---:|---:|")?;
            for c in &self.controller_cells {
                let quic = matches!(c.transport, Transport::Quic(_) | Transport::QuicFec(_));
                let q = |v: u64| if quic { v.to_string() } else { "-".to_string() };
                writeln!(
                    f,
                    "| {} | {:.1} | {} | {:.1}{} | {} / {} | {} | {} | {} | {}+{} of {} |",
                    c.rtt.as_millis(),
                    c.loss * 100.0,
                    c.transport,
                    c.goodput_bps / 1e6,
                    if c.incomplete > 0 { "*" } else { "" },
                    ms(c.p50),
                    ms(c.p99),
                    q(c.lost_packets),
                    q(c.congestion_events),
                    q(c.mean_cwnd / 1024),
                    c.link_lost,
                    c.link_queue_drops,
                    c.link_packets
                )?;
            }
        }
        for c in self.cells.iter().chain(&self.controller_cells) {
            if c.trace.is_empty() {
                continue;
            }
            writeln!(
                f,
                "\ntrace {} at {} ms / {:.1} %: t s, cwnd KiB, srtt ms, lost pkts, congestion events, sent pkts",
                c.transport,
                c.rtt.as_millis(),
                c.loss * 100.0
            )?;
            for (t, l) in &c.trace {
                writeln!(
                    f,
                    "{t:.1} {} {:.0} {} {} {}",
                    l.cwnd / 1024,
                    l.rtt.as_secs_f64() * 1000.0,
                    l.lost_packets,
                    l.congestion_events,
                    l.sent_packets
                )?;
            }
        }
        if self
            .cells
            .iter()
            .chain(&self.controller_cells)
            .any(|c| c.incomplete > 0)
        {
            writeln!(
                f,
                "\n* some epochs did not commit within the drain deadline (latency figures then cover only those that did)"
            )?;
        }
        Ok(())
    }
}
