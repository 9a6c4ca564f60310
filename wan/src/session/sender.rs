//! Primary-site end of the replication session.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{info, warn};

use super::wire::{self, ControlFrame, Decoder, EpochKind, ErrorCode, Hello, Item};
use super::wire::{DiskReport, DiskSync, ReplicaReport};
use super::wire::{VerifyHashes, VerifyResult};
use super::{Backoff, SessionError};

/// Configuration of the sending end.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// This (primary) site's name, sent in HELLO.
    pub site: String,
    /// The replicated VM.
    pub vm_id: String,
    /// Epochs sent but not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// Un-acknowledged epochs kept for resume, at most (count)...
    pub window_epochs: usize,
    /// ...and in bytes. Older ones are dropped; if the receiver then needs
    /// one of them, the session falls back to a full resync.
    pub window_bytes: u64,
    /// Local limit on one epoch's size (the receiver's own limit, learned in
    /// HELLO_ACK, applies too).
    pub max_epoch_size: u64,
    /// Send a HEARTBEAT when nothing else was sent for this long.
    pub heartbeat_interval: Duration,
    /// Drop the connection when nothing arrived from the receiver for this long.
    pub peer_timeout: Duration,
    /// Reconnection delays.
    pub backoff: Backoff,
}

impl SenderConfig {
    pub fn new(site: impl Into<String>, vm_id: impl Into<String>) -> Self {
        Self {
            site: site.into(),
            vm_id: vm_id.into(),
            max_in_flight: 8,
            window_epochs: 256,
            window_bytes: 2 << 30,
            max_epoch_size: 1 << 30,
            heartbeat_interval: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(5),
            backoff: Backoff::default(),
        }
    }
}

/// What the sender tells its shell and the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// Shell: open a new connection (then call `handle_connected` or
    /// `handle_connect_failed`).
    Connect,
    /// Shell: close the current connection, after writing
    /// [`SessionError::error_frame`] to the stream when there is one. The
    /// session already counts the connection as gone.
    Close { error: SessionError },
    /// The receiver answered HELLO; streaming (re)starts with `resume_from`.
    Connected {
        peer_site: String,
        receiver_committed: u64,
        resume_from: u64,
    },
    /// Every epoch up to and including `epoch` is committed at the backup:
    /// the engine releases the output held for them.
    Committed { epoch: u64 },
    /// The receiver needs epochs this sender no longer holds (or rejected
    /// one): the engine must push a [`EpochKind::Full`] epoch next.
    ResyncRequired {
        receiver_committed: u64,
        oldest_held: Option<u64>,
        reason: String,
    },
    /// The connection ended; a new attempt follows after `retry_in`.
    Disconnected {
        error: SessionError,
        retry_in: Duration,
    },
    /// The session cannot go on (wrong VM, version, epoch over the
    /// receiver's limit); no reconnection is attempted.
    Failed { error: SessionError },
    /// The receiver compared a slice it was sent hashes of (online verify).
    VerifyResult(VerifyResult),
    /// The standby said what it holds (before `Connected`), or answered a
    /// hash request.
    DiskReport(DiskReport),
}

/// Why [`Sender::push_epoch`] refused an epoch. The session is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("epoch of {size} bytes is over the limit of {limit} bytes")]
    EpochTooLarge { size: u64, limit: u64 },
    #[error("a full resync is pending: the next epoch must be a full image")]
    ResyncPending,
    #[error("the session has failed: {0}")]
    Failed(SessionError),
}

#[derive(Debug)]
enum State {
    /// Waiting to reconnect at `retry_at`.
    Down { retry_at: Instant },
    /// The shell is opening a connection.
    Connecting,
    /// HELLO sent, waiting for HELLO_ACK.
    Handshaking,
    /// Streaming epochs.
    Up,
    /// Permanently stopped.
    Failed(SessionError),
}

#[derive(Debug)]
struct Held {
    epoch: u64,
    kind: EpochKind,
    payload: Bytes,
    sent: bool,
    /// VERIFY_HASHES frames that go right after this epoch on the stream.
    verify: Vec<Bytes>,
    /// A DISK_SYNC frame that goes right before this epoch, every time it
    /// is sent (the standby needs it to decode the epoch).
    prelude: Option<Bytes>,
}

/// The primary's replication session (sans-IO).
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    state: State,
    /// Un-acknowledged epochs, contiguous and ascending.
    window: VecDeque<Held>,
    window_bytes: u64,
    /// Number of the next pushed epoch.
    next_epoch: u64,
    /// Highest epoch the receiver has committed.
    acked: u64,
    /// Next epoch to transmit on the current connection.
    next_send: u64,
    /// Sent on this connection and not yet acked.
    /// (epoch, payload bytes) sent on this connection and not yet acked,
    /// ascending; kept apart from the window, which may evict them.
    on_wire: VecDeque<(u64, u64)>,
    resync_pending: bool,
    attempt: u32,
    peer_limit: Option<u64>,
    decoder: Decoder,
    out: VecDeque<Bytes>,
    events: VecDeque<SenderEvent>,
    last_rx: Instant,
    last_tx: Instant,
    hb_seq: u64,
    /// The standby's REPLICA report of the current connection.
    peer_report: Option<ReplicaReport>,
}

impl Sender {
    /// A new session whose first epoch will be number `first_epoch`
    /// (usually 1, or the last epoch the engine knows was committed + 1).
    /// It asks for a connection at once.
    pub fn new(cfg: SenderConfig, first_epoch: u64, now: Instant) -> Self {
        let first_epoch = first_epoch.max(1);
        let mut s = Self {
            cfg,
            state: State::Connecting,
            window: VecDeque::new(),
            window_bytes: 0,
            next_epoch: first_epoch,
            acked: first_epoch - 1,
            next_send: first_epoch,
            on_wire: VecDeque::new(),
            resync_pending: false,
            attempt: 0,
            peer_limit: None,
            decoder: Decoder::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            last_rx: now,
            last_tx: now,
            hb_seq: 0,
            peer_report: None,
        };
        s.events.push_back(SenderEvent::Connect);
        s
    }

    /// Number the next pushed epoch will get.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// Highest epoch the receiver has acknowledged as committed.
    pub fn committed(&self) -> u64 {
        self.acked
    }

    /// Epochs sent on the current connection and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.on_wire.len()
    }

    /// Payload bytes sent on the current connection and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> u64 {
        self.on_wire.iter().map(|(_, b)| b).sum()
    }

    /// Epochs held for resume (sent or not).
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// True while the engine must push a full epoch next.
    pub fn resync_pending(&self) -> bool {
        self.resync_pending
    }

    /// True once HELLO_ACK was received on the current connection.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Up)
    }

    /// The permanent failure, if any.
    pub fn failure(&self) -> Option<&SessionError> {
        match &self.state {
            State::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Queues a new epoch for replication and returns its number.
    pub fn push_epoch(
        &mut self,
        kind: EpochKind,
        payload: Bytes,
        _now: Instant,
    ) -> Result<u64, PushError> {
        if let State::Failed(e) = &self.state {
            return Err(PushError::Failed(e.clone()));
        }
        let size = payload.len() as u64;
        let limit = self
            .peer_limit
            .map_or(self.cfg.max_epoch_size, |p| p.min(self.cfg.max_epoch_size));
        if size > limit {
            return Err(PushError::EpochTooLarge { size, limit });
        }
        if self.resync_pending && kind == EpochKind::Delta {
            return Err(PushError::ResyncPending);
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        if kind == EpochKind::Full && self.resync_pending {
            info!(epoch, "full resync epoch queued");
            self.resync_pending = false;
            // Nothing older is needed any more: the full image replaces it.
            self.drop_unsent();
            self.next_send = epoch;
        }
        self.window_bytes += size;
        self.window.push_back(Held {
            epoch,
            kind,
            payload,
            sent: false,
            verify: Vec::new(),
            prelude: None,
        });
        self.evict();
        Ok(epoch)
    }

    /// As [`Self::push_epoch`], with a DISK_SYNC frame that precedes the
    /// epoch on the stream each time it is sent.
    pub fn push_epoch_with_prelude(
        &mut self,
        kind: EpochKind,
        payload: Bytes,
        prelude: Option<DiskSync>,
        now: Instant,
    ) -> Result<u64, PushError> {
        let epoch = self.push_epoch(kind, payload, now)?;
        if let Some(p) = prelude {
            if let Some(h) = self.window.iter_mut().find(|h| h.epoch == epoch) {
                h.prelude = Some(ControlFrame::DiskSync(p).encode());
            }
        }
        Ok(epoch)
    }

    /// Queues a DISK_SYNC control frame (a hash request) on the current
    /// connection; false when the session is not up (the engine asks again
    /// after it reconnects).
    pub fn send_disk_sync(&mut self, d: DiskSync, now: Instant) -> bool {
        if !matches!(self.state, State::Up) {
            return false;
        }
        self.send_control(ControlFrame::DiskSync(d), now);
        true
    }

    /// What the standby said it holds on the current (or last) connection.
    pub fn peer_report(&self) -> Option<ReplicaReport> {
        self.peer_report
    }

    /// Sends the hashes of a verify slice right after epoch `v.epoch`, the
    /// newest pushed epoch (the receiver must see them after that epoch
    /// and before the next). Returns false when that can no longer be
    /// done (another epoch was pushed since, or it left the window while
    /// the link is down): the engine asks again at a later epoch. Hashes
    /// can also be lost with a connection; the engine asks again then too.
    pub fn push_verify(&mut self, v: VerifyHashes, now: Instant) -> bool {
        let epoch = v.epoch;
        if epoch.checked_add(1) != Some(self.next_epoch) {
            return false;
        }
        let frame = ControlFrame::VerifyHashes(v).encode();
        if let Some(h) = self.window.iter_mut().find(|h| h.epoch == epoch) {
            if !h.sent {
                h.verify.push(frame);
                return true;
            }
        }
        if matches!(self.state, State::Up) && self.next_send > epoch {
            self.out.push_back(frame);
            self.last_tx = now;
            return true;
        }
        false
    }

    /// Drops the oldest held epochs while the window is over its bounds.
    fn evict(&mut self) {
        while self.window.len() > 1
            && (self.window.len() > self.cfg.window_epochs
                || self.window_bytes > self.cfg.window_bytes)
        {
            let h = self.window.pop_front().expect("non-empty");
            self.window_bytes -= h.payload.len() as u64;
            if !h.sent && matches!(self.state, State::Up | State::Handshaking) {
                // The stream would skip this epoch: only a full image helps.
                self.require_resync(format!(
                    "epoch {} dropped from the resume window before it could be sent",
                    h.epoch
                ));
            }
        }
    }

    fn drop_unsent(&mut self) {
        while self.window.back().is_some_and(|h| !h.sent) {
            let h = self.window.pop_back().expect("non-empty");
            self.window_bytes -= h.payload.len() as u64;
        }
    }

    fn require_resync(&mut self, reason: String) {
        if self.resync_pending {
            return;
        }
        warn!(
            receiver_committed = self.acked,
            reason = %reason,
            "falling back to a full resync of the VM"
        );
        self.resync_pending = true;
        self.drop_unsent();
        self.events.push_back(SenderEvent::ResyncRequired {
            receiver_committed: self.acked,
            oldest_held: self.window.front().map(|h| h.epoch),
            reason,
        });
    }

    /// The shell opened a connection (one ordered byte stream).
    pub fn handle_connected(&mut self, now: Instant) {
        if !matches!(self.state, State::Connecting) {
            return;
        }
        self.state = State::Handshaking;
        self.peer_report = None;
        self.decoder = Decoder::new();
        self.out.clear();
        self.last_rx = now;
        self.send_control(
            ControlFrame::Hello(Hello {
                version: wire::PROTOCOL_VERSION,
                site: self.cfg.site.clone(),
                vm_id: self.cfg.vm_id.clone(),
                next_epoch: self.next_epoch,
            }),
            now,
        );
    }

    /// Opening a connection failed.
    pub fn handle_connect_failed(&mut self, now: Instant, reason: &str) {
        if matches!(self.state, State::Connecting) {
            self.go_down(SessionError::ConnectionLost(reason.to_string()), now);
        }
    }

    /// The connection ended underneath the session.
    pub fn handle_disconnected(&mut self, now: Instant, reason: &str) {
        if matches!(
            self.state,
            State::Connecting | State::Handshaking | State::Up
        ) {
            self.go_down(SessionError::ConnectionLost(reason.to_string()), now);
        }
    }

    fn go_down(&mut self, error: SessionError, now: Instant) {
        let retry_in = self.cfg.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        warn!(error = %error, retry_in = ?retry_in, committed = self.acked, "replication link down");
        self.state = State::Down {
            retry_at: now + retry_in,
        };
        for h in &mut self.window {
            h.sent = false;
        }
        self.on_wire.clear();
        self.out.clear();
        self.decoder = Decoder::new();
        self.events
            .push_back(SenderEvent::Disconnected { error, retry_in });
    }

    fn fail(&mut self, error: SessionError) {
        warn!(error = %error, "replication session failed");
        self.out.clear();
        self.events.push_back(SenderEvent::Close {
            error: error.clone(),
        });
        self.events.push_back(SenderEvent::Failed {
            error: error.clone(),
        });
        self.state = State::Failed(error);
    }

    /// Ends the connection with `error` (sent to the peer), then reconnects.
    fn close_and_retry(&mut self, error: SessionError, now: Instant) {
        self.events.push_back(SenderEvent::Close {
            error: error.clone(),
        });
        self.go_down(error, now);
    }

    /// Bytes received from the receiver.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        if !matches!(self.state, State::Handshaking | State::Up) {
            return;
        }
        self.last_rx = now;
        self.decoder.push(data);
        loop {
            let item = match self.decoder.next_item() {
                Ok(Some(i)) => i,
                Ok(None) => break,
                Err(e) => {
                    self.close_and_retry(e.into(), now);
                    return;
                }
            };
            let frame = match item {
                Item::Control(f) => f,
                _ => {
                    self.close_and_retry(
                        SessionError::Unexpected {
                            frame: "EPOCH",
                            context: "from the receiver",
                        },
                        now,
                    );
                    return;
                }
            };
            if let Err(e) = self.handle_frame(frame, now) {
                match e {
                    SessionError::Version { .. }
                    | SessionError::WrongVm { .. }
                    | SessionError::EpochTooLarge { .. } => self.fail(e),
                    SessionError::Peer {
                        code: ErrorCode::Version | ErrorCode::WrongVm | ErrorCode::EpochTooLarge,
                        ..
                    } => {
                        // The peer already closed; just stop.
                        self.fail(e)
                    }
                    _ => self.close_and_retry(e, now),
                }
                return;
            }
            if !matches!(self.state, State::Handshaking | State::Up) {
                return;
            }
        }
    }

    fn handle_frame(&mut self, frame: ControlFrame, now: Instant) -> Result<(), SessionError> {
        match (frame, &self.state) {
            (ControlFrame::HelloAck(h), State::Handshaking) => {
                if h.version != wire::PROTOCOL_VERSION {
                    return Err(SessionError::Version {
                        ours: wire::PROTOCOL_VERSION,
                        peer: h.version,
                    });
                }
                if h.vm_id != self.cfg.vm_id {
                    return Err(SessionError::WrongVm {
                        ours: self.cfg.vm_id.clone(),
                        peer: h.vm_id,
                    });
                }
                self.peer_limit = Some(h.max_epoch_size);
                self.attempt = 0;
                self.state = State::Up;
                let resume_from = self.resume(h.last_committed, now);
                info!(
                    peer_site = %h.site,
                    receiver_committed = h.last_committed,
                    resume_from,
                    "replication session up"
                );
                self.events.push_back(SenderEvent::Connected {
                    peer_site: h.site,
                    receiver_committed: h.last_committed,
                    resume_from,
                });
                // Held epochs over the receiver's limit can never be sent.
                if let Some(h) = self
                    .window
                    .iter()
                    .find(|h| h.payload.len() as u64 > h_limit(self.peer_limit))
                {
                    return Err(SessionError::EpochTooLarge {
                        epoch: h.epoch,
                        size: h.payload.len() as u64,
                        limit: h_limit(self.peer_limit),
                    });
                }
                Ok(())
            }
            (ControlFrame::Ack { committed }, State::Up) => {
                if committed >= self.next_send {
                    return Err(SessionError::Unexpected {
                        frame: "ACK",
                        context: "for an epoch that was never sent",
                    });
                }
                self.ack(committed);
                Ok(())
            }
            (ControlFrame::Heartbeat { .. }, _) => Ok(()),
            (ControlFrame::DiskReport(DiskReport::Replica(r)), State::Handshaking) => {
                // Comes just before HELLO_ACK, so the engine knows what the
                // standby holds when it hears `Connected`.
                self.peer_report = Some(r);
                self.events
                    .push_back(SenderEvent::DiskReport(DiskReport::Replica(r)));
                Ok(())
            }
            (
                ControlFrame::DiskReport(
                    d @ (DiskReport::Hashes { .. } | DiskReport::NoSeed { .. }),
                ),
                State::Up,
            ) => {
                self.events.push_back(SenderEvent::DiskReport(d));
                Ok(())
            }
            (ControlFrame::VerifyResult(r), State::Up) => {
                self.events.push_back(SenderEvent::VerifyResult(r));
                Ok(())
            }
            (ControlFrame::Error(e), _) => {
                warn!(code = ?e.code, epoch = e.epoch, message = %e.message, "receiver reported an error");
                if e.code == ErrorCode::Rejected {
                    // The replica could not take that epoch: start over from a full image.
                    self.require_resync(format!(
                        "receiver rejected epoch {}: {}",
                        e.epoch, e.message
                    ));
                }
                Err(SessionError::Peer {
                    code: e.code,
                    epoch: e.epoch,
                    message: e.message,
                })
            }
            (f, _) => Err(SessionError::Unexpected {
                frame: f.name(),
                context: "in this state",
            }),
        }
    }

    /// Works out where streaming restarts after HELLO_ACK.
    fn resume(&mut self, c: u64, _now: Instant) -> u64 {
        if c > self.acked {
            self.ack(c.min(self.next_epoch.saturating_sub(1)));
        }
        if c >= self.next_epoch {
            // The receiver is ahead of anything we produced (we restarted).
            self.next_epoch = c + 1;
            self.acked = c;
            self.window.clear();
            self.window_bytes = 0;
            self.next_send = self.next_epoch;
            self.require_resync(format!(
                "receiver committed epoch {c}, beyond anything this sender produced"
            ));
            return self.next_send;
        }
        let need = c + 1;
        if self.resync_pending {
            self.next_send = self.next_epoch;
            return self.next_send;
        }
        if need == self.next_epoch || self.window.front().is_some_and(|h| h.epoch <= need) {
            // Everything missing is held (the window is contiguous up to next_epoch - 1).
            self.discard_through(c);
            self.next_send = need;
            return need;
        }
        // The newest full image newer than c, if held, replaces what is missing.
        if let Some(f) = self
            .window
            .iter()
            .rev()
            .find(|h| h.kind == EpochKind::Full && h.epoch > c)
            .map(|h| h.epoch)
        {
            self.discard_through(f - 1);
            self.next_send = f;
            return f;
        }
        let oldest = self.window.front().map(|h| h.epoch);
        self.acked = c;
        self.require_resync(format!(
            "receiver committed epoch {c} but the oldest epoch still held is {}",
            oldest.map_or("none".to_string(), |o| o.to_string())
        ));
        self.next_send = self.next_epoch;
        self.next_send
    }

    fn discard_through(&mut self, epoch: u64) {
        while self.window.front().is_some_and(|h| h.epoch <= epoch) {
            let h = self.window.pop_front().expect("non-empty");
            self.window_bytes -= h.payload.len() as u64;
        }
    }

    fn ack(&mut self, committed: u64) {
        if committed <= self.acked {
            return;
        }
        self.discard_through(committed);
        while self.on_wire.front().is_some_and(|(e, _)| *e <= committed) {
            self.on_wire.pop_front();
        }
        self.acked = committed;
        self.events
            .push_back(SenderEvent::Committed { epoch: committed });
    }

    fn send_control(&mut self, f: ControlFrame, now: Instant) {
        self.out.push_back(f.encode());
        self.last_tx = now;
    }

    /// Next bytes to write on the connection's stream, in order.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        if let Some(b) = self.out.pop_front() {
            return Some(b);
        }
        if !matches!(self.state, State::Up) || self.on_wire.len() >= self.cfg.max_in_flight {
            return None;
        }
        let idx = self.window.iter().position(|h| h.epoch == self.next_send)?;
        let h = &mut self.window[idx];
        debug_assert!(!h.sent);
        h.sent = true;
        let payload = h.payload.clone();
        let mut header = wire::encode_epoch_header(h.epoch, h.kind, payload.len() as u64);
        if let Some(p) = &h.prelude {
            // The prelude goes first; the header follows it in `out`.
            self.out.push_back(header);
            header = p.clone();
        }
        self.next_send += 1;
        self.on_wire.push_back((h.epoch, payload.len() as u64));
        self.last_tx = now;
        if !payload.is_empty() {
            self.out.push_back(payload);
        }
        self.out.extend(h.verify.iter().cloned());
        Some(header)
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Down { retry_at } => Some(retry_at),
            State::Handshaking | State::Up => Some(
                (self.last_rx + self.cfg.peer_timeout)
                    .min(self.last_tx + self.cfg.heartbeat_interval),
            ),
            State::Connecting | State::Failed(_) => None,
        }
    }

    /// Timers: reconnect after backoff, heartbeats, peer silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Down { retry_at } if now >= retry_at => {
                self.state = State::Connecting;
                self.events.push_back(SenderEvent::Connect);
            }
            State::Handshaking | State::Up => {
                if now >= self.last_rx + self.cfg.peer_timeout {
                    let e = if matches!(self.state, State::Handshaking) {
                        SessionError::HandshakeTimeout(self.cfg.peer_timeout)
                    } else {
                        SessionError::PeerTimeout(self.cfg.peer_timeout)
                    };
                    self.close_and_retry(e, now);
                    return;
                }
                if now >= self.last_tx + self.cfg.heartbeat_interval {
                    self.hb_seq += 1;
                    self.send_control(ControlFrame::Heartbeat { seq: self.hb_seq }, now);
                }
            }
            _ => {}
        }
    }

    #[cfg(test)]
    pub(crate) fn state_debug(&self) -> String {
        format!(
            "{:?} next_send={} next_epoch={} acked={} in_flight={} window={:?} out={}",
            self.state,
            self.next_send,
            self.next_epoch,
            self.acked,
            self.on_wire.len(),
            self.window
                .iter()
                .map(|h| (h.epoch, h.sent))
                .collect::<Vec<_>>(),
            self.out.len()
        )
    }

    /// Next event for the shell or the engine.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Ends the session for good (the engine stops protecting the VM).
    pub fn close(&mut self) {
        if !matches!(self.state, State::Failed(_)) {
            self.fail(SessionError::LocalClose);
        }
    }
}

fn h_limit(peer: Option<u64>) -> u64 {
    peer.unwrap_or(u64::MAX)
}
