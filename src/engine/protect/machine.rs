//! The protector's decisions, sans-IO (quinn-proto style): inputs are
//! `handle_*` calls carrying the time, outputs are [`Action`]s polled with
//! [`ProtectCore::poll_action`] and a wake-up time from
//! [`ProtectCore::poll_timeout`]. No clock is read, no guest, session or
//! socket is touched here, so every sequence of events can be replayed in
//! a unit test on simulated time.
//!
//! The driver (`protect.rs`) feeds it what the guest, the replication
//! session and the failover state machine report, executes the actions,
//! and keeps what only it can hold: the guest, the encoder, the session,
//! the pre-copy cursors, the addresses, the operator's reply channel.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use failover::Event;
use netops::config::HookEvent;
use netops::policy::Role;
use tracing::{error, info, warn};

use super::action::{Action, ArbiterCall, Finish};
use super::lifecycle::{Lifecycle, Phase, Switchover};
use crate::engine::pacer::{Decision, Pacer};
use crate::engine::release_gate::{Release, ReleaseGate};

/// A switchover not done by then is aborted: the backup did not commit
/// the final epoch, or the witness did not move the lease.
pub const SWITCHOVER_DEADLINE: Duration = Duration::from_secs(20);

/// The first wait after a replication error; doubled up to the maximum.
pub const RETRY_FIRST: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// While output leaves at once, how soon after the guest sent it.
pub const UNPROTECTED_FLUSH: Duration = Duration::from_millis(2);

/// What the core is told once, at construction.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub vm: String,
    pub site: String,
    pub backup: String,
    pub interval: Duration,
    pub max_in_flight: u32,
}

/// What the driver saw of the session and the output buffer just before
/// [`ProtectCore::handle_timeout`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Epochs sent and not yet acknowledged.
    pub in_flight: u32,
    /// The backup asked for a full resync.
    pub resync_pending: bool,
    /// Held output fills more than half the buffer.
    pub output_pressure: bool,
    /// How long the link needs to drain what is in flight.
    pub backlog: Duration,
    /// The link has room for another pre-copy epoch.
    pub precopy_room: bool,
}

/// The failover side's facts, when a witness is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Witnessed {
    /// Output has been allowed at least once (addresses announced).
    announced: bool,
    /// The failover rules declared the backup lost.
    backup_lost: bool,
}

/// A queued action; the steady state's name is resolved when polled, as
/// the actions before it may change it.
#[derive(Debug)]
enum Queued {
    Do(Action),
    ShowSteadyState,
}

#[derive(Debug)]
pub struct ProtectCore {
    cfg: CoreConfig,
    lifecycle: Lifecycle,
    phase: Phase,
    pacer: Pacer,
    gate: ReleaseGate,
    witness: Option<Witnessed>,
    /// Replication errors in a row (for the backoff).
    errors_in_a_row: u32,
    /// The last observation, for the pacer once the checkpoint is sent.
    observed: Observed,
    queue: VecDeque<Queued>,
    wake: Option<Instant>,
}

impl ProtectCore {
    /// A VM whose protection starts with a full synchronisation, without a
    /// witness (see [`Self::with_witness`]).
    pub fn new(cfg: CoreConfig, now: Instant) -> Self {
        let pacer = Pacer::new(cfg.interval, cfg.max_in_flight, now);
        Self {
            cfg,
            lifecycle: Lifecycle::Protected,
            phase: Phase::PreCopy,
            pacer,
            gate: ReleaseGate::new(),
            witness: None,
            errors_in_a_row: 0,
            observed: Observed::default(),
            queue: VecDeque::new(),
            wake: None,
        }
    }

    /// Output leaves only while the failover rules allow it (the `lease_ok`
    /// of [`Self::release_now`]), and their events drive the lifecycle.
    pub fn with_witness(&mut self) {
        self.witness = Some(Witnessed {
            announced: false,
            backup_lost: false,
        });
        self.settle();
    }

    /// For a VM resumed at takeover: no synchronisation until the other
    /// site (the old primary, now holding a standby) connects; until the
    /// first checkpoint of that synchronisation the VM serves unprotected
    /// under this site's lease.
    pub fn serve_until_peer_returns(&mut self) {
        self.phase = Phase::AwaitPeer;
        self.gate = ReleaseGate::serving_unreplicated();
        if let Some(w) = &mut self.witness {
            w.announced = true;
        }
        self.settle();
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The newest checkpoint the backup would resume from.
    pub fn committed_checkpoint(&self) -> u64 {
        self.gate.committed_checkpoint()
    }

    /// The checkpoint interval in force (stretched when the link lags).
    pub fn interval(&self) -> Duration {
        self.pacer.interval()
    }

    /// True when held output leaves without waiting for the backup (it
    /// was declared lost, or it holds no replica of a VM that serves).
    pub fn releases_at_once(&self) -> bool {
        self.gate.release(self.backup_lost()) == Release::All
    }

    /// How far held output may go now, given whether the failover rules
    /// allow this site to release at all (`lease_ok`, read by the driver
    /// at the moment of release: a late timer never stretches a lease).
    /// None: nothing may leave.
    pub fn release_now(&self, lease_ok: bool) -> Option<Release> {
        if self.lifecycle.holds_output() || (self.witness.is_some() && !lease_ok) {
            return None;
        }
        Some(self.gate.release(self.backup_lost()))
    }

    /// The state to show once nothing transient (sync, switchover) is on.
    pub fn steady_state(&self) -> &'static str {
        if self.lifecycle.holds_output() {
            "fenced"
        } else if self.releases_at_once() {
            "unprotected"
        } else {
            "protected"
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        Some(match self.queue.pop_front()? {
            Queued::Do(a) => a,
            Queued::ShowSteadyState => Action::ShowState(self.steady_state()),
        })
    }

    /// When [`Self::handle_timeout`] wants to be called again at the
    /// latest (an event may call for it sooner).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.wake
    }

    /// Protection starts (the `run` of the driver).
    pub fn handle_start(&mut self, now: Instant) {
        self.pacer = Pacer::new(self.cfg.interval, self.cfg.max_in_flight, now);
        if self.phase == Phase::AwaitPeer {
            warn!(vm = %self.cfg.vm, peer = %self.cfg.backup, "running unprotected until a standby at the other site answers");
            self.push(Action::ShowState("unprotected"));
        } else {
            self.begin_sync("protection starts");
        }
    }

    /// Decides the next piece of work at `now`. Returns true when it
    /// queued one: call again once it is done, before waiting.
    pub fn handle_timeout(&mut self, now: Instant, observed: Observed) -> bool {
        self.observed = observed;
        self.wake = None;
        if self.lifecycle.is_final() {
            return false;
        }
        let mut wake = now + self.cfg.interval;
        if let Lifecycle::SwitchingOver(sw) = self.lifecycle {
            if now >= sw.deadline {
                self.abort_switchover(sw, now);
                return true;
            }
            wake = wake.min(sw.deadline);
        }
        let paused = self.lifecycle.forbids_checkpoints();
        if self.phase == Phase::PreCopy && !paused {
            self.push(Action::PumpHashRequests);
        }
        let mut step = None;
        match self.phase {
            _ if paused => {}
            Phase::AwaitPeer => {}
            Phase::Backoff { until, new_session } => {
                if now >= until {
                    self.end_backoff(new_session);
                    return true;
                }
                wake = wake.min(until);
            }
            // Room is made by acknowledgements, which wake the driver.
            Phase::PreCopy if observed.precopy_room => step = Some(Action::PreCopyStep),
            Phase::PreCopy => {}
            Phase::Checkpointing if observed.resync_pending => {
                self.begin_sync("the backup needs a full resync");
                return true;
            }
            Phase::Checkpointing => {
                match self
                    .pacer
                    .decide(now, observed.in_flight, observed.output_pressure)
                {
                    Decision::Checkpoint => step = Some(Action::Checkpoint { paced: true }),
                    Decision::WaitUntil(t) => wake = t,
                    Decision::WaitForAck => {}
                }
            }
        }
        if let Some(step) = step {
            self.push(step);
            return true;
        }
        if self.releases_at_once() {
            // Unprotected: output leaves without waiting for a commit, a
            // couple of milliseconds after the guest sent it.
            self.push(Action::Flush);
            wake = wake.min(now + UNPROTECTED_FLUSH);
        }
        self.wake = Some(wake);
        false
    }

    /// The guest was paused for checkpoint `epoch`: its output up to here
    /// is closed under that number.
    pub fn handle_checkpoint_taken(&mut self, epoch: u64) {
        self.gate.checkpoint_taken(epoch);
        self.settle();
    }

    /// A paced checkpoint went to the session at `now`.
    pub fn handle_checkpoint_sent(&mut self, now: Instant) {
        self.pacer
            .checkpoint_taken(now, self.observed.in_flight, self.observed.backlog);
    }

    /// The last pre-copy round is done: the first checkpoint follows.
    pub fn handle_precopy_finished(&mut self) {
        self.phase = Phase::Checkpointing;
        self.push(Action::Checkpoint { paced: false });
        self.queue.push_back(Queued::ShowSteadyState);
    }

    /// The backup acknowledged every epoch up to `epoch`.
    pub fn handle_committed(&mut self, epoch: u64) {
        if self.gate.committed(epoch) {
            self.errors_in_a_row = 0;
        }
        self.settle();
        self.push(Action::Flush);
        self.check_switchover();
    }

    /// The backup needs a full resync.
    pub fn handle_resync_required(&mut self) {
        if !matches!(self.phase, Phase::Backoff { .. }) {
            self.begin_sync("the backup needs a full resync");
        }
    }

    /// The session reached the backup's standby.
    pub fn handle_connected(&mut self, peer: &str) {
        if self.phase == Phase::AwaitPeer {
            info!(vm = %self.cfg.vm, peer = %peer, "a standby answers: synchronising the running VM to it");
            self.begin_sync("a standby answers");
        }
    }

    /// A replication error (anything but a demotion or a guest that is
    /// gone): the step under way is abandoned, the guest runs on (output
    /// held as the rules say), and after a backoff a full resync starts,
    /// over a new session when the old one cannot go on.
    pub fn handle_error(&mut self, now: Instant, new_session: bool, error: &dyn std::fmt::Display) {
        self.queue.clear();
        if self.lifecycle.is_final() {
            return;
        }
        self.errors_in_a_row = self.errors_in_a_row.saturating_add(1);
        let wait = RETRY_FIRST
            .saturating_mul(1 << self.errors_in_a_row.min(8).saturating_sub(1))
            .min(RETRY_MAX);
        error!(vm = %self.cfg.vm, error = %error, retry_in = ?wait, new_session, "replication error: the guest runs on, output waits; full resync after the backoff");
        self.phase = Phase::Backoff {
            until: now + wait,
            new_session,
        };
        self.push(Action::BufferWrites(false));
        self.push(Action::ShowState("recovering"));
    }

    /// The guest is gone: protection ends.
    pub fn handle_guest_stopped(&mut self) {
        self.queue.clear();
        if self.lifecycle.is_final() {
            return;
        }
        warn!(vm = %self.cfg.vm, "guest stopped: protection ends");
        self.lifecycle = Lifecycle::Stopped;
        self.push(Action::Finish(Finish::GuestStopped));
    }

    /// The operator asks to move the VM to the backup. Err: refused, with
    /// the reason; Ok: the final checkpoint is queued.
    pub fn handle_switchover_request(
        &mut self,
        vm: &str,
        lease_ok: bool,
        next_epoch: u64,
    ) -> Result<(), String> {
        let refusal = match self.witness {
            _ if vm != self.cfg.vm => {
                Some(format!("this process protects {}, not {vm}", self.cfg.vm))
            }
            None => Some("switchover needs a [witness] in the configuration".into()),
            Some(_) if matches!(self.lifecycle, Lifecycle::SwitchingOver(_)) => {
                Some("a switchover is already under way".into())
            }
            Some(_) if self.phase != Phase::Checkpointing => Some(format!(
                "{} is synchronising or recovering its replica; retry once `remus-wan status` says protected",
                self.cfg.site
            )),
            Some(w)
                if self.lifecycle.holds_output()
                    || w.backup_lost
                    || !self.gate.waits_for_commits()
                    || !lease_ok =>
            {
                Some(format!(
                    "{} is not in a state to hand over (fenced, unprotected or without a lease): see `remus-wan status`",
                    self.cfg.site
                ))
            }
            Some(_)
                if self.gate.committed_checkpoint() + 1
                    < next_epoch.saturating_sub(self.cfg.max_in_flight as u64) =>
            {
                Some("the backup is far behind; retry when it has caught up".into())
            }
            Some(_) => None,
        };
        if let Some(why) = refusal {
            return Err(why);
        }
        info!(vm = %self.cfg.vm, to = %self.cfg.backup, "switchover: final checkpoint, then the lease moves");
        self.push(Action::FinalCheckpoint);
        Ok(())
    }

    /// The final checkpoint `final_epoch` was sent and the guest paused
    /// (the switchover began at `started`): the failover state machine
    /// hears of it now, so a failure before left nothing to undo there.
    pub fn handle_switchover_paused(&mut self, final_epoch: u64, started: Instant) {
        self.push(Action::Arbiter(ArbiterCall::StartSwitchover));
        self.push(Action::ShowState("switching over"));
        self.lifecycle = Lifecycle::SwitchingOver(Switchover {
            final_epoch,
            started,
            deadline: started + SWITCHOVER_DEADLINE,
            committed_reported: false,
            held: false,
        });
        self.check_switchover();
    }

    /// A verdict of the failover state machine; `token` is its fencing
    /// token now.
    pub fn handle_failover(&mut self, now: Instant, ev: Event, token: u64) {
        let Some(mut w) = self.witness else {
            return;
        };
        if self.lifecycle.is_final() {
            return;
        }
        let vm = self.cfg.vm.clone();
        match ev {
            Event::Fence => match &mut self.lifecycle {
                Lifecycle::SwitchingOver(sw) => {
                    // The hand-over was asked of the witness: output is
                    // held (the guest is already paused) until it
                    // answers. Not a fence: no hooks, the addresses move
                    // with the outcome.
                    sw.held = true;
                    info!(vm = %vm, token, "switchover: output held while the witness moves the lease");
                }
                Lifecycle::Fenced => {}
                _ if !w.announced => {}
                _ => {
                    self.lifecycle = Lifecycle::Fenced;
                    warn!(vm = %vm, token, "fenced: this site reaches neither the backup nor the witness; guest paused, output held");
                    self.step_down(token, HookEvent::Fence, Action::PauseGuest, "fenced");
                }
            },
            Event::Unfence => {
                let was_fenced = self.lifecycle.holds_output();
                match &mut self.lifecycle {
                    Lifecycle::SwitchingOver(sw) => sw.held = false,
                    Lifecycle::Fenced => self.lifecycle = Lifecycle::Protected,
                    _ => {}
                }
                self.settle();
                if !w.announced {
                    w.announced = true;
                    info!(vm = %vm, token, "this site may release the VM's output: announcing its addresses");
                    self.push(Action::SetRole {
                        role: Role::Active,
                        token,
                    });
                    self.push(Action::PointDnsHere);
                } else if was_fenced {
                    info!(vm = %vm, token, "unfenced: guest resumed");
                    self.push(Action::SetRole {
                        role: Role::Active,
                        token,
                    });
                    self.push(Action::ResumeGuest);
                    self.queue.push_back(Queued::ShowSteadyState);
                }
                self.push(Action::Flush);
            }
            Event::ProtectionLost => {
                w.backup_lost = true;
                warn!(vm = %vm, token, "protection lost: the backup site is unreachable; the VM runs unprotected (output no longer waits for it)");
                self.push(Action::Hooks {
                    event: HookEvent::ProtectionLost,
                    token,
                    sites: false,
                });
                if !self.lifecycle.holds_output() {
                    self.push(Action::ShowState("unprotected"));
                }
                self.push(Action::Flush);
            }
            Event::ProtectionRestored => {
                w.backup_lost = false;
                info!(vm = %vm, token, "protection restored: the backup site is back");
                self.push(Action::Hooks {
                    event: HookEvent::ProtectionRestored,
                    token,
                    sites: false,
                });
                if matches!(
                    self.lifecycle,
                    Lifecycle::Protected | Lifecycle::Unprotected
                ) {
                    self.queue.push_back(Queued::ShowSteadyState);
                }
            }
            Event::Demote { token } => {
                if matches!(self.lifecycle, Lifecycle::SwitchingOver(_)) {
                    self.push(Action::ReplySwitchover(Err(format!(
                        "demoted under token {token} during the switchover"
                    ))));
                }
                error!(vm = %vm, token, "demoted: {} runs the VM under a newer fencing token; stopping it here", self.cfg.backup);
                self.step_down(token, HookEvent::Demote, Action::HaltGuest, "demoted");
                self.push(Action::Finish(Finish::Demoted { token }));
                self.lifecycle = Lifecycle::Demoted { token };
            }
            Event::SwitchoverDone { token } => {
                let took = match self.lifecycle {
                    Lifecycle::SwitchingOver(sw) => now.saturating_duration_since(sw.started),
                    _ => Duration::ZERO,
                };
                info!(vm = %vm, token, took_ms = took.as_millis() as u64, "switchover done: {} runs the VM", self.cfg.backup);
                self.push(Action::SetRole {
                    role: Role::Down,
                    token,
                });
                self.push(Action::Hooks {
                    event: HookEvent::Demote,
                    token,
                    sites: true,
                });
                if matches!(self.lifecycle, Lifecycle::SwitchingOver(_)) {
                    self.push(Action::ReplySwitchover(Ok(format!(
                        "{vm} handed over to {} under fencing token {token} in {} ms",
                        self.cfg.backup,
                        took.as_millis()
                    ))));
                }
                self.push(Action::ShowState("handed over"));
                self.push(Action::Finish(Finish::HandedOver));
                self.lifecycle = Lifecycle::HandedOver;
            }
            Event::Promote { .. } => {}
        }
        self.witness = Some(w);
        self.settle();
    }

    fn push(&mut self, a: Action) {
        self.queue.push_back(Queued::Do(a));
    }

    /// This site stops serving the VM under `token` (fenced or demoted):
    /// withdraw its addresses, run the operator's hooks (a demotion also
    /// tells them which site runs the VM now), stop the guest with `guest`
    /// (pause, or halt for good) and show `state`.
    fn step_down(&mut self, token: u64, event: HookEvent, guest: Action, state: &'static str) {
        self.push(Action::SetRole {
            role: Role::Down,
            token,
        });
        self.push(Action::Hooks {
            event,
            token,
            sites: event == HookEvent::Demote,
        });
        self.push(guest);
        self.push(Action::ShowState(state));
    }

    fn backup_lost(&self) -> bool {
        self.witness.is_some_and(|w| w.backup_lost)
    }

    /// Protected and Unprotected follow the release rule: whether output
    /// waits for commits now.
    fn settle(&mut self) {
        if matches!(
            self.lifecycle,
            Lifecycle::Protected | Lifecycle::Unprotected
        ) {
            self.lifecycle = if self.releases_at_once() {
                Lifecycle::Unprotected
            } else {
                Lifecycle::Protected
            };
        }
    }

    /// Starts a full synchronisation (at start, on the backup's request,
    /// or after an error): the backup builds a new replica beside the one
    /// it has until this one is consistent. The checkpoints sent before
    /// may never be committed: only the sync's own can release output.
    fn begin_sync(&mut self, why: &'static str) {
        self.gate.resync_started();
        self.phase = Phase::PreCopy;
        self.push(Action::BeginSync { why });
        self.push(Action::ShowState("synchronising"));
    }

    /// The backoff is over: a new session if needed (a sync follows once
    /// its standby answers), else a full resync at once.
    fn end_backoff(&mut self, new_session: bool) {
        if new_session {
            self.phase = Phase::AwaitPeer;
            self.push(Action::NewSession);
            self.push(Action::ShowState("synchronising"));
        } else {
            self.begin_sync("after a replication error");
        }
    }

    /// Once the final epoch is committed (and its output released), the
    /// failover state machine asks the witness to move the lease.
    fn check_switchover(&mut self) {
        let committed = self.gate.committed_checkpoint();
        let Lifecycle::SwitchingOver(sw) = &mut self.lifecycle else {
            return;
        };
        if self.witness.is_none() || sw.committed_reported || committed < sw.final_epoch {
            return;
        }
        sw.committed_reported = true;
        info!(vm = %self.cfg.vm, epoch = sw.final_epoch, "switchover: final epoch committed at the backup; handing the lease over");
        self.push(Action::Arbiter(ArbiterCall::FinalEpochCommitted));
    }

    /// Abandons a switchover past its deadline. Before the witness was
    /// asked, the guest resumes at once under the lease; after, it stays
    /// paused with output held until the witness answers (Unfence resumes
    /// it; if the lease had moved, the switchover ends as done).
    fn abort_switchover(&mut self, sw: Switchover, now: Instant) {
        let why = if sw.committed_reported {
            "the witness did not move the lease"
        } else {
            "the backup did not commit the final epoch"
        };
        warn!(vm = %self.cfg.vm, after = ?now.saturating_duration_since(sw.started), why, "switchover aborted: the VM stays here");
        self.push(Action::ReplySwitchover(Err(format!(
            "switchover aborted after {} s: {why}; {} keeps running {}",
            SWITCHOVER_DEADLINE.as_secs(),
            self.cfg.site,
            self.cfg.vm
        ))));
        if self.witness.is_some() {
            self.push(Action::Arbiter(ArbiterCall::AbortSwitchover));
            if sw.committed_reported {
                self.lifecycle = Lifecycle::Fenced;
                self.push(Action::ShowState("fenced"));
                return;
            }
        }
        self.lifecycle = Lifecycle::Protected;
        self.settle();
        self.push(Action::ResumeGuest);
        self.queue.push_back(Queued::ShowSteadyState);
    }
}
