//! The replication session: a sans-IO state machine for each end of the
//! link, in the style of quinn-proto.
//!
//! Neither [`Sender`] (primary site) nor [`Receiver`] (backup site) owns a
//! socket or reads a clock. The shell (see [`crate::transport::replication`])
//! feeds them what happened — a connection came up or went down, bytes
//! arrived, a timer fired — with the current [`Instant`], then drains what
//! they want done: bytes to write ([`Sender::poll_transmit`]), the next
//! deadline ([`Sender::poll_timeout`]) and events ([`Sender::poll_event`]).
//! Both ends speak a single ordered byte stream (one QUIC bidirectional
//! stream, or one TLS-over-TCP connection for the baseline); the frames are
//! in [`wire`].

pub mod disk_frames;
pub mod receiver;
pub mod sender;
pub mod verify_frames;
pub mod wire;

pub use receiver::{Receiver, ReceiverConfig, ReceiverEvent};
pub use sender::{PushError, Sender, SenderConfig, SenderEvent};
pub use wire::{EpochKind, ErrorCode, PROTOCOL_VERSION};

use std::time::Duration;

/// Why a connection of the session ended or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// An epoch was larger than the receiver's configured limit.
    #[error("epoch {epoch} is {size} bytes, over the receiver's limit of {limit} bytes")]
    EpochTooLarge { epoch: u64, size: u64, limit: u64 },
    /// Nothing at all arrived from the peer for the timeout.
    #[error("peer silent for {0:?}")]
    PeerTimeout(Duration),
    /// The peer began an epoch and then sent nothing more for the timeout.
    #[error("stream stalled in epoch {epoch}: {received} of {len} bytes received, then nothing for {after:?}")]
    Stalled {
        epoch: u64,
        received: u64,
        len: u64,
        after: Duration,
    },
    /// The connection came up but no HELLO / HELLO_ACK followed in time.
    #[error("no handshake from the peer within {0:?}")]
    HandshakeTimeout(Duration),
    /// The two ends speak different protocol versions.
    #[error("replication protocol version mismatch: we speak remus-wan/{ours}, the peer speaks remus-wan/{peer}")]
    Version { ours: u8, peer: u8 },
    /// The peer replicates another VM.
    #[error("peer replicates VM {peer:?}, this session is for VM {ours:?}")]
    WrongVm { ours: String, peer: String },
    /// An epoch number arrived out of sequence.
    #[error("epoch {got} out of order: expected {expected}")]
    OutOfOrder { got: u64, expected: u64 },
    /// Bytes that are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(#[from] wire::WireError),
    /// A valid frame in the wrong place.
    #[error("unexpected {frame} frame {context}")]
    Unexpected {
        frame: &'static str,
        context: &'static str,
    },
    /// The peer sent an ERROR frame.
    #[error("peer reported {code:?} (epoch {epoch}): {message}")]
    Peer {
        code: ErrorCode,
        epoch: u64,
        message: String,
    },
    /// The receiver could not verify or apply an epoch.
    #[error("epoch {epoch} rejected: {message}")]
    Rejected { epoch: u64, message: String },
    /// The transport underneath failed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The local side asked for the session to end.
    #[error("session closed locally")]
    LocalClose,
}

impl SessionError {
    /// The epoch concerned, 0 when none.
    pub fn epoch(&self) -> u64 {
        match self {
            Self::EpochTooLarge { epoch, .. }
            | Self::Stalled { epoch, .. }
            | Self::Rejected { epoch, .. }
            | Self::Peer { epoch, .. } => *epoch,
            Self::OutOfOrder { got, .. } => *got,
            _ => 0,
        }
    }

    /// The ERROR frame that tells the peer why we close, or `None` when the
    /// peer cannot or need not hear it (it reported the error itself, or
    /// the connection is already gone).
    pub fn error_frame(&self) -> Option<bytes::Bytes> {
        match self {
            Self::Peer { .. } | Self::ConnectionLost(_) | Self::LocalClose => None,
            _ => Some(
                wire::ControlFrame::Error(wire::ErrorFrame {
                    code: self.code(),
                    epoch: self.epoch(),
                    message: self.to_string(),
                })
                .encode(),
            ),
        }
    }

    /// The ERROR frame code that reports this error to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::EpochTooLarge { .. } => ErrorCode::EpochTooLarge,
            Self::PeerTimeout(_) | Self::Stalled { .. } | Self::HandshakeTimeout(_) => {
                ErrorCode::Timeout
            }
            Self::Version { .. } => ErrorCode::Version,
            Self::WrongVm { .. } => ErrorCode::WrongVm,
            Self::OutOfOrder { .. } => ErrorCode::OutOfOrder,
            Self::Rejected { .. } => ErrorCode::Rejected,
            Self::Peer { code, .. } => *code,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Reconnection delays: `initial`, then doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// Delay before attempt number `attempt` (0-based) after a failure.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod disk_session_tests;
#[cfg(test)]
mod tests;
