//! The failover rules of docs/design.md, one scenario each, on the simulated
//! network (simulated time; deterministic).

mod sim;

use std::time::Duration;

use failover::{Event, Stance, Timers};
use sim::{World, A, B, W};

const S: fn(u64) -> Duration = Duration::from_secs;

fn settled() -> World {
    let mut w = World::new(42, Timers::default());
    w.run_until(S(5)).expect("safe");
    assert!(w.releasing(A), "primary runs after start-up");
    assert_eq!(w.stance(B), Some(Stance::Standby));
    assert!(w.site(B).is_some_and(|s| s.replica_ready()));
    w
}

fn events(w: &World, p: failover::SiteId, after: Duration) -> Vec<Event> {
    w.log
        .iter()
        .filter(|h| h.node == p && h.at >= after)
        .map(|h| h.event.clone())
        .collect()
}

/// Runs in 50 ms steps, asserting `check` at every step.
fn hold(w: &mut World, until: Duration, mut check: impl FnMut(&World) -> bool, what: &str) {
    while w.now < until {
        let next = w.now + Duration::from_millis(50);
        w.run_until(next).expect("safe");
        assert!(
            check(w),
            "{what} broken at {:?}\n{}",
            w.now,
            w.trace_tail(20)
        );
    }
}

#[test]
fn primary_that_loses_only_the_backup_runs_on_unprotected() {
    let mut w = settled();
    let t = w.now;
    w.set_link(A, B, false);
    hold(
        &mut w,
        t + S(20),
        |w| w.releasing(A),
        "primary keeps serving",
    );
    let a = events(&w, A, t);
    assert!(a.contains(&Event::ProtectionLost), "{a:?}");
    assert!(!a.contains(&Event::Fence), "{a:?}");
    // B asked and was refused: the primary holds the lease.
    assert_eq!(w.promoted(B, t), None);
    // When the backup is back, protection is restored.
    w.set_link(A, B, true);
    w.run_until(w.now + S(2)).expect("safe");
    assert!(events(&w, A, t).contains(&Event::ProtectionRestored));
    assert_eq!(w.stance(B), Some(Stance::Standby));
}

#[test]
fn primary_that_loses_only_the_witness_runs_on_the_backups_promise() {
    let mut w = settled();
    let t = w.now;
    w.set_link(A, W, false);
    hold(
        &mut w,
        t + S(20),
        |w| w.releasing(A),
        "primary keeps serving",
    );
    assert!(!events(&w, A, t).contains(&Event::Fence));
}

#[test]
fn losing_the_witness_changes_nothing_while_the_sites_see_each_other() {
    let mut w = settled();
    let t = w.now;
    w.crash(W);
    hold(
        &mut w,
        t + S(30),
        |w| w.releasing(A) && w.stance(B) == Some(Stance::Standby),
        "nothing changes",
    );
    w.restart(W);
    let until = w.now + S(10);
    hold(&mut w, until, |w| w.releasing(A), "primary keeps serving");
}

#[test]
fn isolated_primary_fences_and_the_backup_takes_over() {
    let mut w = settled();
    let t = w.now;
    w.set_link(A, B, false);
    w.set_link(A, W, false);
    w.run_until(t + S(10)).expect("safe");
    assert!(events(&w, A, t).contains(&Event::Fence));
    let promoted = w.promoted(B, t).expect("backup promoted");
    assert!(promoted - t <= S(4), "took {:?}", promoted - t);
    assert!(w.releasing(B) && !w.releasing(A));
    // The stale primary comes back: it learns the newer token and demotes,
    // never releasing output again under its old token.
    let heal = w.now;
    w.set_link(A, B, true);
    w.set_link(A, W, true);
    hold(
        &mut w,
        heal + S(5),
        |w| !w.releasing(A),
        "stale primary stays silent",
    );
    assert!(events(&w, A, heal)
        .iter()
        .any(|e| matches!(e, Event::Demote { .. })));
    // It then resynchronises and becomes the new standby.
    assert_eq!(w.stance(A), Some(Stance::Standby));
    assert!(w
        .site(A)
        .is_some_and(|s| s.token() == w.site(B).map(|b| b.token()).unwrap_or(0)));
}

#[test]
fn backup_cut_from_everything_never_promotes() {
    let mut w = settled();
    let t = w.now;
    w.set_link(A, B, false);
    w.set_link(B, W, false);
    hold(
        &mut w,
        t + S(20),
        |w| w.releasing(A) && !w.releasing(B),
        "primary alone active",
    );
    assert_eq!(w.promoted(B, t), None);
}

#[test]
fn primary_crash_promotes_the_backup() {
    let mut w = settled();
    let t = w.now;
    w.crash(A);
    w.run_until(t + S(6)).expect("safe");
    let at = w.promoted(B, t).expect("promoted");
    let timers = Timers::default();
    assert!(at - t >= timers.detection_timeout - timers.heartbeat_interval);
    assert!(w.releasing(B));
}

#[test]
fn switchover_moves_the_lease_without_overlap() {
    let mut w = settled();
    let t = w.now;
    assert!(w.start_switchover(A, Duration::from_millis(150)));
    w.run_until(t + S(3)).expect("safe");
    assert!(w.releasing(B), "{}", w.trace_tail(20));
    assert!(events(&w, A, t)
        .iter()
        .any(|e| matches!(e, Event::SwitchoverDone { .. })));
    // A resynchronises and protection runs the other way; a switchover
    // back works the same.
    w.run_until(w.now + S(3)).expect("safe");
    assert_eq!(w.stance(A), Some(Stance::Standby));
    let t2 = w.now;
    assert!(w.start_switchover(B, Duration::from_millis(150)));
    w.run_until(t2 + S(3)).expect("safe");
    assert!(w.releasing(A));
    assert_eq!(w.highest_promoted_token, 3);
}

#[test]
fn bad_timers_are_refused() {
    let t = Timers {
        lease: S(5),
        ..Timers::default()
    };
    assert!(t.validate().is_err());
    assert!(Timers::default().validate().is_ok());
}
