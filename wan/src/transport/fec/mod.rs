//! Forward error correction over the replication byte stream (issue 16).
//!
//! Under random loss nearly every 1 MiB epoch loses a packet, and QUIC
//! recovers a loss by retransmission: one RTT more, or a probe timeout for
//! a lost tail packet or a lost commit message. Here the sender adds
//! redundancy so the receiver can finish an epoch without waiting:
//!
//! * [`Encoder`] (sender): at each burst end (the session has nothing more
//!   to write, or a window reached its cap) it cuts the bytes written since
//!   the last burst end into shards and sends Reed-Solomon recovery shards
//!   as QUIC datagrams ([`wire`]); how many follows the loss the connection
//!   measures ([`LossEstimate`]). A short burst (a commit message) is
//!   mirrored verbatim.
//! * [`Reassembly`] (receiver): stream chunks read out of order and shards
//!   recovered from datagrams fill one buffer; its contiguous prefix is the
//!   stream. quinn still retransmits what was lost; those copies are
//!   dropped as duplicates.
//! * [`link`]: the tokio shell that makes this an ordinary replication
//!   [`super::replication::Link`].
//!
//! The datagrams are optional for the peer: a receiver without FEC ignores
//! them, a sender without FEC sends none, and the stream alone always
//! carries every byte. No negotiation is needed.

pub mod encoder;
pub mod link;
pub mod loss;
pub mod reassembly;
pub mod segments;
pub mod wire;

pub use encoder::{Encoder, EncoderStats, FecParams};
pub use loss::LossEstimate;
pub use reassembly::{Limits, Reassembly, ReassemblyStats};

/// What a peer can send that we refuse. Each one closes the link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    #[error("malformed FEC datagram: {0}")]
    Malformed(&'static str),
    #[error("unknown FEC datagram kind {0:#04x}")]
    UnknownKind(u8),
    #[error("peer sent bytes up to stream offset {end}, more than {limit} beyond the {delivered} delivered")]
    TooFarAhead {
        end: u64,
        delivered: u64,
        limit: u64,
    },
    #[error("FEC window at offset {start} conflicts with an earlier one")]
    ConflictingWindow { start: u64 },
    #[error("FEC window at offset {start} could not be decoded: {message}")]
    Decode { start: u64, message: String },
}
