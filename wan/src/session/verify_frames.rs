//! Bodies of the online-verify frames (`VERIFY_HASHES` = 9,
//! `VERIFY_RESULT` = 10), all integers big-endian.
//!
//! The primary hashes a slice of the VM (a run of memory frames or disk
//! blocks) while the guest is paused at the checkpoint that closes epoch
//! E, and sends the hashes right after EPOCH E on the same stream. The
//! standby applies epochs one after the other, so when it reads
//! `VERIFY_HASHES` its replica is exactly epoch E (if E committed): it
//! hashes the same slice and answers with the units that differ.
//!
//! ```text
//! VERIFY_HASHES: id u64 | epoch u64 | region u8 | unit u32 | first u64 | n u32 | n × hash u64
//! VERIFY_RESULT: id u64 | epoch u64 | region u8 | first u64 | count u32 | outcome u8 | ...
//!   outcome 0 (compared): m u32 | m × offset u32 (ascending, each < count)
//!   outcome 1 (retry) / 2 (failed): reason (u16 length + UTF-8)
//! ```
//!
//! Both fit a control frame: at most [`MAX_VERIFY_UNITS`] hashes (32 KiB).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Most units (frames or blocks) one verify frame may cover.
pub const MAX_VERIFY_UNITS: u32 = 4096;

/// What part of the VM a slice covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VerifyRegion {
    /// Guest memory; units are frames (pages).
    Memory,
    /// The guest's disk image; units are fixed-size blocks.
    Disk,
}

impl VerifyRegion {
    fn to_u8(self) -> u8 {
        match self {
            Self::Memory => 0,
            Self::Disk => 1,
        }
    }

    fn from_u8(v: u8) -> Result<Self, VerifyWireError> {
        match v {
            0 => Ok(Self::Memory),
            1 => Ok(Self::Disk),
            other => Err(VerifyWireError::BadRegion(other)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Disk => "disk",
        }
    }
}

/// The primary's hashes of one slice, as of the commit of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyHashes {
    /// Request number (the answer carries it back).
    pub id: u64,
    /// The epoch whose commit the hashes describe.
    pub epoch: u64,
    pub region: VerifyRegion,
    /// Bytes per unit (page size, or disk block size); the last disk block
    /// may be shorter (the image's end).
    pub unit: u32,
    /// Number of the first unit (frame number, or block number).
    pub first: u64,
    /// xxh3-64 of each unit, in order.
    pub hashes: Vec<u64>,
}

/// How the standby answered a [`VerifyHashes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Compared: offsets (from `first`) of the units that differ.
    Compared { differing: Vec<u32> },
    /// Not compared this time (the replica was not at that epoch: the
    /// epoch was refused, or a resync is under way): ask again later.
    Retry(String),
    /// Cannot be compared at all (no replica, slice outside it).
    Failed(String),
}

/// The standby's answer for one slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyResult {
    pub id: u64,
    pub epoch: u64,
    pub region: VerifyRegion,
    pub first: u64,
    pub count: u32,
    pub outcome: VerifyOutcome,
}

/// Malformed verify frame bodies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyWireError {
    #[error("{0} frame truncated")]
    Truncated(&'static str),
    #[error("verify region {0} is unknown")]
    BadRegion(u8),
    #[error("verify outcome {0} is unknown")]
    BadOutcome(u8),
    #[error("verify slice of {0} units is over the limit of {MAX_VERIFY_UNITS}")]
    TooManyUnits(u32),
    #[error("verify unit size 0")]
    ZeroUnit,
    #[error("differing unit offset {offset} is outside a slice of {count} units, or out of order")]
    BadOffset { offset: u32, count: u32 },
    #[error("reason in VERIFY_RESULT is not UTF-8")]
    BadString,
}

const HASHES: &str = "VERIFY_HASHES";
const RESULT: &str = "VERIFY_RESULT";

fn need(buf: &Bytes, n: usize, what: &'static str) -> Result<(), VerifyWireError> {
    if buf.remaining() < n {
        Err(VerifyWireError::Truncated(what))
    } else {
        Ok(())
    }
}

fn u64_(buf: &mut Bytes, what: &'static str) -> Result<u64, VerifyWireError> {
    need(buf, 8, what)?;
    Ok(buf.get_u64())
}

fn u32_(buf: &mut Bytes, what: &'static str) -> Result<u32, VerifyWireError> {
    need(buf, 4, what)?;
    Ok(buf.get_u32())
}

fn u8_(buf: &mut Bytes, what: &'static str) -> Result<u8, VerifyWireError> {
    need(buf, 1, what)?;
    Ok(buf.get_u8())
}

fn units(n: u32) -> Result<u32, VerifyWireError> {
    if n > MAX_VERIFY_UNITS {
        Err(VerifyWireError::TooManyUnits(n))
    } else {
        Ok(n)
    }
}

impl VerifyHashes {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u64(self.id);
        out.put_u64(self.epoch);
        out.put_u8(self.region.to_u8());
        out.put_u32(self.unit);
        out.put_u64(self.first);
        out.put_u32(self.hashes.len() as u32);
        for h in &self.hashes {
            out.put_u64(*h);
        }
    }

    /// Decodes a body (trailing bytes are the caller's to refuse).
    pub fn decode_body(buf: &mut Bytes) -> Result<Self, VerifyWireError> {
        let id = u64_(buf, HASHES)?;
        let epoch = u64_(buf, HASHES)?;
        let region = VerifyRegion::from_u8(u8_(buf, HASHES)?)?;
        let unit = u32_(buf, HASHES)?;
        if unit == 0 {
            return Err(VerifyWireError::ZeroUnit);
        }
        let first = u64_(buf, HASHES)?;
        let n = units(u32_(buf, HASHES)?)?;
        need(buf, n as usize * 8, HASHES)?;
        let hashes = (0..n).map(|_| buf.get_u64()).collect();
        Ok(Self {
            id,
            epoch,
            region,
            unit,
            first,
            hashes,
        })
    }
}

impl VerifyResult {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u64(self.id);
        out.put_u64(self.epoch);
        out.put_u8(self.region.to_u8());
        out.put_u64(self.first);
        out.put_u32(self.count);
        let reason = |out: &mut BytesMut, s: &str| {
            // Cut at a character boundary so the peer decodes it.
            let mut n = s.len().min(1024);
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            out.put_u16(n as u16);
            out.put_slice(&s.as_bytes()[..n]);
        };
        match &self.outcome {
            VerifyOutcome::Compared { differing } => {
                out.put_u8(0);
                out.put_u32(differing.len() as u32);
                for d in differing {
                    out.put_u32(*d);
                }
            }
            VerifyOutcome::Retry(why) => {
                out.put_u8(1);
                reason(out, why);
            }
            VerifyOutcome::Failed(why) => {
                out.put_u8(2);
                reason(out, why);
            }
        }
    }

    /// Decodes a body (trailing bytes are the caller's to refuse).
    pub fn decode_body(buf: &mut Bytes) -> Result<Self, VerifyWireError> {
        let id = u64_(buf, RESULT)?;
        let epoch = u64_(buf, RESULT)?;
        let region = VerifyRegion::from_u8(u8_(buf, RESULT)?)?;
        let first = u64_(buf, RESULT)?;
        let count = units(u32_(buf, RESULT)?)?;
        let reason = |buf: &mut Bytes| -> Result<String, VerifyWireError> {
            need(buf, 2, RESULT)?;
            let n = buf.get_u16() as usize;
            need(buf, n, RESULT)?;
            String::from_utf8(buf.split_to(n).to_vec()).map_err(|_| VerifyWireError::BadString)
        };
        let outcome = match u8_(buf, RESULT)? {
            0 => {
                let m = u32_(buf, RESULT)?;
                if m > count {
                    return Err(VerifyWireError::TooManyUnits(m));
                }
                need(buf, m as usize * 4, RESULT)?;
                let mut differing = Vec::with_capacity(m as usize);
                for _ in 0..m {
                    let offset = buf.get_u32();
                    if offset >= count || differing.last().is_some_and(|&l| offset <= l) {
                        return Err(VerifyWireError::BadOffset { offset, count });
                    }
                    differing.push(offset);
                }
                VerifyOutcome::Compared { differing }
            }
            1 => VerifyOutcome::Retry(reason(buf)?),
            2 => VerifyOutcome::Failed(reason(buf)?),
            other => return Err(VerifyWireError::BadOutcome(other)),
        };
        Ok(Self {
            id,
            epoch,
            region,
            first,
            count,
            outcome,
        })
    }
}

/// Fuzzing entry point: decodes `data` as either body (first byte picks
/// which); a body that decodes re-encodes to the same bytes.
pub fn fuzz_verify_body(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mut buf = Bytes::copy_from_slice(rest);
    let mut out = BytesMut::new();
    let used = if which & 1 == 0 {
        match VerifyHashes::decode_body(&mut buf) {
            Ok(v) => {
                v.encode_body(&mut out);
                rest.len() - buf.remaining()
            }
            Err(_) => return,
        }
    } else {
        match VerifyResult::decode_body(&mut buf) {
            Ok(v) => {
                v.encode_body(&mut out);
                rest.len() - buf.remaining()
            }
            Err(_) => return,
        }
    };
    assert_eq!(&out[..], &rest[..used], "re-encoded body differs");
}

#[cfg(test)]
mod tests {
    use super::super::wire::{ControlFrame, Decoder, Item, WireError, MAX_CONTROL_BODY};
    use super::*;
    use proptest::prelude::*;

    fn region() -> impl Strategy<Value = VerifyRegion> {
        prop_oneof![Just(VerifyRegion::Memory), Just(VerifyRegion::Disk)]
    }

    fn hashes_frame() -> impl Strategy<Value = VerifyHashes> {
        (
            any::<u64>(),
            any::<u64>(),
            region(),
            1u32..,
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..=MAX_VERIFY_UNITS as usize),
        )
            .prop_map(|(id, epoch, region, unit, first, hashes)| VerifyHashes {
                id,
                epoch,
                region,
                unit,
                first,
                hashes,
            })
    }

    fn result_frame() -> impl Strategy<Value = VerifyResult> {
        (
            any::<u64>(),
            any::<u64>(),
            region(),
            any::<u64>(),
            1u32..=MAX_VERIFY_UNITS,
            any::<u8>(),
            proptest::collection::btree_set(any::<u32>(), 0..64),
            "\\PC{0,40}",
        )
            .prop_map(|(id, epoch, region, first, count, kind, set, why)| {
                let outcome = match kind % 3 {
                    0 => VerifyOutcome::Compared {
                        differing: set
                            .into_iter()
                            .map(|d| d % count)
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .collect(),
                    },
                    1 => VerifyOutcome::Retry(why),
                    _ => VerifyOutcome::Failed(why),
                };
                VerifyResult {
                    id,
                    epoch,
                    region,
                    first,
                    count,
                    outcome,
                }
            })
    }

    fn roundtrip(f: ControlFrame) -> Result<Item, WireError> {
        let bytes = f.encode();
        assert!(bytes.len() as u64 <= 10 + MAX_CONTROL_BODY);
        let mut d = Decoder::new();
        d.push(&bytes);
        d.next_item().map(|i| i.expect("a whole frame"))
    }

    proptest! {
        #[test]
        fn hashes_roundtrip(v in hashes_frame()) {
            let f = ControlFrame::VerifyHashes(v);
            prop_assert_eq!(roundtrip(f.clone()), Ok(Item::Control(f)));
        }

        #[test]
        fn results_roundtrip(v in result_frame()) {
            let f = ControlFrame::VerifyResult(v);
            prop_assert_eq!(roundtrip(f.clone()), Ok(Item::Control(f)));
        }

        /// Any truncation of a valid body is a typed error, never a panic.
        #[test]
        fn truncated_bodies_are_errors(v in hashes_frame(), r in result_frame(), cut in any::<prop::sample::Index>()) {
            for f in [ControlFrame::VerifyHashes(v), ControlFrame::VerifyResult(r)] {
                let bytes = f.encode();
                let body = &bytes[10..];
                let n = cut.index(body.len().max(1)).min(body.len().saturating_sub(1));
                let mut frame = bytes[..10].to_vec();
                frame[2..10].copy_from_slice(&(n as u64).to_be_bytes());
                frame.extend_from_slice(&body[..n]);
                let mut d = Decoder::new();
                d.push(&frame);
                prop_assert!(matches!(d.next_item(), Err(WireError::Verify(VerifyWireError::Truncated(_)))));
            }
        }

        /// Arbitrary bodies never panic the decoders.
        #[test]
        fn arbitrary_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            fuzz_verify_body(&data);
        }
    }

    #[test]
    fn malformed_bodies_have_typed_errors() {
        let good = VerifyResult {
            id: 1,
            epoch: 2,
            region: VerifyRegion::Disk,
            first: 3,
            count: 4,
            outcome: VerifyOutcome::Compared {
                differing: vec![1, 3],
            },
        };
        let mut body = BytesMut::new();
        good.encode_body(&mut body);
        // region byte
        let mut b = body.clone();
        b[16] = 7;
        assert_eq!(
            VerifyResult::decode_body(&mut b.freeze()),
            Err(VerifyWireError::BadRegion(7))
        );
        // an offset beyond the slice
        let mut b = body.clone();
        let n = b.len();
        b[n - 1] = 9;
        assert_eq!(
            VerifyResult::decode_body(&mut b.freeze()),
            Err(VerifyWireError::BadOffset {
                offset: 9,
                count: 4
            })
        );
        // outcome byte
        let mut b = body.clone();
        b[29] = 5;
        assert_eq!(
            VerifyResult::decode_body(&mut b.freeze()),
            Err(VerifyWireError::BadOutcome(5))
        );
        // too many hashes
        let mut h = BytesMut::new();
        VerifyHashes {
            id: 1,
            epoch: 1,
            region: VerifyRegion::Memory,
            unit: 4096,
            first: 0,
            hashes: vec![],
        }
        .encode_body(&mut h);
        let n = h.len();
        h[n - 4..].copy_from_slice(&(MAX_VERIFY_UNITS + 1).to_be_bytes());
        assert_eq!(
            VerifyHashes::decode_body(&mut h.freeze()),
            Err(VerifyWireError::TooManyUnits(MAX_VERIFY_UNITS + 1))
        );
    }
}
