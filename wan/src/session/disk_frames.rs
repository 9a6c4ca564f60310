//! Bodies of the disk-resynchronisation frames (`DISK_SYNC` = 7, primary →
//! standby; `DISK_REPORT` = 8, standby → primary), all integers big-endian.
//! Each body starts with a sub-type byte.
//!
//! ```text
//! DISK_SYNC   1 BEGIN     epoch u64 | lineage u64 | mode u8 | base u64 | block_size u32 | disk_bytes u64
//!             2 HASH_REQ  first_block u64 | count u32
//! DISK_REPORT 1 REPLICA   lineage u64 | epoch u64 | consistent u8 | disk_bytes u64 | seed_bytes u64
//!             2 HASHES    first_block u64 | n u32 | n × xxh3-64 u64
//!             3 NO_SEED   first_block u64
//! ```
//!
//! `BEGIN` travels just before the full epoch `epoch` that opens a
//! synchronisation (and again whenever that epoch is resent), so the
//! standby knows how to seed the new replica's disk before decoding it.
//! `REPLICA` travels just before `HELLO_ACK`: what the standby holds.
//! A hash request covers at most [`MAX_HASH_BLOCKS`] blocks, so every
//! frame fits a control frame (32 KiB of hashes at most).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Most blocks one hash request (and its answer) may cover.
pub const MAX_HASH_BLOCKS: u32 = 4096;

/// How a synchronisation fills the disk of the new replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskSyncMode {
    /// From zeros: every block is sent.
    Full,
    /// Seeded from the standby's live replica (consistent, same lineage,
    /// at epoch `base` or later): only blocks written after `base` are sent.
    Incremental,
    /// Seeded from an old local copy (a diverged replica, or the image the
    /// VM ran from at that site): blocks whose hashes differ are sent.
    Checksum,
}

impl DiskSyncMode {
    fn to_u8(self) -> u8 {
        match self {
            Self::Full => 0,
            Self::Incremental => 1,
            Self::Checksum => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Self, DiskWireError> {
        match v {
            0 => Ok(Self::Full),
            1 => Ok(Self::Incremental),
            2 => Ok(Self::Checksum),
            other => Err(DiskWireError::BadMode(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
            Self::Checksum => "checksum",
        }
    }
}

/// How the synchronisation opened by full epoch `epoch` seeds its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncBegin {
    pub epoch: u64,
    /// Identity of the primary's written-block map; the new replica keeps it.
    pub lineage: u64,
    pub mode: DiskSyncMode,
    /// Incremental: the live replica's epoch the difference is taken from.
    pub base: u64,
    pub block_size: u32,
    pub disk_bytes: u64,
}

/// Frame 7, primary → standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSync {
    Begin(SyncBegin),
    /// Hash blocks `first_block ..first_block + count` of the replica under
    /// synchronisation and answer with [`DiskReport::Hashes`].
    HashRequest {
        first_block: u64,
        count: u32,
    },
}

/// What the standby holds, sent before `HELLO_ACK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaReport {
    /// Lineage of the live replica (0: none, or from an older version).
    pub lineage: u64,
    /// Last committed epoch of the live replica.
    pub epoch: u64,
    /// The live replica is a resumable committed epoch (not diverged).
    pub consistent: bool,
    /// Size of the live replica's disk (0: none).
    pub disk_bytes: u64,
    /// Size of an old local copy of the disk usable as a checksum seed
    /// (0: none).
    pub seed_bytes: u64,
}

/// Frame 8, standby → primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskReport {
    Replica(ReplicaReport),
    Hashes {
        first_block: u64,
        hashes: Vec<u64>,
    },
    /// The standby has no seeded replica to hash (it restarted, or the
    /// synchronisation is not a checksum one): start over.
    NoSeed {
        first_block: u64,
    },
}

/// Malformed disk frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskWireError {
    #[error("{0} frame truncated")]
    Truncated(&'static str),
    #[error("unknown {frame} sub-type {sub}")]
    BadSubType { frame: &'static str, sub: u8 },
    #[error("unknown disk sync mode {0}")]
    BadMode(u8),
    #[error("hash batch of {0} blocks is over the limit of {MAX_HASH_BLOCKS}")]
    TooManyBlocks(u64),
    #[error("block size {0} is not a power of two between 4 KiB and 64 MiB")]
    BadBlockSize(u32),
    #[error("consistent flag {0} is neither 0 nor 1")]
    BadFlag(u8),
}

fn need(buf: &Bytes, n: usize, what: &'static str) -> Result<(), DiskWireError> {
    if buf.remaining() < n {
        return Err(DiskWireError::Truncated(what));
    }
    Ok(())
}

impl DiskSync {
    pub fn encode_body(&self, out: &mut BytesMut) {
        match self {
            Self::Begin(b) => {
                out.put_u8(1);
                out.put_u64(b.epoch);
                out.put_u64(b.lineage);
                out.put_u8(b.mode.to_u8());
                out.put_u64(b.base);
                out.put_u32(b.block_size);
                out.put_u64(b.disk_bytes);
            }
            Self::HashRequest { first_block, count } => {
                out.put_u8(2);
                out.put_u64(*first_block);
                out.put_u32(*count);
            }
        }
    }

    /// Decodes a body; trailing bytes are left for the caller to refuse.
    pub fn decode_body(buf: &mut Bytes) -> Result<Self, DiskWireError> {
        const W: &str = "DISK_SYNC";
        need(buf, 1, W)?;
        match buf.get_u8() {
            1 => {
                need(buf, 8 + 8 + 1 + 8 + 4 + 8, W)?;
                let epoch = buf.get_u64();
                let lineage = buf.get_u64();
                let mode = DiskSyncMode::from_u8(buf.get_u8())?;
                let base = buf.get_u64();
                let block_size = buf.get_u32();
                let disk_bytes = buf.get_u64();
                if !block_size.is_power_of_two() || !(4096..=64 << 20).contains(&block_size) {
                    return Err(DiskWireError::BadBlockSize(block_size));
                }
                Ok(Self::Begin(SyncBegin {
                    epoch,
                    lineage,
                    mode,
                    base,
                    block_size,
                    disk_bytes,
                }))
            }
            2 => {
                need(buf, 12, W)?;
                let first_block = buf.get_u64();
                let count = buf.get_u32();
                if count > MAX_HASH_BLOCKS {
                    return Err(DiskWireError::TooManyBlocks(count.into()));
                }
                Ok(Self::HashRequest { first_block, count })
            }
            sub => Err(DiskWireError::BadSubType { frame: W, sub }),
        }
    }
}

impl DiskReport {
    pub fn encode_body(&self, out: &mut BytesMut) {
        match self {
            Self::Replica(r) => {
                out.put_u8(1);
                out.put_u64(r.lineage);
                out.put_u64(r.epoch);
                out.put_u8(u8::from(r.consistent));
                out.put_u64(r.disk_bytes);
                out.put_u64(r.seed_bytes);
            }
            Self::Hashes {
                first_block,
                hashes,
            } => {
                out.put_u8(2);
                out.put_u64(*first_block);
                // Callers keep batches within MAX_HASH_BLOCKS; a longer one
                // is cut rather than sent as a frame the peer refuses.
                let n = hashes.len().min(MAX_HASH_BLOCKS as usize);
                out.put_u32(n as u32);
                for h in &hashes[..n] {
                    out.put_u64(*h);
                }
            }
            Self::NoSeed { first_block } => {
                out.put_u8(3);
                out.put_u64(*first_block);
            }
        }
    }

    /// Decodes a body; trailing bytes are left for the caller to refuse.
    pub fn decode_body(buf: &mut Bytes) -> Result<Self, DiskWireError> {
        const W: &str = "DISK_REPORT";
        need(buf, 1, W)?;
        match buf.get_u8() {
            1 => {
                need(buf, 8 + 8 + 1 + 8 + 8, W)?;
                let lineage = buf.get_u64();
                let epoch = buf.get_u64();
                let consistent = match buf.get_u8() {
                    0 => false,
                    1 => true,
                    other => return Err(DiskWireError::BadFlag(other)),
                };
                Ok(Self::Replica(ReplicaReport {
                    lineage,
                    epoch,
                    consistent,
                    disk_bytes: buf.get_u64(),
                    seed_bytes: buf.get_u64(),
                }))
            }
            2 => {
                need(buf, 12, W)?;
                let first_block = buf.get_u64();
                let n = buf.get_u32();
                if n > MAX_HASH_BLOCKS {
                    return Err(DiskWireError::TooManyBlocks(n.into()));
                }
                need(buf, n as usize * 8, W)?;
                let hashes = (0..n).map(|_| buf.get_u64()).collect();
                Ok(Self::Hashes {
                    first_block,
                    hashes,
                })
            }
            3 => {
                need(buf, 8, W)?;
                Ok(Self::NoSeed {
                    first_block: buf.get_u64(),
                })
            }
            sub => Err(DiskWireError::BadSubType { frame: W, sub }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mode() -> impl Strategy<Value = DiskSyncMode> {
        prop_oneof![
            Just(DiskSyncMode::Full),
            Just(DiskSyncMode::Incremental),
            Just(DiskSyncMode::Checksum)
        ]
    }

    fn sync() -> impl Strategy<Value = DiskSync> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                mode(),
                any::<u64>(),
                12u32..=26,
                any::<u64>()
            )
                .prop_map(|(epoch, lineage, mode, base, shift, disk_bytes)| {
                    DiskSync::Begin(SyncBegin {
                        epoch,
                        lineage,
                        mode,
                        base,
                        block_size: 1 << shift,
                        disk_bytes,
                    })
                }),
            (any::<u64>(), 0..=MAX_HASH_BLOCKS)
                .prop_map(|(first_block, count)| DiskSync::HashRequest { first_block, count }),
        ]
    }

    fn report() -> impl Strategy<Value = DiskReport> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(lineage, epoch, consistent, disk_bytes, seed_bytes)| {
                    DiskReport::Replica(ReplicaReport {
                        lineage,
                        epoch,
                        consistent,
                        disk_bytes,
                        seed_bytes,
                    })
                }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u64>(), 0..300)
            )
                .prop_map(|(first_block, hashes)| DiskReport::Hashes {
                    first_block,
                    hashes
                }),
            any::<u64>().prop_map(|first_block| DiskReport::NoSeed { first_block }),
        ]
    }

    proptest! {
        #[test]
        fn disk_sync_roundtrips(f in sync()) {
            let mut b = BytesMut::new();
            f.encode_body(&mut b);
            let mut bytes = b.freeze();
            prop_assert_eq!(DiskSync::decode_body(&mut bytes), Ok(f));
            prop_assert!(bytes.is_empty());
        }

        #[test]
        fn disk_report_roundtrips(f in report()) {
            let mut b = BytesMut::new();
            f.encode_body(&mut b);
            let mut bytes = b.freeze();
            prop_assert_eq!(DiskReport::decode_body(&mut bytes), Ok(f));
            prop_assert!(bytes.is_empty());
        }

        /// Any bytes: a frame or a typed error, never a panic; every
        /// truncation of a valid body is an error.
        #[test]
        fn arbitrary_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DiskSync::decode_body(&mut Bytes::from(data.clone()));
            let _ = DiskReport::decode_body(&mut Bytes::from(data));
        }

        #[test]
        fn truncated_bodies_are_errors(f in report(), g in sync(), cut in 0usize..64) {
            let mut b = BytesMut::new();
            f.encode_body(&mut b);
            if cut < b.len() {
                let mut short = b.freeze().slice(..cut);
                prop_assert!(DiskReport::decode_body(&mut short).is_err());
            }
            let mut b = BytesMut::new();
            g.encode_body(&mut b);
            if cut < b.len() {
                let mut short = b.freeze().slice(..cut);
                prop_assert!(DiskSync::decode_body(&mut short).is_err());
            }
        }
    }

    #[test]
    fn limits_are_enforced() {
        let mut b = BytesMut::new();
        b.put_u8(2);
        b.put_u64(0);
        b.put_u32(MAX_HASH_BLOCKS + 1);
        assert_eq!(
            DiskSync::decode_body(&mut b.clone().freeze()),
            Err(DiskWireError::TooManyBlocks(u64::from(MAX_HASH_BLOCKS) + 1))
        );
        assert_eq!(
            DiskReport::decode_body(&mut b.freeze()),
            Err(DiskWireError::TooManyBlocks(u64::from(MAX_HASH_BLOCKS) + 1))
        );
        let mut b = BytesMut::new();
        b.put_u8(9);
        assert!(matches!(
            DiskSync::decode_body(&mut b.freeze()),
            Err(DiskWireError::BadSubType { sub: 9, .. })
        ));
    }
}
