//! A simulated three-party network for the failover state machines:
//! simulated time, per-party clocks that drift, per-link delays, in-order
//! delivery per connection, partitions and crashes. Deterministic per seed.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use failover::{
    Event, LeaseRecord, Message, Output, Site, SiteId, Stance, Timers, Witness, WitnessOutput,
};

pub const A: SiteId = SiteId(1);
pub const B: SiteId = SiteId(2);
pub const W: SiteId = SiteId(3);
pub const VM: &str = "web1";

/// The witness's configuration: the VM's two sites.
pub fn parties() -> [(String, [SiteId; 2]); 1] {
    [(VM.to_owned(), [A, B])]
}

/// What the witness's disk does with one write of a lease record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// The record is durable and the witness is told so.
    Works,
    /// The write fails before the file changes: the old record stays.
    Fails,
    /// The record reaches the file, yet the witness is told the write
    /// failed (the folder's fsync failed after the rename).
    LandsButFails,
}

/// splitmix64: small, fast, good enough to pick schedules.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

enum Node {
    Site(Box<Site>),
    Witness(Witness),
    Down,
}

#[derive(Debug, Clone)]
enum Ev {
    Deliver {
        from: SiteId,
        to: SiteId,
        msg: Message,
        generation: u64,
    },
    Wake {
        node: SiteId,
    },
    ResyncDone {
        node: SiteId,
        generation: u64,
    },
    FinalEpochCommitted {
        node: SiteId,
    },
    /// A write of the witness's lease record completes.
    WitnessWriteDone {
        id: usize,
    },
}

/// A write of the witness's lease record under way.
#[derive(Debug, Clone)]
struct WitnessWrite {
    incarnation: u64,
    vm: String,
    record: LeaseRecord,
    outcome: Disk,
}

/// How a crashed site's process comes back. Both are what a real engine
/// does when it starts a new standby at the site the VM left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comeback {
    /// [`Site::restarted`] with the token the engine persisted.
    Restarted,
    /// A fresh [`Site::backup`]: a new standby process that knows no token
    /// and learns the current one from its peer.
    FreshBackup,
}

/// The other site of the VM.
pub fn peer_of(p: SiteId) -> SiteId {
    if p == A {
        B
    } else {
        A
    }
}

/// A record of what happened, for assertions and for printing a failing
/// schedule.
#[derive(Debug, Clone)]
pub struct Happened {
    pub at: Duration,
    pub node: SiteId,
    pub event: Event,
}

pub struct World {
    pub timers: Timers,
    pub now: Duration,
    t0: Instant,
    rng: Rng,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    events: Vec<Option<Ev>>,
    seq: u64,
    nodes: BTreeMap<SiteId, Node>,
    /// Clock rate of each party in parts per million off true time.
    drift_ppm: BTreeMap<SiteId, i64>,
    next_wake: BTreeMap<SiteId, Duration>,
    /// Link state per unordered pair: up, generation (bumped on each cut).
    links: BTreeMap<(SiteId, SiteId), (bool, u64)>,
    /// Last delivery time per directed link, for in-order delivery.
    last_delivery: BTreeMap<(SiteId, SiteId), Duration>,
    pub max_delay: Duration,
    pub min_delay: Duration,
    /// Persisted state: each site's highest token, the witness's records.
    persisted_token: BTreeMap<SiteId, u64>,
    witness_records: BTreeMap<String, failover::LeaseRecord>,
    pub resync_time: Duration,
    resyncing: BTreeMap<SiteId, bool>,
    pub log: Vec<Happened>,
    pub trace: Vec<String>,
    pub highest_promoted_token: u64,
    /// What the witness's disk does with writes, once `witness_writes`
    /// (a script of outcomes, one per write) is used up.
    pub witness_disk: Disk,
    witness_writes: VecDeque<Disk>,
    /// How long a write of the witness's record takes (zero: done within
    /// the step that asked for it).
    pub witness_write_latency: Duration,
    writes_in_flight: Vec<Option<WitnessWrite>>,
    /// Bumped when the witness crashes: its writes in flight end with it.
    witness_incarnation: u64,
    /// The witness's state file is gone: a restarted witness refuses to
    /// run until [`World::reinit_witness`] (the operator's act).
    witness_file_lost: bool,
    /// Writes of the witness's record reported failed.
    pub witness_write_failures: u64,
    /// Each token the witness ever put in a grant, and to whom.
    pub granted_tokens: BTreeMap<u64, SiteId>,
    /// Broken safety properties found inside a step.
    violations: Vec<String>,
}

fn key(a: SiteId, b: SiteId) -> (SiteId, SiteId) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

impl World {
    pub fn new(seed: u64, timers: Timers) -> Self {
        let mut rng = Rng::new(seed);
        let t0 = Instant::now();
        let mut drift_ppm = BTreeMap::new();
        for p in [A, B, W] {
            // +-0.5 %: far worse than any real oscillator, still inside the
            // clock margin over one lease.
            drift_ppm.insert(p, rng.below(10_001) as i64 - 5_000);
        }
        let mut w = Self {
            timers,
            now: Duration::ZERO,
            t0,
            rng,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            nodes: BTreeMap::new(),
            drift_ppm,
            next_wake: BTreeMap::new(),
            links: BTreeMap::new(),
            last_delivery: BTreeMap::new(),
            max_delay: Duration::from_millis(60),
            min_delay: Duration::from_millis(1),
            persisted_token: BTreeMap::new(),
            witness_records: BTreeMap::new(),
            resync_time: Duration::from_millis(1500),
            resyncing: BTreeMap::new(),
            log: Vec::new(),
            trace: Vec::new(),
            highest_promoted_token: 0,
            witness_disk: Disk::Works,
            witness_writes: VecDeque::new(),
            witness_write_latency: Duration::ZERO,
            writes_in_flight: Vec::new(),
            witness_incarnation: 0,
            witness_file_lost: false,
            witness_write_failures: 0,
            granted_tokens: BTreeMap::new(),
            violations: Vec::new(),
        };
        for pair in [key(A, B), key(A, W), key(B, W)] {
            w.links.insert(pair, (true, 0));
        }
        let a = Site::primary(A, B, W, timers, w.local(A));
        let b = Site::backup(B, A, W, timers, w.local(B));
        w.nodes.insert(A, Node::Site(Box::new(a)));
        w.nodes.insert(B, Node::Site(Box::new(b)));
        w.nodes
            .insert(W, Node::Witness(Witness::new(timers, parties())));
        w.drain(A);
        w.drain(B);
        w
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Party `p`'s clock at the current simulated time.
    pub fn local(&self, p: SiteId) -> Instant {
        self.local_at(p, self.now)
    }

    fn local_at(&self, p: SiteId, t: Duration) -> Instant {
        let ppm = self.drift_ppm[&p];
        let nanos = t.as_nanos() as i128;
        let skewed = nanos + nanos * ppm as i128 / 1_000_000;
        self.t0 + Duration::from_nanos(skewed.max(0) as u64)
    }

    /// Simulated time at which party `p`'s clock shows `local`.
    fn global_of(&self, p: SiteId, local: Instant) -> Duration {
        let ppm = self.drift_ppm[&p] as i128;
        let l = local.saturating_duration_since(self.t0).as_nanos() as i128;
        let g = l * 1_000_000 / (1_000_000 + ppm);
        // Round up so the party's clock has reached `local` when woken.
        Duration::from_nanos((g + 1).max(0) as u64)
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.events.push(Some(ev));
        let idx = self.events.len() - 1;
        self.queue.push(Reverse((at, self.seq, idx)));
    }

    pub fn site(&self, p: SiteId) -> Option<&Site> {
        match self.nodes.get(&p) {
            Some(Node::Site(s)) => Some(s),
            _ => None,
        }
    }

    pub fn site_mut(&mut self, p: SiteId) -> Option<&mut Site> {
        match self.nodes.get_mut(&p) {
            Some(Node::Site(s)) => Some(s),
            _ => None,
        }
    }

    pub fn releasing(&self, p: SiteId) -> bool {
        self.site(p)
            .is_some_and(|s| s.may_release_output(self.local(p)))
    }

    pub fn stance(&self, p: SiteId) -> Option<Stance> {
        self.site(p).map(|s| s.stance())
    }

    pub fn link_up(&self, a: SiteId, b: SiteId) -> bool {
        self.links[&key(a, b)].0
    }

    pub fn set_link(&mut self, a: SiteId, b: SiteId, up: bool) {
        let l = self.links.get_mut(&key(a, b)).expect("known pair");
        if l.0 && !up {
            l.1 += 1; // the connection dies with what it carried
        }
        l.0 = up;
        self.trace.push(format!(
            "{:?} link {}-{} {}",
            self.now,
            a.0,
            b.0,
            if up { "up" } else { "down" }
        ));
    }

    pub fn crash(&mut self, p: SiteId) {
        if p == W && !matches!(self.nodes.get(&W), Some(Node::Down)) {
            self.witness_incarnation += 1;
            // A write under way when the witness dies may or may not have
            // reached the file; nothing of it is decided after the crash.
            for slot in &mut self.writes_in_flight {
                if let Some(wr) = slot.take() {
                    if wr.outcome != Disk::Fails && self.rng.chance(50) {
                        self.witness_records.insert(wr.vm, wr.record);
                    }
                }
            }
        }
        self.nodes.insert(p, Node::Down);
        self.resyncing.remove(&p);
        // Every connection of the crashed party dies.
        for other in [A, B, W] {
            if other != p {
                let l = self.links.get_mut(&key(p, other)).expect("pair");
                l.1 += 1;
            }
        }
        self.trace.push(format!("{:?} crash {}", self.now, p.0));
    }

    pub fn restart(&mut self, p: SiteId) {
        self.restart_as(p, Comeback::Restarted);
    }

    /// Starts a new process at a crashed party; a site comes back the way
    /// `how` says (the witness recovers from its records, and refuses to
    /// run once they are lost: see [`World::lose_witness_file`]). The new
    /// site resynchronises from its peer as soon as it hears it active.
    pub fn restart_as(&mut self, p: SiteId, how: Comeback) {
        if !matches!(self.nodes.get(&p), Some(Node::Down)) {
            return;
        }
        let now = self.local(p);
        if p == W {
            if self.witness_file_lost {
                // What `remus-wan witness` does on a state directory
                // without its file: refuse to run.
                self.trace.push(format!(
                    "{:?} witness refuses to start: its state file is lost",
                    self.now
                ));
                return;
            }
            let records = self.witness_records.clone();
            self.nodes.insert(
                W,
                Node::Witness(Witness::recover(self.timers, parties(), 0, records, now)),
            );
        } else {
            let peer = peer_of(p);
            let s = match how {
                Comeback::Restarted => {
                    let token = self.persisted_token.get(&p).copied().unwrap_or(0);
                    Site::restarted(p, peer, W, self.timers, token, now)
                }
                Comeback::FreshBackup => Site::backup(p, peer, W, self.timers, now),
            };
            self.nodes.insert(p, Node::Site(Box::new(s)));
            self.drain(p);
        }
        self.trace
            .push(format!("{:?} restart {} as {how:?}", self.now, p.0));
    }

    /// The witness's state file is lost (its disk was replaced): from now
    /// on a restarted witness refuses to run, as the real one does.
    pub fn lose_witness_file(&mut self) {
        self.witness_records.clear();
        self.witness_file_lost = true;
        self.trace
            .push(format!("{:?} witness state file lost", self.now));
    }

    /// The operator re-initialises a crashed witness whose file was lost
    /// (`remus-wan witness --init`) and starts it: a new state whose
    /// tokens begin above `token_floor`.
    pub fn reinit_witness(&mut self, token_floor: u64) {
        if !matches!(self.nodes.get(&W), Some(Node::Down)) {
            return;
        }
        self.witness_file_lost = false;
        self.witness_records.clear();
        let now = self.local(W);
        self.nodes.insert(
            W,
            Node::Witness(Witness::recover(
                self.timers,
                parties(),
                token_floor,
                BTreeMap::new(),
                now,
            )),
        );
        self.trace.push(format!(
            "{:?} witness re-initialised, tokens above {token_floor}",
            self.now
        ));
    }

    /// The next writes of the witness's record end as `outcomes` says, in
    /// order; later ones as `witness_disk` says.
    pub fn script_witness_writes(&mut self, outcomes: impl IntoIterator<Item = Disk>) {
        self.witness_writes.extend(outcomes);
    }

    /// The lease records in the witness's file.
    pub fn witness_file(&self) -> Option<LeaseRecord> {
        if self.witness_file_lost {
            return None;
        }
        self.witness_records.get(VM).copied()
    }

    /// The witness's current lease record for the VM (None while it is
    /// down or before anyone asked).
    pub fn lease_record(&self) -> Option<LeaseRecord> {
        match self.nodes.get(&W) {
            Some(Node::Witness(w)) => w.record(VM),
            _ => None,
        }
    }

    /// A standby that may take the VM over: it holds a resynchronised
    /// replica and promises its peer.
    pub fn protects(&self, p: SiteId) -> bool {
        self.site(p)
            .is_some_and(|s| s.stance() == Stance::Standby && s.replica_ready())
    }

    pub fn start_switchover(&mut self, p: SiteId, final_epoch_after: Duration) -> bool {
        let started = self.site_mut(p).is_some_and(|s| s.start_switchover());
        if started {
            let at = self.now + final_epoch_after;
            self.push(at, Ev::FinalEpochCommitted { node: p });
            self.trace
                .push(format!("{:?} switchover from {}", self.now, p.0));
        }
        started
    }

    /// Runs until simulated time `until`, checking safety after every step.
    pub fn run_until(&mut self, until: Duration) -> Result<(), String> {
        self.run_checked(until, |_| Ok(()))
    }

    /// Like [`World::run_until`], and also checks `check` after every
    /// step: properties that must hold continuously (a site keeps
    /// releasing output) are checked at every change, not only at samples.
    pub fn run_checked(
        &mut self,
        until: Duration,
        mut check: impl FnMut(&World) -> Result<(), String>,
    ) -> Result<(), String> {
        while let Some(Reverse((at, _, idx))) = self.queue.peek().cloned() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = self.now.max(at);
            let Some(ev) = self.events[idx].take() else {
                continue;
            };
            self.step(ev);
            self.check_safety()?;
            check(self)?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver {
                from,
                to,
                msg,
                generation,
            } => {
                let (up, gen_now) = self.links[&key(from, to)];
                if !up || gen_now != generation {
                    return;
                }
                let local = self.local(to);
                match self.nodes.get_mut(&to) {
                    Some(Node::Site(s)) => {
                        s.handle_message(from, msg, local);
                        self.drain(to);
                    }
                    Some(Node::Witness(w)) => {
                        let outs = w.handle(VM, from, msg, local);
                        self.witness_outputs(outs);
                    }
                    _ => {}
                }
            }
            Ev::Wake { node } => {
                if self.next_wake.get(&node) != Some(&self.now) {
                    return;
                }
                let local = self.local(node);
                if let Some(s) = self.site_mut(node) {
                    s.handle_timeout(local);
                    self.drain(node);
                }
            }
            Ev::ResyncDone { node, generation } => {
                self.resyncing.remove(&node);
                let peer = peer_of(node);
                let (up, g) = self.links[&key(node, peer)];
                let peer_active = self.stance(peer) == Some(Stance::Active);
                if up && g == generation && peer_active {
                    let local = self.local(node);
                    if let Some(s) = self.site_mut(node) {
                        s.set_replica_ready(true, local);
                        self.drain(node);
                    }
                }
            }
            Ev::FinalEpochCommitted { node } => {
                let local = self.local(node);
                if let Some(s) = self.site_mut(node) {
                    s.final_epoch_committed(local);
                    self.drain(node);
                }
            }
            Ev::WitnessWriteDone { id } => {
                if let Some(wr) = self.writes_in_flight.get_mut(id).and_then(Option::take) {
                    if wr.incarnation == self.witness_incarnation {
                        self.witness_write_done(wr);
                    }
                }
            }
        }
    }

    /// What the witness's shell does with its outputs: each record is
    /// written before anything that follows it is sent, and nothing that
    /// follows a failed write is sent.
    fn witness_outputs(&mut self, outs: Vec<WitnessOutput>) {
        for o in outs {
            match o {
                WitnessOutput::Persist { vm, record } => {
                    let outcome = self.witness_writes.pop_front().unwrap_or(self.witness_disk);
                    let wr = WitnessWrite {
                        incarnation: self.witness_incarnation,
                        vm,
                        record,
                        outcome,
                    };
                    if self.witness_write_latency.is_zero() {
                        if !self.witness_write_done(wr) {
                            return;
                        }
                    } else {
                        self.writes_in_flight.push(Some(wr));
                        let id = self.writes_in_flight.len() - 1;
                        let at = self.now + self.witness_write_latency;
                        self.push(at, Ev::WitnessWriteDone { id });
                        // Whatever follows waits for the write.
                        return;
                    }
                }
                WitnessOutput::Send { to: dest, msg } => {
                    self.witness_sends(dest, &msg);
                    self.send(W, dest, msg);
                }
            }
        }
    }

    /// A write of the witness's record ends; returns whether it was
    /// reported durable.
    fn witness_write_done(&mut self, wr: WitnessWrite) -> bool {
        if wr.outcome != Disk::Fails {
            self.witness_records.insert(wr.vm.clone(), wr.record);
        }
        let durable = wr.outcome == Disk::Works;
        if !durable {
            self.witness_write_failures += 1;
        }
        self.trace.push(format!(
            "{:?} witness write {:?} {:?}",
            self.now, wr.record, wr.outcome
        ));
        let local = self.local(W);
        let outs = match self.nodes.get_mut(&W) {
            Some(Node::Witness(w)) => w.persisted(&wr.vm, durable, local),
            _ => return false,
        };
        self.witness_outputs(outs);
        durable
    }

    /// Checks each grant the witness sends: a token goes to one site only,
    /// and a token granted for the first time is above every token granted
    /// before and every token any site knows (a site ignores a grant under
    /// an older token; it may know this very token already, from a refusal
    /// naming the holder the witness recovered).
    fn witness_sends(&mut self, dest: SiteId, msg: &Message) {
        let Message::LeaseReply {
            granted: Some(_),
            token,
            holder: Some(h),
            ..
        } = *msg
        else {
            return;
        };
        assert_eq!(h, dest, "a grant names its receiver");
        match self.granted_tokens.get(&token) {
            Some(&other) if other != dest => self.violations.push(format!(
                "token {token} granted to site {} and to site {}",
                other.0, dest.0
            )),
            Some(_) => {}
            None => {
                if let Some((&last, _)) = self.granted_tokens.last_key_value() {
                    if last > token {
                        self.violations.push(format!(
                            "new token {token} granted to site {} after token {last}",
                            dest.0
                        ));
                    }
                }
                for s in [A, B] {
                    let known = self.site(s).map_or(0, |s| s.token());
                    if known > token {
                        self.violations.push(format!(
                            "new token {token} granted to site {} while site {} knows token {known}",
                            dest.0, s.0
                        ));
                    }
                }
                self.granted_tokens.insert(token, dest);
                self.trace.push(format!(
                    "{:?} witness grants new token {token} to {}",
                    self.now, dest.0
                ));
            }
        }
    }

    fn send(&mut self, from: SiteId, to: SiteId, msg: Message) {
        let (up, generation) = self.links[&key(from, to)];
        if !up {
            return;
        }
        let delay = self.rng.ms(
            self.min_delay.as_millis() as u64,
            self.max_delay.as_millis() as u64,
        );
        let last = self
            .last_delivery
            .get(&(from, to))
            .copied()
            .unwrap_or_default();
        let at = (self.now + delay).max(last);
        self.last_delivery.insert((from, to), at);
        self.push(
            at,
            Ev::Deliver {
                from,
                to,
                msg,
                generation,
            },
        );
    }

    /// Carries out what a site asked for and schedules its next wake-up.
    fn drain(&mut self, p: SiteId) {
        let mut outs = Vec::new();
        let (token, wake) = {
            let Some(s) = self.site_mut(p) else { return };
            while let Some(o) = s.poll_output() {
                outs.push(o);
            }
            (s.token(), s.poll_timeout())
        };
        self.persisted_token.insert(p, token);
        for o in outs {
            match o {
                Output::Send { to, msg } => {
                    // Resync begins when an idle site hears an active peer.
                    if let Message::HeartbeatAck { .. } = msg {
                        self.maybe_resync(p);
                    }
                    self.send(p, to, msg)
                }
                Output::Event(e) => {
                    if let Event::Promote { token } = e {
                        assert!(
                            token > self.highest_promoted_token,
                            "token {token} promoted twice or out of order"
                        );
                        self.highest_promoted_token = token;
                    }
                    self.trace
                        .push(format!("{:?} site {} {:?}", self.now, p.0, e));
                    self.log.push(Happened {
                        at: self.now,
                        node: p,
                        event: e,
                    });
                }
            }
        }
        let at = self.global_of(p, wake).max(self.now);
        let at = if at == self.now {
            at + Duration::from_micros(1)
        } else {
            at
        };
        if self.next_wake.get(&p) != Some(&at) {
            self.next_wake.insert(p, at);
            self.push(at, Ev::Wake { node: p });
        }
    }

    fn maybe_resync(&mut self, p: SiteId) {
        let peer = peer_of(p);
        let needs = self
            .site(p)
            .is_some_and(|s| matches!(s.stance(), Stance::Idle | Stance::Standby));
        if needs
            && self.stance(peer) == Some(Stance::Active)
            && !self.resyncing.get(&p).copied().unwrap_or(false)
            && !self.replica_ready(p)
        {
            self.resyncing.insert(p, true);
            let generation = self.links[&key(p, peer)].1;
            let at = self.now + self.resync_time;
            self.push(
                at,
                Ev::ResyncDone {
                    node: p,
                    generation,
                },
            );
        }
    }

    fn replica_ready(&self, p: SiteId) -> bool {
        self.site(p).is_some_and(|s| s.replica_ready())
    }

    fn check_safety(&self) -> Result<(), String> {
        if let Some(v) = self.violations.first() {
            return Err(format!("{v} (at {:?})\n{}", self.now, self.trace_tail(40)));
        }
        if self.releasing(A) && self.releasing(B) {
            return Err(format!(
                "split brain at {:?}: both sites may release output\n{}",
                self.now,
                self.trace_tail(40)
            ));
        }
        Ok(())
    }

    pub fn trace_tail(&self, n: usize) -> String {
        let start = self.trace.len().saturating_sub(n);
        self.trace[start..].join("\n")
    }

    /// The events site `p` reported at or after `after`, in order.
    pub fn events_of(&self, p: SiteId, after: Duration) -> Vec<Event> {
        self.log
            .iter()
            .filter(|h| h.node == p && h.at >= after)
            .map(|h| h.event.clone())
            .collect()
    }

    pub fn promoted(&self, p: SiteId, after: Duration) -> Option<Duration> {
        self.log
            .iter()
            .find(|h| h.node == p && h.at >= after && matches!(h.event, Event::Promote { .. }))
            .map(|h| h.at)
    }
}
