//! The FEC datagram format, with a decoder that takes whatever a peer sends.
//!
//! Two kinds, told apart by the first byte:
//!
//! ```text
//! REPAIR  'R' | window start u64 | window len u32 | shard size u16 |
//!              shard count u16 | recovery count u16 | recovery index u16 |
//!              shard bytes (exactly shard size)
//! MIRROR  'M' | stream offset u64 | bytes (1.. of them)
//! HELLO   'H'
//! ```
//!
//! All integers big-endian. A window is the byte range
//! `[start, start + len)` of the replication stream, cut into `shard count`
//! data shards of `shard size` bytes (the last one zero-padded); a REPAIR
//! carries one of its `recovery count` Reed-Solomon recovery shards. A
//! MIRROR is a verbatim copy of a short burst (e.g. a commit message). A
//! HELLO tells the peer that we decode its FEC datagrams; a sender sends
//! none before it has seen one (a peer without FEC would only drop them).

use bytes::{BufMut, Bytes, BytesMut};

use super::FecError;

pub const KIND_REPAIR: u8 = b'R';
pub const KIND_MIRROR: u8 = b'M';
pub const KIND_HELLO: u8 = b'H';

/// Bytes before the shard in a REPAIR datagram.
pub const REPAIR_HEADER: usize = 1 + 8 + 4 + 2 + 2 + 2 + 2;
/// Bytes before the payload in a MIRROR datagram.
pub const MIRROR_HEADER: usize = 1 + 8;

/// Largest shard we accept: more than any QUIC datagram on an Ethernet path.
pub const MAX_SHARD_SIZE: usize = 4096;
/// Most data shards in one window (4 MiB windows of ~1.4 KB shards need ~3000).
pub const MAX_SHARD_COUNT: usize = 16_384;
/// Most recovery shards of one window.
pub const MAX_RECOVERY_COUNT: usize = 4096;
/// QUIC stream offsets are below 2^62.
pub const MAX_STREAM_OFFSET: u64 = (1 << 62) - 1;

/// Which bytes of the stream a window covers and how it is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowShape {
    pub start: u64,
    pub len: u32,
    pub shard_size: u16,
    pub shard_count: u16,
    pub recovery_count: u16,
}

impl WindowShape {
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.len)
    }

    /// Stream range of data shard `i`, clipped to the window.
    pub fn shard_range(&self, i: usize) -> (u64, u64) {
        let s = self.start + (i * usize::from(self.shard_size)) as u64;
        (s, (s + u64::from(self.shard_size)).min(self.end()))
    }

    /// Checks everything a decoder relies on; `Err` names the first problem.
    pub fn validate(&self) -> Result<(), FecError> {
        let bad = |what: &'static str| Err(FecError::Malformed(what));
        let size = usize::from(self.shard_size);
        let count = usize::from(self.shard_count);
        let recovery = usize::from(self.recovery_count);
        if size == 0 || size % 2 != 0 || size > MAX_SHARD_SIZE {
            return bad("shard size must be even and within 2..=4096");
        }
        if count == 0 || count > MAX_SHARD_COUNT {
            return bad("shard count out of range");
        }
        if recovery == 0 || recovery > MAX_RECOVERY_COUNT {
            return bad("recovery count out of range");
        }
        let len = self.len as usize;
        if len == 0 || len > count * size || len <= (count - 1) * size {
            return bad("window length does not match its shards");
        }
        if self.start.checked_add(u64::from(self.len)).is_none() || self.end() > MAX_STREAM_OFFSET {
            return bad("window beyond the largest stream offset");
        }
        if !reed_solomon_simd::ReedSolomonDecoder::supports(count, recovery) {
            return bad("shard counts not supported by the code");
        }
        Ok(())
    }
}

/// A decoded FEC datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    Repair {
        shape: WindowShape,
        index: u16,
        shard: Bytes,
    },
    Mirror {
        offset: u64,
        bytes: Bytes,
    },
    Hello,
}

impl Datagram {
    /// Parses and validates one datagram. Never panics.
    pub fn decode(mut d: Bytes) -> Result<Self, FecError> {
        let Some(&kind) = d.first() else {
            return Err(FecError::Malformed("empty datagram"));
        };
        match kind {
            KIND_REPAIR => {
                if d.len() < REPAIR_HEADER {
                    return Err(FecError::Malformed("short repair header"));
                }
                let h = d.split_to(REPAIR_HEADER);
                let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
                let mut start = [0u8; 8];
                start.copy_from_slice(&h[1..9]);
                let shape = WindowShape {
                    start: u64::from_be_bytes(start),
                    len: u32::from_be_bytes([h[9], h[10], h[11], h[12]]),
                    shard_size: u16_at(13),
                    shard_count: u16_at(15),
                    recovery_count: u16_at(17),
                };
                let index = u16_at(19);
                shape.validate()?;
                if index >= shape.recovery_count {
                    return Err(FecError::Malformed("recovery index out of range"));
                }
                if d.len() != usize::from(shape.shard_size) {
                    return Err(FecError::Malformed("shard length differs from shard size"));
                }
                Ok(Self::Repair {
                    shape,
                    index,
                    shard: d,
                })
            }
            KIND_MIRROR => {
                if d.len() <= MIRROR_HEADER {
                    return Err(FecError::Malformed("short mirror"));
                }
                let h = d.split_to(MIRROR_HEADER);
                let mut off = [0u8; 8];
                off.copy_from_slice(&h[1..9]);
                let offset = u64::from_be_bytes(off);
                if offset
                    .checked_add(d.len() as u64)
                    .is_none_or(|e| e > MAX_STREAM_OFFSET)
                {
                    return Err(FecError::Malformed(
                        "mirror beyond the largest stream offset",
                    ));
                }
                Ok(Self::Mirror { offset, bytes: d })
            }
            KIND_HELLO if d.len() == 1 => Ok(Self::Hello),
            KIND_HELLO => Err(FecError::Malformed("long hello")),
            other => Err(FecError::UnknownKind(other)),
        }
    }

    pub fn encode(&self) -> Bytes {
        match self {
            Self::Repair {
                shape,
                index,
                shard,
            } => {
                let mut b = BytesMut::with_capacity(REPAIR_HEADER + shard.len());
                b.put_u8(KIND_REPAIR);
                b.put_u64(shape.start);
                b.put_u32(shape.len);
                b.put_u16(shape.shard_size);
                b.put_u16(shape.shard_count);
                b.put_u16(shape.recovery_count);
                b.put_u16(*index);
                b.put_slice(shard);
                b.freeze()
            }
            Self::Mirror { offset, bytes } => {
                let mut b = BytesMut::with_capacity(MIRROR_HEADER + bytes.len());
                b.put_u8(KIND_MIRROR);
                b.put_u64(*offset);
                b.put_slice(bytes);
                b.freeze()
            }
            Self::Hello => Bytes::from_static(&[KIND_HELLO]),
        }
    }
}

/// Fuzz entry point (wan/fuzz `decode_fec_datagram`): a datagram decodes to
/// a typed error or to a value that re-encodes to the same bytes.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(d) = Datagram::decode(Bytes::copy_from_slice(data)) {
        assert_eq!(d.encode().as_ref(), data, "re-encoding differs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> WindowShape {
        WindowShape {
            start: 1000,
            len: 2500,
            shard_size: 1024,
            shard_count: 3,
            recovery_count: 4,
        }
    }

    #[test]
    fn repair_and_mirror_round_trip() {
        let r = Datagram::Repair {
            shape: shape(),
            index: 3,
            shard: Bytes::from(vec![7u8; 1024]),
        };
        assert_eq!(Datagram::decode(r.encode()), Ok(r));
        let m = Datagram::Mirror {
            offset: 42,
            bytes: Bytes::from_static(b"commit"),
        };
        assert_eq!(Datagram::decode(m.encode()), Ok(m));
    }

    #[test]
    fn nonsense_is_a_typed_error() {
        let good = Datagram::Repair {
            shape: shape(),
            index: 0,
            shard: Bytes::from(vec![0u8; 1024]),
        }
        .encode();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = good.to_vec();
            f(&mut v);
            Datagram::decode(Bytes::from(v))
        };
        assert!(matches!(
            with(&|v| v[0] = b'X'),
            Err(FecError::UnknownKind(b'X'))
        ));
        assert!(with(&|v| v.truncate(10)).is_err());
        assert!(with(&|v| v.truncate(REPAIR_HEADER + 10)).is_err());
        // odd shard size
        assert!(with(&|v| v[14] = 1).is_err());
        // length not matching the shard count
        assert!(with(&|v| v[16] = 9).is_err());
        // index >= recovery count
        assert!(with(&|v| v[20] = 4).is_err());
        // zero recovery count
        assert!(with(&|v| {
            v[17] = 0;
            v[18] = 0
        })
        .is_err());
        // start near 2^64
        assert!(with(&|v| v[1] = 0xff).is_err());
        assert!(Datagram::decode(Bytes::new()).is_err());
        assert!(Datagram::decode(Bytes::from_static(b"M12345678")).is_err());
    }

    #[test]
    fn the_fuzz_seeds_decode_and_feed() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode_fec_datagram");
        let mut n = 0;
        for e in std::fs::read_dir(dir).expect("seed directory") {
            let data = std::fs::read(e.expect("entry").path()).expect("seed");
            fuzz_decode(&data);
            super::super::reassembly::fuzz_feed(&data);
            n += 1;
        }
        assert!(n >= 4);
        let seq = include_bytes!("../../../fuzz/seeds/decode_fec_datagram/repair.bin");
        assert!(matches!(
            Datagram::decode(Bytes::from_static(seq)),
            Ok(Datagram::Repair { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            fuzz_decode(&data);
            let mut v = data.clone();
            v.insert(0, KIND_REPAIR);
            fuzz_decode(&v);
            v[0] = KIND_MIRROR;
            fuzz_decode(&v);
            super::super::reassembly::fuzz_feed(&data);
        }
    }
}
