//! The witness: grants each VM's lease to at most one of that VM's two
//! sites at a time, with a fencing token that only grows.
//!
//! Sans-IO: [`Witness::handle`] takes a message and the witness's clock and
//! returns what to persist or what to send.
//!
//! # Write-ahead, by construction
//!
//! A reply that grants or renews a lease goes out only once the record it
//! states is known to be durable. A message that changes a VM's record (a
//! grant to a new holder, a handover) yields a single
//! [`WitnessOutput::Persist`] and nothing else: the replies wait inside the
//! witness, which keeps its record as it was. The shell writes the record
//! and reports the outcome with [`Witness::persisted`]:
//!
//! - durable: the record takes effect (the lease period starts then) and
//!   the waiting replies come out of that call;
//! - failed: nothing is sent and the record stays as it was, so the site's
//!   next request is a new grant and is persisted again. A failed write may
//!   still have reached the disk (the folder's fsync fails after the
//!   rename), so the witness no longer knows what its file says about the
//!   VM: until a write for the VM succeeds, even a renewal of the current
//!   holder first rewrites the record (a restarted witness would otherwise
//!   recover a holder it never announced while it renewed another).
//!   Refusals grant nothing and are answered at once.
//!
//! While a write is in progress for a VM, further messages about that VM
//! are dropped: sites repeat requests every renewal interval.
//!
//! # Who may hold a lease
//!
//! The witness knows each VM's two sites (its primary and backup in the
//! configuration) and refuses any other site, and any VM it does not know,
//! with a refusal that names no holder and token 0 (a site acts on a
//! refusal only if it carries a newer token than its own).
//!
//! # Starting
//!
//! [`Witness::recover`] starts from the persisted records. It cannot know
//! how long a lease has left, or whether a VM without a record had a lease
//! from an earlier, lost state, so no lease changes hands for one lease
//! period (+ margin) after a start; the recorded holder may renew. Every new
//! grant's token exceeds the VM's record, the state's token floor and every
//! token a site of the VM reported since the start (requests carry the
//! highest token the site knows), so a witness re-initialised after losing
//! its file never hands out a token a site would ignore.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Make this record durable, then report the outcome with
    /// [`Witness::persisted`]. Always the only output of its call.
    Persist {
        vm: String,
        record: LeaseRecord,
    },
    Send {
        to: SiteId,
        msg: Message,
    },
}

/// What one message asks of a VM's lease.
#[derive(Debug)]
struct Decision {
    /// The record after it (the current one for a renewal or refusal).
    record: LeaseRecord,
    /// Some reply tells a site it holds the lease.
    grants: bool,
    /// The holder's lease period starts (again) once the record is durable.
    starts_lease: bool,
    replies: Vec<(SiteId, Message)>,
}

/// A record handed to the shell, and the replies that wait for it.
#[derive(Debug)]
struct Pending {
    record: LeaseRecord,
    starts_lease: bool,
    replies: Vec<(SiteId, Message)>,
}

#[derive(Debug)]
struct Lease {
    /// The record last confirmed durable: what the witness answers from.
    record: LeaseRecord,
    /// Witness clock; the lease is free for another site only after it.
    /// `None`: free (nobody ever held it, as far as this witness knows).
    expires: Option<Instant>,
    /// Highest token a site of the VM reported since the start.
    seen: u64,
    /// A write for this VM failed: the file may hold another record.
    unsure: bool,
    pending: Option<Pending>,
}

#[derive(Debug)]
pub struct Witness {
    timers: Timers,
    /// The two sites that may hold each VM's lease.
    parties: BTreeMap<String, [SiteId; 2]>,
    /// Every new grant's token exceeds this.
    token_floor: u64,
    /// Records of the configured VMs, and those recovered for VMs no
    /// longer configured (kept, never served).
    leases: BTreeMap<String, Lease>,
    /// Refused (VM, site) pairs already logged as a warning.
    warned: BTreeSet<(String, SiteId)>,
}

impl Witness {
    /// A witness over a state that is the only one there ever was: no lease
    /// exists anywhere, tokens start at 1 (a simulation's first start). A
    /// real witness starts with [`Witness::recover`].
    pub fn new(timers: Timers, parties: impl IntoIterator<Item = (String, [SiteId; 2])>) -> Self {
        let parties: BTreeMap<_, _> = parties.into_iter().collect();
        let leases = parties
            .keys()
            .map(|vm| (vm.clone(), Lease::new(None, 0, None)))
            .collect();
        Self {
            timers,
            parties,
            token_floor: 0,
            leases,
            warned: BTreeSet::new(),
        }
    }

    /// A witness starting from its persisted state: `records` and the
    /// state's `token_floor`. No lease changes hands before one lease
    /// period (+ margin) from `now`: a recorded holder's lease is treated as
    /// renewed now, and a VM without a record as held by a site this state
    /// does not know of (the state may replace a lost one). Recorded holders
    /// may renew at once.
    pub fn recover(
        timers: Timers,
        parties: impl IntoIterator<Item = (String, [SiteId; 2])>,
        token_floor: u64,
        records: impl IntoIterator<Item = (String, LeaseRecord)>,
        now: Instant,
    ) -> Self {
        let expires = Some(now + timers.lease + timers.clock_margin);
        let parties: BTreeMap<_, _> = parties.into_iter().collect();
        let mut leases: BTreeMap<String, Lease> = records
            .into_iter()
            .map(|(vm, r)| (vm, Lease::new(r.holder, r.token, expires)))
            .collect();
        // Token 0, not the floor: the token in a reply tells a site that
        // another site was granted the lease under it (it demotes on a
        // higher one), and no grant was ever made under the floor. The
        // floor only raises the next grant's token.
        for vm in parties.keys() {
            leases
                .entry(vm.clone())
                .or_insert_with(|| Lease::new(None, 0, expires));
        }
        Self {
            timers,
            parties,
            token_floor,
            leases,
            warned: BTreeSet::new(),
        }
    }

    /// The current (durable) record of a VM's lease.
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
        let (req, token, to) = match msg {
            Message::LeaseRequest { req, token } => (req, token, None),
            Message::Handover { req, token, to } => (req, token, Some(to)),
            // Heartbeats are between sites; a witness ignores them.
            _ => return Vec::new(),
        };
        let Some(parties) = self.parties.get(vm).copied() else {
            self.refused(vm, from, "the VM is not in the witness's configuration");
            return vec![outsider_refusal(from, req)];
        };
        if !parties.contains(&from) {
            self.refused(
                vm,
                from,
                "the site is neither the VM's primary nor its backup",
            );
            return vec![outsider_refusal(from, req)];
        }
        if to.is_some_and(|to| to == from || !parties.contains(&to)) {
            self.refused(
                vm,
                from,
                "a handover to a site other than the VM's other site",
            );
            let lease = &self.leases[vm];
            return sends(refusal(lease, from, req).replies);
        }
        let timers = self.timers;
        let floor = self.token_floor;
        let lease = self
            .leases
            .get_mut(vm)
            .expect("every configured VM has a lease");
        lease.seen = lease.seen.max(token);
        if lease.pending.is_some() {
            tracing::debug!(
                vm,
                site = from.0,
                "lease record being written: message dropped"
            );
            return Vec::new();
        }
        let next_token = lease.record.token.max(lease.seen).max(floor) + 1;
        let d = match to {
            None => request(lease, from, req, timers.lease, next_token, now),
            Some(to) => handover(lease, from, req, token, to, next_token),
        };
        if d.record != lease.record || (d.grants && lease.unsure) {
            lease.pending = Some(Pending {
                record: d.record,
                starts_lease: d.starts_lease,
                replies: d.replies,
            });
            return vec![WitnessOutput::Persist {
                vm: vm.to_owned(),
                record: d.record,
            }];
        }
        if d.starts_lease {
            lease.expires = Some(now + timers.lease + timers.clock_margin);
        }
        sends(d.replies)
    }

    /// The shell's report on the last [`WitnessOutput::Persist`] for `vm`:
    /// `durable` once the record is on disk (written and synced), false if
    /// the write failed in any way. Returns the replies that waited for it
    /// (none after a failure).
    pub fn persisted(&mut self, vm: &str, durable: bool, now: Instant) -> Vec<WitnessOutput> {
        let timers = self.timers;
        let Some(lease) = self.leases.get_mut(vm) else {
            return Vec::new();
        };
        let Some(p) = lease.pending.take() else {
            return Vec::new();
        };
        if !durable {
            // Nothing was announced: the record stays as it was, and the
            // file may hold either version until a write succeeds.
            lease.unsure = true;
            tracing::warn!(
                vm,
                token = p.record.token,
                "lease record not persisted: nothing granted (the site will ask again)"
            );
            return Vec::new();
        }
        lease.unsure = false;
        if p.record != lease.record {
            tracing::info!(
                vm,
                site = p.record.holder.map(|h| h.0),
                token = p.record.token,
                "lease granted"
            );
        }
        lease.record = p.record;
        if p.starts_lease {
            // Counted from the confirmation, after the request's receipt:
            // later than the holder counts from, so never shorter.
            lease.expires = Some(now + timers.lease + timers.clock_margin);
        }
        sends(p.replies)
    }

    fn refused(&mut self, vm: &str, site: SiteId, why: &str) {
        if self.warned.insert((vm.to_owned(), site)) {
            tracing::warn!(vm, site = site.0, why, "lease request refused");
        } else {
            tracing::debug!(vm, site = site.0, why, "lease request refused");
        }
    }
}

impl Lease {
    fn new(holder: Option<SiteId>, token: u64, expires: Option<Instant>) -> Self {
        Self {
            record: LeaseRecord { holder, token },
            expires,
            seen: 0,
            unsure: false,
            pending: None,
        }
    }
}

fn request(
    lease: &Lease,
    from: SiteId,
    req: u64,
    validity: Duration,
    next_token: u64,
    now: Instant,
) -> Decision {
    let record = if lease.record.holder == Some(from) {
        // Renewal, or a repeat whose reply was lost: same token.
        lease.record
    } else if lease.expires.is_none_or(|e| now >= e) {
        LeaseRecord {
            holder: Some(from),
            token: next_token,
        }
    } else {
        return refusal(lease, from, req);
    };
    Decision {
        record,
        grants: true,
        starts_lease: true,
        replies: vec![(
            from,
            Message::LeaseReply {
                req,
                granted: Some(validity),
                token: record.token,
                holder: Some(from),
            },
        )],
    }
}

fn handover(
    lease: &Lease,
    from: SiteId,
    req: u64,
    token: u64,
    to: SiteId,
    next_token: u64,
) -> Decision {
    let fresh = lease.record.holder == Some(from) && lease.record.token == token;
    // Already handed over (the reply to `from` was lost): tell both again.
    let repeat = lease.record.holder == Some(to) && lease.record.token > token;
    if !fresh && !repeat {
        return refusal(lease, from, req);
    }
    let record = if fresh {
        LeaseRecord {
            holder: Some(to),
            token: next_token,
        }
    } else {
        lease.record
    };
    Decision {
        record,
        grants: true,
        starts_lease: fresh,
        replies: vec![
            // The new holder learns it holds the lease; it renews at once
            // because it cannot tell how old this message is.
            (
                to,
                Message::LeaseReply {
                    req: 0,
                    granted: Some(Duration::ZERO),
                    token: record.token,
                    holder: Some(to),
                },
            ),
            (
                from,
                Message::LeaseReply {
                    req,
                    granted: None,
                    token: record.token,
                    holder: record.holder,
                },
            ),
        ],
    }
}

fn refusal(lease: &Lease, from: SiteId, req: u64) -> Decision {
    Decision {
        record: lease.record,
        grants: false,
        starts_lease: false,
        replies: vec![(
            from,
            Message::LeaseReply {
                req,
                granted: None,
                token: lease.record.token,
                holder: lease.record.holder,
            },
        )],
    }
}

/// The refusal for a site that may not hold the VM's lease at all: it
/// names no holder and no token, so it changes nothing at a site.
fn outsider_refusal(to: SiteId, req: u64) -> WitnessOutput {
    WitnessOutput::Send {
        to,
        msg: Message::LeaseReply {
            req,
            granted: None,
            token: 0,
            holder: None,
        },
    }
}

fn sends(replies: Vec<(SiteId, Message)>) -> Vec<WitnessOutput> {
    replies
        .into_iter()
        .map(|(to, msg)| WitnessOutput::Send { to, msg })
        .collect()
}
