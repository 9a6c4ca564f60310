//! The one error type of the codec, shared by encoder and decoder.

use thiserror::Error;

/// Everything that can go wrong while encoding or decoding a checkpoint epoch.
///
/// Decoder errors are reported before anything becomes visible: a rejected
/// epoch never touches the replica.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The input ends before a field or section it announces.
    #[error("truncated epoch: {what} needs {needed} bytes, {available} available")]
    Truncated {
        what: &'static str,
        needed: u64,
        available: u64,
    },
    /// The first four bytes are not the epoch magic.
    #[error("bad magic {found:02x?}, expected \"RWCK\"")]
    BadMagic { found: [u8; 4] },
    /// A wire-format version this build does not speak.
    #[error("unsupported wire-format version {found} (this build supports {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    /// Header flag bits this version does not define.
    #[error("unsupported header flags {flags:#x}")]
    UnsupportedFlags { flags: u32 },
    /// The trailer checksum does not match the epoch's bytes.
    #[error(
        "checksum mismatch: trailer says {expected:#034x}, content hashes to {computed:#034x}"
    )]
    ChecksumMismatch { expected: u128, computed: u128 },
    /// A page record (or a reference) names a frame beyond guest memory.
    #[error("frame {frame} out of range (guest has {frames} frames)")]
    FrameOutOfRange { frame: u64, frames: u64 },
    /// A length field exceeds what the format or the configured limits allow.
    #[error("{what} is {len} bytes, limit {limit}")]
    Oversized {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    /// A duplicate or delta record refers to content the receiver cannot know.
    #[error("bad reference in frame {frame} (to frame {target}): {reason}")]
    BadReference {
        frame: u64,
        target: u64,
        reason: &'static str,
    },
    /// The same frame appears twice in one epoch.
    #[error("frame {frame} appears twice in one epoch")]
    DuplicateFrame { frame: u64 },
    /// Bytes after the trailer.
    #[error("{extra} unexpected bytes after the epoch trailer")]
    TrailingBytes { extra: u64 },
    /// The epoch belongs to another VM.
    #[error("epoch is for VM {found}, this decoder serves VM {expected}")]
    VmMismatch { expected: u64, found: u64 },
    /// Page size of the epoch (or of an input page) differs from the configured one.
    #[error("page size {found} does not match {expected}")]
    PageSizeMismatch { expected: u64, found: u64 },
    /// The epoch is built on a replica state other than the one committed.
    #[error("epoch {epoch} is built on epoch {base}, but the replica has committed {committed:?}")]
    BaseMismatch {
        epoch: u64,
        base: u64,
        committed: Option<u64>,
    },
    /// Structurally invalid content (bad record kind, bad run, bad zstd frame...).
    #[error("corrupt epoch: {0}")]
    Corrupt(String),
    /// Encoder: epoch numbers must grow along the chain of epochs in flight.
    #[error("epoch {epoch} does not follow epoch {previous}")]
    EpochNotIncreasing { epoch: u64, previous: u64 },
    /// Encoder: an epoch the replica has acknowledged cannot be invalidated.
    #[error("cannot invalidate from epoch {epoch}: epoch {acknowledged} is already acknowledged")]
    AlreadyAcknowledged { epoch: u64, acknowledged: u64 },
}

impl CodecError {
    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        CodecError::Corrupt(msg.into())
    }
}
