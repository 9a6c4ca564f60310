//! The documented window of unprotected running (docs/failover.md, "The
//! window of unprotected output"): a primary that lost only its backup
//! runs on under its lease and releases output without commits; if it then
//! dies, the backup is granted the lease once that lease has lapsed and
//! promotes from the replica it holds, which is older than what clients
//! received meanwhile. This pins the behaviour the docs describe, so a
//! change to it (e.g. the witness refusing such a takeover) is a
//! deliberate one.

mod sim;

use std::time::Duration;

use failover::{Event, Stance, Timers};
use sim::{World, A, B};

const S: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn a_primary_that_dies_while_unprotected_is_taken_over_from_the_older_replica() {
    let timers = Timers::default();
    let mut w = World::new(7, timers);
    w.run_until(S(5)).expect("safe");
    assert!(w.releasing(A));
    assert_eq!(w.stance(B), Some(Stance::Standby));
    // The window opens: A loses only B, runs on unprotected.
    let cut = w.now;
    w.set_link(A, B, false);
    w.run_until(cut + S(10)).expect("safe");
    assert!(w.releasing(A), "A runs on under its lease");
    assert!(
        w.log
            .iter()
            .any(|h| h.node == A && h.at >= cut && h.event == Event::ProtectionLost),
        "the window opens with ProtectionLost"
    );
    assert_eq!(
        w.promoted(B, cut),
        None,
        "no takeover while A holds the lease"
    );
    // A dies inside the window: B takes over from its replica.
    let died = w.now;
    w.crash(A);
    w.run_until(died + timers.detection_timeout + timers.lease + S(5))
        .expect("safe");
    let at = w.promoted(B, died).expect("B takes over");
    assert!(at >= died, "never before A's death");
    assert!(w.releasing(B));
}
