//! Round trips of a VM between its two sites on failures alone: after a
//! takeover (or a switchover) the promoted site runs the VM and protects it
//! back towards the site it left, where a new standby process starts,
//! resynchronises and becomes ready; when the promoted site then dies, the
//! old site must take the VM back. dc1 -> dc2 -> dc1 -> dc2 ... on the
//! simulated network (simulated time, drifting clocks; deterministic).
//!
//! What the engine of a promoted site sees, with its peer dead (asserted
//! below, see `after_takeover_with_the_peer_dead`):
//!
//!     Promote { token }, ProtectionLost, Unfence
//!
//! all three out of the one `handle_message` that carries the witness's
//! grant, in this order, and then nothing at all (no Fence, no Demote)
//! for as long as the witness renews the lease: the lease alone permits
//! output. If a new process at the dead site is already heard when the
//! grant comes, `ProtectionLost` is left out: `Promote, Unfence`. After a
//! switchover (the old primary alive) it is `Promote`, then `Unfence` one
//! renewal round trip later. So the engine must
//! - not release anything on `Promote` alone: `Unfence` is the permission
//!   (after a switchover `Unfence` comes one renewal round trip after
//!   `Promote`, since an unsolicited grant carries no validity);
//! - take `ProtectionLost`, which arrives *before* `Unfence`, to mean
//!   "release output without waiting for the backup's acknowledgement",
//!   whether or not it is released yet: there is no backup to acknowledge
//!   anything, and no later event will say so again;
//! - expect `ProtectionRestored` as soon as a new standby process at the
//!   other site is heard, which is before its replica has resynchronised:
//!   it means the peer's failover process is alive, not that its replica
//!   can acknowledge epochs.

mod sim;

use std::time::Duration;

use failover::{Event, LeaseRecord, SiteId, Stance, Timers};
use sim::{peer_of, Comeback, World, A, B, W};

const S: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

/// How often the continuous properties are also sampled, as an engine
/// polling `may_release_output` would (they are checked at every step of
/// the simulation besides).
const SAMPLE: Duration = Duration::from_millis(50);

/// A takeover or switchover that happened: who runs the VM now, under
/// which token, and since when it releases output.
#[derive(Debug, Clone, Copy)]
struct Moved {
    to: SiteId,
    token: u64,
    /// When the move began (the kill, or the switchover's start).
    began: Duration,
    /// When `to` first released output after the move.
    serving_from: Duration,
}

/// A primary at A releasing output under token 1, a ready standby at B.
fn settled(seed: u64) -> World {
    let mut w = World::new(seed, Timers::default());
    w.run_until(S(5)).expect("safe");
    assert!(w.releasing(A), "seed {seed}: primary runs after start-up");
    assert!(w.protects(B), "seed {seed}: backup resynced after start-up");
    assert_eq!(token_of(&w, A), 1);
    w
}

fn token_of(w: &World, p: SiteId) -> u64 {
    w.site(p).map_or(0, |s| s.token())
}

fn fail(w: &World, what: impl std::fmt::Display) -> String {
    format!("{what} (at {:?})\n{}", w.now, w.trace_tail(40))
}

/// The survivor asks the witness at most `detection_timeout` after it
/// last heard the dead site, whose lease has run out by then; then one
/// request round trip, plus one renewal period in case the witness's
/// clock had not quite let the old lease lapse.
fn takeover_bound(w: &World) -> Duration {
    let t = w.timers;
    t.detection_timeout + t.renew_interval + 2 * w.max_delay
}

/// A planned handover: the final epoch, the handover request to the
/// witness, its grant to the peer, the peer's renewal round trip.
fn switchover_bound(w: &World, final_epoch_after: Duration) -> Duration {
    final_epoch_after + 4 * w.max_delay + MS(1)
}

/// A new standby hears the active site's next heartbeat, acknowledges it
/// (which starts the resync in the simulation), and resyncs.
fn resync_bound(w: &World) -> Duration {
    w.timers.heartbeat_interval + 2 * w.max_delay + w.resync_time + MS(10)
}

/// `p` releases output, and nothing since `since` told its engine to stop.
fn serving(w: &World, p: SiteId, since: Duration) -> Result<(), String> {
    if !w.releasing(p) {
        return Err(fail(w, format!("site {} does not release output", p.0)));
    }
    let stop = w.events_of(p, since).into_iter().find(|e| {
        matches!(
            e,
            Event::Fence | Event::Demote { .. } | Event::SwitchoverDone { .. }
        )
    });
    match stop {
        Some(e) => Err(fail(w, format!("site {} got {e:?}", p.0))),
        None => Ok(()),
    }
}

/// Runs until `until` with `m.to` serving at every step and every sample,
/// and holding the witness's lease under `m.token` at every sample.
fn keep_serving(w: &mut World, m: Moved, until: Duration) -> Result<(), String> {
    let held = Some(LeaseRecord {
        holder: Some(m.to),
        token: m.token,
    });
    while w.now < until {
        let next = (w.now + SAMPLE).min(until);
        w.run_checked(next, |w| serving(w, m.to, m.serving_from))?;
        serving(w, m.to, m.serving_from)?;
        if w.lease_record() != held {
            return Err(fail(w, format!("lease is {:?}", w.lease_record())));
        }
    }
    Ok(())
}

fn keep_serving_for(w: &mut World, m: Moved, span: Duration) -> Result<(), String> {
    let until = w.now + span;
    keep_serving(w, m, until)
}

/// The one promotion of `p` since `since`, checked to follow `before`.
fn promoted_once(w: &World, p: SiteId, since: Duration, before: u64) -> Result<u64, String> {
    let tokens: Vec<u64> = w
        .events_of(p, since)
        .into_iter()
        .filter_map(|e| match e {
            Event::Promote { token } => Some(token),
            _ => None,
        })
        .collect();
    match tokens[..] {
        // Every move is one grant by the witness: the token grows by one.
        [token] if token == before + 1 => Ok(token),
        _ => Err(fail(
            w,
            format!("site {}: promotions {tokens:?} after token {before}", p.0),
        )),
    }
}

/// When `p` first reported `event` since `since`.
fn first(w: &World, p: SiteId, since: Duration, event: &Event) -> Option<Duration> {
    w.log
        .iter()
        .find(|h| h.node == p && h.at >= since && h.event == *event)
        .map(|h| h.at)
}

/// Kills the active site `from`, whose process stays dead or, with
/// `comeback`, starts again as a new standby that long after the kill
/// (possibly before its peer noticed the failure). The peer must be
/// promoted exactly once, within the takeover bound, and release output
/// from that very instant: the grant that promotes is a lease.
fn kill_active(
    w: &mut World,
    from: SiteId,
    token: u64,
    comeback: Option<(Duration, Comeback)>,
) -> Result<Moved, String> {
    let to = peer_of(from);
    let began = w.now;
    w.crash(from);
    let deadline = began + takeover_bound(w);
    let check = |w: &World| match w.promoted(to, began) {
        Some(at) => serving(w, to, at),
        None => Ok(()),
    };
    if let Some((after, how)) = comeback {
        w.run_checked(began + after, check)?;
        w.restart_as(from, how);
    }
    w.run_checked(deadline, check)?;
    let at = w
        .promoted(to, began)
        .filter(|&at| at <= deadline)
        .ok_or_else(|| fail(w, format!("site {} not promoted in time", to.0)))?;
    let token = promoted_once(w, to, began, token)?;
    if first(w, to, began, &Event::Unfence) != Some(at) {
        return Err(fail(w, "Unfence did not come with Promote"));
    }
    Ok(Moved {
        to,
        token,
        began,
        serving_from: at,
    })
}

/// Asserts what the engine of a site promoted by a takeover saw, its peer
/// still dead: see the module's documentation.
fn after_takeover_with_the_peer_dead(w: &World, m: Moved) -> Result<(), String> {
    let seen = w.events_of(m.to, m.began);
    let expected = [
        Event::Promote { token: m.token },
        Event::ProtectionLost,
        Event::Unfence,
    ];
    if seen != expected {
        return Err(fail(w, format!("site {} saw {seen:?}", m.to.0)));
    }
    Ok(())
}

/// A planned switchover from the active site `from`: its peer must be
/// promoted exactly once and release output within the switchover bound,
/// and `from` must report the handover.
fn switch_over(
    w: &mut World,
    from: SiteId,
    final_epoch_after: Duration,
    token: u64,
) -> Result<Moved, String> {
    let to = peer_of(from);
    let began = w.now;
    if !w.start_switchover(from, final_epoch_after) {
        return Err(fail(w, format!("site {} refused the switchover", from.0)));
    }
    let deadline = began + switchover_bound(w, final_epoch_after);
    w.run_checked(deadline, |w| match first(w, to, began, &Event::Unfence) {
        Some(at) => serving(w, to, at),
        None => Ok(()),
    })?;
    let serving_from = first(w, to, began, &Event::Unfence)
        .ok_or_else(|| fail(w, format!("site {} never released output", to.0)))?;
    let token = promoted_once(w, to, began, token)?;
    // The old primary is alive: the new one is protected from the start.
    let seen = w.events_of(to, began);
    if seen != [Event::Promote { token }, Event::Unfence] {
        return Err(fail(w, format!("site {} saw {seen:?}", to.0)));
    }
    if !w
        .events_of(from, began)
        .contains(&Event::SwitchoverDone { token })
    {
        return Err(fail(w, format!("site {} did not hand over", from.0)));
    }
    Ok(Moved {
        to,
        token,
        began,
        serving_from,
    })
}

/// A switchover from `from` whose process dies `crash_after` into it:
/// before the final epoch, with the handover in flight, or after. Either
/// way the peer ends up running the VM, promoted exactly once, within the
/// takeover bound of the crash.
fn switch_over_and_die(
    w: &mut World,
    from: SiteId,
    final_epoch_after: Duration,
    crash_after: Duration,
    token: u64,
) -> Result<Moved, String> {
    let to = peer_of(from);
    let began = w.now;
    if !w.start_switchover(from, final_epoch_after) {
        return Err(fail(w, format!("site {} refused the switchover", from.0)));
    }
    let check = |w: &World| match first(w, to, began, &Event::Unfence) {
        Some(at) => serving(w, to, at),
        None => Ok(()),
    };
    w.run_checked(began + crash_after, check)?;
    w.crash(from);
    let deadline = w.now + takeover_bound(w);
    w.run_checked(deadline, check)?;
    let serving_from = first(w, to, began, &Event::Unfence)
        .ok_or_else(|| fail(w, format!("site {} never released output", to.0)))?;
    let token = promoted_once(w, to, began, token)?;
    Ok(Moved {
        to,
        token,
        began,
        serving_from,
    })
}

/// The site the VM left comes back (unless its process survived, idle,
/// after a switchover) and resynchronises from `m.to`, which serves
/// throughout and ends up protected again.
fn protect_back(w: &mut World, m: Moved, how: Option<Comeback>) -> Result<(), String> {
    let back = peer_of(m.to);
    if let Some(how) = how {
        if w.site(back).is_some() {
            w.crash(back); // the idle old primary's process ends
        }
        w.restart_as(back, how);
    }
    let deadline = w.now + resync_bound(w);
    w.run_checked(deadline, |w| serving(w, m.to, m.serving_from))?;
    if !w.protects(back) {
        return Err(fail(w, format!("site {} never resynced", back.0)));
    }
    if token_of(w, back) != m.token || w.stance(m.to) != Some(Stance::Active) {
        return Err(fail(w, "the sites disagree on the token or the roles"));
    }
    // The engine of the active site was told, last, that it is protected.
    let last_protection = w
        .events_of(m.to, m.began)
        .into_iter()
        .rfind(|e| matches!(e, Event::ProtectionLost | Event::ProtectionRestored));
    if last_protection == Some(Event::ProtectionLost) {
        return Err(fail(w, format!("site {} still unprotected", m.to.0)));
    }
    Ok(())
}

fn expect_ok(what: &str, r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{what}: {e}");
    }
}

#[test]
fn switchover_protect_back_then_the_new_primary_dies() {
    for how in [Comeback::Restarted, Comeback::FreshBackup] {
        expect_ok(&format!("{how:?}"), switchover_then_kill(how));
    }
}

fn switchover_then_kill(how: Comeback) -> Result<(), String> {
    let mut w = settled(42);
    let moved = switch_over(&mut w, A, MS(150), 1)?;
    assert_eq!((moved.to, moved.token), (B, 2));
    // The old primary's process ends with the switchover; a new standby
    // process starts at dc1 for the VM now running at dc2.
    protect_back(&mut w, moved, Some(how))?;
    keep_serving_for(&mut w, moved, S(5))?;

    let back = kill_active(&mut w, B, moved.token, None)?;
    assert_eq!((back.to, back.token), (A, 3));
    // A minute with the peer dead and the witness reachable: output all
    // along, no fence, the lease held.
    keep_serving(&mut w, back, back.serving_from + S(60))?;
    after_takeover_with_the_peer_dead(&w, back)?;
    // dc2 comes back and protects the VM at dc1 in turn.
    protect_back(&mut w, back, Some(how))?;
    keep_serving_for(&mut w, back, S(5))
}

/// A primary whose process crashes and comes back (a supervisor restarts
/// it) within the detection timeout, as a restarted or a fresh standby:
/// its VM is gone, so the backup must still take over. The fault this
/// found: the backup counted the new process's (idle or standby)
/// heartbeats as signs of life, never asked the witness, and the VM ran
/// nowhere, for good.
#[test]
fn primary_restarting_within_the_detection_timeout_is_taken_over() {
    for how in [Comeback::Restarted, Comeback::FreshBackup] {
        expect_ok(&format!("{how:?}"), quick_restart(how));
    }
}

fn quick_restart(how: Comeback) -> Result<(), String> {
    let mut w = settled(42);
    let m = kill_active(&mut w, A, 1, Some((S(1), how)))?;
    assert_eq!((m.to, m.token), (B, 2));
    // The new process at A is heard all along: B is promoted "protected",
    // although that process has no replica yet.
    let seen = w.events_of(B, m.began);
    if seen != [Event::Promote { token: 2 }, Event::Unfence] {
        return Err(fail(&w, format!("B saw {seen:?}")));
    }
    protect_back(&mut w, m, None)?;
    keep_serving_for(&mut w, m, S(10))
}

/// The old primary of a switchover may hear of the new token from its
/// peer's heartbeat before the witness's reply (separate connections).
/// Here the reply is lost with the witness link. The fault this found:
/// the peer's news made it `Demote` (the engine reported the switchover
/// as failed and stopped with an error) instead of `SwitchoverDone`.
#[test]
fn switchover_learnt_from_the_peer_first_is_done_not_a_demotion() {
    let mut w = settled(42);
    // Every message takes at least 20 ms, so stepping 1 ms at a time
    // catches the witness's reply in flight.
    w.min_delay = MS(20);
    let began = w.now;
    assert!(w.start_switchover(A, MS(150)));
    while w.lease_record().and_then(|r| r.holder) != Some(B) {
        w.run_until(w.now + MS(1)).expect("safe");
        assert!(
            w.now < began + S(2),
            "the handover never reached the witness"
        );
    }
    w.set_link(A, W, false);
    w.run_until(w.now + S(3)).expect("safe");
    assert_eq!(
        w.events_of(A, began),
        [Event::Fence, Event::SwitchoverDone { token: 2 }],
        "{}",
        w.trace_tail(20)
    );
    // ...and it goes on to protect the VM at B, as after any switchover.
    assert!(w.releasing(B) && w.protects(A), "{}", w.trace_tail(20));
}

#[test]
fn kill_take_over_protect_back_kill_again() {
    expect_ok("round trips", kill_round_trips());
}

fn kill_round_trips() -> Result<(), String> {
    let mut w = settled(7);
    let (mut active, mut token) = (A, 1);
    let mut path = vec![active];
    for round in 0..6 {
        let m = kill_active(&mut w, active, token, None)?;
        keep_serving(&mut w, m, m.serving_from + S(20))?;
        after_takeover_with_the_peer_dead(&w, m)?;
        let how = [Comeback::Restarted, Comeback::FreshBackup][round % 2];
        protect_back(&mut w, m, Some(how))?;
        keep_serving_for(&mut w, m, S(3))?;
        (active, token) = (m.to, m.token);
        path.push(active);
    }
    // dc1 -> dc2 -> dc1 -> dc2 -> dc1 -> dc2 -> dc1, one token per move.
    assert_eq!(path, [A, B, A, B, A, B, A]);
    assert_eq!(token, 7);
    Ok(())
}

fn schedules() -> u64 {
    std::env::var("FAILOVER_FAILBACK_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

#[derive(Debug, Clone, Copy)]
enum MoveKind {
    Kill,
    Switchover,
    /// The old primary dies during its own switchover.
    SwitchoverThenKill,
}

/// How many moves of each kind the schedules made, the last being kills
/// whose site came back early.
type Tally = [usize; 4];

#[test]
fn random_round_trips_keep_one_site_serving() {
    let mut tally: Tally = [0; 4];
    for seed in 0..schedules() {
        let r = random_round_trips(seed, &mut tally);
        expect_ok(&format!("seed {seed}"), r);
    }
    // The schedules must actually exercise every kind of move.
    let each = schedules() as usize / 4;
    assert!(tally.iter().all(|&n| n >= each), "moves {tally:?}");
}

fn random_round_trips(seed: u64, tally: &mut Tally) -> Result<(), String> {
    let mut w = settled(seed);
    // From a LAN to a bad WAN, for the whole schedule.
    w.max_delay = w.rng().ms(2, 250);
    let mut current = Moved {
        to: A,
        token: 1,
        began: Duration::ZERO,
        serving_from: w.now,
    };
    for _ in 0..4 + w.rng().below(5) {
        let quiet = w.rng().ms(0, 4000);
        keep_serving_for(&mut w, current, quiet)?;
        let from = current.to;
        let after = w.rng().ms(10, 400);
        let kind = match w.rng().below(10) {
            0..=4 => MoveKind::Kill,
            5..=7 => MoveKind::Switchover,
            _ => MoveKind::SwitchoverThenKill,
        };
        tally[kind as usize] += 1;
        // A killed site's process may come back at once (a supervisor
        // restarting it), before its peer even noticed the failure.
        let comeback = w.rng().chance(30).then(|| {
            let after = w.rng().ms(0, 4000);
            let how = [Comeback::Restarted, Comeback::FreshBackup][w.rng().below(2) as usize];
            (after, how)
        });
        if matches!(kind, MoveKind::Kill) && comeback.is_some() {
            tally[3] += 1;
        }
        let m = match kind {
            MoveKind::Kill => kill_active(&mut w, from, current.token, comeback)?,
            MoveKind::Switchover => switch_over(&mut w, from, after, current.token)?,
            MoveKind::SwitchoverThenKill => {
                let crash_after = w.rng().ms(0, after.as_millis() as u64 + 500);
                switch_over_and_die(&mut w, from, after, crash_after, current.token)?
            }
        };
        // The site the VM left stays away for a while...
        let away = w.rng().ms(0, 8000);
        keep_serving_for(&mut w, m, away)?;
        if matches!(kind, MoveKind::Kill) && comeback.is_none() {
            after_takeover_with_the_peer_dead(&w, m)?;
        }
        // ...then a new standby process starts there, or (after a clean
        // switchover, or an early comeback) the one there resyncs in place.
        let how = match (kind, w.rng().below(3)) {
            (MoveKind::Kill, _) if comeback.is_some() => None,
            (MoveKind::Switchover, 0) => None,
            (_, 1) => Some(Comeback::FreshBackup),
            _ => Some(Comeback::Restarted),
        };
        protect_back(&mut w, m, how)?;
        current = m;
    }
    Ok(())
}
