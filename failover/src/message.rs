//! Messages of the failover protocol. They travel over the sites'
//! authenticated QUIC connections (wired in the engine); this crate only
//! produces and consumes them.

use std::time::Duration;

/// A party of the protocol: one of the two sites of a VM, or the witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(pub u32);

/// What a site says about itself in heartbeats and acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stance {
    /// Runs the VM under the token it carries.
    Active,
    /// Holds (or is resynchronising) the replica and promises not to ask
    /// the witness for the lease before `detection_timeout` has passed
    /// since it received the acknowledged heartbeat, if that heartbeat
    /// said `Active` (only an active peer's heartbeats hold a standby
    /// back: an idle or standby peer does not run the VM).
    Standby,
    /// Has asked the witness for the lease and has not had a definitive
    /// answer: it may hold the lease already, so it promises nothing.
    Candidate,
    /// Neither runs the VM nor promises anything (fenced, demoted, just
    /// restarted).
    Idle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Site to site, every heartbeat interval.
    Heartbeat {
        seq: u64,
        token: u64,
        stance: Stance,
    },
    /// Reply to a heartbeat, echoing its sequence number. A `Standby` ack
    /// is the promise the primary may run on without the witness.
    HeartbeatAck {
        seq: u64,
        token: u64,
        stance: Stance,
    },
    /// Site to witness: grant or renew the lease. `token` is the highest
    /// token the site knows.
    LeaseRequest { req: u64, token: u64 },
    /// Witness to site. `granted` holds the lease's validity from the
    /// witness's receipt of the request; `token`/`holder` are the lease's
    /// current state either way.
    LeaseReply {
        req: u64,
        granted: Option<Duration>,
        token: u64,
        holder: Option<SiteId>,
    },
    /// Site to witness: give my lease (under `token`) to `to`, for a
    /// planned switchover.
    Handover { req: u64, token: u64, to: SiteId },
}
