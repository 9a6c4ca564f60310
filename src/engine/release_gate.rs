//! Which held output may leave: the output-commit rule of a protected VM,
//! as a small state machine the `protect` shell consults before every
//! release.
//!
//! Output of epoch N may leave once the backup holds a replica that it
//! would resume from and that includes the end of epoch N. Two things make
//! that more than "the backup acknowledged N":
//!
//! - Not every acknowledged epoch is a replica one can resume from.
//!   Pre-copy epochs carry pages and no state, and during a resync they
//!   fill a replica beside the live one. Only the commit of a checkpoint
//!   (an epoch with the VM's state) moves what the backup would resume
//!   from; a resync forgets the checkpoints sent before it, whose commits
//!   may never come.
//! - A VM resumed at takeover serves before any replica of it exists (the
//!   old site is down, or its standby is still filling). Its output leaves
//!   at once then: there is nothing to commit it to, and holding it would
//!   stop the service. That ends at the pause of the first checkpoint of
//!   its synchronisation: from then on its output waits for commits like
//!   any protected VM's. A flag that only the failover state machine
//!   clears (it never does when it never declared protection lost) kept
//!   such a VM releasing ahead of its replica forever; see issue 13.
//!
//! Whether the failover rules allow output at all (lease, promise,
//! fencing) and whether they declared the backup lost are the caller's
//! inputs: this gate only says how far output may go.

use std::collections::VecDeque;

/// How far held output may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Everything, the running epoch included (no replica to wait for).
    All,
    /// Epochs up to and including this one (0: none).
    Through(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    /// The VM serves and the backup has no replica of it: release all.
    Unreplicated,
    /// Epochs up to here may leave without a commit (the output that
    /// left unprotected before the first checkpoint of the sync).
    Through(u64),
}

#[derive(Debug, Clone)]
pub struct ReleaseGate {
    floor: Floor,
    /// Checkpoints sent and not yet known committed, ascending.
    pending: VecDeque<u64>,
    /// The newest checkpoint the backup committed: what it would resume.
    committed: u64,
}

impl Default for ReleaseGate {
    fn default() -> Self {
        Self::new()
    }
}

impl ReleaseGate {
    /// A VM whose protection starts with it: nothing leaves before the
    /// first checkpoint commits.
    pub fn new() -> Self {
        Self {
            floor: Floor::Through(0),
            pending: VecDeque::new(),
            committed: 0,
        }
    }

    /// A VM that already serves without a replica (resumed at takeover):
    /// its output leaves at once until its first checkpoint is taken.
    pub fn serving_unreplicated() -> Self {
        Self {
            floor: Floor::Unreplicated,
            ..Self::new()
        }
    }

    /// The guest was paused for checkpoint `epoch`: its output up to here
    /// is closed under that number.
    pub fn checkpoint_taken(&mut self, epoch: u64) {
        if self.floor == Floor::Unreplicated {
            // What left before this pause is part of this checkpoint's
            // state; what the guest sends from now on waits for commits.
            self.floor = Floor::Through(epoch);
        }
        if self.pending.back().is_none_or(|&last| epoch > last) {
            self.pending.push_back(epoch);
        }
    }

    /// A full resync starts: the checkpoints sent before it may never be
    /// committed (the backup rejected one, or lost its session); only a
    /// checkpoint of the resync can release their output.
    pub fn resync_started(&mut self) {
        self.pending.clear();
    }

    /// The backup acknowledged every epoch up to `epoch`. Returns true when
    /// that moved the committed checkpoint.
    pub fn committed(&mut self, epoch: u64) -> bool {
        let mut moved = false;
        while let Some(&c) = self.pending.front() {
            if c > epoch {
                break;
            }
            self.pending.pop_front();
            if c > self.committed {
                self.committed = c;
                moved = true;
            }
        }
        moved
    }

    /// The newest checkpoint the backup would resume from (0: none yet).
    pub fn committed_checkpoint(&self) -> u64 {
        self.committed
    }

    /// True once a checkpoint taken since the VM served unreplicated (or
    /// since protection started) holds the floor: output waits for commits.
    pub fn waits_for_commits(&self) -> bool {
        self.floor != Floor::Unreplicated
    }

    /// How far output may go, given whether the failover rules declared
    /// the backup lost (the VM then runs unprotected).
    pub fn release(&self, backup_lost: bool) -> Release {
        match self.floor {
            _ if backup_lost => Release::All,
            Floor::Unreplicated => Release::All,
            Floor::Through(f) => Release::Through(f.max(self.committed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_vm_releases_only_committed_checkpoints() {
        let mut g = ReleaseGate::new();
        assert_eq!(g.release(false), Release::Through(0));
        // Pre-copy epochs 1..=3 are acknowledged: nothing may leave.
        assert!(!g.committed(3));
        assert_eq!(g.release(false), Release::Through(0));
        g.checkpoint_taken(4);
        g.checkpoint_taken(5);
        assert!(g.committed(4));
        assert_eq!(g.release(false), Release::Through(4));
        assert_eq!(g.committed_checkpoint(), 4);
        assert!(g.committed(5));
        assert_eq!(g.release(false), Release::Through(5));
    }

    #[test]
    fn precopy_acks_of_a_resync_release_nothing_held_before_it() {
        let mut g = ReleaseGate::new();
        g.checkpoint_taken(4);
        g.committed(4);
        // Checkpoints 5 and 6 are sent; 5 is rejected, a resync starts.
        g.checkpoint_taken(5);
        g.checkpoint_taken(6);
        g.resync_started();
        // The resync's pre-copy epochs 7..=9 are acknowledged.
        assert!(!g.committed(9));
        assert_eq!(g.release(false), Release::Through(4));
        // Its first checkpoint commits: everything before it may leave.
        g.checkpoint_taken(10);
        assert!(g.committed(10));
        assert_eq!(g.release(false), Release::Through(10));
    }

    #[test]
    fn a_resumed_vm_serves_until_its_first_checkpoint_then_waits_for_commits() {
        let mut g = ReleaseGate::serving_unreplicated();
        assert_eq!(g.release(false), Release::All);
        assert!(!g.waits_for_commits());
        // Its new standby answers: pre-copy acknowledged, still serving.
        g.committed(5);
        assert_eq!(g.release(false), Release::All);
        // The first checkpoint's pause: what came before may leave,
        // nothing after it until it commits.
        g.checkpoint_taken(6);
        assert!(g.waits_for_commits());
        assert_eq!(g.release(false), Release::Through(6));
        g.checkpoint_taken(7);
        assert_eq!(g.release(false), Release::Through(6));
        g.committed(7);
        assert_eq!(g.release(false), Release::Through(7));
        assert_eq!(g.committed_checkpoint(), 7);
    }

    #[test]
    fn a_lost_backup_releases_everything_and_its_return_restores_the_rule() {
        let mut g = ReleaseGate::new();
        g.checkpoint_taken(4);
        g.committed(4);
        g.checkpoint_taken(5);
        assert_eq!(g.release(true), Release::All);
        assert_eq!(g.release(false), Release::Through(4));
    }

    #[test]
    fn acknowledgements_are_cumulative_and_never_move_back() {
        let mut g = ReleaseGate::new();
        for e in [2, 3, 5, 8] {
            g.checkpoint_taken(e);
        }
        assert!(g.committed(6));
        assert_eq!(g.committed_checkpoint(), 5);
        assert!(!g.committed(4));
        assert_eq!(g.committed_checkpoint(), 5);
        // A checkpoint number that does not grow is not recorded twice.
        g.checkpoint_taken(8);
        assert!(g.committed(8));
        assert_eq!(g.committed_checkpoint(), 8);
    }
}
