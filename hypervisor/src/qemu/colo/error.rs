//! What can be wrong with a migration stream, worded for the log of a
//! checkpoint that failed.

/// A migration stream (or a COLO exchange) that cannot be parsed. The
/// parser stops at the first one and keeps returning it: a stream is
/// never resynchronised after a corrupt byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream does not start with "QEVM" version 3.
    #[error("not a QEMU migration stream: header {0:02x?}")]
    BadHeader([u8; 8]),
    /// A section type byte we do not know (or not where it appeared).
    #[error("unknown or misplaced section type 0x{kind:02x} at byte {at}")]
    UnknownSection { kind: u8, at: u64 },
    /// A section of a device we do not parse where only RAM may come.
    #[error("unsupported section {idstr:?} (type 0x{kind:02x}) at byte {at}: only RAM is parsed")]
    UnsupportedSection { idstr: String, kind: u8, at: u64 },
    /// A PART/END section for a section id no START announced.
    #[error("section id {0} was never started")]
    UnknownSectionId(u32),
    /// A section footer that does not match its header.
    #[error("section footer for id {found}, expected {expected}")]
    BadFooter { expected: u32, found: u32 },
    /// A RAM record flag we must not accept (xbzrle, compression,
    /// multifd, RDMA hooks, or garbage).
    #[error("unsupported RAM record flags 0x{flags:x} at byte {at}")]
    UnsupportedRamFlags { flags: u64, at: u64 },
    /// A RAM record naming a block that is not in the block list.
    #[error("RAM record for unknown block {0:?}")]
    UnknownBlock(String),
    /// CONTINUE with no block named before.
    #[error("RAM record continues a block, but no block was named before")]
    ContinueWithoutBlock,
    /// A page offset beyond its block.
    #[error("page offset 0x{offset:x} beyond block {block:?} of 0x{len:x} bytes")]
    OffsetOutOfBlock {
        block: String,
        offset: u64,
        len: u64,
    },
    /// Page data before any block list.
    #[error("RAM page before the block list (MEM_SIZE)")]
    PageBeforeBlocks,
    /// The block list does not add up to the announced total.
    #[error("RAM block list is inconsistent: {0}")]
    BadBlockList(String),
    /// A command we do not carry (postcopy and friends).
    #[error("unsupported migration command {cmd} (len {len})")]
    UnsupportedCommand { cmd: u16, len: u16 },
    /// The configuration section is malformed.
    #[error("bad configuration section: {0}")]
    BadConfiguration(String),
    /// The device part of the initial stream could not be delimited.
    #[error("device state of the initial stream: {0}")]
    BadDeviceState(String),
    /// The device blob of a checkpoint is malformed.
    #[error("checkpoint device blob: {0}")]
    BadDeviceBlob(String),
    /// A COLO message other than the one the protocol expects now.
    #[error("unexpected COLO message {got} (expected {expected})")]
    UnexpectedMessage { expected: &'static str, got: String },
    /// Something exceeds a sanity bound (a length field of garbage).
    #[error("{what} of {len} bytes exceeds the bound of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// More bytes arrived where QEMU waits for us.
    #[error("{0} unexpected bytes after the end of the initial stream")]
    TrailingBytes(usize),
}
