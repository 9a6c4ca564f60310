//! Where a protected VM stands, in two independent dimensions: its
//! lifecycle (who may release the guest's output and whether the guest
//! runs, decided by the failover rules and the operator) and its
//! replication phase (what is being sent to the backup). A fenced VM can be
//! in any phase; a synchronising one in any lifecycle state but the ends.

use std::time::Instant;

/// Where the replication of the VM stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the backup's standby to answer before a full sync: the
    /// VM already serves (resumed at takeover), or the session was
    /// restarted after an error.
    AwaitPeer,
    /// A full synchronisation by pre-copy, one step per epoch (the cursors
    /// that read memory and disk are the driver's).
    PreCopy,
    /// Checkpoints, every interval.
    Checkpointing,
    /// After an error the guest runs on, output held as the rules say,
    /// nothing is sent until `until`; then a full resync (over a new
    /// session when `new_session`).
    Backoff { until: Instant, new_session: bool },
}

/// What the protector may do with the guest and its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The guest runs; its output waits for the backup's commits.
    Protected,
    /// The guest runs; its output leaves at once: the failover rules
    /// declared the backup lost, or the VM serves before any replica of it
    /// exists (resumed at takeover, until its first checkpoint).
    Unprotected,
    /// This site reaches neither the backup nor the witness (or a
    /// switchover's outcome is unknown): guest paused, output held, no
    /// checkpoint, addresses withdrawn.
    Fenced,
    /// A planned move: the guest is paused after its final epoch, no
    /// checkpoint is taken.
    SwitchingOver(Switchover),
    /// The switchover is done: the VM runs at the other site. Final.
    HandedOver,
    /// Another site holds a newer fencing token. Final.
    Demoted { token: u64 },
    /// The guest is gone (exited, or stopped by its owner). Final.
    Stopped,
}

/// A planned move in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switchover {
    pub final_epoch: u64,
    pub started: Instant,
    /// Not done by then: aborted.
    pub deadline: Instant,
    /// The backup committed the final epoch: the witness was asked to
    /// move the lease (from then on an abort cannot resume the guest
    /// before the witness answers).
    pub committed_reported: bool,
    /// A fence arrived after the witness was asked: output is held until
    /// it answers.
    pub held: bool,
}

impl Lifecycle {
    /// Protection is over; nothing more happens.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::HandedOver | Self::Demoted { .. } | Self::Stopped
        )
    }

    /// No epoch may be taken: the guest is paused (fenced, switching
    /// over) or gone.
    pub fn forbids_checkpoints(&self) -> bool {
        matches!(self, Self::Fenced | Self::SwitchingOver(_)) || self.is_final()
    }

    /// Output may not leave whatever the commits say.
    pub fn holds_output(&self) -> bool {
        matches!(self, Self::Fenced)
            || matches!(self, Self::SwitchingOver(s) if s.held)
            || self.is_final()
    }
}
