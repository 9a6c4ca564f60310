//! Deterministic tests of [`LossTolerantCore`]: direct event sequences, and
//! a packet-level simulated link (simulated time in 100 µs steps, seeded
//! random loss, a FIFO bottleneck with a tail-drop queue, a sender paced as
//! quinn paces: 1.25 x window / smoothed RTT).

use std::collections::{BTreeMap, VecDeque};

use super::*;

const MS: Duration = Duration::from_millis(1);
const MTU: u64 = 1200;

fn core() -> LossTolerantCore {
    LossTolerantCore::new(Arc::new(LossTolerantConfig::default()), MTU as u16)
}

/// What the sender has to send.
#[derive(Clone, Copy)]
enum Load {
    /// Always something (goodput).
    Saturate,
    /// `bytes` every `every` (commit latency).
    Epochs { bytes: u64, every: Duration },
}

struct Sim {
    t0: Instant,
    now: Instant,
    cc: LossTolerantCore,
    // link
    rate: f64,
    one_way: Duration,
    queue_cap: u64,
    loss: f64,
    rng: u64,
    queue: VecDeque<u64>,
    credit: f64,
    acks: VecDeque<(Instant, u64)>,
    // sender
    load: Load,
    backlog: u64,
    next_epoch: Instant,
    /// (push time, last packet number of the epoch, time its last packet left)
    epochs: Vec<(Instant, u64, Option<Instant>)>,
    next_pn: u64,
    outstanding: BTreeMap<u64, Instant>,
    in_flight: u64,
    largest_acked: Option<u64>,
    srtt: Option<Duration>,
    min_rtt: Duration,
    tokens: f64,
    // counters
    delivered: u64,
    sent: u64,
    random_drops: u64,
    queue_drops: u64,
    max_queue: u64,
}

impl Sim {
    fn new(rate: f64, rtt: Duration, queue_cap: u64, loss: f64, load: Load) -> Self {
        let t0 = Instant::now();
        Self {
            t0,
            now: t0,
            cc: core(),
            rate,
            one_way: rtt / 2,
            queue_cap,
            loss,
            rng: 0x9E37_79B9_7F4A_7C15,
            queue: VecDeque::new(),
            credit: 0.0,
            acks: VecDeque::new(),
            load,
            backlog: 0,
            next_epoch: t0,
            epochs: Vec::new(),
            next_pn: 1,
            outstanding: BTreeMap::new(),
            in_flight: 0,
            largest_acked: None,
            srtt: None,
            min_rtt: Duration::MAX,
            tokens: 0.0,
            delivered: 0,
            sent: 0,
            random_drops: 0,
            queue_drops: 0,
            max_queue: 0,
        }
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Runs until `until` (since the start) in 100 µs steps.
    fn run_until(&mut self, until: Duration) {
        let dt = Duration::from_micros(100);
        while self.elapsed() < until {
            self.now += dt;
            self.acks_in();
            self.serve(dt);
            self.send(dt);
        }
    }

    fn acks_in(&mut self) {
        let mut any = false;
        while self.acks.front().is_some_and(|&(at, _)| at <= self.now) {
            let Some((_, pn)) = self.acks.pop_front() else {
                break;
            };
            let Some(sent) = self.outstanding.remove(&pn) else {
                continue;
            };
            any = true;
            self.in_flight -= MTU;
            let sample = self.now - sent;
            self.min_rtt = self.min_rtt.min(sample);
            self.srtt = Some(self.srtt.map_or(sample, |s| (s * 7 + sample) / 8));
            self.largest_acked = Some(self.largest_acked.map_or(pn, |l| l.max(pn)));
            let app_limited = matches!(self.load, Load::Epochs { .. }) && self.backlog == 0;
            self.cc.on_ack(self.now, MTU, app_limited, self.min_rtt);
        }
        if !any {
            return;
        }
        // Packet-threshold loss detection (3 packets), as QUIC's.
        let largest = self.largest_acked.unwrap_or(0);
        let lost: Vec<(u64, Instant)> = self
            .outstanding
            .range(..largest.saturating_sub(2))
            .map(|(&pn, &t)| (pn, t))
            .collect();
        if let Some(&(_, newest)) = lost.last() {
            for (pn, _) in &lost {
                self.outstanding.remove(pn);
            }
            self.in_flight -= MTU * lost.len() as u64;
            self.cc
                .on_congestion_event(newest, false, MTU * lost.len() as u64);
        }
        self.cc
            .on_end_acks(self.now, self.in_flight, self.largest_acked);
    }

    fn serve(&mut self, dt: Duration) {
        self.credit += self.rate * dt.as_secs_f64();
        while self.credit >= MTU as f64 {
            let Some(pn) = self.queue.pop_front() else {
                break;
            };
            self.credit -= MTU as f64;
            self.delivered += MTU;
            self.acks.push_back((self.now + 2 * self.one_way, pn));
        }
        if self.queue.is_empty() {
            self.credit = self.credit.min(MTU as f64);
        }
    }

    fn send(&mut self, dt: Duration) {
        if let Load::Epochs { bytes, every } = self.load {
            if self.now >= self.next_epoch {
                self.backlog += bytes;
                let last = self.next_pn + (self.backlog.div_ceil(MTU)) - 1;
                self.epochs.push((self.now, last, None));
                self.next_epoch += every;
            }
        }
        let w = self.cc.window();
        let srtt = self.srtt.unwrap_or(Duration::from_millis(100));
        let pace = 1.25 * w as f64 / srtt.as_secs_f64();
        let burst =
            (w as f64 * 0.002 / srtt.as_secs_f64()).clamp(10.0 * MTU as f64, 256.0 * MTU as f64);
        self.tokens = (self.tokens + pace * dt.as_secs_f64()).min(burst);
        while self.tokens >= MTU as f64 && self.in_flight + MTU < w {
            if let Load::Epochs { .. } = self.load {
                if self.backlog == 0 {
                    break;
                }
                self.backlog = self.backlog.saturating_sub(MTU);
            }
            self.tokens -= MTU as f64;
            let pn = self.next_pn;
            self.next_pn += 1;
            self.sent += 1;
            self.cc.on_sent(pn);
            self.outstanding.insert(pn, self.now);
            self.in_flight += MTU;
            for e in &mut self.epochs {
                if e.1 == pn {
                    e.2 = Some(self.now);
                }
            }
            if self.random() < self.loss {
                self.random_drops += 1;
            } else if (self.queue.len() as u64 + 1) * MTU > self.queue_cap {
                self.queue_drops += 1;
            } else {
                self.queue.push_back(pn);
                self.max_queue = self.max_queue.max(self.queue.len() as u64 * MTU);
            }
        }
    }
}

/// 200 Mbit/s.
const RATE: f64 = 25_000_000.0;

#[test]
fn random_loss_below_the_threshold_leaves_a_saturated_link_full_and_its_queue_unfilled() {
    let rtt = 50 * MS;
    let bdp = (RATE * rtt.as_secs_f64()) as u64;
    let mut s = Sim::new(RATE, rtt, bdp, 0.005, Load::Saturate);
    s.run_until(Duration::from_secs(2));
    assert_eq!(s.cc.phase(), Phase::Cruise);
    let (d0, q0, c0) = (s.delivered, s.queue_drops, s.cc.stats().congested_rounds);
    s.max_queue = 0;
    s.run_until(Duration::from_secs(6));
    let goodput = (s.delivered - d0) as f64 / 4.0;
    assert!(goodput > 0.95 * RATE, "{goodput} of {RATE}");
    // No tail drop and no cut once the model is running; the random losses
    // (~0.5 % of ~80,000 packets) were all tolerated.
    assert_eq!(s.queue_drops, q0, "tail drops in cruise");
    assert_eq!(s.cc.stats().congested_rounds, c0, "{:?}", s.cc.stats());
    assert!(s.cc.stats().tolerated_rounds > 40, "{:?}", s.cc.stats());
    assert!(s.random_drops > 300);
    // At most the cruise gain's half BDP queues.
    assert!(
        s.max_queue <= bdp * 6 / 10,
        "queue {} vs BDP {bdp}",
        s.max_queue
    );
    let w = s.cc.window() as f64;
    assert!(w > 1.3 * bdp as f64 && w < 1.8 * bdp as f64, "{w} vs {bdp}");
}

#[test]
fn heavy_random_loss_above_the_threshold_still_keeps_most_of_the_link() {
    // 5 % random loss reads as congestion every round: the window is cut
    // and grows back; the link must not collapse as a loss-based
    // controller's would (Mathis: ~5 packets per RTT here).
    let rtt = 50 * MS;
    let bdp = (RATE * rtt.as_secs_f64()) as u64;
    let mut s = Sim::new(RATE, rtt, bdp, 0.05, Load::Saturate);
    s.run_until(Duration::from_secs(2));
    let d0 = s.delivered;
    s.run_until(Duration::from_secs(6));
    let goodput = (s.delivered - d0) as f64 / 4.0;
    assert!(goodput > 0.5 * RATE, "{goodput} of {RATE}");
    assert!(s.cc.stats().congested_rounds > 0);
}

#[test]
fn two_percent_random_loss_on_a_long_path_is_not_congestion() {
    // 100 ms, 2 % random loss: rounds are small while the window grows
    // (a few hundred packets), and 2 % of them is often more than 3 % of
    // one round; only a loss well above 3 % counts. (Before the
    // significance test this locked in at 17-27 % of the link.)
    let rtt = 100 * MS;
    let bdp = (RATE * rtt.as_secs_f64()) as u64;
    let mut s = Sim::new(RATE, rtt, bdp, 0.02, Load::Saturate);
    s.run_until(Duration::from_secs(3));
    let (d0, c0) = (s.delivered, s.cc.stats().congested_rounds);
    s.run_until(Duration::from_secs(7));
    let goodput = (s.delivered - d0) as f64 / 4.0;
    assert!(goodput > 0.9 * RATE, "{goodput}, {:?}", s.cc.stats());
    // (At most the start-up overshoot was congestion.)
    assert!(c0 <= 1, "{:?}", s.cc.stats());
    assert_eq!(s.cc.stats().congested_rounds, c0, "{:?}", s.cc.stats());
    assert!(s.cc.stats().tolerated_rounds > 30, "{:?}", s.cc.stats());
}

#[test]
fn a_slower_path_brings_the_window_down_to_the_new_bottleneck() {
    let rtt = 50 * MS;
    let bdp = (RATE * rtt.as_secs_f64()) as u64;
    let mut s = Sim::new(RATE, rtt, bdp, 0.0, Load::Saturate);
    s.run_until(Duration::from_secs(3));
    let before = s.cc.window();
    // A competing flow takes half of the bottleneck.
    s.rate = RATE / 2.0;
    s.run_until(Duration::from_secs(5));
    let (d0, q0) = (s.delivered, s.queue_drops);
    s.run_until(Duration::from_secs(7));
    let after = s.cc.window();
    assert!(
        after as f64 <= 0.6 * before as f64,
        "window {before} -> {after}"
    );
    let goodput = (s.delivered - d0) as f64 / 2.0;
    assert!(goodput > 0.9 * RATE / 2.0, "{goodput}");
    assert_eq!(s.queue_drops, q0, "tail drops after adapting");
}

#[test]
fn a_shallow_queue_that_overflows_is_congestion() {
    // A queue of a quarter of a BDP: the cruise window (1.5 BDP)
    // overflows it, whole rounds lose more than 3 %, and the window is cut
    // (to no less than 1.25 BDP, which this queue holds).
    let rtt = 50 * MS;
    let bdp = (RATE * rtt.as_secs_f64()) as u64;
    let mut s = Sim::new(RATE, rtt, bdp / 4, 0.0, Load::Saturate);
    s.run_until(Duration::from_secs(2));
    let (d0, sent0, q0) = (s.delivered, s.sent, s.queue_drops);
    s.run_until(Duration::from_secs(8));
    assert!(s.cc.stats().congested_rounds > 3, "{:?}", s.cc.stats());
    // The limit of the design, measured: overflow below 3 % of a round is
    // tolerated like random loss, so a queue this shallow runs at a few
    // percent of tail drops (4.8 % here) with the link full.
    let drops = (s.queue_drops - q0) as f64 / (s.sent - sent0) as f64;
    assert!(drops < 0.06, "tail drops {drops}");
    let goodput = (s.delivered - d0) as f64 / 6.0;
    assert!(goodput > 0.95 * RATE, "{goodput}");
}

#[test]
fn epochs_after_a_random_loss_still_leave_at_the_link_rate() {
    // One 1 MiB epoch every 100 ms at 0.5 % loss: nearly every epoch
    // loses a packet. Each must still leave the sender within its
    // serialisation time at the link rate (42 ms) plus a little: no
    // recovery window shrinks the next one.
    let rtt = 50 * MS;
    let bdp = (RATE * rtt.as_secs_f64()) as u64;
    let load = Load::Epochs {
        bytes: 1 << 20,
        every: 100 * MS,
    };
    let mut s = Sim::new(RATE, rtt, bdp, 0.005, load);
    s.run_until(Duration::from_secs(12));
    let serialisation = Duration::from_secs_f64((1u64 << 20) as f64 / RATE);
    let late: Vec<Duration> = s
        .epochs
        .iter()
        .skip(20) // the first two seconds find the window
        .filter_map(|&(push, _, done)| done.map(|d| d - push))
        .filter(|&d| d > serialisation + 5 * MS)
        .collect();
    assert!(s.random_drops > 300, "{}", s.random_drops);
    assert!(s.epochs.len() >= 115);
    assert!(
        late.is_empty(),
        "epochs sent slower than the link: {late:?}"
    );
    assert_eq!(s.queue_drops, 0);
}

#[test]
fn a_round_below_the_threshold_changes_nothing_above_it_cuts_once() {
    let mut c = core();
    let t0 = Instant::now();
    let mut t = t0;
    let mut pn = 10_000;
    // Cruise at 25 MB/s, 50 ms: 1.5 BDP = 1.875 MB.
    let mut round = |c: &mut LossTolerantCore, t: &mut Instant, lost: u64| {
        let sent_at = *t;
        for _ in 0..50 {
            *t += MS;
            pn += 20;
            c.on_sent(pn);
            c.on_ack(*t, 25_000, false, 50 * MS);
            c.on_end_acks(*t, 1_500_000, Some(pn - 1000));
        }
        if lost > 0 {
            c.on_congestion_event(sent_at + MS, false, lost);
        }
        // The round ends with the next acknowledgement.
        pn += 1;
        c.on_sent(pn);
        *t += MS;
        c.on_ack(*t, 1200, false, 50 * MS);
        c.on_end_acks(*t, 1_500_000, Some(pn));
    };
    for _ in 0..10 {
        round(&mut c, &mut t, 0);
    }
    assert_eq!(c.phase(), Phase::Cruise);
    let w = c.window();
    assert!(w > 1_800_000 && w < 1_950_000, "{w}");
    // 1 % of a round's 1.25 MB lost: tolerated, window unchanged.
    round(&mut c, &mut t, 12_500);
    assert_eq!(c.window(), w);
    assert_eq!(c.stats().tolerated_rounds, 1);
    assert_eq!(c.inflight_cap(), None);
    // 10 %: congested; the cap is 0.85 x the most in flight that round.
    round(&mut c, &mut t, 125_000);
    assert_eq!(c.stats().congested_rounds, 1);
    // (0.85 x 1.525 MB = 1.30 MB is below the floor of 1.25 measured BDPs,
    // 1.5625 MB: the cap is the floor.)
    let cap = c.inflight_cap().expect("a cap");
    assert!((1_550_000..1_580_000).contains(&cap), "{cap}");
    assert_eq!(c.window(), cap);
    // Losses of packets sent before the cut do not cut again ...
    let before_cut = t - 10 * MS;
    c.on_congestion_event(before_cut, false, 500_000);
    round(&mut c, &mut t, 0);
    assert_eq!(c.stats().congested_rounds, 1);
    // ... the cap holds for eight rounds, then grows back by an eighth per
    // clean round until the model's window is reached.
    for _ in 0..7 {
        round(&mut c, &mut t, 0);
    }
    assert_eq!(c.inflight_cap(), Some(cap));
    round(&mut c, &mut t, 0);
    assert!(c.inflight_cap().expect("still capped") > cap);
    for _ in 0..10 {
        round(&mut c, &mut t, 0);
    }
    assert_eq!(c.inflight_cap(), None);
    assert_eq!(c.window(), w);
}

#[test]
fn one_loss_in_a_small_round_is_not_congestion_and_persistent_congestion_restarts() {
    let mut c = core();
    let mut t = Instant::now();
    for pn in 1..=10 {
        c.on_sent(pn);
    }
    t += 50 * MS;
    c.on_ack(t, 9 * 1200, false, 50 * MS);
    c.on_congestion_event(t - 50 * MS, false, 1200);
    c.on_end_acks(t, 0, Some(10));
    assert_eq!(c.stats().congested_rounds, 0);
    assert_eq!(c.stats().tolerated_rounds, 1);
    assert_eq!(c.window(), LossTolerantConfig::default().initial_window);
    c.on_congestion_event(t, true, 1200);
    assert_eq!(c.window(), 4 * 1200);
    assert_eq!(c.phase(), Phase::Startup);
    assert_eq!(c.stats().persistent, 1);
    // Start-up grows by what is acknowledged while the window is in use.
    c.on_sent(11);
    t += 50 * MS;
    c.on_ack(t, 4 * 1200, false, 50 * MS);
    c.on_end_acks(t, 0, Some(11));
    assert_eq!(c.window(), 8 * 1200);
}

#[test]
fn the_quinn_adapter_builds_and_clones() {
    let cfg = Arc::new(LossTolerantConfig::default());
    let c = cfg.build(Instant::now(), 1200);
    assert_eq!(c.window(), 200 * 1200);
    assert_eq!(c.initial_window(), 200 * 1200);
    let copy = c.clone_box();
    assert_eq!(copy.window(), c.window());
    assert!(c.into_any().downcast::<LossTolerant>().is_ok());
}

#[test]
fn a_short_path_with_a_small_queue_stays_full_without_overflowing() {
    // 1 ms RTT, the benchmark's smallest queue (256 KiB): the window is
    // computed from at least 5 ms (1.5 x 25 MB/s x 5 ms = 188 KB), which
    // the queue holds.
    let mut s = Sim::new(RATE, MS, 256 << 10, 0.0, Load::Saturate);
    s.run_until(Duration::from_secs(1));
    let (d0, q0) = (s.delivered, s.queue_drops);
    s.run_until(Duration::from_secs(3));
    let goodput = (s.delivered - d0) as f64 / 2.0;
    assert!(goodput > 0.95 * RATE, "{goodput}");
    assert_eq!(s.queue_drops, q0, "tail drops in cruise");
    assert_eq!(s.cc.phase(), Phase::Cruise);
}
