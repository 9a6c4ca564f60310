//! Backup-site end of the replication session.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use super::wire::{self, ControlFrame, Decoder, EpochKind, HelloAck, Item};
use super::wire::{DiskReport, DiskSync, ReplicaReport};
use super::wire::{VerifyHashes, VerifyResult};
use super::SessionError;

/// Configuration of the receiving end.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// This (backup) site's name, sent in HELLO_ACK.
    pub site: String,
    /// The VM this receiver holds the replica of.
    pub vm_id: String,
    /// Largest epoch payload accepted, in bytes; larger ones are refused
    /// with [`SessionError::EpochTooLarge`] before any of it is buffered.
    pub max_epoch_size: u64,
    /// Send a HEARTBEAT when nothing else was sent for this long.
    pub heartbeat_interval: Duration,
    /// Drop the connection when nothing arrived for this long (a stalled
    /// epoch counts: its error is [`SessionError::Stalled`]).
    pub peer_timeout: Duration,
}

impl ReceiverConfig {
    pub fn new(site: impl Into<String>, vm_id: impl Into<String>) -> Self {
        Self {
            site: site.into(),
            vm_id: vm_id.into(),
            max_epoch_size: 1 << 30,
            heartbeat_interval: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(5),
        }
    }
}

/// What the receiver tells its shell and the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// A sender introduced itself; streaming starts after the last committed epoch.
    Hello {
        site: String,
        vm_id: String,
        last_committed: u64,
    },
    /// A complete epoch, staged. The engine verifies and applies it
    /// atomically, then calls [`Receiver::commit`] (or [`Receiver::reject`]),
    /// in epoch order.
    Epoch {
        epoch: u64,
        kind: EpochKind,
        payload: Bytes,
    },
    /// Shell: close the current connection, after writing
    /// [`SessionError::error_frame`] when there is one. The session already
    /// counts the connection as gone and waits for the next one.
    Close { error: SessionError },
    /// Online verify: hashes of a slice as of `epoch`, which was delivered
    /// just before (and the next epoch is not yet). The engine compares its
    /// replica and answers with [`Receiver::verify_result`].
    Verify(VerifyHashes),
    /// Disk resynchronisation: how the next full epoch seeds its disk
    /// (delivered just before that epoch), or a hash request the engine
    /// answers with [`Receiver::disk_report`].
    DiskSync(DiskSync),
}

/// Hash requests delivered and not yet answered, at most: the primary asks
/// for a couple at a time; more is a misbehaving peer, refused rather than
/// queued without bound.
pub const MAX_PENDING_HASH_REQUESTS: usize = 8;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// No connection.
    Idle,
    /// Connected, waiting for HELLO.
    AwaitHello,
    /// HELLO received; HELLO_ACK deferred until the engine has answered
    /// every epoch delivered on the previous connection.
    HelloPending,
    Streaming,
}

#[derive(Debug)]
struct Staging {
    epoch: u64,
    kind: EpochKind,
    len: u64,
    buf: BytesMut,
}

/// The backup's replication session (sans-IO).
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    state: State,
    committed: u64,
    /// Next epoch number acceptable as a delta.
    expected: u64,
    staging: Option<Staging>,
    /// Delivered to the engine and not yet committed or rejected, in order.
    delivered: VecDeque<u64>,
    decoder: Decoder,
    out: VecDeque<Bytes>,
    events: VecDeque<ReceiverEvent>,
    last_rx: Instant,
    last_tx: Instant,
    hb_seq: u64,
    connected_at: Instant,
    peer_site: Option<String>,
    /// What the engine says the standby holds, sent before HELLO_ACK.
    report: Option<ReplicaReport>,
    /// Hash requests delivered on this connection and not yet answered.
    hash_requests: usize,
}

impl Receiver {
    /// `last_committed`: the replica's epoch as persisted (0 when empty).
    pub fn new(cfg: ReceiverConfig, last_committed: u64, now: Instant) -> Self {
        Self {
            cfg,
            state: State::Idle,
            committed: last_committed,
            expected: last_committed + 1,
            staging: None,
            delivered: VecDeque::new(),
            decoder: Decoder::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            last_rx: now,
            last_tx: now,
            hb_seq: 0,
            connected_at: now,
            peer_site: None,
            report: None,
            hash_requests: 0,
        }
    }

    /// Last epoch committed to the replica.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Epochs delivered to the engine and not yet committed or rejected.
    pub fn pending(&self) -> usize {
        self.delivered.len()
    }

    /// True while a sender is streaming to us.
    pub fn is_streaming(&self) -> bool {
        self.state == State::Streaming
    }

    /// A new connection (one ordered byte stream) from a sender. Any
    /// previous connection is considered gone.
    pub fn handle_connected(&mut self, now: Instant) {
        self.reset_connection();
        self.state = State::AwaitHello;
        self.connected_at = now;
        self.last_rx = now;
        self.last_tx = now;
    }

    /// The connection ended underneath the session.
    pub fn handle_disconnected(&mut self, _now: Instant, reason: &str) {
        if self.state != State::Idle {
            warn!(
                reason,
                committed = self.committed,
                "replication connection lost"
            );
            self.reset_connection();
        }
    }

    fn reset_connection(&mut self) {
        if let Some(s) = self.staging.take() {
            info!(
                epoch = s.epoch,
                received = s.buf.len(),
                len = s.len,
                "partial epoch discarded; the replica stays at its last committed epoch"
            );
        }
        self.state = State::Idle;
        self.hash_requests = 0;
        self.decoder = Decoder::new();
        self.out.clear();
        self.expected = self.delivered.back().map_or(self.committed, |e| *e) + 1;
    }

    fn close(&mut self, error: SessionError) {
        warn!(error = %error, committed = self.committed, "closing replication connection");
        self.reset_connection();
        self.events.push_back(ReceiverEvent::Close { error });
    }

    /// Bytes received from the sender. Protocol errors close the connection
    /// (a [`ReceiverEvent::Close`] is queued) and are also returned.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) -> Result<(), SessionError> {
        if self.state == State::Idle {
            return Ok(());
        }
        self.last_rx = now;
        self.decoder.push(data);
        loop {
            let item = match self.decoder.next_item() {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let e = SessionError::from(e);
                    self.close(e.clone());
                    return Err(e);
                }
            };
            if let Err(e) = self.handle_item(item, now) {
                self.close(e.clone());
                return Err(e);
            }
            if self.state == State::Idle {
                return Ok(());
            }
        }
    }

    fn handle_item(&mut self, item: Item, now: Instant) -> Result<(), SessionError> {
        match item {
            Item::Control(ControlFrame::Hello(h)) if self.state == State::AwaitHello => {
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
                info!(peer_site = %h.site, vm = %h.vm_id, "replication HELLO");
                self.peer_site = Some(h.site);
                self.state = State::HelloPending;
                self.maybe_hello_ack(now);
                Ok(())
            }
            Item::Control(ControlFrame::Heartbeat { .. }) => Ok(()),
            Item::Control(ControlFrame::DiskSync(d)) if self.state == State::Streaming => {
                if matches!(d, DiskSync::HashRequest { .. }) {
                    if self.hash_requests >= MAX_PENDING_HASH_REQUESTS {
                        return Err(SessionError::Unexpected {
                            frame: "DISK_SYNC",
                            context: "beyond the pending hash requests allowed",
                        });
                    }
                    self.hash_requests += 1;
                }
                self.events.push_back(ReceiverEvent::DiskSync(d));
                Ok(())
            }
            Item::Control(ControlFrame::VerifyHashes(v)) if self.state == State::Streaming => {
                self.events.push_back(ReceiverEvent::Verify(v));
                Ok(())
            }
            Item::Control(ControlFrame::Error(e)) => {
                warn!(code = ?e.code, epoch = e.epoch, message = %e.message, "sender reported an error");
                Err(SessionError::Peer {
                    code: e.code,
                    epoch: e.epoch,
                    message: e.message,
                })
            }
            Item::EpochHeader { epoch, kind, len } if self.state == State::Streaming => {
                if len > self.cfg.max_epoch_size {
                    return Err(SessionError::EpochTooLarge {
                        epoch,
                        size: len,
                        limit: self.cfg.max_epoch_size,
                    });
                }
                let ok = match kind {
                    EpochKind::Delta => epoch == self.expected,
                    EpochKind::Full => epoch >= self.expected,
                };
                if !ok {
                    return Err(SessionError::OutOfOrder {
                        got: epoch,
                        expected: self.expected,
                    });
                }
                self.staging = Some(Staging {
                    epoch,
                    kind,
                    len,
                    buf: BytesMut::with_capacity(len as usize),
                });
                Ok(())
            }
            Item::EpochChunk(c) => {
                let s = self.staging.as_mut().expect("chunk follows a header");
                s.buf.extend_from_slice(&c);
                Ok(())
            }
            Item::EpochEnd => {
                let s = self.staging.take().expect("end follows a header");
                self.expected = s.epoch + 1;
                self.delivered.push_back(s.epoch);
                self.events.push_back(ReceiverEvent::Epoch {
                    epoch: s.epoch,
                    kind: s.kind,
                    payload: s.buf.freeze(),
                });
                Ok(())
            }
            Item::Control(f) => Err(SessionError::Unexpected {
                frame: f.name(),
                context: "from the sender in this state",
            }),
            Item::EpochHeader { .. } => Err(SessionError::Unexpected {
                frame: "EPOCH",
                context: "before HELLO was answered",
            }),
        }
    }

    fn maybe_hello_ack(&mut self, now: Instant) {
        if self.state != State::HelloPending || !self.delivered.is_empty() {
            return;
        }
        self.state = State::Streaming;
        self.expected = self.committed + 1;
        if let Some(r) = self.report {
            self.send_control(ControlFrame::DiskReport(DiskReport::Replica(r)), now);
        }
        self.send_control(
            ControlFrame::HelloAck(HelloAck {
                version: wire::PROTOCOL_VERSION,
                site: self.cfg.site.clone(),
                vm_id: self.cfg.vm_id.clone(),
                last_committed: self.committed,
                max_epoch_size: self.cfg.max_epoch_size,
            }),
            now,
        );
        self.events.push_back(ReceiverEvent::Hello {
            site: self.peer_site.clone().unwrap_or_default(),
            vm_id: self.cfg.vm_id.clone(),
            last_committed: self.committed,
        });
    }

    /// The engine applied `epoch` to the replica. Epochs are committed in
    /// the order they were delivered; anything else is refused.
    pub fn commit(&mut self, epoch: u64, now: Instant) -> Result<(), SessionError> {
        match self.delivered.front() {
            Some(&e) if e == epoch => {}
            Some(&e) => {
                return Err(SessionError::OutOfOrder {
                    got: epoch,
                    expected: e,
                })
            }
            None => {
                return Err(SessionError::Unexpected {
                    frame: "commit",
                    context: "for an epoch that is not pending",
                })
            }
        }
        self.delivered.pop_front();
        self.committed = epoch;
        if self.state == State::Streaming {
            self.send_control(ControlFrame::Ack { committed: epoch }, now);
        }
        self.maybe_hello_ack(now);
        Ok(())
    }

    /// The engine could not verify or apply `epoch` (it must not have
    /// touched the replica). Later pending epochs are dropped with it and
    /// the connection is closed; the sender answers with a full resync.
    pub fn reject(&mut self, epoch: u64, message: &str, now: Instant) {
        warn!(epoch, message, "epoch rejected");
        self.delivered.clear();
        if self.state == State::HelloPending {
            self.maybe_hello_ack(now);
            return;
        }
        if self.state != State::Idle {
            self.close(SessionError::Rejected {
                epoch,
                message: message.to_string(),
            });
        }
        self.expected = self.committed + 1;
    }

    /// What the standby holds (sent to every sender before HELLO_ACK).
    pub fn set_report(&mut self, r: ReplicaReport) {
        self.report = Some(r);
    }

    /// The engine's answer to a hash request (dropped when the connection
    /// it came on is gone: the sender asks again).
    pub fn disk_report(&mut self, r: DiskReport, now: Instant) {
        if self.state == State::Streaming {
            if !matches!(r, DiskReport::Replica(_)) {
                self.hash_requests = self.hash_requests.saturating_sub(1);
            }
            self.send_control(ControlFrame::DiskReport(r), now);
        }
    }

    /// The engine's answer to a [`ReceiverEvent::Verify`] (dropped when the
    /// connection it came on is gone: the sender asks again).
    pub fn verify_result(&mut self, r: VerifyResult, now: Instant) {
        if self.state == State::Streaming {
            self.send_control(ControlFrame::VerifyResult(r), now);
        }
    }

    fn send_control(&mut self, f: ControlFrame, now: Instant) {
        self.out.push_back(f.encode());
        self.last_tx = now;
    }

    /// Next bytes to write on the connection's stream.
    pub fn poll_transmit(&mut self, _now: Instant) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Idle {
            return None;
        }
        if self.state == State::AwaitHello {
            return Some(self.deadline());
        }
        Some(
            self.deadline()
                .min(self.last_tx + self.cfg.heartbeat_interval),
        )
    }

    /// When the connection is given up: HELLO must come within the timeout
    /// of connecting (heartbeats do not extend that); later, anything at all.
    fn deadline(&self) -> Instant {
        if self.state == State::AwaitHello {
            self.connected_at + self.cfg.peer_timeout
        } else {
            self.last_rx + self.cfg.peer_timeout
        }
    }

    /// Timers: heartbeats, peer silence, stalled epochs.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Idle {
            return;
        }
        if now >= self.deadline() {
            let e = match &self.staging {
                Some(s) => SessionError::Stalled {
                    epoch: s.epoch,
                    received: s.buf.len() as u64,
                    len: s.len,
                    after: self.cfg.peer_timeout,
                },
                None if self.state == State::AwaitHello => {
                    SessionError::HandshakeTimeout(self.cfg.peer_timeout)
                }
                None => SessionError::PeerTimeout(self.cfg.peer_timeout),
            };
            self.close(e);
            return;
        }
        if now >= self.last_tx + self.cfg.heartbeat_interval && self.state != State::AwaitHello {
            self.hb_seq += 1;
            self.send_control(ControlFrame::Heartbeat { seq: self.hb_seq }, now);
        }
    }

    /// Next event for the shell or the engine.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }
}
