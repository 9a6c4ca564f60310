//! One site's view of one protected VM: whether it may run the VM and
//! release its output, when to fence, when to promote.
//!
//! The rule that keeps two sites from ever releasing output at once: a site
//! releases output only while it is `Active` and holds either
//! - a witness lease (valid until the send time of the request that was
//!   granted, plus the lease, minus the clock margin), or
//! - a promise from its peer: a `Standby`/`Idle` acknowledgement of one of
//!   the heartbeats it sent while `Active`. The peer asks the witness for
//!   the lease only after `detection_timeout` without an `Active`
//!   heartbeat from us, so it cannot become active before (heartbeat send
//!   time + detection timeout − margin).
//!
//! The witness grants the lease to another site only after the current
//! one's has expired on its clock, and a peer that asked the witness stops
//! promising (`Candidate`) until it has a definitive answer. Hence: with
//! both links lost, the primary fences itself; with one, it runs on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::message::{Message, SiteId, Stance};
use crate::timers::Timers;

/// What the engine must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This site now holds the lease under `token`: activate the replica,
    /// attach the network, announce the VM's addresses.
    Promote { token: u64 },
    /// Output may be released (again): run the guest, release held output.
    Unfence,
    /// Output may no longer be released: pause the guest, hold output.
    Fence,
    /// Another site holds a newer token: stop the VM for good, withdraw
    /// announcements, resynchronise as a standby.
    Demote { token: u64 },
    /// Active and the peer has been silent for the detection timeout: the
    /// VM runs unprotected.
    ProtectionLost,
    /// The peer is heard again.
    ProtectionRestored,
    /// Switchover: the lease has moved to the peer; this site is now idle.
    SwitchoverDone { token: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send { to: SiteId, msg: Message },
    Event(Event),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// Waiting for the engine to commit the final epoch.
    FinalEpoch,
    /// Final epoch committed; asking the witness to move the lease.
    Requested,
}

#[derive(Debug)]
pub struct Site {
    me: SiteId,
    peer: SiteId,
    witness: SiteId,
    timers: Timers,
    stance: Stance,
    token: u64,
    replica_ready: bool,
    lease_until: Option<Instant>,
    promise_until: Option<Instant>,
    /// Last time anything arrived from the peer.
    peer_heard: Instant,
    /// Last time the peer said it runs the VM (`Active`): a standby's
    /// detection timeout counts from this, not from `peer_heard`. A peer
    /// process that restarted after a crash is `Idle` (its VM is gone),
    /// a fresh standby process is `Standby`: hearing either must not keep
    /// us from taking over, or a primary whose process comes back within
    /// the detection timeout leaves the VM running nowhere, for good.
    primary_heard: Instant,
    /// Since when we are a candidate (to know whether the peer spoke since).
    candidate_since: Option<Instant>,
    unprotected: bool,
    output_allowed: bool,
    handover: Option<Handover>,
    /// After a switchover aborted once the witness had been asked: nothing
    /// held before counts (the witness may have moved the lease), so output
    /// waits for a reply to a request numbered from here.
    confirm_from: Option<u64>,
    /// A switchover was aborted after the witness was asked: a newer token
    /// learnt now is that switchover's outcome.
    handover_aborted: bool,
    hb_seq: u64,
    hb_sent: VecDeque<(u64, Instant)>,
    req_seq: u64,
    req_sent: VecDeque<(u64, Instant)>,
    next_heartbeat: Instant,
    next_request: Instant,
    out: VecDeque<Output>,
    /// The latest time we were given, so deadlines already passed are not
    /// reported as wake-ups again.
    now: Instant,
}

/// How many unanswered heartbeats / requests we remember send times for.
const SENT_MEMORY: usize = 128;

impl Site {
    /// The site that starts the VM. It runs it, but releases output only
    /// once it holds the lease or its peer's promise.
    pub fn primary(
        me: SiteId,
        peer: SiteId,
        witness: SiteId,
        timers: Timers,
        now: Instant,
    ) -> Self {
        Self::new(me, peer, witness, timers, Stance::Active, 0, now)
    }

    /// The site that holds the replica. It may take over only once the
    /// engine reports its replica ready ([`Site::set_replica_ready`]).
    pub fn backup(me: SiteId, peer: SiteId, witness: SiteId, timers: Timers, now: Instant) -> Self {
        Self::new(me, peer, witness, timers, Stance::Standby, 0, now)
    }

    /// A site process that restarted: whatever VM it ran is gone. It knows
    /// the last token it saw (persisted by the engine) and idles until it
    /// has resynchronised a replica.
    pub fn restarted(
        me: SiteId,
        peer: SiteId,
        witness: SiteId,
        timers: Timers,
        token: u64,
        now: Instant,
    ) -> Self {
        Self::new(me, peer, witness, timers, Stance::Idle, token, now)
    }

    fn new(
        me: SiteId,
        peer: SiteId,
        witness: SiteId,
        timers: Timers,
        stance: Stance,
        token: u64,
        now: Instant,
    ) -> Self {
        let mut s = Self {
            me,
            peer,
            witness,
            timers,
            stance,
            token,
            replica_ready: false,
            lease_until: None,
            promise_until: None,
            peer_heard: now,
            primary_heard: now,
            candidate_since: None,
            unprotected: false,
            output_allowed: false,
            handover: None,
            confirm_from: None,
            handover_aborted: false,
            hb_seq: 0,
            hb_sent: VecDeque::new(),
            req_seq: 0,
            req_sent: VecDeque::new(),
            next_heartbeat: now,
            next_request: now,
            out: VecDeque::new(),
            now,
        };
        s.handle_timeout(now);
        s
    }

    /// Whether the engine reported a replica it could activate.
    pub fn replica_ready(&self) -> bool {
        self.replica_ready
    }

    pub fn stance(&self) -> Stance {
        self.stance
    }

    /// The highest fencing token this site knows; it travels with every
    /// epoch and every announcement decision.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// True while this site may release the VM's output and announce its
    /// addresses.
    pub fn may_release_output(&self, now: Instant) -> bool {
        self.stance == Stance::Active
            && self.handover != Some(Handover::Requested)
            && self.confirm_from.is_none()
            && (self.lease_until.is_some_and(|t| now < t)
                || self.promise_until.is_some_and(|t| now < t))
    }

    /// Until when output may be released without hearing anything new:
    /// the later of the lease and the peer's promise, while
    /// [`Site::may_release_output`] holds. An engine checks its own clock
    /// against this before each release, so a late wake-up of the shell
    /// can never stretch a lease.
    pub fn release_allowed_until(&self, now: Instant) -> Option<Instant> {
        if !self.may_release_output(now) {
            return None;
        }
        self.lease_until.max(self.promise_until)
    }

    /// The engine has (or no longer has) a replica at a committed epoch.
    pub fn set_replica_ready(&mut self, ready: bool, now: Instant) {
        self.replica_ready = ready;
        if ready && self.stance == Stance::Idle {
            self.stance = Stance::Standby;
        }
        self.handle_timeout(now);
    }

    /// Begins a planned switchover to the peer. The engine pauses the
    /// guest, commits a final epoch and then calls
    /// [`Site::final_epoch_committed`].
    pub fn start_switchover(&mut self) -> bool {
        if self.stance != Stance::Active || self.handover.is_some() {
            return false;
        }
        self.handover = Some(Handover::FinalEpoch);
        true
    }

    /// Abandons a switchover that did not end in time (the backup never
    /// committed the final epoch, or the witness did not answer). Before
    /// the witness was asked nothing changed: output may go on under the
    /// lease. Once it was asked, the witness may have moved the lease
    /// already: output stays held until the witness answers a request sent
    /// from now on (granting the lease again, or naming the new holder,
    /// which ends as [`Event::SwitchoverDone`]). Returns false when no
    /// switchover was under way.
    pub fn abort_switchover(&mut self, now: Instant) -> bool {
        match self.handover.take() {
            None => return false,
            Some(Handover::FinalEpoch) => {}
            Some(Handover::Requested) => {
                self.confirm_from = Some(self.req_seq + 1);
                self.handover_aborted = true;
                self.next_request = now;
            }
        }
        tracing::warn!(site = self.me.0, token = self.token, "switchover aborted");
        self.handle_timeout(now);
        true
    }

    pub fn final_epoch_committed(&mut self, now: Instant) {
        if self.handover == Some(Handover::FinalEpoch) {
            self.handover = Some(Handover::Requested);
            self.next_request = now;
            self.handle_timeout(now);
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Site::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.next_heartbeat;
        if self.wants_requests() {
            t = t.min(self.next_request);
        }
        // Expiries change what we may do: wake up for them too.
        let detection = self.peer_heard + self.timers.detection_timeout;
        let primary_gone = self.primary_heard + self.timers.detection_timeout;
        for deadline in [
            self.lease_until,
            self.promise_until,
            Some(detection),
            Some(primary_gone),
        ]
        .into_iter()
        .flatten()
        {
            if deadline > self.now {
                t = t.min(deadline);
            }
        }
        t
    }

    fn wants_requests(&self) -> bool {
        matches!(self.stance, Stance::Active | Stance::Candidate)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let silent =
            now.saturating_duration_since(self.peer_heard) >= self.timers.detection_timeout;
        let primary_silent =
            now.saturating_duration_since(self.primary_heard) >= self.timers.detection_timeout;
        if self.stance == Stance::Standby && self.replica_ready && primary_silent {
            tracing::warn!(
                site = self.me.0,
                "no active peer heard for the detection timeout: asking the witness for the lease"
            );
            self.stance = Stance::Candidate;
            self.candidate_since = Some(now);
            self.next_request = now;
        }
        if self.stance == Stance::Active && silent != self.unprotected {
            self.unprotected = silent;
            self.event(if silent {
                Event::ProtectionLost
            } else {
                Event::ProtectionRestored
            });
        }
        if now >= self.next_heartbeat {
            self.hb_seq += 1;
            remember(&mut self.hb_sent, self.hb_seq, now);
            self.send(
                self.peer,
                Message::Heartbeat {
                    seq: self.hb_seq,
                    token: self.token,
                    stance: self.stance,
                },
            );
            self.next_heartbeat = now + self.timers.heartbeat_interval;
        }
        if self.wants_requests() && now >= self.next_request {
            self.req_seq += 1;
            remember(&mut self.req_sent, self.req_seq, now);
            let msg = match self.handover {
                Some(Handover::Requested) => Message::Handover {
                    req: self.req_seq,
                    token: self.token,
                    to: self.peer,
                },
                _ => Message::LeaseRequest {
                    req: self.req_seq,
                    token: self.token,
                },
            };
            self.send(self.witness, msg);
            self.next_request = now + self.timers.renew_interval;
        }
        self.update_output(now);
    }

    pub fn handle_message(&mut self, from: SiteId, msg: Message, now: Instant) {
        if from == self.peer {
            self.peer_heard = self.peer_heard.max(now);
            if let Message::Heartbeat { stance, .. } | Message::HeartbeatAck { stance, .. } = msg {
                if stance == Stance::Active {
                    self.primary_heard = self.primary_heard.max(now);
                }
            }
            match msg {
                Message::Heartbeat { seq, token, stance } => {
                    self.learn_token(token, stance, now);
                    self.send(
                        self.peer,
                        Message::HeartbeatAck {
                            seq,
                            token: self.token,
                            stance: self.stance,
                        },
                    );
                }
                Message::HeartbeatAck { seq, token, stance } => {
                    self.learn_token(token, stance, now);
                    let promises = matches!(stance, Stance::Standby | Stance::Idle);
                    if self.stance == Stance::Active && promises && token <= self.token {
                        if let Some(sent) = sent_at(&self.hb_sent, seq) {
                            let until = (sent + self.timers.detection_timeout)
                                .checked_sub(self.timers.clock_margin);
                            self.promise_until = self.promise_until.max(until);
                        }
                    }
                }
                _ => {}
            }
        } else if from == self.witness {
            if let Message::LeaseReply {
                req,
                granted,
                token,
                holder,
            } = msg
            {
                self.lease_reply(req, granted, token, holder, now);
            }
        }
        self.handle_timeout(now);
    }

    /// A token newer than ours means another site was granted the lease.
    fn learn_token(&mut self, token: u64, peer_stance: Stance, now: Instant) {
        if token > self.token {
            self.token = token;
            self.superseded(now);
        }
        // A candidate that hears an active peer again stays a candidate
        // until the witness answers its latest request (see lease_reply).
        let _ = peer_stance;
    }

    fn lease_reply(
        &mut self,
        req: u64,
        granted: Option<Duration>,
        token: u64,
        holder: Option<SiteId>,
        now: Instant,
    ) {
        let mine = holder == Some(self.me);
        let confirms = self.confirm_from.is_some_and(|c| req >= c);
        match granted {
            Some(validity) if mine => {
                if token < self.token {
                    return; // a reply from before a newer grant we know of
                }
                if confirms && token == self.token {
                    // The aborted switchover moved nothing: ours again.
                    self.confirm_from = None;
                    self.handover_aborted = false;
                }
                // Validity counts from the witness's receipt, which is
                // after our send: count from our send, conservatively. An
                // unsolicited grant (handover) has no send time: it gives
                // no validity until the renewal we send at once.
                let until = sent_at(&self.req_sent, req)
                    .and_then(|sent| (sent + validity).checked_sub(self.timers.clock_margin));
                match self.stance {
                    Stance::Active => {}
                    Stance::Standby | Stance::Candidate if self.replica_ready => {
                        self.stance = Stance::Active;
                        self.candidate_since = None;
                        self.handover = None;
                        self.promise_until = None;
                        // Our heartbeats so far did not say `Active`, so
                        // the peer's detection timeout did not count from
                        // them (see `primary_heard`): their acks promise
                        // nothing.
                        self.hb_sent.clear();
                        self.unprotected = false;
                        self.next_request = now;
                        tracing::info!(site = self.me.0, token, "lease granted: promoting");
                        self.event(Event::Promote { token });
                    }
                    // Without a replica there is nothing to run: let the
                    // lease lapse.
                    _ => return,
                }
                self.token = token;
                self.lease_until = self.lease_until.max(until);
            }
            _ => {
                if token > self.token {
                    self.token = token;
                    self.superseded(now);
                } else if self.stance == Stance::Candidate
                    && req == self.req_seq
                    && self.candidate_since.is_some_and(|c| self.primary_heard > c)
                {
                    // Definitive: our latest request was refused, and the
                    // peer runs the VM after all. Requests travel in
                    // order, so no earlier one was granted either. (An
                    // idle peer is no reason to stop asking: the lease of
                    // its dead predecessor will lapse.)
                    self.stance = Stance::Standby;
                    self.candidate_since = None;
                }
            }
        }
    }

    /// Our token (now `self.token`) has been superseded: another site holds
    /// or held the lease since.
    fn superseded(&mut self, now: Instant) {
        match self.stance {
            // We asked the witness to move the lease to the peer, after the
            // final epoch was committed and with output held: whoever tells
            // us first of the newer token, it is the handover's outcome.
            // The peer's heartbeat (its own connection) often arrives
            // before the witness's reply; taking it for a demotion made a
            // successful switchover look failed to the engine.
            Stance::Active
                if self.handover == Some(Handover::Requested) || self.handover_aborted =>
            {
                self.stance = Stance::Idle;
                self.handover = None;
                self.confirm_from = None;
                self.handover_aborted = false;
                self.lease_until = None;
                self.promise_until = None;
                self.replica_ready = false;
                self.event(Event::SwitchoverDone { token: self.token });
            }
            Stance::Active | Stance::Candidate => self.demote(now),
            _ => {}
        }
    }

    fn demote(&mut self, _now: Instant) {
        let was_active = self.stance == Stance::Active;
        self.stance = Stance::Idle;
        self.confirm_from = None;
        self.handover_aborted = false;
        self.candidate_since = None;
        self.lease_until = None;
        self.promise_until = None;
        self.handover = None;
        self.replica_ready = false;
        if was_active {
            tracing::warn!(
                site = self.me.0,
                token = self.token,
                "a newer token exists: demoting"
            );
            self.event(Event::Demote { token: self.token });
        }
    }

    fn update_output(&mut self, now: Instant) {
        let allowed = self.may_release_output(now);
        if allowed != self.output_allowed {
            self.output_allowed = allowed;
            self.event(if allowed {
                Event::Unfence
            } else {
                Event::Fence
            });
        }
    }

    fn event(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }

    fn send(&mut self, to: SiteId, msg: Message) {
        self.out.push_back(Output::Send { to, msg });
    }
}

fn remember(log: &mut VecDeque<(u64, Instant)>, seq: u64, now: Instant) {
    if log.len() == SENT_MEMORY {
        log.pop_front();
    }
    log.push_back((seq, now));
}

fn sent_at(log: &VecDeque<(u64, Instant)>, seq: u64) -> Option<Instant> {
    log.iter().find(|(s, _)| *s == seq).map(|(_, t)| *t)
}
