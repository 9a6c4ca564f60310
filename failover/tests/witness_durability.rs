//! The witness's durability on the simulated network (simulated time,
//! drifting clocks; deterministic): a disk that fails a write once, fails
//! for a while, or lands a write yet reports it failed; witness restarts
//! from what its file holds; a witness that lost its file. Besides the
//! split-brain check after every step, the harness checks every grant the
//! witness sends: a token goes to one site only, and a token granted for
//! the first time is above every token any site knows.

mod sim;

use std::time::Duration;

use failover::{Event, LeaseRecord, SiteId, Stance, Timers};
use sim::{Disk, World, A, B, W};

const S: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

fn schedules() -> u64 {
    std::env::var("FAILOVER_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn settled(seed: u64) -> World {
    let mut w = World::new(seed, Timers::default());
    w.run_until(S(5)).expect("safe");
    assert!(w.releasing(A), "primary runs after start-up");
    assert!(w.protects(B), "backup resynced after start-up");
    w
}

fn held_by(p: SiteId, token: u64) -> Option<LeaseRecord> {
    Some(LeaseRecord {
        holder: Some(p),
        token,
    })
}

fn ok(w: &World, r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
    let _ = w;
}

/// Runs in 10 ms steps until `cond` holds; panics at `deadline`.
fn run_until_cond(w: &mut World, deadline: Duration, what: &str, cond: impl Fn(&World) -> bool) {
    while !cond(w) {
        assert!(
            w.now < deadline,
            "{what}: not by {deadline:?}\n{}",
            w.trace_tail(40)
        );
        let next = w.now + MS(10);
        let r = w.run_until(next);
        ok(w, r);
    }
}

fn promotions(w: &World, p: SiteId) -> Vec<u64> {
    w.log
        .iter()
        .filter(|h| h.node == p)
        .filter_map(|h| match h.event {
            Event::Promote { token } => Some(token),
            _ => None,
        })
        .collect()
}

/// The primary is cut from both; the backup asks for the lease and the
/// witness's first write of the grant fails. The grant is not announced;
/// the backup's next request is a new grant, written again; once it is
/// durable the backup promotes under it. The witness then restarts at once
/// and the old primary reaches it again: it learns the newer token from
/// the file instead of having its old lease renewed.
#[test]
fn a_grant_whose_write_fails_once_is_written_again_and_survives_a_restart() {
    for seed in 0..20 {
        let mut w = settled(seed);
        let t = w.now;
        w.script_witness_writes([Disk::Fails]);
        w.set_link(A, B, false);
        w.set_link(A, W, false);
        run_until_cond(&mut w, t + S(8), "a failed write", |w| {
            w.witness_write_failures == 1
        });
        assert_eq!(w.lease_record(), held_by(A, 1), "seed {seed}: record kept");
        assert_eq!(w.witness_file(), held_by(A, 1));
        assert!(!w.releasing(B), "seed {seed}: nothing was announced");
        run_until_cond(&mut w, t + S(10), "the backup promoted", |w| w.releasing(B));
        assert_eq!(
            w.witness_file(),
            held_by(B, 2),
            "seed {seed}: the backup's lease is durable before it runs"
        );
        w.crash(W);
        w.restart(W);
        w.set_link(A, W, true);
        let r = w.run_until(w.now + S(10));
        ok(&w, r);
        assert!(w.releasing(B) && !w.releasing(A), "seed {seed}");
        assert!(w
            .events_of(A, t)
            .iter()
            .any(|e| matches!(e, Event::Demote { token: 2 })));
        assert_eq!(promotions(&w, B), vec![2], "seed {seed}");
    }
}

/// While the disk fails, the holder keeps renewing (a renewal writes
/// nothing) and nobody else gets the lease: after the primary dies the
/// backup cannot take over until writes succeed again, and then does
/// within one renewal round trip.
#[test]
fn while_writes_fail_no_lease_changes_hands_and_the_takeover_follows_the_repair() {
    for seed in 0..20 {
        let mut w = settled(seed);
        let t = w.now;
        w.witness_disk = Disk::Fails;
        // The holder is not troubled.
        while w.now < t + S(20) {
            let r = w.run_until(w.now + MS(50));
            ok(&w, r);
            assert!(w.releasing(A), "seed {seed}: the holder renews");
        }
        assert_eq!(w.witness_write_failures, 0);
        let crash = w.now;
        w.crash(A);
        while w.now < crash + S(15) {
            let r = w.run_until(w.now + MS(50));
            ok(&w, r);
            assert!(
                !w.releasing(B),
                "seed {seed}: granted without a durable record"
            );
        }
        assert!(w.witness_write_failures > 10, "seed {seed}");
        assert_eq!(w.promoted(B, t), None, "seed {seed}");
        assert_eq!(w.lease_record(), held_by(A, 1));
        let repaired = w.now;
        w.witness_disk = Disk::Works;
        let r = w.run_until(repaired + S(2));
        ok(&w, r);
        let promoted = w
            .promoted(B, repaired)
            .unwrap_or_else(|| panic!("seed {seed}: no takeover\n{}", w.trace_tail(30)));
        let timers = Timers::default();
        assert!(
            promoted - repaired <= timers.renew_interval + 2 * w.max_delay,
            "seed {seed}: took {:?}",
            promoted - repaired
        );
        assert_eq!(w.witness_file(), held_by(B, 2));
        // A restarted witness recovers exactly what it announced.
        w.crash(W);
        w.restart(W);
        assert_eq!(w.lease_record(), held_by(B, 2));
        let r = w.run_until(w.now + S(5));
        ok(&w, r);
        assert!(w.releasing(B));
    }
}

/// The worst write failure: the grant to the backup reaches the file, yet
/// the witness is told it failed. The old primary then reaches the witness
/// again and asks to renew its lease; the witness must write its record
/// again before renewing it (the file names the backup), or a restarted
/// witness would recover the backup as holder and grant it the lease while
/// the primary's renewed lease runs.
#[test]
fn after_a_write_that_landed_but_failed_a_renewal_rewrites_the_record() {
    for seed in 0..20 {
        let mut w = settled(seed);
        let t = w.now;
        w.script_witness_writes([Disk::LandsButFails]);
        w.set_link(A, B, false);
        w.set_link(A, W, false);
        run_until_cond(&mut w, t + S(8), "a failed write", |w| {
            w.witness_write_failures == 1
        });
        assert_eq!(w.witness_file(), held_by(B, 2), "the write landed");
        assert_eq!(w.lease_record(), held_by(A, 1), "not announced");
        // The backup loses the witness, the primary finds it again.
        w.set_link(B, W, false);
        w.set_link(A, W, true);
        let deadline = w.now + S(3);
        run_until_cond(&mut w, deadline, "the primary renewed", |w| w.releasing(A));
        assert_eq!(w.witness_file(), held_by(A, 1), "rewritten first");
        w.crash(W);
        w.restart(W);
        w.set_link(B, W, true);
        let r = w.run_until(w.now + S(10));
        ok(&w, r);
        assert!(w.releasing(A), "seed {seed}\n{}", w.trace_tail(20));
        assert_eq!(w.promoted(B, t), None);
    }
}

/// Random schedules of partitions, crashes and restarts of any party
/// (the witness's more often), switchovers, and a witness disk that works,
/// fails, or lands writes it reports failed, with writes that take up to
/// 40 ms (a crash cuts one short, landed or not); then 20 s with
/// everything healed and a working disk, after which exactly one site runs
/// the VM. A restarted witness recovers from what its file holds.
#[test]
fn random_write_failures_and_witness_restarts_never_split_the_brain() {
    let mut failures = 0;
    let mut promotions_total = 0;
    for seed in 0..schedules() / 4 {
        let mut w = World::new(seed, Timers::default());
        let result = chaos(&mut w, S(40)).and_then(|_| {
            for (p, q) in [(A, B), (A, W), (B, W)] {
                w.set_link(p, q, true);
            }
            w.witness_disk = Disk::Works;
            for p in [A, B, W] {
                w.restart(p);
            }
            w.max_delay = MS(60);
            w.run_until(w.now + S(20))
        });
        if let Err(e) = result {
            panic!("seed {seed}: {e}");
        }
        let active: Vec<_> = [A, B].into_iter().filter(|p| w.releasing(*p)).collect();
        assert!(
            active.len() == 1
                || w.stance(A) != Some(Stance::Active) && w.stance(B) != Some(Stance::Active),
            "seed {seed}: after healing, releasing sites = {active:?}\n{}",
            w.trace_tail(30)
        );
        failures += w.witness_write_failures;
        promotions_total += promotions(&w, A).len() + promotions(&w, B).len();
    }
    assert!(failures > 100, "only {failures} failed writes: too tame");
    assert!(
        promotions_total > 100,
        "only {promotions_total} promotions: too tame"
    );
}

fn chaos(w: &mut World, span: Duration) -> Result<(), String> {
    const PARTIES: [SiteId; 3] = [A, B, W];
    let end = w.now + span;
    while w.now < end {
        let step = w.rng().ms(50, 3000);
        let at = (w.now + step).min(end);
        w.run_until(at)?;
        let r = w.rng().below(100);
        let p = PARTIES[w.rng().below(3) as usize];
        let q = PARTIES[w.rng().below(3) as usize];
        match r {
            0..=19 if p != q => {
                let up = w.link_up(p, q);
                w.set_link(p, q, !up);
            }
            20..=26 => w.crash(p),
            27..=34 => w.crash(W),
            35..=54 => w.restart(p),
            55..=59 => {
                let from = if w.stance(A) == Some(Stance::Active) {
                    A
                } else {
                    B
                };
                let after = w.rng().ms(10, 400);
                w.start_switchover(from, after);
            }
            60..=64 => w.max_delay = w.rng().ms(2, 400),
            65..=79 => {
                w.witness_disk = match w.rng().below(3) {
                    0 => Disk::Works,
                    1 => Disk::Fails,
                    _ => Disk::LandsButFails,
                };
            }
            80..=84 => w.witness_write_latency = w.rng().ms(0, 40),
            _ => {}
        }
    }
    Ok(())
}

/// The witness's disk was replaced: its file is gone. It refuses to run
/// (as `remus-wan witness` does on a state directory without its file),
/// and the sites carry on without it; nothing is granted under restarted
/// tokens.
#[test]
fn a_witness_that_lost_its_file_refuses_to_run() {
    let mut w = settled(7);
    let t = w.now;
    w.crash(W);
    w.lose_witness_file();
    w.restart(W);
    assert_eq!(w.lease_record(), None, "not running");
    while w.now < t + S(30) {
        let r = w.run_until(w.now + MS(50));
        ok(&w, r);
        assert!(w.releasing(A) && w.stance(B) == Some(Stance::Standby));
    }
    assert_eq!(w.granted_tokens.keys().copied().max(), Some(1));
}

/// After two switchovers the sites hold token 3. The witness loses its
/// file and the operator re-initialises it with no floor at all (the
/// worst case: `remus-wan witness --init` floors tokens at the host's
/// clock). It grants nothing for a lease period, then the primary's next
/// request gets a token above the 3 it reported; when the primary then
/// dies, the backup takes over under a newer token still. (A witness that
/// restarted its tokens at 1 would grant tokens the sites ignore: no
/// takeover, ever.)
#[test]
fn a_reinitialised_witness_grants_above_every_token_the_sites_hold() {
    for seed in 0..20 {
        let mut w = settled(seed);
        assert!(w.start_switchover(A, MS(150)));
        let r = w.run_until(w.now + S(6));
        ok(&w, r);
        assert!(w.start_switchover(B, MS(150)));
        let r = w.run_until(w.now + S(6));
        ok(&w, r);
        assert!(w.releasing(A) && w.protects(B), "seed {seed}");
        assert_eq!(w.site(A).map(|s| s.token()), Some(3));
        w.crash(W);
        w.lose_witness_file();
        w.restart(W);
        let r = w.run_until(w.now + S(2));
        ok(&w, r);
        w.reinit_witness(0);
        let t = w.now;
        let r = w.run_until(t + S(5));
        ok(&w, r);
        assert!(w.releasing(A), "seed {seed}");
        let a_token = w.site(A).map_or(0, |s| s.token());
        assert!(
            a_token > 3,
            "seed {seed}: the primary runs under token {a_token}, not above the 3 it reported \
             (the witness's record: {:?})",
            w.lease_record()
        );
        assert_eq!(w.lease_record(), held_by(A, a_token));
        let crash = w.now;
        w.crash(A);
        let r = w.run_until(crash + S(8));
        ok(&w, r);
        assert!(
            w.promoted(B, crash).is_some() && w.releasing(B),
            "seed {seed}: no takeover\n{}",
            w.trace_tail(30)
        );
        assert!(w.site(B).map_or(0, |s| s.token()) > a_token);
    }
}

/// The primary is cut from the backup only and renews its lease; the
/// backup is a candidate, refused. The witness loses its file and is
/// re-initialised at once: it knows no holder, yet the primary's lease
/// still runs, so it refuses everyone for a lease period (the primary's
/// lease lapses meanwhile) before the first request gets the lease.
#[test]
fn a_reinitialised_witness_waits_a_lease_period_before_granting() {
    for seed in 0..20 {
        let mut w = settled(seed);
        let t = w.now;
        w.set_link(A, B, false);
        run_until_cond(&mut w, t + S(6), "the backup asks", |w| {
            w.stance(B) == Some(Stance::Candidate)
        });
        let r = w.run_until(w.now + MS(100));
        ok(&w, r);
        assert!(w.releasing(A), "seed {seed}: primary holds its lease");
        w.crash(W);
        w.lose_witness_file();
        w.reinit_witness(0);
        let r = w.run_until(w.now + S(10));
        ok(&w, r);
        assert!(
            w.releasing(A) != w.releasing(B),
            "seed {seed}: one site runs\n{}",
            w.trace_tail(30)
        );
    }
}
