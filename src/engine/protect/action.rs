//! What the protect core asks its driver to do. The driver executes the
//! actions in order; one that fails abandons the ones queued behind it
//! (they belonged to the same step) and the error goes back to the core.

use netops::config::HookEvent;
use netops::policy::Role;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Starts a full synchronisation's input/output: captured writes kept
    /// again, encoder reset, dirty tracking restarted, the disk measured.
    BeginSync { why: &'static str },
    /// One pre-copy epoch.
    PreCopyStep,
    /// Asks the standby for the next hash batches of a checksum resync.
    PumpHashRequests,
    /// One checkpoint; `paced` ones report back to the pacer when sent.
    Checkpoint { paced: bool },
    /// A replication session in place of one that cannot go on.
    NewSession,
    /// Keep (or drop, and stop keeping) the guest's captured disk writes.
    BufferWrites(bool),
    /// Releases held output as far as [`super::ProtectCore::release_now`]
    /// allows at the moment it runs (the lease is read then).
    Flush,
    /// Pauses the guest (an error is fatal).
    PauseGuest,
    /// Resumes the guest.
    ResumeGuest,
    /// Pauses the guest for good, errors ignored: it runs elsewhere now.
    HaltGuest,
    /// The VM's addresses take `role` under `token`.
    SetRole { role: Role, token: u64 },
    /// DNS names point to this site (the first time output is allowed).
    PointDnsHere,
    /// Runs the operator's hooks for `event`; `sites` passes this site and
    /// the backup (a demotion: who gave the VM up to whom).
    Hooks {
        event: HookEvent,
        token: u64,
        sites: bool,
    },
    /// A switchover: final checkpoint and pause, then
    /// [`super::ProtectCore::handle_switchover_paused`].
    FinalCheckpoint,
    /// Tells the failover state machine what the switchover reached.
    Arbiter(ArbiterCall),
    /// Answers the operator's switchover request.
    ReplySwitchover(Result<String, String>),
    /// The state shown by `status` and the metrics.
    ShowState(&'static str),
    /// Protection ends.
    Finish(Finish),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArbiterCall {
    StartSwitchover,
    FinalEpochCommitted,
    AbortSwitchover,
}

/// Why protection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The switchover is done: the other site runs the VM.
    HandedOver,
    /// A newer fencing token elsewhere: stopped here for good (an error
    /// for the caller).
    Demoted { token: u64 },
    /// The guest is gone.
    GuestStopped,
}
