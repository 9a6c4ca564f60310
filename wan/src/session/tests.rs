//! Sender + receiver driven together on a simulated link with a virtual
//! clock: every transition of the session, deterministically.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::wire::{self, ControlFrame, Decoder, Hello, Item};
use super::*;

const MS: Duration = Duration::from_millis(1);

/// A simulated link between one sender and one receiver.
struct Pair {
    s: Sender,
    r: Receiver,
    now: Instant,
    /// Whether new connections can be made.
    link_up: bool,
    /// Bytes in flight are silently dropped (a black hole, not a reset).
    black_hole: bool,
    connected: bool,
    delay: Duration,
    s_to_r: VecDeque<(Instant, Bytes)>,
    r_to_s: VecDeque<(Instant, Bytes)>,
    s_events: Vec<(Instant, SenderEvent)>,
    r_events: Vec<(Instant, ReceiverEvent)>,
    /// Epochs applied to the replica, in order.
    applied: Vec<(u64, EpochKind)>,
    /// Epochs delivered but not yet applied (when auto_commit is off).
    staged: VecDeque<u64>,
    auto_commit: bool,
    /// In flight, sampled after every step.
    max_seen_in_flight: usize,
}

fn scfg() -> SenderConfig {
    let mut c = SenderConfig::new("dc1", "web1");
    c.max_in_flight = 3;
    c.window_epochs = 16;
    c.heartbeat_interval = Duration::from_millis(500);
    c.peer_timeout = Duration::from_secs(3);
    c.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };
    c
}

fn rcfg() -> ReceiverConfig {
    let mut c = ReceiverConfig::new("dc2", "web1");
    c.max_epoch_size = 10_000;
    c.heartbeat_interval = Duration::from_millis(500);
    c.peer_timeout = Duration::from_secs(3);
    c
}

impl Pair {
    fn new(scfg: SenderConfig, rcfg: ReceiverConfig, receiver_committed: u64) -> Self {
        let now = Instant::now();
        Self {
            s: Sender::new(scfg, receiver_committed + 1, now),
            r: Receiver::new(rcfg, receiver_committed, now),
            now,
            link_up: true,
            black_hole: false,
            connected: false,
            delay: 10 * MS,
            s_to_r: VecDeque::new(),
            r_to_s: VecDeque::new(),
            s_events: Vec::new(),
            r_events: Vec::new(),
            applied: Vec::new(),
            staged: VecDeque::new(),
            auto_commit: true,
            max_seen_in_flight: 0,
        }
    }

    fn disconnect(&mut self, why: &str) {
        if self.connected {
            self.connected = false;
            self.s_to_r.clear();
            self.r_to_s.clear();
            self.s.handle_disconnected(self.now, why);
            self.r.handle_disconnected(self.now, why);
        }
    }

    /// Processes everything that is due now; returns whether anything happened.
    fn step(&mut self) -> bool {
        let mut progress = false;
        let now = self.now;
        while let Some(ev) = self.s.poll_event() {
            progress = true;
            match &ev {
                SenderEvent::Connect => {
                    if self.link_up {
                        self.connected = true;
                        self.r.handle_connected(now);
                        self.s.handle_connected(now);
                    } else {
                        self.s.handle_connect_failed(now, "link down");
                    }
                }
                SenderEvent::Close { error } if self.connected => {
                    if let Some(f) = error.error_frame().filter(|_| !self.black_hole) {
                        let _ = self.r.handle_input(&f, now);
                    }
                    self.connected = false;
                    self.s_to_r.clear();
                    self.r_to_s.clear();
                    self.r.handle_disconnected(now, "sender closed");
                }
                _ => {}
            }
            self.s_events.push((now, ev));
        }
        while let Some(ev) = self.r.poll_event() {
            progress = true;
            match &ev {
                ReceiverEvent::Epoch { epoch, .. } => {
                    self.staged.push_back(*epoch);
                }
                ReceiverEvent::Close { error } if self.connected => {
                    if let Some(f) = error.error_frame().filter(|_| !self.black_hole) {
                        self.s.handle_input(&f, now);
                    }
                    self.connected = false;
                    self.s_to_r.clear();
                    self.r_to_s.clear();
                    self.s.handle_disconnected(now, "receiver closed");
                }
                ReceiverEvent::Close { .. }
                | ReceiverEvent::Hello { .. }
                | ReceiverEvent::Verify(_)
                | ReceiverEvent::DiskSync(_) => {}
            }
            self.r_events.push((now, ev));
        }
        if self.auto_commit {
            while let Some(e) = self.staged.pop_front() {
                self.apply(e);
                progress = true;
            }
        }
        if self.connected {
            while let Some(b) = self.s.poll_transmit(now) {
                progress = true;
                self.s_to_r.push_back((now + self.delay, b));
            }
            while let Some(b) = self.r.poll_transmit(now) {
                progress = true;
                self.r_to_s.push_back((now + self.delay, b));
            }
            // A black hole holds bytes back (a reliable stream delivers
            // them late, or the connection dies of silence).
            while !self.black_hole && self.s_to_r.front().is_some_and(|(t, _)| *t <= now) {
                let (_, b) = self.s_to_r.pop_front().unwrap();
                let _ = self.r.handle_input(&b, now);
                progress = true;
            }
            while !self.black_hole && self.r_to_s.front().is_some_and(|(t, _)| *t <= now) {
                let (_, b) = self.r_to_s.pop_front().unwrap();
                self.s.handle_input(&b, now);
                progress = true;
            }
        }
        if self.s.poll_timeout().is_some_and(|t| t <= now) {
            self.s.handle_timeout(now);
            progress = true;
        }
        if self.r.poll_timeout().is_some_and(|t| t <= now) {
            self.r.handle_timeout(now);
            progress = true;
        }
        self.max_seen_in_flight = self.max_seen_in_flight.max(self.s.in_flight());
        progress
    }

    /// Applies the oldest staged epoch (the engine's job), checking the
    /// replica's invariant: a delta applies only on top of epoch - 1.
    fn apply(&mut self, epoch: u64) {
        let kind = self
            .r_events
            .iter()
            .rev()
            .find_map(|(_, e)| match e {
                ReceiverEvent::Epoch { epoch: n, kind, .. } if *n == epoch => Some(*kind),
                _ => None,
            })
            .unwrap_or(EpochKind::Delta);
        let base = self.r.committed();
        if kind == EpochKind::Delta {
            assert_eq!(epoch, base + 1, "delta {epoch} applied on top of {base}");
        } else {
            assert!(epoch > base, "full {epoch} older than replica {base}");
        }
        self.r.commit(epoch, self.now).expect("commit in order");
        self.applied.push((epoch, kind));
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.s.poll_timeout(),
            self.r.poll_timeout(),
            self.s_to_r
                .front()
                .map(|(t, _)| *t)
                .filter(|_| !self.black_hole),
            self.r_to_s
                .front()
                .map(|(t, _)| *t)
                .filter(|_| !self.black_hole),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the simulation for `d` of virtual time.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..1_000_000 {
            while self.step() {}
            match self.next_deadline() {
                Some(t) if t <= end => self.now = t.max(self.now),
                _ => {
                    self.now = end;
                    while self.step() {}
                    return;
                }
            }
        }
        panic!("simulation did not settle");
    }

    fn push(&mut self, kind: EpochKind, size: usize) -> Result<u64, PushError> {
        let n = self.s.next_epoch();
        let payload = Bytes::from(vec![(n % 251) as u8; size]);
        self.s.push_epoch(kind, payload, self.now)
    }

    fn applied_numbers(&self) -> Vec<u64> {
        self.applied.iter().map(|(e, _)| *e).collect()
    }

    fn sender_events<F: Fn(&SenderEvent) -> bool>(&self, f: F) -> Vec<(Instant, SenderEvent)> {
        self.s_events
            .iter()
            .filter(|(_, e)| f(e))
            .cloned()
            .collect()
    }
}

#[test]
fn hello_carries_site_vm_and_last_committed() {
    let mut p = Pair::new(scfg(), rcfg(), 41);
    p.run_for(100 * MS);
    assert!(p.s.is_connected());
    let c = p.sender_events(|e| matches!(e, SenderEvent::Connected { .. }));
    assert_eq!(
        c[0].1,
        SenderEvent::Connected {
            peer_site: "dc2".into(),
            receiver_committed: 41,
            resume_from: 42
        }
    );
    assert!(p.r_events.iter().any(|(_, e)| *e
        == ReceiverEvent::Hello {
            site: "dc1".into(),
            vm_id: "web1".into(),
            last_committed: 41
        }));
    assert_eq!(p.s.next_epoch(), 42);
}

#[test]
fn pipelines_up_to_max_in_flight_and_acks_carry_committed_epoch() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.delay = 50 * MS;
    p.run_for(200 * MS);
    p.push(EpochKind::Full, 100).unwrap();
    for _ in 0..9 {
        p.push(EpochKind::Delta, 100).unwrap();
    }
    p.step();
    assert_eq!(p.s.in_flight(), 3, "three epochs go out without waiting");
    p.run_for(2 * Duration::from_secs(1));
    assert_eq!(p.max_seen_in_flight, 3);
    assert_eq!(p.applied_numbers(), (1..=10).collect::<Vec<_>>());
    let commits: Vec<u64> = p
        .sender_events(|e| matches!(e, SenderEvent::Committed { .. }))
        .into_iter()
        .map(|(_, e)| match e {
            SenderEvent::Committed { epoch } => epoch,
            _ => unreachable!(),
        })
        .collect();
    assert!(commits.windows(2).all(|w| w[0] < w[1]), "{commits:?}");
    assert_eq!(*commits.last().unwrap(), 10);
    assert_eq!(p.s.committed(), 10);
    assert_eq!(p.s.window_len(), 0, "acked epochs are released");
}

#[test]
fn heartbeats_keep_an_idle_link_alive() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.run_for(Duration::from_secs(30));
    assert!(p.s.is_connected());
    assert!(p.r.is_streaming());
    assert_eq!(
        p.sender_events(|e| matches!(e, SenderEvent::Disconnected { .. }))
            .len(),
        0
    );
}

#[test]
fn peer_silence_times_out_both_ends() {
    // The sender notices first.
    let mut r = rcfg();
    r.peer_timeout = Duration::from_secs(10);
    let mut p = Pair::new(scfg(), r, 0);
    p.run_for(100 * MS);
    p.black_hole = true;
    let t0 = p.now;
    p.run_for(Duration::from_secs(4));
    let d = p.sender_events(|e| matches!(e, SenderEvent::Close { .. }));
    assert_eq!(d.len(), 1, "{:?}", p.s_events);
    assert_eq!(
        d[0].1,
        SenderEvent::Close {
            error: SessionError::PeerTimeout(Duration::from_secs(3))
        }
    );
    let waited = d[0].0 - t0;
    assert!(waited >= Duration::from_millis(2900) && waited <= Duration::from_millis(3100));
    assert!(!p.s.is_connected());

    // The receiver notices first.
    let mut s = scfg();
    s.peer_timeout = Duration::from_secs(10);
    let mut p = Pair::new(s, rcfg(), 0);
    p.run_for(100 * MS);
    p.black_hole = true;
    p.run_for(Duration::from_secs(4));
    assert!(p.r_events.iter().any(|(_, e)| *e
        == ReceiverEvent::Close {
            error: SessionError::PeerTimeout(Duration::from_secs(3))
        }));
    assert!(!p.r.is_streaming());
}

#[test]
fn reconnects_with_exponential_backoff() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.link_up = false;
    p.run_for(Duration::from_secs(10));
    let retries: Vec<Duration> = p
        .sender_events(|e| matches!(e, SenderEvent::Disconnected { .. }))
        .into_iter()
        .map(|(_, e)| match e {
            SenderEvent::Disconnected { retry_in, .. } => retry_in,
            _ => unreachable!(),
        })
        .collect();
    let ms: Vec<u128> = retries.iter().take(7).map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![100, 200, 400, 800, 1600, 2000, 2000]);
    // Connect attempts happen exactly when the backoff says.
    let connects: Vec<Instant> = p
        .sender_events(|e| matches!(e, SenderEvent::Connect))
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(connects[1] - connects[0], 100 * MS);
    assert_eq!(connects[2] - connects[1], 200 * MS);
    // When the link heals, the next attempt succeeds and the backoff resets.
    p.link_up = true;
    p.run_for(Duration::from_secs(3));
    assert!(p.s.is_connected());
    p.disconnect("cut");
    p.link_up = false;
    p.run_for(10 * MS);
    let last = p
        .sender_events(|e| matches!(e, SenderEvent::Disconnected { .. }))
        .pop()
        .unwrap();
    assert!(matches!(last.1, SenderEvent::Disconnected { retry_in, .. } if retry_in == 100 * MS));
}

#[test]
fn resumes_from_receiver_last_committed_without_duplicates_or_gaps() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.auto_commit = false;
    p.delay = 20 * MS;
    p.run_for(100 * MS);
    p.push(EpochKind::Full, 500).unwrap();
    for _ in 0..5 {
        p.push(EpochKind::Delta, 500).unwrap();
    }
    p.run_for(100 * MS);
    // The engine applies 1..=2; 3 is delivered but not applied yet.
    for _ in 0..2 {
        let e = p.staged.pop_front().unwrap();
        p.apply(e);
    }
    p.run_for(5 * MS);
    assert!(p.r.pending() >= 1);
    p.disconnect("cut mid-stream");
    // The engine finishes applying what it had fully staged (3) while the
    // link is down; partially received epochs were discarded.
    while let Some(e) = p.staged.pop_front() {
        p.apply(e);
    }
    let before = p.r.committed();
    assert_eq!(before, 3);
    p.auto_commit = true;
    p.run_for(Duration::from_secs(2));
    assert!(p.s.is_connected());
    let c = p.sender_events(|e| matches!(e, SenderEvent::Connected { .. }));
    assert_eq!(
        c.last().unwrap().1,
        SenderEvent::Connected {
            peer_site: "dc2".into(),
            receiver_committed: 3,
            resume_from: 4
        }
    );
    assert_eq!(p.applied_numbers(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(p.s.committed(), 6);
}

#[test]
fn hello_ack_waits_for_epochs_delivered_on_the_old_connection() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.auto_commit = false;
    p.run_for(100 * MS);
    p.push(EpochKind::Full, 100).unwrap();
    p.run_for(100 * MS);
    assert_eq!(p.staged.len(), 1);
    p.disconnect("cut after delivery, before commit");
    p.run_for(Duration::from_secs(1));
    // Reconnected, but HELLO_ACK is held back while epoch 1 is being applied.
    assert!(!p.s.is_connected());
    let e = p.staged.pop_front().unwrap();
    p.apply(e);
    p.auto_commit = true;
    p.run_for(100 * MS);
    assert!(p.s.is_connected());
    let c = p.sender_events(|e| matches!(e, SenderEvent::Connected { .. }));
    assert!(matches!(
        c.last().unwrap().1,
        SenderEvent::Connected {
            receiver_committed: 1,
            resume_from: 2,
            ..
        }
    ));
    assert_eq!(p.applied_numbers(), vec![1]);
}

#[test]
fn falls_back_to_full_resync_when_the_window_no_longer_holds_the_gap() {
    let mut cfg = scfg();
    cfg.window_epochs = 4;
    let mut p = Pair::new(cfg, rcfg(), 0);
    p.run_for(100 * MS);
    p.push(EpochKind::Full, 100).unwrap();
    p.push(EpochKind::Delta, 100).unwrap();
    p.push(EpochKind::Delta, 100).unwrap();
    p.run_for(200 * MS);
    assert_eq!(p.r.committed(), 3);
    p.disconnect("cut");
    p.link_up = false;
    for _ in 0..9 {
        p.push(EpochKind::Delta, 100).unwrap(); // 4..=12; only 9..=12 stay held
    }
    assert_eq!(p.s.window_len(), 4);
    p.run_for(Duration::from_secs(1));
    p.link_up = true;
    p.run_for(Duration::from_secs(3));
    let r = p.sender_events(|e| matches!(e, SenderEvent::ResyncRequired { .. }));
    assert_eq!(r.len(), 1);
    assert!(matches!(
        &r[0].1,
        SenderEvent::ResyncRequired {
            receiver_committed: 3,
            ..
        }
    ));
    assert!(p.s.resync_pending());
    assert_eq!(
        p.push(EpochKind::Delta, 100),
        Err(PushError::ResyncPending),
        "a delta cannot follow a gap"
    );
    let full = p.push(EpochKind::Full, 1000).unwrap();
    assert_eq!(full, 13);
    p.push(EpochKind::Delta, 100).unwrap();
    p.run_for(Duration::from_secs(1));
    assert_eq!(
        p.applied,
        vec![
            (1, EpochKind::Full),
            (2, EpochKind::Delta),
            (3, EpochKind::Delta),
            (13, EpochKind::Full),
            (14, EpochKind::Delta)
        ]
    );
    assert_eq!(p.s.committed(), 14);
}

#[test]
fn resumes_from_a_held_full_epoch_when_older_deltas_are_gone() {
    let mut cfg = scfg();
    cfg.window_epochs = 4;
    let mut p = Pair::new(cfg, rcfg(), 0);
    p.link_up = false;
    p.run_for(Duration::from_millis(50));
    // A fresh replica (committed 0): 1..=3 are evicted, full epoch 4 is held.
    for _ in 0..3 {
        p.push(EpochKind::Delta, 10).unwrap();
    }
    p.push(EpochKind::Full, 10).unwrap();
    for _ in 0..3 {
        p.push(EpochKind::Delta, 10).unwrap();
    }
    p.link_up = true;
    p.run_for(Duration::from_secs(1));
    assert!(p
        .sender_events(|e| matches!(e, SenderEvent::ResyncRequired { .. }))
        .is_empty());
    assert_eq!(p.applied_numbers(), vec![4, 5, 6, 7]);
}

#[test]
fn sender_restart_behind_receiver_asks_for_resync() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    // Replace the sender by one that starts over at epoch 1 while the
    // replica is at 20.
    p.r = Receiver::new(rcfg(), 20, p.now);
    p.run_for(100 * MS);
    assert!(p.s.resync_pending());
    assert_eq!(p.s.next_epoch(), 21);
    p.push(EpochKind::Full, 10).unwrap();
    p.run_for(100 * MS);
    assert_eq!(p.applied_numbers(), vec![21]);
}

#[test]
fn oversized_epoch_is_refused_by_the_sender_and_the_session_stays_healthy() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.run_for(100 * MS);
    assert_eq!(
        p.push(EpochKind::Full, 20_000),
        Err(PushError::EpochTooLarge {
            size: 20_000,
            limit: 10_000
        })
    );
    p.push(EpochKind::Full, 9_000).unwrap();
    p.run_for(100 * MS);
    assert_eq!(p.applied_numbers(), vec![1]);
    assert!(p.s.is_connected());
}

#[test]
fn receiver_refuses_an_oversized_epoch_with_a_typed_error() {
    let now = Instant::now();
    let mut r = Receiver::new(rcfg(), 7, now);
    r.handle_connected(now);
    let hello = ControlFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        site: "dc1".into(),
        vm_id: "web1".into(),
        next_epoch: 8,
    });
    r.handle_input(&hello.encode(), now).unwrap();
    let header = wire::encode_epoch_header(8, EpochKind::Delta, 50_000);
    let err = r.handle_input(&header, now).unwrap_err();
    assert_eq!(
        err,
        SessionError::EpochTooLarge {
            epoch: 8,
            size: 50_000,
            limit: 10_000
        }
    );
    let mut evs = Vec::new();
    while let Some(e) = r.poll_event() {
        evs.push(e);
    }
    assert!(evs.contains(&ReceiverEvent::Close { error: err.clone() }));
    // The ERROR frame the shell sends says why, with the epoch.
    let mut d = Decoder::new();
    d.push(&err.error_frame().unwrap());
    match d.next_item().unwrap() {
        Some(Item::Control(ControlFrame::Error(e))) => {
            assert_eq!(e.code, ErrorCode::EpochTooLarge);
            assert_eq!(e.epoch, 8);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.committed(), 7);
    // Further bytes on the dead connection are ignored, a new one works.
    assert!(r.handle_input(&[0u8; 100], now).is_ok());
    r.handle_connected(now);
    r.handle_input(&hello.encode(), now).unwrap();
    assert!(r.is_streaming());
}

#[test]
fn sender_learns_the_limit_late_and_fails_cleanly() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.link_up = false;
    p.run_for(10 * MS);
    p.push(EpochKind::Full, 50_000).unwrap(); // limit unknown yet
    p.link_up = true;
    p.run_for(Duration::from_secs(1));
    let f = p.sender_events(|e| matches!(e, SenderEvent::Failed { .. }));
    assert_eq!(f.len(), 1);
    assert!(matches!(
        f[0].1,
        SenderEvent::Failed {
            error: SessionError::EpochTooLarge { epoch: 1, .. }
        }
    ));
    assert!(matches!(
        p.push(EpochKind::Full, 10),
        Err(PushError::Failed(_))
    ));
    assert_eq!(p.r.committed(), 0);
}

#[test]
fn a_stalled_epoch_times_out_and_the_replica_keeps_its_epoch() {
    let now = Instant::now();
    let mut r = Receiver::new(rcfg(), 3, now);
    r.handle_connected(now);
    let hello = ControlFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        site: "dc1".into(),
        vm_id: "web1".into(),
        next_epoch: 4,
    });
    r.handle_input(&hello.encode(), now).unwrap();
    r.handle_input(&wire::encode_epoch_header(4, EpochKind::Delta, 1000), now)
        .unwrap();
    r.handle_input(&[1u8; 300], now).unwrap();
    let mut t = now;
    for _ in 0..100 {
        t = r.poll_timeout().unwrap();
        r.handle_timeout(t);
        while let Some(_hb) = r.poll_transmit(t) {}
        if !r.is_streaming() {
            break;
        }
    }
    assert_eq!(t - now, Duration::from_secs(3));
    let evs: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
    assert!(evs.contains(&ReceiverEvent::Close {
        error: SessionError::Stalled {
            epoch: 4,
            received: 300,
            len: 1000,
            after: Duration::from_secs(3)
        }
    }));
    assert_eq!(r.committed(), 3);
}

#[test]
fn rejected_epoch_leads_to_a_full_resync() {
    let mut p = Pair::new(scfg(), rcfg(), 0);
    p.auto_commit = false;
    p.run_for(100 * MS);
    p.push(EpochKind::Full, 10).unwrap();
    p.push(EpochKind::Delta, 10).unwrap();
    p.run_for(100 * MS);
    let e = p.staged.pop_front().unwrap();
    p.apply(e);
    let bad = p.staged.pop_front().unwrap();
    p.r.reject(bad, "checksum mismatch", p.now);
    p.auto_commit = true;
    p.run_for(Duration::from_secs(1));
    let r = p.sender_events(|e| matches!(e, SenderEvent::ResyncRequired { .. }));
    assert_eq!(r.len(), 1);
    p.push(EpochKind::Full, 10).unwrap();
    p.run_for(Duration::from_secs(1));
    assert_eq!(p.applied_numbers(), vec![1, 3]);
}

#[test]
fn wrong_vm_fails_the_session_without_retrying() {
    let mut p = Pair::new(scfg(), ReceiverConfig::new("dc2", "db7"), 0);
    p.run_for(Duration::from_secs(5));
    let f = p.sender_events(|e| matches!(e, SenderEvent::Failed { .. }));
    assert_eq!(f.len(), 1, "{:?}", p.s_events);
    assert_eq!(
        p.sender_events(|e| matches!(e, SenderEvent::Connect)).len(),
        1
    );
}

/// Random cuts, black holes and engine delays: the replica only ever moves
/// forward by one delta or to a newer full image, never applies an epoch
/// twice, and ends at the last epoch pushed.
#[test]
fn random_link_failures_never_apply_twice_or_skip() {
    for seed in 1..=300u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut cfg = scfg();
        cfg.window_epochs = 6;
        let mut p = Pair::new(cfg, rcfg(), 0);
        p.delay = Duration::from_millis(next() % 40);
        let mut need_full = true;
        for _round in 0..60 {
            match next() % 10 {
                0 => p.disconnect("random cut"),
                1 => p.link_up = !p.link_up,
                2 => p.black_hole = !p.black_hole,
                3 => p.auto_commit = !p.auto_commit,
                _ => {}
            }
            if p.s.resync_pending() {
                need_full = true;
            }
            let kind = if need_full {
                EpochKind::Full
            } else {
                EpochKind::Delta
            };
            if p.push(kind, (next() % 3000) as usize).is_ok() {
                need_full = false;
            }
            let ms = next() % 400;
            p.run_for(Duration::from_millis(ms));
        }
        p.link_up = true;
        p.black_hole = false;
        p.auto_commit = true;
        for _ in 0..3 {
            p.run_for(Duration::from_secs(10));
            if p.s.resync_pending() {
                p.push(EpochKind::Full, 10).unwrap();
            }
        }
        p.run_for(Duration::from_secs(10));
        let nums = p.applied_numbers();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: {nums:?}"
        );
        if p.r.committed() != p.s.next_epoch() - 1 {
            for e in p.r_events.iter().rev().take(12) {
                eprintln!("{:?}", e.1);
            }
            for e in p.s_events.iter().rev().take(12) {
                eprintln!("{:?}", e.1);
            }
            eprintln!(
                "{} | r={} {:?} connected={}",
                p.s.state_debug(),
                p.r.committed(),
                p.r.pending(),
                p.connected
            );
        }
        assert_eq!(
            p.r.committed(),
            p.s.next_epoch() - 1,
            "seed {seed}: everything pushed is committed in the end"
        );
        assert_eq!(p.s.committed(), p.r.committed());
    }
}

/// Verify hashes reach the receiver after the epoch they name and before
/// the next one, also when pushed before the epoch could be sent; the
/// answer comes back as an event; stale requests are refused.
#[test]
fn verify_hashes_follow_their_epoch_and_the_answer_comes_back() {
    use super::wire::{VerifyHashes, VerifyOutcome, VerifyRegion, VerifyResult};
    let mut p = Pair::new(scfg(), rcfg(), 0);
    let hashes = |id: u64, epoch: u64| VerifyHashes {
        id,
        epoch,
        region: VerifyRegion::Memory,
        unit: 4096,
        first: 0,
        hashes: vec![1, 2, 3],
    };
    // Before the link is up: held with the epoch.
    let e1 = p.push(EpochKind::Full, 10).unwrap();
    assert!(p.s.push_verify(hashes(1, e1), p.now));
    p.run_for(100 * MS);
    let e2 = p.push(EpochKind::Delta, 10).unwrap();
    // Not the newest epoch any more.
    assert!(!p.s.push_verify(hashes(9, e1), p.now));
    p.run_for(100 * MS);
    // After the epoch went out: straight onto the stream.
    assert!(p.s.push_verify(hashes(2, e2), p.now));
    let e3 = p.push(EpochKind::Delta, 10).unwrap();
    p.run_for(100 * MS);
    let order: Vec<String> = p
        .r_events
        .iter()
        .filter_map(|(_, e)| match e {
            ReceiverEvent::Epoch { epoch, .. } => Some(format!("E{epoch}")),
            ReceiverEvent::Verify(v) => Some(format!("V{}@{}", v.id, v.epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        vec![
            format!("E{e1}"),
            "V1@1".into(),
            format!("E{e2}"),
            "V2@2".into(),
            format!("E{e3}")
        ]
    );
    p.r.verify_result(
        VerifyResult {
            id: 2,
            epoch: e2,
            region: VerifyRegion::Memory,
            first: 0,
            count: 3,
            outcome: VerifyOutcome::Compared { differing: vec![1] },
        },
        p.now,
    );
    p.run_for(100 * MS);
    let got = p.sender_events(|e| matches!(e, SenderEvent::VerifyResult(_)));
    assert_eq!(got.len(), 1);
    assert!(
        matches!(&got[0].1, SenderEvent::VerifyResult(r) if r.id == 2 && r.outcome == VerifyOutcome::Compared { differing: vec![1] })
    );
}
