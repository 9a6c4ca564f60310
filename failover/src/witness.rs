//! The witness: grants each VM's lease to at most one site at a time, with
//! a fencing token that only grows.
//!
//! Sans-IO: [`Witness::handle`] takes a message and the witness's clock and
//! returns what to persist and what to send. The shell must make every
//! [`WitnessOutput::Persist`] durable before sending the messages that
//! follow it (write-ahead), so a restarted witness never hands out a token
//! twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::message::{Message, SiteId};
use crate::timers::Timers;

/// The durable part of one VM's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: Option<SiteId>,
    pub token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessOutput {
    /// Make this record durable before sending anything that follows.
    Persist {
        vm: String,
        record: LeaseRecord,
    },
    Send {
        to: SiteId,
        msg: Message,
    },
}

#[derive(Debug, Clone)]
struct Lease {
    record: LeaseRecord,
    /// Witness clock; the lease is free for another site only after it.
    expires: Instant,
}

#[derive(Debug)]
pub struct Witness {
    timers: Timers,
    leases: BTreeMap<String, Lease>,
}

impl Witness {
    pub fn new(timers: Timers) -> Self {
        Self {
            timers,
            leases: BTreeMap::new(),
        }
    }

    /// A witness restarting from its persisted records. It cannot know how
    /// long the holders' leases have left, so it treats each as renewed
    /// now: nobody else gets it before a full lease has passed.
    pub fn recover(
        timers: Timers,
        records: impl IntoIterator<Item = (String, LeaseRecord)>,
        now: Instant,
    ) -> Self {
        let expires = now + timers.lease + timers.clock_margin;
        let leases = records
            .into_iter()
            .map(|(vm, record)| (vm, Lease { record, expires }))
            .collect();
        Self { timers, leases }
    }

    /// The current record of a VM's lease.
    pub fn record(&self, vm: &str) -> Option<LeaseRecord> {
        self.leases.get(vm).map(|l| l.record)
    }

    pub fn handle(
        &mut self,
        vm: &str,
        from: SiteId,
        msg: Message,
        now: Instant,
    ) -> Vec<WitnessOutput> {
        match msg {
            Message::LeaseRequest { req, token } => self.request(vm, from, req, token, now),
            Message::Handover { req, token, to } => self.handover(vm, from, req, token, to, now),
            // Heartbeats are between sites; a witness ignores them.
            _ => Vec::new(),
        }
    }

    fn lease_mut(&mut self, vm: &str, now: Instant) -> &mut Lease {
        self.leases.entry(vm.to_owned()).or_insert(Lease {
            record: LeaseRecord {
                holder: None,
                token: 0,
            },
            expires: now,
        })
    }

    fn request(
        &mut self,
        vm: &str,
        from: SiteId,
        req: u64,
        _known_token: u64,
        now: Instant,
    ) -> Vec<WitnessOutput> {
        let duration = self.timers.lease;
        let margin = self.timers.clock_margin;
        let lease = self.lease_mut(vm, now);
        let mut out = Vec::new();
        if lease.record.holder == Some(from) {
            // Renewal, or a repeat whose reply was lost: same token.
            lease.expires = now + duration + margin;
        } else if lease.record.holder.is_none() || now >= lease.expires {
            lease.record = LeaseRecord {
                holder: Some(from),
                token: lease.record.token + 1,
            };
            lease.expires = now + duration + margin;
            out.push(WitnessOutput::Persist {
                vm: vm.to_owned(),
                record: lease.record,
            });
            tracing::info!(
                vm,
                site = from.0,
                token = lease.record.token,
                "lease granted"
            );
        } else {
            out.push(WitnessOutput::Send {
                to: from,
                msg: Message::LeaseReply {
                    req,
                    granted: None,
                    token: lease.record.token,
                    holder: lease.record.holder,
                },
            });
            return out;
        }
        out.push(WitnessOutput::Send {
            to: from,
            msg: Message::LeaseReply {
                req,
                granted: Some(duration),
                token: lease.record.token,
                holder: Some(from),
            },
        });
        out
    }

    fn handover(
        &mut self,
        vm: &str,
        from: SiteId,
        req: u64,
        token: u64,
        to: SiteId,
        now: Instant,
    ) -> Vec<WitnessOutput> {
        let duration = self.timers.lease;
        let margin = self.timers.clock_margin;
        let lease = self.lease_mut(vm, now);
        let mut out = Vec::new();
        let fresh = lease.record.holder == Some(from) && lease.record.token == token;
        let repeat = lease.record.holder == Some(to) && lease.record.token == token + 1;
        if fresh {
            lease.record = LeaseRecord {
                holder: Some(to),
                token: token + 1,
            };
            lease.expires = now + duration + margin;
            out.push(WitnessOutput::Persist {
                vm: vm.to_owned(),
                record: lease.record,
            });
            tracing::info!(
                vm,
                from = from.0,
                to = to.0,
                token = token + 1,
                "lease handed over"
            );
        }
        if fresh || repeat {
            // The new holder learns it holds the lease; it renews at once
            // because it cannot tell how old this message is.
            out.push(WitnessOutput::Send {
                to,
                msg: Message::LeaseReply {
                    req: 0,
                    granted: Some(Duration::ZERO),
                    token: lease.record.token,
                    holder: Some(to),
                },
            });
        }
        out.push(WitnessOutput::Send {
            to: from,
            msg: Message::LeaseReply {
                req,
                granted: None,
                token: lease.record.token,
                holder: lease.record.holder,
            },
        });
        out
    }
}
