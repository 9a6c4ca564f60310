//! The etcd arbiter's rules on the in-memory etcd: single steps, then a
//! simulation of two sites' [`failover::Site`]s arbitrated through it under
//! random link cuts, delays, crashes and switchovers, checking after every
//! step that the two sites never both may release output and that tokens
//! only grow.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use failover::{Event, Message, Output, Site, SiteId, Stance, Timers};
use proptest::prelude::*;

use super::mem::{now_or_never, MemClient, MemEtcd};
use super::rules::{decode, holder_key, Arbiter};

const A: SiteId = SiteId(1);
const B: SiteId = SiteId(2);
const W: SiteId = SiteId(0);

fn ask(arb: &mut Arbiter, kv: &mut MemClient, msg: Message) -> Option<Message> {
    now_or_never(arb.handle(kv, &msg)).expect("etcd reachable")
}

fn reply(m: Option<Message>) -> (Option<Duration>, u64, Option<SiteId>) {
    match m {
        Some(Message::LeaseReply {
            granted,
            token,
            holder,
            ..
        }) => (granted, token, holder),
        other => panic!("expected a lease reply, got {other:?}"),
    }
}

fn req(req: u64) -> Message {
    Message::LeaseRequest { req, token: 0 }
}

#[test]
fn grant_renew_refuse_expire_takeover() {
    let t0 = Instant::now();
    let etcd = Rc::new(RefCell::new(MemEtcd::new(t0)));
    let key = holder_key("/remus-wan/", "web1");
    assert_eq!(key, "/remus-wan/vms/web1/holder");
    let (mut ca, mut cb) = (MemClient::new(etcd.clone()), MemClient::new(etcd.clone()));
    let mut a = Arbiter::new(A, key.clone(), 2);
    let mut b = Arbiter::new(B, key.clone(), 2);

    let (g, t1, h) = reply(ask(&mut a, &mut ca, req(1)));
    assert_eq!((g, h), (Some(Duration::from_secs(2)), Some(A)));
    // Renewal: same token, the etcd lease pushed out.
    etcd.borrow_mut().advance(t0 + Duration::from_millis(1500));
    let (g, t2, _) = reply(ask(&mut a, &mut ca, req(2)));
    assert_eq!((g, t2), (Some(Duration::from_secs(2)), t1));
    // The other site is refused while the lease lives, and told the token.
    etcd.borrow_mut().advance(t0 + Duration::from_millis(3000));
    assert_eq!(reply(ask(&mut b, &mut cb, req(1))), (None, t1, Some(A)));
    // Expired (3.5 s + 2 s): the other site takes it, under a larger token.
    etcd.borrow_mut().advance(t0 + Duration::from_millis(3600));
    let (g, t3, h) = reply(ask(&mut b, &mut cb, req(2)));
    assert_eq!((g.is_some(), h), (true, Some(B)));
    assert!(t3 > t1);
    // The old holder is refused and learns the newer token.
    assert_eq!(reply(ask(&mut a, &mut ca, req(3))), (None, t3, Some(B)));
}

#[test]
fn handover_moves_the_lease_and_the_new_holder_notices() {
    let t0 = Instant::now();
    let etcd = Rc::new(RefCell::new(MemEtcd::new(t0)));
    let key = holder_key("/p", "vm");
    let (mut ca, mut cb) = (MemClient::new(etcd.clone()), MemClient::new(etcd.clone()));
    let mut a = Arbiter::new(A, key.clone(), 2);
    let mut b = Arbiter::new(B, key.clone(), 2);
    assert_eq!(b.observed(etcd.borrow().entry(&key).as_ref(), true), None);
    let (_, t1, _) = reply(ask(&mut a, &mut ca, req(1)));
    // B sees A take it: not for B.
    assert_eq!(b.observed(etcd.borrow().entry(&key).as_ref(), false), None);
    // A handover under a stale token is refused.
    let stale = Message::Handover {
        req: 2,
        token: t1 - 1,
        to: B,
    };
    assert_eq!(reply(ask(&mut a, &mut ca, stale)), (None, t1, Some(A)));
    let ho = Message::Handover {
        req: 3,
        token: t1,
        to: B,
    };
    let (g, t2, h) = reply(ask(&mut a, &mut ca, ho.clone()));
    assert_eq!((g, h), (None, Some(B)));
    assert!(t2 > t1);
    // Repeated (the reply was lost): the same answer, nothing moves.
    assert_eq!(reply(ask(&mut a, &mut ca, ho)), (None, t2, Some(B)));
    // B's watch sees the key name it: the unsolicited grant.
    let e = etcd.borrow().entry(&key);
    assert_eq!(
        b.observed(e.as_ref(), false),
        Some(Message::LeaseReply {
            req: 0,
            granted: Some(Duration::ZERO),
            token: t2,
            holder: Some(B)
        })
    );
    assert_eq!(b.observed(e.as_ref(), false), None, "announced once");
    // B renews the same etcd lease, under the handover's token.
    let lease = decode(&e.expect("key").value).expect("our value").1;
    etcd.borrow_mut().advance(t0 + Duration::from_millis(1900));
    assert_eq!(
        reply(ask(&mut b, &mut cb, req(1))),
        (Some(Duration::from_secs(2)), t2, Some(B))
    );
    assert_eq!(
        etcd.borrow().expiry(lease),
        Some(t0 + Duration::from_millis(3900))
    );
}

#[test]
fn unreachable_etcd_answers_nothing_and_minimum_ttl_is_reported() {
    let t0 = Instant::now();
    let etcd = Rc::new(RefCell::new(MemEtcd::new(t0)));
    etcd.borrow_mut().min_ttl = 5;
    let mut ca = MemClient::new(etcd.clone());
    let mut a = Arbiter::new(A, holder_key("", "vm"), 2);
    ca.up.set(false);
    assert!(now_or_never(a.handle(&mut ca, &req(1))).is_err());
    ca.up.set(true);
    // etcd raised the TTL: the site is told the TTL etcd enforces.
    assert_eq!(
        reply(ask(&mut a, &mut ca, req(2))).0,
        Some(Duration::from_secs(5))
    );
    // Heartbeats are not the witness's business.
    let hb = Message::Heartbeat {
        seq: 1,
        token: 0,
        stance: Stance::Active,
    };
    assert_eq!(ask(&mut a, &mut ca, hb), None);
}

/// Races between one site's read and its write: another site creates the
/// key first (the create fails, our etcd lease is revoked, we are refused
/// with the winner's token); our lease runs out between the read and the
/// keep-alive (nothing granted, and the next request takes the key anew
/// under a larger token); the key is taken over between a handover's read
/// and its write (refused, the winner named).
#[test]
fn races_between_read_and_write_grant_nothing_twice() {
    let t0 = Instant::now();
    let etcd = Rc::new(RefCell::new(MemEtcd::new(t0)));
    let key = holder_key("/r", "vm");
    let mut ca = MemClient::new(etcd.clone());
    let mut a = Arbiter::new(A, key.clone(), 2);

    let k = key.clone();
    *ca.before_put.borrow_mut() = Some(Box::new(move |e: &mut MemEtcd| {
        e.put_new(&k, super::rules::encode(B, 0), 2);
    }));
    let (g, tb, h) = reply(ask(&mut a, &mut ca, req(1)));
    assert_eq!((g, h), (None, Some(B)), "the create lost the race");
    assert_eq!(
        etcd.borrow().entry(&key).map(|e| e.mod_revision),
        Some(tb as i64)
    );
    // Our own etcd lease was revoked: only B's remains.
    assert_eq!(etcd.borrow().lease_count(), 1);

    // B's key expires; A takes it; then A's lease runs out between its
    // read and its keep-alive.
    etcd.borrow_mut().advance(t0 + Duration::from_secs(3));
    let (g, t1, _) = reply(ask(&mut a, &mut ca, req(2)));
    assert!(g.is_some() && t1 > tb);
    *ca.before_keep_alive.borrow_mut() = Some(Box::new(move |e: &mut MemEtcd| {
        e.advance(t0 + Duration::from_secs(6));
    }));
    let (g, t, h) = reply(ask(&mut a, &mut ca, req(3)));
    assert_eq!(
        (g, t, h),
        (None, t1, None),
        "nothing granted on a dead lease"
    );
    let (g, t2, h) = reply(ask(&mut a, &mut ca, req(4)));
    assert_eq!((g.is_some(), h), (true, Some(A)));
    assert!(t2 > t1, "retaken under a larger token");

    // A handover whose key changes hands between read and write.
    let k = key.clone();
    *ca.before_put.borrow_mut() = Some(Box::new(move |e: &mut MemEtcd| {
        // A's lease ran out and B took the key meanwhile.
        e.advance(t0 + Duration::from_secs(9));
        e.put_new(&k, super::rules::encode(B, 0), 2);
    }));
    let ho = Message::Handover {
        req: 5,
        token: t2,
        to: B,
    };
    let (g, t3, h) = reply(ask(&mut a, &mut ca, ho));
    assert_eq!((g, h), (None, Some(B)));
    assert!(t3 > t2);
}

/// A message in flight, delivered at `at` (to `W`: processed by the
/// sender's arbiter against etcd at `at`).
#[derive(Debug)]
struct Flight {
    at: Instant,
    from: SiteId,
    to: SiteId,
    msg: Message,
}

struct Party {
    site: Site,
    arb: Arbiter,
    kv: MemClient,
    alive: bool,
    last_token: u64,
}

struct World {
    now: Instant,
    etcd: Rc<RefCell<MemEtcd>>,
    key: String,
    parties: BTreeMap<SiteId, Party>,
    flights: Vec<Flight>,
    ab_up: bool,
    rng: u64,
    max_delay: u64,
    timers: Timers,
    /// When each site's engine abandons its switchover, if it does: each
    /// site's engine has its own deadline.
    switchover_deadlines: BTreeMap<SiteId, Instant>,
    /// The sites whose engines abandon a switchover past its deadline.
    /// For the others, a switchover must end through the arbiter alone
    /// (as it does when the real engine's deadline, 20 s, is far off).
    aborting: BTreeSet<SiteId>,
}

impl World {
    fn new(seed: u64, timers: Timers) -> Self {
        let now = Instant::now();
        let etcd = Rc::new(RefCell::new(MemEtcd::new(now)));
        let key = holder_key("/sim", "vm");
        let ttl = timers.lease.as_secs() as i64;
        let mut parties = BTreeMap::new();
        for (me, peer) in [(A, B), (B, A)] {
            let site = if me == A {
                Site::primary(me, peer, W, timers, now)
            } else {
                let mut s = Site::backup(me, peer, W, timers, now);
                s.set_replica_ready(true, now);
                s
            };
            let mut arb = Arbiter::new(me, key.clone(), ttl);
            arb.observed(None, true);
            parties.insert(
                me,
                Party {
                    site,
                    arb,
                    kv: MemClient::new(etcd.clone()),
                    alive: true,
                    last_token: 0,
                },
            );
        }
        Self {
            now,
            etcd,
            key,
            parties,
            flights: Vec::new(),
            ab_up: true,
            rng: seed | 1,
            max_delay: 30,
            timers,
            switchover_deadlines: BTreeMap::new(),
            aborting: [A, B].into(),
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        // xorshift64*: deterministic per seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }

    fn delay(&mut self) -> Duration {
        let d = self.rand(self.max_delay + 1);
        Duration::from_millis(d)
    }

    fn linked(&self, p: SiteId, q: SiteId) -> bool {
        let alive = |s: SiteId| s == W || self.parties[&s].alive;
        if !alive(p) || !alive(q) {
            return false;
        }
        match (p, q) {
            (W, s) | (s, W) => self.parties[&s].kv.up.get(),
            _ => self.ab_up,
        }
    }

    /// Collects what the sites send; checks the invariants.
    fn drain(&mut self) -> Result<(), String> {
        let ids: Vec<SiteId> = self.parties.keys().copied().collect();
        for id in ids {
            while let Some(o) = self.parties.get_mut(&id).and_then(|p| p.site.poll_output()) {
                match o {
                    Output::Send { to, msg } => {
                        if self.parties[&id].alive {
                            let at = self.now + self.delay();
                            self.flights.push(Flight {
                                at,
                                from: id,
                                to,
                                msg,
                            });
                        }
                    }
                    Output::Event(Event::SwitchoverDone { .. }) => {
                        self.switchover_deadlines.remove(&id);
                    }
                    Output::Event(_) => {}
                }
            }
        }
        let now = self.now;
        let releasing: Vec<SiteId> = self
            .parties
            .iter()
            .filter(|(_, p)| p.alive && p.site.may_release_output(now))
            .map(|(id, _)| *id)
            .collect();
        if releasing.len() > 1 {
            return Err(format!("both sites may release output at {now:?}"));
        }
        for (id, p) in self.parties.iter_mut() {
            if p.site.token() < p.last_token {
                return Err(format!("site {id:?}'s token went back"));
            }
            p.last_token = p.site.token();
        }
        Ok(())
    }

    /// Every site's watch sees the key as it is now.
    fn watch(&mut self) {
        self.etcd.borrow_mut().advance(self.now);
        let e = self.etcd.borrow().entry(&self.key);
        let ids: Vec<SiteId> = self.parties.keys().copied().collect();
        for id in ids {
            if !self.linked(W, id) {
                continue;
            }
            let got = self
                .parties
                .get_mut(&id)
                .and_then(|p| p.arb.observed(e.as_ref(), false));
            if let Some(msg) = got {
                let at = self.now + self.delay();
                self.flights.push(Flight {
                    at,
                    from: W,
                    to: id,
                    msg,
                });
            }
        }
    }

    fn step_to(&mut self, end: Instant) -> Result<(), String> {
        loop {
            let next_flight = self.flights.iter().map(|f| f.at).min();
            let next_timer = self
                .parties
                .values()
                .filter(|p| p.alive)
                .map(|p| p.site.poll_timeout())
                .min();
            let next = [next_flight, next_timer, Some(end)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(end)
                .max(self.now);
            if next > end {
                break;
            }
            self.now = next;
            self.etcd.borrow_mut().advance(next);
            if let Some(i) = self.flights.iter().position(|f| f.at <= next) {
                let f = self.flights.swap_remove(i);
                self.deliver(f);
            } else {
                for p in self.parties.values_mut().filter(|p| p.alive) {
                    if p.site.poll_timeout() <= next {
                        p.site.handle_timeout(next);
                    }
                }
            }
            let due: Vec<SiteId> = self
                .switchover_deadlines
                .iter()
                .filter(|(_, at)| next >= **at)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                self.switchover_deadlines.remove(&id);
                if let Some(p) = self.parties.get_mut(&id) {
                    p.site.abort_switchover(next);
                }
            }
            self.drain()?;
            self.watch();
            if next >= end {
                break;
            }
        }
        Ok(())
    }

    fn deliver(&mut self, f: Flight) {
        if !self.linked(f.from, f.to) {
            return;
        }
        let now = self.now;
        if f.to == W {
            let p = self.parties.get_mut(&f.from).expect("a site");
            let out = now_or_never(p.arb.handle(&mut p.kv, &f.msg));
            if let Ok(Some(reply)) = out {
                let at = now + self.delay();
                self.flights.push(Flight {
                    at,
                    from: W,
                    to: f.from,
                    msg: reply,
                });
            }
        } else if let Some(p) = self.parties.get_mut(&f.to) {
            p.site.handle_message(f.from, f.msg, now);
        }
    }

    fn chaos(&mut self, steps: u32) -> Result<(), String> {
        for _ in 0..steps {
            let span = Duration::from_millis(50 + self.rand(3000));
            self.step_to(self.now + span)?;
            let s = if self.rand(2) == 0 { A } else { B };
            match self.rand(100) {
                0..=29 => self.ab_up = !self.ab_up,
                30..=59 => {
                    let kv = &self.parties[&s].kv;
                    kv.up.set(!kv.up.get());
                }
                60..=64 => {
                    // A crash: the site process and its VM are gone, and
                    // it comes back idle with the token it had.
                    let p = self.parties.get_mut(&s).expect("site");
                    p.alive = false;
                }
                65..=69 => {
                    let now = self.now;
                    let timers = self.timers;
                    let ttl = timers.lease.as_secs() as i64;
                    let peer = if s == A { B } else { A };
                    let p = self.parties.get_mut(&s).expect("site");
                    if !p.alive {
                        let token = p.site.token();
                        p.site = Site::restarted(s, peer, W, timers, token, now);
                        p.site.set_replica_ready(true, now);
                        p.arb = Arbiter::new(s, p.arb.key().to_owned(), ttl);
                        let e = self.etcd.borrow().entry(&self.key);
                        p.arb.observed(e.as_ref(), true);
                        p.alive = true;
                    }
                }
                70..=79 => {
                    let now = self.now;
                    let after = Duration::from_millis(10 + self.rand(400));
                    let p = self.parties.get_mut(&s).expect("site");
                    if p.alive && p.site.start_switchover() {
                        p.site.final_epoch_committed(now);
                        if self.aborting.contains(&s) {
                            let at = now + after + Duration::from_secs(3);
                            self.switchover_deadlines.insert(s, at);
                        }
                    }
                }
                80..=89 => self.max_delay = 2 + self.rand(400),
                _ => {}
            }
            self.drain()?;
        }
        Ok(())
    }

    fn heal(&mut self) {
        self.ab_up = true;
        for p in self.parties.values() {
            p.kv.up.set(true);
        }
        self.max_delay = 30;
    }
}

fn timers() -> Timers {
    // The defaults, with a whole-second lease (etcd's TTL unit).
    Timers {
        lease: Duration::from_secs(2),
        ..Timers::default()
    }
}

#[test]
fn takeover_when_the_primary_dies_and_switchover_both_ways() {
    let mut w = World::new(7, timers());
    w.step_to(w.now + Duration::from_secs(2)).expect("safe");
    assert!(w.parties[&A].site.may_release_output(w.now));
    // Switchover to B.
    let now = w.now;
    let a = w.parties.get_mut(&A).expect("A");
    assert!(a.site.start_switchover());
    a.site.final_epoch_committed(now);
    w.drain().expect("safe");
    w.step_to(w.now + Duration::from_secs(2)).expect("safe");
    assert_eq!(w.parties[&B].site.stance(), Stance::Active);
    assert!(w.parties[&B].site.may_release_output(w.now));
    assert_eq!(w.parties[&A].site.stance(), Stance::Idle);
    // A gets a replica again; B dies; A takes over after the lease ran out.
    let now = w.now;
    w.parties
        .get_mut(&A)
        .expect("A")
        .site
        .set_replica_ready(true, now);
    w.parties.get_mut(&B).expect("B").alive = false;
    w.step_to(w.now + Duration::from_secs(8)).expect("safe");
    assert_eq!(w.parties[&A].site.stance(), Stance::Active);
    assert!(w.parties[&A].site.may_release_output(w.now));
}

/// How long the network stays healed before the VM must run at exactly
/// one site: a switchover under way ends (through the arbiter, or abandoned
/// by its engine within 3.41 s), a lease nobody renews runs out (the
/// lease), a standby stops hearing an active primary and asks (detection
/// timeout), its requests go out every renew interval; twice that, for
/// message delays and a round lost to a race between the two sites.
fn settle(t: &Timers) -> Duration {
    2 * (Duration::from_millis(3410) + t.lease + t.detection_timeout + t.renew_interval)
}

impl World {
    /// Liveness once healed: if a live site runs the VM or could take it
    /// over (it holds a replica and has not given up), exactly one site
    /// may release output, and etcd names it as the lease's holder under
    /// the token it runs with.
    fn live(&self) -> Result<(), String> {
        let now = self.now;
        let could_run = self.parties.values().any(|p| {
            p.alive
                && (p.site.stance() == Stance::Active
                    || (p.site.replica_ready() && p.site.stance() != Stance::Idle))
        });
        if !could_run {
            return Ok(());
        }
        let state = || {
            let e = self.etcd.borrow().entry(&self.key);
            format!(
                "sites (alive, stance, token, releasing): {:?}; etcd holder {:?}",
                self.parties
                    .values()
                    .map(|p| (
                        p.alive,
                        p.site.stance(),
                        p.site.token(),
                        p.site.may_release_output(now)
                    ))
                    .collect::<Vec<_>>(),
                e.map(|e| (decode(&e.value).map(|(h, _)| h), e.mod_revision))
            )
        };
        let releasing: Vec<SiteId> = self
            .parties
            .iter()
            .filter(|(_, p)| p.alive && p.site.may_release_output(now))
            .map(|(id, _)| *id)
            .collect();
        let [holder] = releasing[..] else {
            return Err(format!("nobody runs the VM: {}", state()));
        };
        let e = self.etcd.borrow().entry(&self.key);
        let named = e
            .as_ref()
            .and_then(|e| Some((decode(&e.value)?.0, e.mod_revision as u64)));
        if named != Some((holder, self.parties[&holder].site.token())) {
            return Err(format!("the releasing site holds no lease: {}", state()));
        }
        Ok(())
    }
}

/// One schedule: `steps` random faults (the engines of the `aborting`
/// sites abandon their switchovers past a deadline), then healed. Safety
/// is checked after every step; once healed for [`settle`], liveness at
/// every step of 5 s more.
fn schedule(seed: u64, steps: u32, aborting: &[SiteId]) -> Result<(), String> {
    let mut w = World::new(seed, timers());
    w.aborting = aborting.iter().copied().collect();
    w.chaos(steps)?;
    w.heal();
    w.step_to(w.now + settle(&w.timers))
        .map_err(|e| format!("healed: {e}"))?;
    for _ in 0..50 {
        w.live().map_err(|e| format!("healed: {e}"))?;
        w.step_to(w.now + Duration::from_millis(100))
            .map_err(|e| format!("healed: {e}"))?;
    }
    w.live().map_err(|e| format!("healed: {e}"))
}

/// Found by the random schedules (seed 9002572061473742252, 11 steps;
/// then, the simulation kept one switchover deadline for both sites, and
/// A's end cleared B's): A, cut off from etcd with a stale token, started a
/// switchover that its engine abandoned; B took the lease over, was cut
/// off from etcd in turn and started a switchover to A. B's lease ran out;
/// its handover then reached etcd, which refused it naming nobody under no
/// token. B, with its output held, asked again forever: Active and never
/// releasing, A Idle, however long the network stayed healed. B's engine
/// would have abandoned the switchover after its 20 s, but the arbiter
/// must end a switchover on its own, as the built-in witness does.
#[test]
fn a_handover_of_a_lapsed_lease_completes() {
    schedule(9_002_572_061_473_742_252, 11, &[A]).expect("safe and live");
}

/// The same on the rules alone: the holder's lease runs out before its
/// handover reaches etcd; the handover still moves it, under a new token,
/// and the new holder notices. A stale handover (a newer holder is known)
/// moves nothing and tells the sender the newer token.
#[test]
fn lapsed_lease_handed_over_unless_stale() {
    let t0 = Instant::now();
    let etcd = Rc::new(RefCell::new(MemEtcd::new(t0)));
    let key = holder_key("/l", "vm");
    let (mut ca, mut cb) = (MemClient::new(etcd.clone()), MemClient::new(etcd.clone()));
    let mut a = Arbiter::new(A, key.clone(), 2);
    let mut b = Arbiter::new(B, key.clone(), 2);
    b.observed(None, true);
    let (_, t1, _) = reply(ask(&mut a, &mut ca, req(1)));
    etcd.borrow_mut().advance(t0 + Duration::from_secs(3));
    assert_eq!(etcd.borrow().entry(&key), None, "lapsed");
    let ho = Message::Handover {
        req: 2,
        token: t1,
        to: B,
    };
    let (g, t2, h) = reply(ask(&mut a, &mut ca, ho));
    assert_eq!((g, h), (None, Some(B)));
    assert!(t2 > t1);
    let e = etcd.borrow().entry(&key);
    assert_eq!(
        reply(b.observed(e.as_ref(), false)),
        (Some(Duration::ZERO), t2, Some(B))
    );
    // B renews the handed-over key.
    assert_eq!(
        reply(ask(&mut b, &mut cb, req(1))),
        (Some(Duration::from_secs(2)), t2, Some(B))
    );
    // B's lease lapses too; A's old handover, overtaken, moves nothing.
    etcd.borrow_mut().advance(t0 + Duration::from_secs(6));
    assert_eq!(etcd.borrow().entry(&key), None);
    let stale = Message::Handover {
        req: 3,
        token: t1,
        to: B,
    };
    assert_eq!(reply(ask(&mut a, &mut ca, stale)), (None, t2, None));
    assert_eq!(etcd.borrow().entry(&key), None);
    // Nor is a lapsed lease handed to the sender itself.
    let to_self = Message::Handover {
        req: 4,
        token: t2,
        to: A,
    };
    assert_eq!(reply(ask(&mut a, &mut ca, to_self)).0, None);
    assert_eq!(etcd.borrow().entry(&key), None);
}

/// Random schedules per run: 256, or `ETCD_SIM_SCHEDULES`.
fn schedules() -> u32 {
    std::env::var("ETCD_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    // A fixed seed, so a run is reproducible (the schedules are the same
    // in CI and on a desk); `ETCD_SIM_SCHEDULES` widens the search.
    #![proptest_config(ProptestConfig {
        cases: schedules(),
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_e7cd),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random faults never let both sites release output; once healed,
    /// the VM runs at exactly one site that holds the lease (unless no
    /// live site can run it).
    #[test]
    fn never_two_sites_releasing(
        seed in any::<u64>(),
        steps in 5u32..40,
        aborting in prop::sample::select(vec![vec![A, B], vec![A], vec![B], vec![]]),
    ) {
        if let Err(e) = schedule(seed, steps, &aborting) {
            return Err(TestCaseError::fail(format!(
                "seed {seed}, {steps} steps, aborting {aborting:?}: {e}"
            )));
        }
    }
}
