//! Byte encoding of failover messages for the sites' QUIC streams.
//!
//! ```text
//! u8  version (1)
//! u8  kind    1 heartbeat, 2 heartbeat-ack, 3 lease-request, 4 lease-reply, 5 handover
//! u8  vm name length, then the name (UTF-8, 1..=63 bytes)
//! kind 1, 2: u64 seq, u64 token, u8 stance (0 active, 1 standby, 2 candidate, 3 idle)
//! kind 3:    u64 req, u64 token
//! kind 4:    u64 req, u8 granted?, [u64 validity in microseconds], u64 token, u8 holder?, [u32 holder]
//! kind 5:    u64 req, u64 token, u32 to
//! ```
//! Little-endian, no trailing bytes. The sender's identity is not in the
//! message: it is the certificate of the connection it arrived on.

use std::time::Duration;

use crate::message::{Message, SiteId, Stance};

pub const WIRE_VERSION: u8 = 1;
/// No valid message is longer.
pub const MAX_MESSAGE_LEN: usize = 3 + 63 + 8 + 1 + 8 + 8 + 1 + 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("failover message truncated: needed {needed} more byte(s)")]
    Truncated { needed: usize },
    #[error("failover message version {found}, this build speaks {WIRE_VERSION}")]
    UnsupportedVersion { found: u8 },
    #[error("unknown failover message kind {0}")]
    UnknownKind(u8),
    #[error("invalid {field} value {value}")]
    BadValue { field: &'static str, value: u64 },
    #[error("VM name is not 1..=63 bytes of UTF-8")]
    BadVmName,
    #[error("{0} trailing byte(s) after the message")]
    Trailing(usize),
}

pub fn encode(vm: &str, msg: &Message) -> Result<Vec<u8>, WireError> {
    if vm.is_empty() || vm.len() > 63 {
        return Err(WireError::BadVmName);
    }
    let mut b = Vec::with_capacity(MAX_MESSAGE_LEN);
    b.push(WIRE_VERSION);
    let kind = match msg {
        Message::Heartbeat { .. } => 1,
        Message::HeartbeatAck { .. } => 2,
        Message::LeaseRequest { .. } => 3,
        Message::LeaseReply { .. } => 4,
        Message::Handover { .. } => 5,
    };
    b.push(kind);
    b.push(vm.len() as u8);
    b.extend_from_slice(vm.as_bytes());
    match *msg {
        Message::Heartbeat { seq, token, stance }
        | Message::HeartbeatAck { seq, token, stance } => {
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&token.to_le_bytes());
            b.push(stance_byte(stance));
        }
        Message::LeaseRequest { req, token } => {
            b.extend_from_slice(&req.to_le_bytes());
            b.extend_from_slice(&token.to_le_bytes());
        }
        Message::LeaseReply {
            req,
            granted,
            token,
            holder,
        } => {
            b.extend_from_slice(&req.to_le_bytes());
            match granted {
                Some(d) => {
                    b.push(1);
                    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                    b.extend_from_slice(&micros.to_le_bytes());
                }
                None => b.push(0),
            }
            b.extend_from_slice(&token.to_le_bytes());
            match holder {
                Some(h) => {
                    b.push(1);
                    b.extend_from_slice(&h.0.to_le_bytes());
                }
                None => b.push(0),
            }
        }
        Message::Handover { req, token, to } => {
            b.extend_from_slice(&req.to_le_bytes());
            b.extend_from_slice(&token.to_le_bytes());
            b.extend_from_slice(&to.0.to_le_bytes());
        }
    }
    Ok(b)
}

/// Decodes one message; returns the VM name and the message.
pub fn decode(bytes: &[u8]) -> Result<(String, Message), WireError> {
    let mut r = Reader { b: bytes };
    let version = r.u8()?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { found: version });
    }
    let kind = r.u8()?;
    let len = usize::from(r.u8()?);
    if len == 0 || len > 63 {
        return Err(WireError::BadVmName);
    }
    let vm = std::str::from_utf8(r.take(len)?)
        .map_err(|_| WireError::BadVmName)?
        .to_owned();
    let msg = match kind {
        1 | 2 => {
            let seq = r.u64()?;
            let token = r.u64()?;
            let stance = stance_from(r.u8()?)?;
            if kind == 1 {
                Message::Heartbeat { seq, token, stance }
            } else {
                Message::HeartbeatAck { seq, token, stance }
            }
        }
        3 => Message::LeaseRequest {
            req: r.u64()?,
            token: r.u64()?,
        },
        4 => {
            let req = r.u64()?;
            let granted = match r.u8()? {
                0 => None,
                1 => Some(Duration::from_micros(r.u64()?)),
                v => {
                    return Err(WireError::BadValue {
                        field: "granted flag",
                        value: v.into(),
                    })
                }
            };
            let token = r.u64()?;
            let holder = match r.u8()? {
                0 => None,
                1 => Some(SiteId(r.u32()?)),
                v => {
                    return Err(WireError::BadValue {
                        field: "holder flag",
                        value: v.into(),
                    })
                }
            };
            Message::LeaseReply {
                req,
                granted,
                token,
                holder,
            }
        }
        5 => Message::Handover {
            req: r.u64()?,
            token: r.u64()?,
            to: SiteId(r.u32()?),
        },
        k => return Err(WireError::UnknownKind(k)),
    };
    if !r.b.is_empty() {
        return Err(WireError::Trailing(r.b.len()));
    }
    Ok((vm, msg))
}

fn stance_byte(s: Stance) -> u8 {
    match s {
        Stance::Active => 0,
        Stance::Standby => 1,
        Stance::Candidate => 2,
        Stance::Idle => 3,
    }
}

fn stance_from(b: u8) -> Result<Stance, WireError> {
    Ok(match b {
        0 => Stance::Active,
        1 => Stance::Standby,
        2 => Stance::Candidate,
        3 => Stance::Idle,
        v => {
            return Err(WireError::BadValue {
                field: "stance",
                value: v.into(),
            })
        }
    })
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated {
                needed: n - self.b.len(),
            });
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}
