//! Byte layout of the replication protocol (see `docs/transport.md`).
//!
//! Every frame starts with a 10-byte header, all integers big-endian:
//!
//! ```text
//! 0      1      2                                      10
//! +------+------+--------------------------------------+------------
//! | type | flags|            body length (u64)         | body ...
//! +------+------+--------------------------------------+------------
//! ```
//!
//! Control frames (everything but `EPOCH`) have bodies of at most
//! [`MAX_CONTROL_BODY`] bytes. An `EPOCH` body is the epoch number (u64)
//! followed by the opaque encoded epoch; the decoder reports its header
//! before buffering any of the payload, so a receiver can refuse an epoch
//! over its size limit without allocating it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use super::disk_frames::{
    DiskReport, DiskSync, DiskSyncMode, DiskWireError, ReplicaReport, SyncBegin, MAX_HASH_BLOCKS,
};
pub use super::verify_frames::{
    VerifyHashes, VerifyOutcome, VerifyRegion, VerifyResult, VerifyWireError, MAX_VERIFY_UNITS,
};

/// Version of the replication protocol carried in HELLO / HELLO_ACK and in
/// the ALPN string (`remus-wan/1`).
pub const PROTOCOL_VERSION: u8 = 1;
/// Length of every frame header.
pub const HEADER_LEN: usize = 10;
/// Largest body a control frame may have.
pub const MAX_CONTROL_BODY: u64 = 64 * 1024;

/// Frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    HelloAck = 2,
    Epoch = 3,
    Ack = 4,
    Heartbeat = 5,
    Error = 6,
    /// Disk resynchronisation, primary → standby (see [`DiskSync`]).
    DiskSync = 7,
    /// Disk resynchronisation, standby → primary (see [`DiskReport`]).
    DiskReport = 8,
    /// Online verify: the primary's hashes of a slice at an epoch.
    VerifyHashes = 9,
    /// Online verify: the standby's comparison of that slice.
    VerifyResult = 10,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Epoch,
            4 => Self::Ack,
            5 => Self::Heartbeat,
            6 => Self::Error,
            7 => Self::DiskSync,
            8 => Self::DiskReport,
            9 => Self::VerifyHashes,
            10 => Self::VerifyResult,
            _ => return None,
        })
    }
}

/// `EPOCH` flag: the epoch is a full image of the VM (a resync), not a delta.
pub const FLAG_FULL: u8 = 0x01;

/// What an epoch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EpochKind {
    /// Changes against the previous epoch; applies only on top of epoch - 1.
    Delta,
    /// The whole VM (pages sent whole); applies on top of anything older.
    Full,
}

/// Error codes carried by `ERROR` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Protocol violation (malformed or unexpected frame).
    Protocol = 1,
    /// HELLO carried a protocol version the peer does not speak.
    Version = 2,
    /// HELLO named a VM the receiver does not hold.
    WrongVm = 3,
    /// An epoch is larger than the receiver's limit.
    EpochTooLarge = 4,
    /// An epoch arrived out of sequence.
    OutOfOrder = 5,
    /// The receiver could not verify or apply an epoch (needs a resync).
    Rejected = 6,
    /// The peer was silent or stalled mid-epoch for too long.
    Timeout = 7,
    /// Any code this version does not know.
    Unknown = 0xffff,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Protocol,
            2 => Self::Version,
            3 => Self::WrongVm,
            4 => Self::EpochTooLarge,
            5 => Self::OutOfOrder,
            6 => Self::Rejected,
            7 => Self::Timeout,
            _ => Self::Unknown,
        }
    }
}

/// First frame on a connection, sender → receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u8,
    /// Sending (primary) site name.
    pub site: String,
    /// Replicated VM.
    pub vm_id: String,
    /// Number the sender will give its next new epoch (diagnostics).
    pub next_epoch: u64,
}

/// Answer to HELLO, receiver → sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u8,
    /// Receiving (backup) site name.
    pub site: String,
    pub vm_id: String,
    /// Last epoch the receiver committed (0: none yet).
    pub last_committed: u64,
    /// Largest epoch payload the receiver accepts, in bytes.
    pub max_epoch_size: u64,
}

/// `ERROR` frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// Epoch concerned (0: none).
    pub epoch: u64,
    pub message: String,
}

/// Every frame but `EPOCH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    Hello(Hello),
    HelloAck(HelloAck),
    /// Receiver → sender: every epoch up to and including `committed` is
    /// applied to the replica.
    Ack {
        committed: u64,
    },
    /// Either direction, when nothing else was sent for a heartbeat interval.
    Heartbeat {
        seq: u64,
    },
    Error(ErrorFrame),
    /// Sender → receiver, right after the epoch it names (see [`VerifyHashes`]).
    VerifyHashes(VerifyHashes),
    /// Receiver → sender: the answer to a [`VerifyHashes`].
    VerifyResult(VerifyResult),
    /// Sender → receiver: disk resynchronisation.
    DiskSync(DiskSync),
    /// Receiver → sender: what the standby holds, block hashes.
    DiskReport(DiskReport),
}

/// Malformed input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("control frame body of {0} bytes exceeds the {MAX_CONTROL_BODY}-byte limit")]
    ControlTooLarge(u64),
    #[error("{0} frame truncated")]
    Truncated(&'static str),
    #[error("{0} frame has {1} trailing bytes")]
    Trailing(&'static str, usize),
    #[error("string in {0} frame is not UTF-8")]
    BadString(&'static str),
    #[error("EPOCH frame body of {0} bytes is shorter than its epoch number")]
    EpochBody(u64),
    #[error(transparent)]
    Verify(#[from] VerifyWireError),
    #[error(transparent)]
    Disk(#[from] DiskWireError),
}

fn put_str(out: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

fn get_str(buf: &mut Bytes, what: &'static str) -> Result<String, WireError> {
    if buf.remaining() < 2 {
        return Err(WireError::Truncated(what));
    }
    let n = buf.get_u16() as usize;
    if buf.remaining() < n {
        return Err(WireError::Truncated(what));
    }
    let s = buf.split_to(n);
    String::from_utf8(s.to_vec()).map_err(|_| WireError::BadString(what))
}

fn get_u64(buf: &mut Bytes, what: &'static str) -> Result<u64, WireError> {
    if buf.remaining() < 8 {
        return Err(WireError::Truncated(what));
    }
    Ok(buf.get_u64())
}

fn get_u8(buf: &mut Bytes, what: &'static str) -> Result<u8, WireError> {
    if buf.remaining() < 1 {
        return Err(WireError::Truncated(what));
    }
    Ok(buf.get_u8())
}

fn header(out: &mut BytesMut, ty: FrameType, flags: u8, body_len: u64) {
    out.put_u8(ty as u8);
    out.put_u8(flags);
    out.put_u64(body_len);
}

impl ControlFrame {
    /// Name used in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "HELLO",
            Self::HelloAck(_) => "HELLO_ACK",
            Self::Ack { .. } => "ACK",
            Self::Heartbeat { .. } => "HEARTBEAT",
            Self::Error(_) => "ERROR",
            Self::VerifyHashes(_) => "VERIFY_HASHES",
            Self::VerifyResult(_) => "VERIFY_RESULT",
            Self::DiskSync(_) => "DISK_SYNC",
            Self::DiskReport(_) => "DISK_REPORT",
        }
    }

    /// Encodes the frame, header included.
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::new();
        let ty = match self {
            Self::Hello(h) => {
                body.put_u8(h.version);
                put_str(&mut body, &h.site);
                put_str(&mut body, &h.vm_id);
                body.put_u64(h.next_epoch);
                FrameType::Hello
            }
            Self::HelloAck(h) => {
                body.put_u8(h.version);
                put_str(&mut body, &h.site);
                put_str(&mut body, &h.vm_id);
                body.put_u64(h.last_committed);
                body.put_u64(h.max_epoch_size);
                FrameType::HelloAck
            }
            Self::Ack { committed } => {
                body.put_u64(*committed);
                FrameType::Ack
            }
            Self::Heartbeat { seq } => {
                body.put_u64(*seq);
                FrameType::Heartbeat
            }
            Self::Error(e) => {
                body.put_u16(e.code as u16);
                body.put_u64(e.epoch);
                put_str(&mut body, &e.message);
                FrameType::Error
            }
            Self::VerifyHashes(v) => {
                v.encode_body(&mut body);
                FrameType::VerifyHashes
            }
            Self::VerifyResult(v) => {
                v.encode_body(&mut body);
                FrameType::VerifyResult
            }
            Self::DiskSync(d) => {
                d.encode_body(&mut body);
                FrameType::DiskSync
            }
            Self::DiskReport(d) => {
                d.encode_body(&mut body);
                FrameType::DiskReport
            }
        };
        let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
        header(&mut out, ty, 0, body.len() as u64);
        out.put_slice(&body);
        out.freeze()
    }

    fn decode(ty: FrameType, mut body: Bytes) -> Result<Self, WireError> {
        let frame = match ty {
            FrameType::Hello => {
                let w = "HELLO";
                Self::Hello(Hello {
                    version: get_u8(&mut body, w)?,
                    site: get_str(&mut body, w)?,
                    vm_id: get_str(&mut body, w)?,
                    next_epoch: get_u64(&mut body, w)?,
                })
            }
            FrameType::HelloAck => {
                let w = "HELLO_ACK";
                Self::HelloAck(HelloAck {
                    version: get_u8(&mut body, w)?,
                    site: get_str(&mut body, w)?,
                    vm_id: get_str(&mut body, w)?,
                    last_committed: get_u64(&mut body, w)?,
                    max_epoch_size: get_u64(&mut body, w)?,
                })
            }
            FrameType::Ack => Self::Ack {
                committed: get_u64(&mut body, "ACK")?,
            },
            FrameType::Heartbeat => Self::Heartbeat {
                seq: get_u64(&mut body, "HEARTBEAT")?,
            },
            FrameType::Error => {
                let w = "ERROR";
                if body.remaining() < 2 {
                    return Err(WireError::Truncated(w));
                }
                let code = ErrorCode::from_u16(body.get_u16());
                Self::Error(ErrorFrame {
                    code,
                    epoch: get_u64(&mut body, w)?,
                    message: get_str(&mut body, w)?,
                })
            }
            FrameType::VerifyHashes => Self::VerifyHashes(VerifyHashes::decode_body(&mut body)?),
            FrameType::VerifyResult => Self::VerifyResult(VerifyResult::decode_body(&mut body)?),
            FrameType::DiskSync => Self::DiskSync(DiskSync::decode_body(&mut body)?),
            FrameType::DiskReport => Self::DiskReport(DiskReport::decode_body(&mut body)?),
            FrameType::Epoch => unreachable!("EPOCH is not a control frame"),
        };
        if body.has_remaining() {
            return Err(WireError::Trailing(frame.name(), body.remaining()));
        }
        Ok(frame)
    }
}

/// Header of an `EPOCH` frame plus the epoch number: what precedes the payload.
pub fn encode_epoch_header(epoch: u64, kind: EpochKind, payload_len: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + 8);
    let flags = if kind == EpochKind::Full {
        FLAG_FULL
    } else {
        0
    };
    header(&mut out, FrameType::Epoch, flags, payload_len + 8);
    out.put_u64(epoch);
    out.freeze()
}

/// One item out of the incremental decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Control(ControlFrame),
    /// An `EPOCH` frame begins; `len` payload bytes follow as chunks.
    EpochHeader {
        epoch: u64,
        kind: EpochKind,
        len: u64,
    },
    /// Payload bytes of the current epoch, in order.
    EpochChunk(Bytes),
    /// The current epoch's payload is complete.
    EpochEnd,
}

#[derive(Debug)]
enum DecState {
    Header,
    Payload { remaining: u64 },
}

/// Incremental frame decoder: feed bytes as they arrive, pull items.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    state: DecState,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            state: DecState::Header,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// True while in the middle of an epoch payload.
    pub fn in_epoch(&self) -> bool {
        matches!(self.state, DecState::Payload { .. })
    }

    /// Next complete item, if the buffered bytes hold one.
    pub fn next_item(&mut self) -> Result<Option<Item>, WireError> {
        match self.state {
            DecState::Payload { remaining } => {
                if remaining == 0 {
                    self.state = DecState::Header;
                    return Ok(Some(Item::EpochEnd));
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let n = (self.buf.len() as u64).min(remaining) as usize;
                let chunk = self.buf.split_to(n).freeze();
                self.state = DecState::Payload {
                    remaining: remaining - n as u64,
                };
                Ok(Some(Item::EpochChunk(chunk)))
            }
            DecState::Header => {
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let ty_byte = self.buf[0];
                let flags = self.buf[1];
                let len = u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes"));
                let ty = FrameType::from_u8(ty_byte).ok_or(WireError::UnknownType(ty_byte))?;
                if ty == FrameType::Epoch {
                    if len < 8 {
                        return Err(WireError::EpochBody(len));
                    }
                    if self.buf.len() < HEADER_LEN + 8 {
                        return Ok(None);
                    }
                    let epoch = u64::from_be_bytes(self.buf[10..18].try_into().expect("8 bytes"));
                    self.buf.advance(HEADER_LEN + 8);
                    let kind = if flags & FLAG_FULL != 0 {
                        EpochKind::Full
                    } else {
                        EpochKind::Delta
                    };
                    self.state = DecState::Payload { remaining: len - 8 };
                    return Ok(Some(Item::EpochHeader {
                        epoch,
                        kind,
                        len: len - 8,
                    }));
                }
                if len > MAX_CONTROL_BODY {
                    return Err(WireError::ControlTooLarge(len));
                }
                let total = HEADER_LEN + len as usize;
                if self.buf.len() < total {
                    return Ok(None);
                }
                self.buf.advance(HEADER_LEN);
                let body = self.buf.split_to(len as usize).freeze();
                Ok(Some(Item::Control(ControlFrame::decode(ty, body)?)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_items(d: &mut Decoder) -> Vec<Item> {
        let mut v = Vec::new();
        while let Some(i) = d.next_item().unwrap() {
            v.push(i);
        }
        v
    }

    #[test]
    fn control_frames_roundtrip_byte_by_byte() {
        let frames = vec![
            ControlFrame::Hello(Hello {
                version: 1,
                site: "dc1".into(),
                vm_id: "web1".into(),
                next_epoch: 7,
            }),
            ControlFrame::HelloAck(HelloAck {
                version: 1,
                site: "dc2".into(),
                vm_id: "web1".into(),
                last_committed: 6,
                max_epoch_size: 1 << 30,
            }),
            ControlFrame::Ack { committed: 9 },
            ControlFrame::Heartbeat { seq: 3 },
            ControlFrame::Error(ErrorFrame {
                code: ErrorCode::EpochTooLarge,
                epoch: 4,
                message: "too big".into(),
            }),
        ];
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for f in &frames {
            for b in f.encode().iter() {
                d.push(&[*b]);
                got.extend(all_items(&mut d));
            }
        }
        let want: Vec<Item> = frames.into_iter().map(Item::Control).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn epoch_frame_layout_and_chunks() {
        let h = encode_epoch_header(42, EpochKind::Full, 5);
        assert_eq!(
            &h[..],
            &[3, 1, 0, 0, 0, 0, 0, 0, 0, 13, 0, 0, 0, 0, 0, 0, 0, 42]
        );
        let mut d = Decoder::new();
        d.push(&h);
        d.push(b"ab");
        let items = all_items(&mut d);
        assert_eq!(
            items,
            vec![
                Item::EpochHeader {
                    epoch: 42,
                    kind: EpochKind::Full,
                    len: 5
                },
                Item::EpochChunk(Bytes::from_static(b"ab")),
            ]
        );
        d.push(b"cdeX");
        let items = all_items(&mut d);
        assert_eq!(items[0], Item::EpochChunk(Bytes::from_static(b"cde")));
        assert_eq!(items[1], Item::EpochEnd);
        assert_eq!(items.len(), 2);
        // The trailing X is the start of the next header.
        assert!(!d.in_epoch());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut d = Decoder::new();
        d.push(&[99, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_item(), Err(WireError::UnknownType(99)));
        let mut d = Decoder::new();
        d.push(&[4, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
        assert!(matches!(d.next_item(), Err(WireError::ControlTooLarge(_))));
        let mut d = Decoder::new();
        d.push(&[4, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 2]);
        assert_eq!(d.next_item(), Err(WireError::Truncated("ACK")));
    }
}
