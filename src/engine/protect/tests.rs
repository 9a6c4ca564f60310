//! The protect core on simulated time: no tokio, no guest, no network.
//! Each test plays the driver's part by hand: it feeds events, reads the
//! actions, and reports back what executing them did.

use std::time::{Duration, Instant};

use failover::Event;
use netops::config::HookEvent;
use netops::policy::Role;
use proptest::prelude::*;

use super::{Action, ArbiterCall, CoreConfig, Finish, Lifecycle, Observed, Phase, ProtectCore};
use crate::engine::release_gate::Release;

const INTERVAL: Duration = Duration::from_millis(100);
const MAX_IN_FLIGHT: u32 = 4;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn core(t0: Instant) -> ProtectCore {
    ProtectCore::new(
        CoreConfig {
            vm: "vm1".into(),
            site: "dc1".into(),
            backup: "dc2".into(),
            interval: INTERVAL,
            max_in_flight: MAX_IN_FLIGHT,
        },
        t0,
    )
}

fn drain(c: &mut ProtectCore) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn room() -> Observed {
    Observed {
        precopy_room: true,
        ..Observed::default()
    }
}

/// Starts protection and plays a pre-copy of one step up to its first
/// checkpoint (epoch `first`), which the backup commits.
fn protecting(c: &mut ProtectCore, t0: Instant, first: u64) {
    c.handle_start(t0);
    assert_eq!(
        drain(c),
        vec![
            Action::BeginSync {
                why: "protection starts"
            },
            Action::ShowState("synchronising"),
        ]
    );
    assert!(c.handle_timeout(t0, room()));
    assert_eq!(
        drain(c),
        vec![Action::PumpHashRequests, Action::PreCopyStep]
    );
    c.handle_precopy_finished();
    assert_eq!(c.phase(), Phase::Checkpointing);
    assert_eq!(c.poll_action(), Some(Action::Checkpoint { paced: false }));
    c.handle_checkpoint_taken(first);
    assert_eq!(c.poll_action(), Some(Action::ShowState("protected")));
    assert_eq!(c.poll_action(), None);
    c.handle_committed(first);
    assert_eq!(drain(c), vec![Action::Flush]);
    assert_eq!(c.release_now(true), Some(Release::Through(first)));
}

/// With a witness that allowed output once (addresses announced).
fn witnessed(c: &mut ProtectCore, t0: Instant) {
    c.with_witness();
    protecting(c, t0, 1);
    c.handle_failover(t0, Event::Unfence, 1);
    assert_eq!(
        drain(c),
        vec![
            Action::SetRole {
                role: Role::Active,
                token: 1
            },
            Action::PointDnsHere,
            Action::Flush,
        ]
    );
}

#[test]
fn checkpoints_are_paced_at_the_interval_and_wait_at_the_in_flight_limit() {
    let t0 = Instant::now();
    let mut c = core(t0);
    protecting(&mut c, t0, 1);
    // Not due yet: nothing to do, woken at the interval.
    assert!(!c.handle_timeout(t0 + ms(10), Observed::default()));
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.poll_timeout(), Some(t0 + INTERVAL));
    // Due.
    assert!(c.handle_timeout(t0 + INTERVAL, Observed::default()));
    assert_eq!(drain(&mut c), vec![Action::Checkpoint { paced: true }]);
    c.handle_checkpoint_taken(2);
    c.handle_checkpoint_sent(t0 + INTERVAL);
    assert_eq!(c.interval(), INTERVAL, "the link keeps up");
    // At the limit of epochs in flight, even a late one waits for an ack.
    let full = Observed {
        in_flight: MAX_IN_FLIGHT,
        ..Observed::default()
    };
    assert!(!c.handle_timeout(t0 + ms(1000), full));
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.poll_timeout(), Some(t0 + ms(1000) + INTERVAL));
    // Output pressure: at once, before the interval.
    let pressed = Observed {
        output_pressure: true,
        ..Observed::default()
    };
    assert!(c.handle_timeout(t0 + INTERVAL + ms(1), pressed));
    assert_eq!(drain(&mut c), vec![Action::Checkpoint { paced: true }]);
}

#[test]
fn the_backup_asking_for_a_resync_starts_one_and_forgets_unconfirmed_checkpoints() {
    let t0 = Instant::now();
    let mut c = core(t0);
    protecting(&mut c, t0, 1);
    c.handle_checkpoint_taken(2);
    let asked = Observed {
        resync_pending: true,
        ..Observed::default()
    };
    assert!(c.handle_timeout(t0 + INTERVAL, asked));
    assert_eq!(
        drain(&mut c),
        vec![
            Action::BeginSync {
                why: "the backup needs a full resync"
            },
            Action::ShowState("synchronising"),
        ]
    );
    // Checkpoint 2's commit never releases its output: only the resync's.
    c.handle_committed(2);
    assert_eq!(c.release_now(true), Some(Release::Through(1)));
}

#[test]
fn a_replication_error_backs_off_then_resyncs_and_backoffs_double() {
    let t0 = Instant::now();
    let mut c = core(t0);
    protecting(&mut c, t0, 1);
    // A checkpoint fails mid-step: what was queued behind it is dropped.
    assert!(c.handle_timeout(t0 + INTERVAL, Observed::default()));
    c.handle_error(t0 + INTERVAL, false, &"refused");
    assert_eq!(
        drain(&mut c),
        vec![Action::BufferWrites(false), Action::ShowState("recovering")]
    );
    let until = t0 + INTERVAL + ms(500);
    assert_eq!(
        c.phase(),
        Phase::Backoff {
            until,
            new_session: false
        }
    );
    // Nothing is sent meanwhile; the wake-up never passes the backoff's end.
    assert!(!c.handle_timeout(until - ms(50), Observed::default()));
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.poll_timeout(), Some(until));
    assert!(c.handle_timeout(until, Observed::default()));
    assert_eq!(
        drain(&mut c),
        vec![
            Action::BeginSync {
                why: "after a replication error"
            },
            Action::ShowState("synchronising"),
        ]
    );
    // A second error in a row waits twice as long, over a new session.
    c.handle_error(until, true, &"session ended");
    drain(&mut c);
    let until2 = until + ms(1000);
    assert_eq!(
        c.phase(),
        Phase::Backoff {
            until: until2,
            new_session: true
        }
    );
    assert!(c.handle_timeout(until2, Observed::default()));
    assert_eq!(
        drain(&mut c),
        vec![Action::NewSession, Action::ShowState("synchronising")]
    );
    assert_eq!(c.phase(), Phase::AwaitPeer);
    assert!(
        !c.handle_timeout(until2, room()),
        "no sync before a standby answers"
    );
    c.handle_connected("dc2");
    assert_eq!(
        drain(&mut c),
        vec![
            Action::BeginSync {
                why: "a standby answers"
            },
            Action::ShowState("synchronising"),
        ]
    );
    // A resync asked during a backoff waits for its end.
    c.handle_error(until2, false, &"again");
    drain(&mut c);
    c.handle_resync_required();
    assert_eq!(drain(&mut c), vec![]);
}

#[test]
fn a_committed_checkpoint_resets_the_backoff() {
    let t0 = Instant::now();
    let mut c = core(t0);
    protecting(&mut c, t0, 1);
    for _ in 0..3 {
        c.handle_error(t0, false, &"x");
    }
    c.handle_committed(1);
    c.handle_error(t0, false, &"x");
    assert!(matches!(c.phase(), Phase::Backoff { .. }));
    // Still three errors in a row: no commit of a new checkpoint came.
    assert_eq!(
        c.phase(),
        Phase::Backoff {
            until: t0 + ms(4000),
            new_session: false
        }
    );
    c.handle_checkpoint_taken(2);
    c.handle_committed(2);
    c.handle_error(t0, false, &"x");
    assert_eq!(
        c.phase(),
        Phase::Backoff {
            until: t0 + ms(500),
            new_session: false
        }
    );
}

#[test]
fn a_lost_backup_under_the_lease_releases_at_once_until_it_is_back() {
    let t0 = Instant::now();
    let mut c = core(t0);
    witnessed(&mut c, t0);
    c.handle_checkpoint_taken(2);
    assert_eq!(c.release_now(true), Some(Release::Through(1)));
    c.handle_failover(t0, Event::ProtectionLost, 1);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Hooks {
                event: HookEvent::ProtectionLost,
                token: 1,
                sites: false
            },
            Action::ShowState("unprotected"),
            Action::Flush,
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::Unprotected);
    assert_eq!(c.release_now(true), Some(Release::All));
    assert_eq!(c.release_now(false), None, "never without the lease");
    // Output keeps leaving a couple of milliseconds after it was sent.
    let now = t0 + ms(10);
    assert!(!c.handle_timeout(now, Observed::default()));
    assert_eq!(drain(&mut c), vec![Action::Flush]);
    assert!(c.poll_timeout().is_some_and(|t| t <= now + ms(2)));
    // The backup is back and asks for a resync; protection is restored.
    c.handle_resync_required();
    drain(&mut c);
    c.handle_failover(now, Event::ProtectionRestored, 1);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Hooks {
                event: HookEvent::ProtectionRestored,
                token: 1,
                sites: false
            },
            Action::ShowState("protected"),
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::Protected);
    assert_eq!(c.release_now(true), Some(Release::Through(1)));
    c.handle_precopy_finished();
    drain(&mut c);
    c.handle_checkpoint_taken(9);
    c.handle_committed(9);
    assert_eq!(c.release_now(true), Some(Release::Through(9)));
}

#[test]
fn losing_backup_and_witness_fences_until_unfenced() {
    let t0 = Instant::now();
    let mut c = core(t0);
    witnessed(&mut c, t0);
    c.handle_failover(t0, Event::Fence, 1);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::SetRole {
                role: Role::Down,
                token: 1
            },
            Action::Hooks {
                event: HookEvent::Fence,
                token: 1,
                sites: false
            },
            Action::PauseGuest,
            Action::ShowState("fenced"),
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::Fenced);
    // No checkpoint, no release, however late, lease or not.
    assert!(!c.handle_timeout(t0 + ms(10_000), Observed::default()));
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.release_now(true), None);
    c.handle_committed(5);
    assert_eq!(drain(&mut c), vec![Action::Flush]);
    assert_eq!(c.release_now(true), None);
    // Fenced twice is fenced once.
    c.handle_failover(t0, Event::Fence, 1);
    assert_eq!(drain(&mut c), vec![]);
    // Lost backup while fenced: still fenced, and shown so.
    c.handle_failover(t0, Event::ProtectionLost, 1);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Hooks {
                event: HookEvent::ProtectionLost,
                token: 1,
                sites: false
            },
            Action::Flush,
        ]
    );
    assert_eq!(c.release_now(true), None);
    c.handle_failover(t0, Event::Unfence, 1);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::SetRole {
                role: Role::Active,
                token: 1
            },
            Action::ResumeGuest,
            Action::ShowState("unprotected"),
            Action::Flush,
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::Unprotected);
    assert!(c.handle_timeout(t0 + ms(10_000), Observed::default()));
    assert_eq!(drain(&mut c), vec![Action::Checkpoint { paced: true }]);
}

#[test]
fn a_fence_before_output_was_ever_allowed_is_ignored() {
    let t0 = Instant::now();
    let mut c = core(t0);
    c.with_witness();
    protecting(&mut c, t0, 1);
    c.handle_failover(t0, Event::Fence, 0);
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.lifecycle(), Lifecycle::Protected);
    // Without a lease nothing leaves anyway.
    assert_eq!(c.release_now(false), None);
}

/// Up to the final checkpoint (epoch 2) sent and the guest paused.
fn switching_over(c: &mut ProtectCore, t0: Instant) {
    witnessed(c, t0);
    assert_eq!(
        c.handle_switchover_request("vm1", true, 2),
        Ok(()),
        "the backup has committed epoch 1"
    );
    assert_eq!(drain(c), vec![Action::FinalCheckpoint]);
    c.handle_checkpoint_taken(2);
    c.handle_switchover_paused(2, t0);
    assert_eq!(
        drain(c),
        vec![
            Action::Arbiter(ArbiterCall::StartSwitchover),
            Action::ShowState("switching over"),
        ]
    );
    assert!(matches!(c.lifecycle(), Lifecycle::SwitchingOver(_)));
}

#[test]
fn a_switchover_hands_over_once_the_final_epoch_is_committed() {
    let t0 = Instant::now();
    let mut c = core(t0);
    switching_over(&mut c, t0);
    // No checkpoint while paused for the move; woken at its deadline.
    assert!(!c.handle_timeout(t0 + ms(500), Observed::default()));
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(
        c.handle_switchover_request("vm1", true, 3),
        Err("a switchover is already under way".into())
    );
    c.handle_committed(2);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Flush,
            Action::Arbiter(ArbiterCall::FinalEpochCommitted)
        ]
    );
    assert_eq!(c.release_now(true), Some(Release::Through(2)));
    // The witness was asked: output is held until it answers.
    c.handle_failover(t0 + ms(600), Event::Fence, 1);
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.release_now(true), None);
    c.handle_failover(t0 + ms(700), Event::SwitchoverDone { token: 2 }, 1);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::SetRole {
                role: Role::Down,
                token: 2
            },
            Action::Hooks {
                event: HookEvent::Demote,
                token: 2,
                sites: true
            },
            Action::ReplySwitchover(Ok(
                "vm1 handed over to dc2 under fencing token 2 in 700 ms".into()
            )),
            Action::ShowState("handed over"),
            Action::Finish(Finish::HandedOver),
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::HandedOver);
    assert!(!c.handle_timeout(t0 + ms(800), Observed::default()));
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn a_switchover_past_its_deadline_is_aborted_and_the_vm_stays() {
    let t0 = Instant::now();
    let mut c = core(t0);
    switching_over(&mut c, t0);
    assert_eq!(c.poll_timeout(), None);
    assert!(!c.handle_timeout(t0 + ms(19_950), Observed::default()));
    let deadline = t0 + super::machine::SWITCHOVER_DEADLINE;
    assert_eq!(c.poll_timeout(), Some(deadline));
    assert!(c.handle_timeout(deadline, Observed::default()));
    assert_eq!(
        drain(&mut c),
        vec![
            Action::ReplySwitchover(Err(
                "switchover aborted after 20 s: the backup did not commit the final epoch; dc1 keeps running vm1".into()
            )),
            Action::Arbiter(ArbiterCall::AbortSwitchover),
            Action::ResumeGuest,
            Action::ShowState("protected"),
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::Protected);
    assert!(c.handle_timeout(deadline, Observed::default()));
    assert_eq!(drain(&mut c), vec![Action::Checkpoint { paced: true }]);
}

#[test]
fn a_switchover_aborted_after_the_witness_was_asked_stays_fenced_until_it_answers() {
    let t0 = Instant::now();
    let mut c = core(t0);
    switching_over(&mut c, t0);
    c.handle_committed(2);
    drain(&mut c);
    let deadline = t0 + super::machine::SWITCHOVER_DEADLINE;
    assert!(c.handle_timeout(deadline, Observed::default()));
    assert_eq!(
        drain(&mut c),
        vec![
            Action::ReplySwitchover(Err(
                "switchover aborted after 20 s: the witness did not move the lease; dc1 keeps running vm1".into()
            )),
            Action::Arbiter(ArbiterCall::AbortSwitchover),
            Action::ShowState("fenced"),
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::Fenced);
    c.handle_failover(deadline, Event::Unfence, 1);
    assert!(drain(&mut c).contains(&Action::ResumeGuest));
    assert_eq!(c.lifecycle(), Lifecycle::Protected);
}

#[test]
fn a_switchover_is_refused_unless_protected_under_the_lease_and_caught_up() {
    let t0 = Instant::now();
    let mut c = core(t0);
    // Without a witness.
    protecting(&mut c, t0, 1);
    assert!(c.handle_switchover_request("vm1", true, 2).is_err());
    let mut c = core(t0);
    c.with_witness();
    c.handle_start(t0);
    drain(&mut c);
    assert!(c
        .handle_switchover_request("vm1", true, 2)
        .is_err_and(|e| e.contains("synchronising")));
    let mut c = core(t0);
    witnessed(&mut c, t0);
    assert!(c
        .handle_switchover_request("vm2", true, 2)
        .is_err_and(|e| e.contains("not vm2")));
    assert!(c.handle_switchover_request("vm1", false, 2).is_err());
    assert!(c
        .handle_switchover_request("vm1", true, 20)
        .is_err_and(|e| e.contains("far behind")));
    c.handle_failover(t0, Event::ProtectionLost, 1);
    drain(&mut c);
    assert!(c.handle_switchover_request("vm1", true, 2).is_err());
    assert_eq!(drain(&mut c), vec![], "a refusal changes nothing");
}

#[test]
fn a_demotion_halts_the_guest_and_ends_protection() {
    let t0 = Instant::now();
    let mut c = core(t0);
    switching_over(&mut c, t0);
    c.handle_failover(t0, Event::Demote { token: 9 }, 1);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::ReplySwitchover(Err("demoted under token 9 during the switchover".into())),
            Action::SetRole {
                role: Role::Down,
                token: 9
            },
            Action::Hooks {
                event: HookEvent::Demote,
                token: 9,
                sites: true
            },
            Action::HaltGuest,
            Action::ShowState("demoted"),
            Action::Finish(Finish::Demoted { token: 9 }),
        ]
    );
    assert_eq!(c.lifecycle(), Lifecycle::Demoted { token: 9 });
    assert_eq!(c.release_now(true), None);
    c.handle_failover(t0, Event::Unfence, 9);
    c.handle_committed(5);
    assert!(!c.handle_timeout(t0 + ms(10_000), Observed::default()));
    assert!(drain(&mut c).iter().all(|a| *a == Action::Flush));
    assert_eq!(c.release_now(true), None);
}

#[test]
fn a_stopped_guest_ends_protection() {
    let t0 = Instant::now();
    let mut c = core(t0);
    protecting(&mut c, t0, 1);
    assert!(c.handle_timeout(t0 + INTERVAL, Observed::default()));
    c.handle_guest_stopped();
    assert_eq!(drain(&mut c), vec![Action::Finish(Finish::GuestStopped)]);
    assert_eq!(c.lifecycle(), Lifecycle::Stopped);
    assert!(!c.handle_timeout(t0 + INTERVAL * 2, Observed::default()));
    assert_eq!(drain(&mut c), vec![]);
}

#[test]
fn a_vm_resumed_at_takeover_serves_until_its_first_checkpoint() {
    let t0 = Instant::now();
    let mut c = core(t0);
    c.with_witness();
    c.serve_until_peer_returns();
    assert_eq!(c.lifecycle(), Lifecycle::Unprotected);
    c.handle_start(t0);
    assert_eq!(drain(&mut c), vec![Action::ShowState("unprotected")]);
    assert!(!c.handle_timeout(t0, room()));
    assert_eq!(drain(&mut c), vec![Action::Flush]);
    assert_eq!(c.release_now(true), Some(Release::All));
    // Already announced: a fence now pauses it.
    c.handle_connected("dc1");
    drain(&mut c);
    c.handle_precopy_finished();
    drain(&mut c);
    c.handle_checkpoint_taken(4);
    assert_eq!(c.lifecycle(), Lifecycle::Protected);
    assert_eq!(c.release_now(true), Some(Release::Through(4)));
    c.handle_failover(t0, Event::Fence, 2);
    assert_eq!(c.lifecycle(), Lifecycle::Fenced);
}

/// One input of the property test.
#[derive(Debug, Clone)]
enum Input {
    Tick {
        ms: u64,
        in_flight: u32,
        resync: bool,
        pressure: bool,
    },
    /// The backup acknowledges up to `back` epochs behind the newest.
    Committed {
        back: u64,
    },
    Error {
        new_session: bool,
    },
    ResyncRequired,
    Connected,
    Failover(u8),
    Switchover {
        lease: bool,
    },
    GuestStopped,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        12 => (0..300u64, 0..=MAX_IN_FLIGHT, any::<bool>(), any::<bool>()).prop_map(
            |(ms, in_flight, r, p)| Input::Tick {
                ms,
                in_flight,
                resync: r && ms % 7 == 0,
                pressure: p
            }
        ),
        8 => (0..3u64).prop_map(|back| Input::Committed { back }),
        2 => any::<bool>().prop_map(|new_session| Input::Error { new_session }),
        1 => Just(Input::ResyncRequired),
        2 => Just(Input::Connected),
        6 => (0..20u8).prop_map(Input::Failover),
        2 => any::<bool>().prop_map(|lease| Input::Switchover { lease }),
        1 => Just(Input::GuestStopped),
    ]
}

/// The test's driver: executes actions, numbers epochs, remembers what
/// the invariants need.
struct Sim {
    c: ProtectCore,
    now: Instant,
    next_epoch: u64,
    /// The newest epoch the backup acknowledged.
    acked: u64,
    /// Checkpoints taken, ascending.
    checkpoints: Vec<u64>,
    precopy_steps: u32,
    backup_lost: bool,
    finished: bool,
}

impl Sim {
    fn run_actions(&mut self) {
        while let Some(a) = self.c.poll_action() {
            assert!(!self.finished, "{a:?} after the end");
            match a {
                Action::PreCopyStep | Action::Checkpoint { paced: true } => assert!(
                    !self.c.lifecycle().forbids_checkpoints(),
                    "{a:?} while {:?}",
                    self.c.lifecycle()
                ),
                _ => {}
            }
            match a {
                Action::PreCopyStep => {
                    self.next_epoch += 1;
                    self.precopy_steps += 1;
                    if self.precopy_steps.is_multiple_of(3) {
                        self.c.handle_precopy_finished();
                    }
                }
                Action::Checkpoint { paced } => {
                    self.checkpoint();
                    if paced {
                        self.c.handle_checkpoint_sent(self.now);
                    }
                }
                Action::FinalCheckpoint => {
                    assert_eq!(self.c.phase(), Phase::Checkpointing);
                    let e = self.checkpoint();
                    self.c.handle_switchover_paused(e, self.now);
                }
                Action::Finish(_) => self.finished = true,
                _ => {}
            }
        }
    }

    fn checkpoint(&mut self) -> u64 {
        let e = self.next_epoch;
        self.next_epoch += 1;
        self.c.handle_checkpoint_taken(e);
        self.checkpoints.push(e);
        e
    }

    fn check(&self) {
        for lease in [true, false] {
            match self.c.release_now(lease) {
                None => {}
                Some(Release::All) => {
                    assert!(lease, "all output released without the lease");
                    assert!(self.backup_lost, "all output released with a backup");
                }
                Some(Release::Through(n)) => {
                    assert!(lease);
                    assert!(
                        n <= self.acked,
                        "output of {n} released, {} acked",
                        self.acked
                    );
                    assert!(n == 0 || self.checkpoints.contains(&n));
                }
            }
        }
        if matches!(self.c.lifecycle(), Lifecycle::Fenced) || self.c.lifecycle().is_final() {
            assert_eq!(self.c.release_now(true), None);
        }
        if self.c.lifecycle() == Lifecycle::Protected {
            assert_ne!(self.c.release_now(true), Some(Release::All));
        }
    }
}

proptest! {
    #[test]
    fn the_core_never_releases_early_nor_checkpoints_a_paused_guest(
        inputs in proptest::collection::vec(input(), 1..120)
    ) {
        let t0 = Instant::now();
        let mut sim = Sim {
            c: core(t0),
            now: t0,
            next_epoch: 1,
            acked: 0,
            checkpoints: Vec::new(),
            precopy_steps: 0,
            backup_lost: false,
            finished: false,
        };
        sim.c.with_witness();
        sim.c.handle_start(t0);
        sim.run_actions();
        for i in inputs {
            if sim.finished {
                break;
            }
            match i {
                Input::Tick { ms: d, in_flight, resync, pressure } => {
                    sim.now += ms(d);
                    let obs = Observed {
                        in_flight,
                        resync_pending: resync,
                        output_pressure: pressure,
                        backlog: ms(d),
                        precopy_room: in_flight < 2,
                    };
                    let busy = sim.c.handle_timeout(sim.now, obs);
                    if !busy && !sim.c.lifecycle().is_final() {
                        // Never a busy loop: the next wake-up is ahead.
                        prop_assert!(sim.c.poll_timeout().is_some_and(|t| t > sim.now));
                    }
                }
                Input::Committed { back } => {
                    let e = sim.next_epoch.saturating_sub(1 + back).max(sim.acked);
                    sim.acked = e;
                    sim.c.handle_committed(e);
                }
                Input::Error { new_session } => sim.c.handle_error(sim.now, new_session, &"error"),
                Input::ResyncRequired => sim.c.handle_resync_required(),
                Input::Connected => sim.c.handle_connected("dc2"),
                Input::Failover(k) => {
                    let ev = match k {
                        0..=4 => Event::Unfence,
                        5..=8 => Event::Fence,
                        9..=12 => Event::ProtectionLost,
                        13..=16 => Event::ProtectionRestored,
                        17 => Event::Promote { token: 2 },
                        18 => Event::SwitchoverDone { token: 2 },
                        _ => Event::Demote { token: 3 },
                    };
                    match ev {
                        Event::ProtectionLost => sim.backup_lost = true,
                        Event::ProtectionRestored => sim.backup_lost = false,
                        _ => {}
                    }
                    sim.c.handle_failover(sim.now, ev, 1);
                }
                Input::Switchover { lease } => {
                    let _ = sim.c.handle_switchover_request("vm1", lease, sim.next_epoch);
                }
                Input::GuestStopped => sim.c.handle_guest_stopped(),
            }
            sim.run_actions();
            sim.check();
        }
    }
}

/// A link that acknowledges each epoch `rtt` after it was sent, played
/// against the core for `run` of simulated time. Returns the checkpoints
/// taken and the interval in force at the end.
fn simulate(rtt: Duration, run: Duration) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut c = core(t0);
    let mut now = t0;
    let mut next_epoch = 1;
    // (due, epoch), in sending order.
    let mut acks: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut checkpoints = 0;
    c.handle_start(now);
    drain(&mut c);
    c.handle_precopy_finished();
    while now < t0 + run {
        let mut busy = true;
        while busy {
            while let Some(a) = c.poll_action() {
                if let Action::Checkpoint { paced } = a {
                    c.handle_checkpoint_taken(next_epoch);
                    acks.push_back((now + rtt, next_epoch));
                    next_epoch += 1;
                    checkpoints += 1;
                    if paced {
                        c.handle_checkpoint_sent(now);
                    }
                }
            }
            let observed = Observed {
                in_flight: acks.len() as u32,
                backlog: rtt * acks.len() as u32,
                ..Observed::default()
            };
            busy = c.handle_timeout(now, observed);
        }
        drain(&mut c);
        // Never released beyond what the backup acknowledged.
        let committed = next_epoch - 1 - acks.len() as u64;
        assert_eq!(c.release_now(true), Some(Release::Through(committed)));
        let wake = c.poll_timeout().expect("a wake-up while protecting");
        now = match acks.front() {
            Some(&(due, _)) if due <= wake => due,
            _ => wake,
        };
        while let Some(&(due, epoch)) = acks.front() {
            if due > now {
                break;
            }
            acks.pop_front();
            c.handle_committed(epoch);
        }
    }
    (checkpoints, c.interval())
}

#[test]
fn on_a_fast_link_one_checkpoint_per_interval() {
    let (n, interval) = simulate(ms(20), Duration::from_secs(10));
    assert!((99..=101).contains(&n), "{n} checkpoints in 10 s at 100 ms");
    assert_eq!(interval, INTERVAL);
}

#[test]
fn on_a_slow_link_checkpoints_wait_for_acks_and_the_interval_stretches() {
    let (n, interval) = simulate(ms(1000), Duration::from_secs(10));
    // Never more than the in-flight limit per round trip.
    assert!(n <= 10 * MAX_IN_FLIGHT as u64 + MAX_IN_FLIGHT as u64, "{n}");
    assert!(interval > INTERVAL, "stretched to {interval:?}");
}
