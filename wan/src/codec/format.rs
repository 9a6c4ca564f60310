//! Constants and fixed-layout pieces of wire-format versions 1 to 3
//! (docs/wire-format.md is the normative description of version 1;
//! version 2 is version 1 plus the page record kind [`REC_PREFIX_ZSTD`],
//! version 3 is version 2 plus the chunk block method [`BLOCK_ZSTD_REFS`]).

/// First four bytes of every epoch.
pub const MAGIC: [u8; 4] = *b"RWCK";
/// The newest version this build writes and reads. An epoch is written as
/// version 3 only when a chunk uses [`BLOCK_ZSTD_REFS`], else as version 2
/// when it holds a [`REC_PREFIX_ZSTD`] record, else as version 1 (byte for
/// byte what builds before version 2 wrote); the decoder reads all three.
pub const VERSION: u16 = 3;
/// The version that introduced [`REC_PREFIX_ZSTD`].
pub const VERSION_PREFIX: u16 = 2;
/// The version that introduced [`BLOCK_ZSTD_REFS`].
pub const VERSION_REFS: u16 = 3;
/// The oldest version this build reads.
pub const MIN_VERSION: u16 = 1;
/// Size of the fixed header of version 1.
pub const HEADER_LEN: usize = 64;
/// Size of the trailer (xxh3-128 of header and body, little-endian).
pub const TRAILER_LEN: usize = 16;
/// `base_epoch` value meaning "depends on no earlier epoch".
pub const NO_BASE: u64 = u64::MAX;

/// Smallest and largest page sizes the format admits.
pub const MIN_PAGE_SIZE: u64 = 512;
pub const MAX_PAGE_SIZE: u64 = 65536;
/// Hard cap on a chunk's decoded size, whatever the configuration: bounds the
/// decoder's scratch allocation per chunk.
pub const MAX_CHUNK_RAW: u64 = 16 << 20;

/// Block storage methods.
pub const BLOCK_STORED: u8 = 0;
pub const BLOCK_ZSTD: u8 = 1;
/// Version 3, record chunks of an epoch with a base only: `stored` is
/// `ref_count:ULEB128`, that many frame numbers (each a zigzag ULEB128
/// difference from the previous one plus one, the first from 0), then one
/// zstd frame decoding to exactly `raw_len` bytes, compressed with the
/// replica's committed content of those frames, concatenated in that
/// order, as its prefix (`ZSTD_CCtx_refPrefix`).
pub const BLOCK_ZSTD_REFS: u8 = 2;
/// Most frames one `BLOCK_ZSTD_REFS` chunk may name: bounds the prefix the
/// decoder assembles (1 MiB with 4 KiB pages).
pub const MAX_CHUNK_REFS: u64 = 256;

/// Page record kinds.
pub const REC_ZERO: u8 = 0;
pub const REC_REF: u8 = 1;
pub const REC_DELTA_RLE: u8 = 2;
pub const REC_DELTA_ZSTD: u8 = 3;
pub const REC_FULL_ZSTD: u8 = 4;
pub const REC_FULL_RAW: u8 = 5;
/// Version 2: the page compressed as one zstd frame with the replica's
/// committed content of the same frame as its prefix (a content-only,
/// single-use dictionary: `ZSTD_CCtx_refPrefix`); payload: ULEB128 length,
/// then the frame. Needs a base, like the deltas.
pub const REC_PREFIX_ZSTD: u8 = 6;

/// The fixed header, as read from or written to the first [`HEADER_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub flags: u32,
    pub page_size: u32,
    pub vm_id: u64,
    pub epoch: u64,
    /// [`NO_BASE`] when the epoch references no earlier content.
    pub base_epoch: u64,
    pub record_count: u32,
    pub chunk_count: u32,
    pub disk_write_count: u32,
    pub body_len: u64,
}

impl Header {
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.vm_id.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.base_epoch.to_le_bytes());
        out.extend_from_slice(&self.record_count.to_le_bytes());
        out.extend_from_slice(&self.chunk_count.to_le_bytes());
        out.extend_from_slice(&self.disk_write_count.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
    }

    pub fn base(&self) -> Option<u64> {
        (self.base_epoch != NO_BASE).then_some(self.base_epoch)
    }
}
