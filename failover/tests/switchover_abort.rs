//! A switchover that does not end (the backup never commits the final
//! epoch, or the witness does not answer) is aborted by the engine after
//! its deadline. These drive one `Site` by hand, message by message, to pin
//! down what the abort may and may not allow: before the witness was asked,
//! the primary goes on under its lease; after, nothing it held before
//! counts until the witness answers a request sent after the abort.

use std::time::{Duration, Instant};

use failover::{Event, Message, Output, Site, SiteId, Stance, Timers};

const A: SiteId = SiteId(1);
const B: SiteId = SiteId(2);
const W: SiteId = SiteId(3);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Messages sent and events emitted since the last call.
fn drain(s: &mut Site) -> (Vec<(SiteId, Message)>, Vec<Event>) {
    let (mut sent, mut events) = (Vec::new(), Vec::new());
    while let Some(o) = s.poll_output() {
        match o {
            Output::Send { to, msg } => sent.push((to, msg)),
            Output::Event(e) => events.push(e),
        }
    }
    (sent, events)
}

/// The number of the last request (lease or handover) sent to the witness.
fn last_request(sent: &[(SiteId, Message)]) -> Option<u64> {
    sent.iter().rev().find_map(|(to, m)| match m {
        Message::LeaseRequest { req, .. } | Message::Handover { req, .. } if *to == W => Some(*req),
        _ => None,
    })
}

fn reply(req: u64, granted: bool, token: u64, holder: SiteId) -> Message {
    Message::LeaseReply {
        req,
        granted: granted.then(|| Duration::from_secs(2)),
        token,
        holder: Some(holder),
    }
}

/// A primary holding the lease under token 1, and the time.
fn active_primary() -> (Site, Instant) {
    let t0 = Instant::now();
    let mut s = Site::primary(A, B, W, Timers::default(), t0);
    let (sent, _) = drain(&mut s);
    let req = last_request(&sent).expect("a lease request at start");
    s.handle_message(W, reply(req, true, 1, A), t0 + ms(5));
    let now = t0 + ms(6);
    assert!(s.may_release_output(now));
    drain(&mut s);
    (s, now)
}

/// Final epoch committed: the handover request goes to the witness.
fn handover_requested(s: &mut Site, now: Instant) -> u64 {
    assert!(s.start_switchover());
    s.final_epoch_committed(now);
    let (sent, events) = drain(s);
    assert!(events.contains(&Event::Fence), "{events:?}");
    assert!(!s.may_release_output(now));
    sent.iter()
        .find_map(|(_, m)| match m {
            Message::Handover { req, .. } => Some(*req),
            _ => None,
        })
        .expect("handover request")
}

#[test]
fn aborted_before_the_witness_was_asked_the_primary_goes_on() {
    let (mut s, now) = active_primary();
    assert!(s.start_switchover());
    assert!(
        s.may_release_output(now),
        "output goes on until the final epoch"
    );
    assert!(s.abort_switchover(now));
    assert!(s.may_release_output(now));
    let (_, events) = drain(&mut s);
    assert!(!events.contains(&Event::Fence), "{events:?}");
    // A new switchover can start (and be aborted the same way).
    assert!(s.start_switchover());
    assert!(s.abort_switchover(now + ms(1)));
    assert!(s.may_release_output(now + ms(1)));
}

#[test]
fn aborted_after_the_witness_was_asked_output_waits_for_a_fresh_answer() {
    let (mut s, now) = active_primary();
    let handover = handover_requested(&mut s, now);
    let t = now + ms(10);
    assert!(s.abort_switchover(t));
    let (sent, _) = drain(&mut s);
    assert!(!s.may_release_output(t), "the old lease no longer counts");
    let renewal = last_request(&sent).expect("a request right after the abort");
    assert!(renewal > handover);
    // The peer still promises (it was not given the lease): no output on
    // that, since a handover grant would have broken the promise.
    s.handle_message(
        B,
        Message::HeartbeatAck {
            seq: 1,
            token: 1,
            stance: Stance::Standby,
        },
        t + ms(1),
    );
    assert!(!s.may_release_output(t + ms(1)));
    // A late reply to the handover request itself confirms nothing.
    s.handle_message(W, reply(handover, true, 1, A), t + ms(2));
    assert!(!s.may_release_output(t + ms(2)));
    // The answer to the request after the abort: still ours.
    s.handle_message(W, reply(renewal, true, 1, A), t + ms(3));
    assert!(s.may_release_output(t + ms(4)));
    let (_, events) = drain(&mut s);
    assert!(events.contains(&Event::Unfence), "{events:?}");
    assert!(s.start_switchover(), "a new switchover can start");
}

#[test]
fn aborted_after_the_lease_moved_ends_as_the_switchover_it_was() {
    for peer_first in [false, true] {
        let (mut s, now) = active_primary();
        handover_requested(&mut s, now);
        let t = now + ms(10);
        assert!(s.abort_switchover(t));
        let (sent, _) = drain(&mut s);
        let renewal = last_request(&sent).expect("request");
        if peer_first {
            // The new primary's heartbeat carries the newer token.
            s.handle_message(
                B,
                Message::Heartbeat {
                    seq: 7,
                    token: 2,
                    stance: Stance::Active,
                },
                t + ms(1),
            );
        } else {
            s.handle_message(W, reply(renewal, false, 2, B), t + ms(1));
        }
        let (_, events) = drain(&mut s);
        assert!(
            events.contains(&Event::SwitchoverDone { token: 2 }),
            "peer first: {peer_first}: {events:?}"
        );
        assert!(!events.iter().any(|e| matches!(e, Event::Demote { .. })));
        assert!(!s.may_release_output(t + ms(2)));
        assert_eq!(s.stance(), Stance::Idle);
    }
}
