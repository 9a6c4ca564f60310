//! A user-space WAN emulator: a UDP relay that sits between two endpoints
//! and applies, per direction, one-way delay, jitter, random loss (seeded),
//! random corruption (one bit flipped in a delivered datagram), a bandwidth
//! limit with a bounded (tail-drop) queue, and a switchable partition — all
//! changeable at run time through an [`EmulatorHandle`].
//!
//! The kernel's netem qdisc is not available everywhere we test, hence
//! this. Clients send to [`Emulator::local_addr`]; each client address gets
//! its own socket towards the upstream (like a NAT), so reconnecting
//! clients and several clients work.
//!
//! ```text
//! client ──► [listen] ─forward: delay/jitter/loss/rate─► [per-client socket] ──► upstream
//! client ◄── [listen] ◄─backward: delay/jitter/loss/rate─ [per-client socket] ◄── upstream
//! ```
//!
//! Jitter never reorders packets (each packet leaves no earlier than the
//! previous one), like netem with a rate: heavy reordering would be read as
//! loss by QUIC and TCP alike.

pub mod netns;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};

/// Conditions of one direction of the link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within ±jitter.
    pub jitter: Duration,
    /// Probability (0..=1) that a packet is dropped.
    pub loss: f64,
    /// Probability (0..=1) that a delivered packet has one random bit of
    /// its payload flipped (a faulty NIC, link or middlebox that slips past
    /// the link-layer checksums). QUIC's AEAD rejects such a packet, so for
    /// QUIC it becomes a loss; this is how tests show it.
    pub corrupt: f64,
    /// Bandwidth limit in bits per second (`None`: unlimited).
    pub rate_bps: Option<u64>,
    /// Bytes that may wait for the bandwidth limit; more are dropped.
    pub queue_bytes: usize,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            corrupt: 0.0,
            rate_bps: None,
            queue_bytes: 1 << 20,
        }
    }
}

impl LinkParams {
    /// A link with `rtt` split evenly over both directions.
    pub fn symmetric(rtt: Duration, loss: f64, rate_bps: Option<u64>) -> Self {
        let mut p = Self {
            delay: rtt / 2,
            loss,
            rate_bps,
            ..Self::default()
        };
        if let Some(r) = rate_bps {
            // One BDP of queue (at least 64 KiB), like a sensibly sized router buffer.
            let bdp = (r as f64 / 8.0 * rtt.as_secs_f64()) as usize;
            p.queue_bytes = bdp.max(64 << 10);
        }
        p
    }
}

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Where clients send (use `127.0.0.1:0` in tests).
    pub listen: SocketAddr,
    /// The real server.
    pub upstream: SocketAddr,
    /// Client → upstream.
    pub forward: LinkParams,
    /// Upstream → client.
    pub backward: LinkParams,
    /// Seed of the loss and jitter generator.
    pub seed: u64,
    /// The relay stops by itself after this long.
    pub max_lifetime: Duration,
    /// At most this many client addresses are relayed at once.
    pub max_clients: usize,
}

impl EmulatorConfig {
    pub fn new(upstream: SocketAddr) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            forward: LinkParams::default(),
            backward: LinkParams::default(),
            seed: 1,
            max_lifetime: Duration::from_secs(600),
            max_clients: 16,
        }
    }

    /// The same conditions both ways.
    pub fn with_link(mut self, p: LinkParams) -> Self {
        self.forward = p;
        self.backward = p;
        self
    }
}

/// Counters of one direction.
#[derive(Debug, Default)]
struct DirCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    partition_drops: AtomicU64,
    corrupted: AtomicU64,
    max_packet: AtomicU64,
}

/// Counters of one direction, as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Packets delivered.
    pub packets: u64,
    pub bytes: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// Dropped because the rate-limit queue was full.
    pub queue_drops: u64,
    /// Dropped by the partition.
    pub partition_drops: u64,
    /// Delivered with one bit flipped (counted in `packets` too).
    pub corrupted: u64,
    /// Largest packet delivered (bytes).
    pub max_packet: u64,
}

impl DirCounters {
    fn read(&self) -> DirectionStats {
        DirectionStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queue_drops: self.queue_drops.load(Ordering::Relaxed),
            partition_drops: self.partition_drops.load(Ordering::Relaxed),
            corrupted: self.corrupted.load(Ordering::Relaxed),
            max_packet: self.max_packet.load(Ordering::Relaxed),
        }
    }
}

/// Both directions' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmulatorStats {
    pub forward: DirectionStats,
    pub backward: DirectionStats,
}

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → upstream.
    Forward,
    /// Upstream → client.
    Backward,
}

#[derive(Debug)]
struct Shared {
    partitioned: AtomicBool,
    stopped: AtomicBool,
    params: [Mutex<LinkParams>; 2],
    counters: [DirCounters; 2],
}

/// Run-time control of a running emulator. Cloneable.
#[derive(Debug, Clone)]
pub struct EmulatorHandle {
    shared: Arc<Shared>,
}

impl EmulatorHandle {
    /// Cuts (true) or heals (false) the link: while cut, every packet in
    /// both directions is dropped, including those already in flight.
    pub fn set_partitioned(&self, cut: bool) {
        info!(cut, "WAN emulator partition");
        self.shared.partitioned.store(cut, Ordering::SeqCst);
    }

    pub fn cut(&self) {
        self.set_partitioned(true)
    }

    pub fn heal(&self) {
        self.set_partitioned(false)
    }

    pub fn is_partitioned(&self) -> bool {
        self.shared.partitioned.load(Ordering::SeqCst)
    }

    /// Changes one direction's conditions (applies to packets arriving from now on).
    pub fn set_params(&self, dir: Direction, p: LinkParams) {
        *self.shared.params[dir as usize]
            .lock()
            .expect("params lock") = p;
    }

    /// Changes both directions.
    pub fn set_link(&self, p: LinkParams) {
        self.set_params(Direction::Forward, p);
        self.set_params(Direction::Backward, p);
    }

    pub fn params(&self, dir: Direction) -> LinkParams {
        *self.shared.params[dir as usize]
            .lock()
            .expect("params lock")
    }

    pub fn stats(&self) -> EmulatorStats {
        EmulatorStats {
            forward: self.shared.counters[0].read(),
            backward: self.shared.counters[1].read(),
        }
    }

    /// Stops relaying.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
    }
}

/// A running emulator. Dropping it stops the relay.
#[derive(Debug)]
pub struct Emulator {
    local_addr: SocketAddr,
    handle: EmulatorHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.handle.stop();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// xorshift64*: small, seeded, good enough for loss and jitter.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The per-direction shaping model (pure: times in, departure times out).
#[derive(Debug)]
pub struct Shaper {
    rng: Rng,
    /// When the rate-limited "wire" is free again.
    link_free_at: Option<Instant>,
    /// Delivery time of the previous packet (no reordering).
    last_delivery: Option<Instant>,
}

/// What the shaper decided for a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deliver(Instant),
    Lost,
    QueueFull,
}

impl Shaper {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            link_free_at: None,
            last_delivery: None,
        }
    }

    /// Decides the fate of a `len`-byte packet arriving at `now`.
    pub fn admit(&mut self, p: &LinkParams, len: usize, now: Instant) -> Verdict {
        if p.loss > 0.0 && self.rng.unit() < p.loss {
            return Verdict::Lost;
        }
        let mut t = now;
        if let Some(rate) = p.rate_bps.filter(|r| *r > 0) {
            let free = self.link_free_at.unwrap_or(now).max(now);
            let backlog = (free - now).as_secs_f64() * rate as f64 / 8.0;
            if backlog + len as f64 > p.queue_bytes as f64 {
                return Verdict::QueueFull;
            }
            let tx = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            t = free + tx;
            self.link_free_at = Some(t);
        }
        let mut d = p.delay;
        if !p.jitter.is_zero() {
            let j = p.jitter.as_secs_f64() * (2.0 * self.rng.unit() - 1.0);
            d = Duration::from_secs_f64((p.delay.as_secs_f64() + j).max(0.0));
        }
        let mut at = t + d;
        if let Some(last) = self.last_delivery {
            at = at.max(last);
        }
        self.last_delivery = Some(at);
        Verdict::Deliver(at)
    }

    /// For a `len`-byte packet the link delivers: the bit to flip, if this
    /// one is corrupted. Separate from [`Shaper::admit`] because only
    /// delivered packets can arrive corrupted; with `corrupt == 0` it draws
    /// nothing, so seeded loss and jitter sequences stay as they were.
    pub fn corrupt_bit(&mut self, p: &LinkParams, len: usize) -> Option<usize> {
        if p.corrupt <= 0.0 || len == 0 || self.rng.unit() >= p.corrupt {
            return None;
        }
        Some((self.rng.next_u64() % (len as u64 * 8)) as usize)
    }
}

/// Applies [`Shaper::corrupt_bit`]'s decision to a packet about to be
/// delivered, and counts it.
fn maybe_corrupt(shaper: &mut Shaper, p: &LinkParams, data: &mut [u8], c: &DirCounters) {
    if let Some(bit) = shaper.corrupt_bit(p, data.len()) {
        data[bit / 8] ^= 1 << (bit % 8);
        c.corrupted.fetch_add(1, Ordering::Relaxed);
    }
}

struct Packet {
    at: Instant,
    data: Vec<u8>,
    to: SocketAddr,
    sock: Arc<UdpSocket>,
}

/// Most packets waiting for their delivery time in one direction.
const MAX_PENDING: usize = 200_000;

impl Emulator {
    /// Binds the listening socket and starts relaying.
    pub async fn start(cfg: EmulatorConfig) -> std::io::Result<Self> {
        let listen = Arc::new(UdpSocket::bind(cfg.listen).await?);
        grow_buffers(&listen);
        let local_addr = listen.local_addr()?;
        let shared = Arc::new(Shared {
            partitioned: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            params: [Mutex::new(cfg.forward), Mutex::new(cfg.backward)],
            counters: [DirCounters::default(), DirCounters::default()],
        });
        let handle = EmulatorHandle {
            shared: shared.clone(),
        };
        let deadline = Instant::now() + cfg.max_lifetime;
        let (fwd_tx, fwd_rx) = mpsc::unbounded_channel::<Packet>();
        let (bwd_tx, bwd_rx) = mpsc::unbounded_channel::<Packet>();
        let mut tasks = vec![
            tokio::spawn(deliver(
                fwd_rx,
                shared.clone(),
                Direction::Forward,
                deadline,
            )),
            tokio::spawn(deliver(
                bwd_rx,
                shared.clone(),
                Direction::Backward,
                deadline,
            )),
        ];
        let fwd_shaper = Arc::new(Mutex::new(Shaper::new(cfg.seed)));
        let bwd_shaper = Arc::new(Mutex::new(Shaper::new(cfg.seed ^ 0x5555_5555)));
        let upstream = cfg.upstream;
        let max_clients = cfg.max_clients;
        let sh = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                if sh.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let r = tokio::time::timeout_at(deadline, listen.recv_from(&mut buf)).await;
                let (n, from) = match r {
                    Err(_) => {
                        info!("WAN emulator reached its lifetime; stopping");
                        sh.stopped.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(Err(e)) => {
                        debug!(error = %e, "emulator recv");
                        continue;
                    }
                    Ok(Ok(x)) => x,
                };
                let sock = match clients.get(&from) {
                    Some(s) => s.clone(),
                    None => {
                        if clients.len() >= max_clients {
                            continue;
                        }
                        let Ok(s) = UdpSocket::bind(SocketAddr::new(upstream.ip(), 0)).await else {
                            continue;
                        };
                        let s = Arc::new(s);
                        grow_buffers(&s);
                        clients.insert(from, s.clone());
                        // Upstream → this client.
                        let back = s.clone();
                        let listen2 = listen.clone();
                        let tx = bwd_tx.clone();
                        let shaper = bwd_shaper.clone();
                        let sh2 = sh.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                if sh2.stopped.load(Ordering::SeqCst) {
                                    return;
                                }
                                let Ok(Ok((n, src))) =
                                    tokio::time::timeout_at(deadline, back.recv_from(&mut buf))
                                        .await
                                else {
                                    if Instant::now() >= deadline {
                                        return;
                                    }
                                    continue;
                                };
                                if src != upstream {
                                    continue;
                                }
                                admit(
                                    &sh2,
                                    &shaper,
                                    Direction::Backward,
                                    &buf[..n],
                                    from,
                                    &listen2,
                                    &tx,
                                );
                            }
                        });
                        s
                    }
                };
                admit(
                    &sh,
                    &fwd_shaper,
                    Direction::Forward,
                    &buf[..n],
                    upstream,
                    &sock,
                    &fwd_tx,
                );
            }
        }));
        info!(listen = %local_addr, upstream = %cfg.upstream, "WAN emulator running");
        Ok(Self {
            local_addr,
            handle,
            tasks,
        })
    }

    /// Where clients send their packets.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> EmulatorHandle {
        self.handle.clone()
    }
}

fn admit(
    sh: &Shared,
    shaper: &Mutex<Shaper>,
    dir: Direction,
    data: &[u8],
    to: SocketAddr,
    sock: &Arc<UdpSocket>,
    tx: &mpsc::UnboundedSender<Packet>,
) {
    let c = &sh.counters[dir as usize];
    if sh.partitioned.load(Ordering::Relaxed) {
        c.partition_drops.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let p = *sh.params[dir as usize].lock().expect("params lock");
    let now = Instant::now();
    let mut shaper = shaper.lock().expect("shaper lock");
    match shaper.admit(&p, data.len(), now) {
        Verdict::Lost => {
            c.lost.fetch_add(1, Ordering::Relaxed);
        }
        Verdict::QueueFull => {
            c.queue_drops.fetch_add(1, Ordering::Relaxed);
        }
        Verdict::Deliver(at) => {
            let mut data = data.to_vec();
            maybe_corrupt(&mut shaper, &p, &mut data, c);
            let _ = tx.send(Packet {
                at,
                data,
                to,
                sock: sock.clone(),
            });
        }
    }
}

async fn deliver(
    mut rx: mpsc::UnboundedReceiver<Packet>,
    sh: Arc<Shared>,
    dir: Direction,
    deadline: Instant,
) {
    let c = &sh.counters[dir as usize];
    let mut queue: VecDeque<Packet> = VecDeque::new();
    loop {
        if sh.stopped.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return;
        }
        // Send everything due.
        let now = Instant::now();
        while queue.front().is_some_and(|p| p.at <= now) {
            let p = queue.pop_front().expect("non-empty");
            if sh.partitioned.load(Ordering::Relaxed) {
                c.partition_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if p.sock.send_to(&p.data, p.to).await.is_ok() {
                c.packets.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(p.data.len() as u64, Ordering::Relaxed);
                c.max_packet
                    .fetch_max(p.data.len() as u64, Ordering::Relaxed);
            }
        }
        let next = queue.front().map(|p| p.at).unwrap_or(deadline);
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => {
                    if queue.len() < MAX_PENDING {
                        queue.push_back(p);
                    } else {
                        c.queue_drops.fetch_add(1, Ordering::Relaxed);
                    }
                    // Take whatever else is already waiting without sleeping.
                    while let Ok(p) = rx.try_recv() {
                        if queue.len() < MAX_PENDING {
                            queue.push_back(p);
                        }
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

fn grow_buffers(s: &UdpSocket) {
    let s = socket2::SockRef::from(s);
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shaper_applies_delay_rate_and_queue_limit() {
        let now = Instant::now();
        let mut s = Shaper::new(7);
        let p = LinkParams {
            delay: Duration::from_millis(25),
            rate_bps: Some(8_000_000), // 1 byte per microsecond
            queue_bytes: 3000,
            ..LinkParams::default()
        };
        assert_eq!(
            s.admit(&p, 1000, now),
            Verdict::Deliver(now + Duration::from_micros(1000) + Duration::from_millis(25))
        );
        assert_eq!(
            s.admit(&p, 1000, now),
            Verdict::Deliver(now + Duration::from_micros(2000) + Duration::from_millis(25))
        );
        assert!(matches!(s.admit(&p, 1000, now), Verdict::Deliver(_)));
        // 3000 bytes are queued: the next one is tail-dropped.
        assert_eq!(s.admit(&p, 1000, now), Verdict::QueueFull);
        // Once the queue drained, packets pass again.
        let later = now + Duration::from_millis(10);
        assert_eq!(
            s.admit(&p, 500, later),
            Verdict::Deliver(later + Duration::from_micros(500) + Duration::from_millis(25))
        );
    }

    #[test]
    fn shaper_loss_is_seeded_and_close_to_the_rate() {
        let now = Instant::now();
        let p = LinkParams {
            loss: 0.02,
            ..LinkParams::default()
        };
        let run = |seed| {
            let mut s = Shaper::new(seed);
            (0..100_000)
                .filter(|_| s.admit(&p, 100, now) == Verdict::Lost)
                .count()
        };
        let a = run(3);
        assert_eq!(a, run(3), "same seed, same losses");
        assert!((1700..2300).contains(&a), "{a}");
    }

    #[test]
    fn shaper_corruption_is_seeded_close_to_the_rate_and_inside_the_packet() {
        let p = LinkParams {
            corrupt: 0.05,
            ..LinkParams::default()
        };
        let run = |seed| {
            let mut s = Shaper::new(seed);
            (0..20_000)
                .filter_map(|i| s.corrupt_bit(&p, 1 + i % 1500).map(|b| (i, b)))
                .collect::<Vec<_>>()
        };
        let hits = run(5);
        assert_eq!(hits, run(5), "same seed, same corruption");
        assert!((800..1200).contains(&hits.len()), "{}", hits.len());
        for (i, bit) in &hits {
            assert!(*bit < (1 + i % 1500) * 8, "bit {bit} outside packet {i}");
        }
        // Flips land all over the packet, not in one place.
        let late = hits
            .iter()
            .filter(|(i, b)| *b >= (1 + i % 1500) * 4)
            .count();
        assert!(late * 3 > hits.len(), "{late} of {}", hits.len());
    }

    #[test]
    fn corruption_flips_exactly_one_bit_and_is_counted() {
        let p = LinkParams {
            corrupt: 1.0,
            ..LinkParams::default()
        };
        let mut s = Shaper::new(11);
        let c = DirCounters::default();
        let clean = vec![0xA5u8; 1200];
        for _ in 0..100 {
            let mut d = clean.clone();
            maybe_corrupt(&mut s, &p, &mut d, &c);
            let flipped: u32 = d
                .iter()
                .zip(&clean)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flipped, 1);
        }
        assert_eq!(c.read().corrupted, 100);
        // No corruption configured: the packet and the loss sequence are untouched.
        let off = LinkParams::default();
        let mut d = clean.clone();
        maybe_corrupt(&mut s, &off, &mut d, &c);
        assert_eq!(d, clean);
        let (mut a, mut b) = (Shaper::new(3), Shaper::new(3));
        let lossy = LinkParams {
            loss: 0.3,
            ..LinkParams::default()
        };
        let now = Instant::now();
        for _ in 0..1000 {
            let _ = b.corrupt_bit(&off, 1000);
            assert_eq!(a.admit(&lossy, 100, now), b.admit(&lossy, 100, now));
        }
    }

    #[test]
    fn jitter_never_reorders() {
        let now = Instant::now();
        let mut s = Shaper::new(9);
        let p = LinkParams {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            ..LinkParams::default()
        };
        let mut last = now;
        let mut spread = (Duration::MAX, Duration::ZERO);
        for i in 0..1000u64 {
            let t = now + Duration::from_micros(i * 100);
            let Verdict::Deliver(at) = s.admit(&p, 100, t) else {
                panic!()
            };
            assert!(at >= last);
            assert!(at - t <= Duration::from_millis(31));
            spread = (spread.0.min(at - t), spread.1.max(at - t));
            last = at;
        }
        assert!(spread.1 > Duration::from_millis(25));
    }
}
