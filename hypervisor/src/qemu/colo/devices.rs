//! Finding the end of the device part of QEMU's initial migration stream.
//!
//! Device sections (`QEMU_VM_SECTION_FULL`) carry no length: only QEMU's
//! vmstate descriptions say how to walk them. We do not walk them; we keep
//! them as an opaque blob, and find where it ends from its framing: each
//! section is a header (type, be32 section id, id string, instance,
//! version), its fields, and a footer (0x7e + the same be32 id). After the
//! last one comes EOF (0x00) and then QEMU's own description of what it
//! sent (VMDESCRIPTION: be32 length + JSON) — after which QEMU waits for
//! its peer. So the part ends where EOF + VMDESCRIPTION end exactly at the
//! end of what has arrived, and the JSON's device list must name exactly
//! the sections found on the way: a footer pattern inside a device's
//! fields cannot pass for a section boundary unnoticed.

use serde_json::Value;

use super::error::StreamError;
use super::wire::{self, Cursor};

/// Bound on the device part (a PC's is tens of KB).
pub const MAX_DEVICE_PART: usize = 64 << 20;
/// Bound on the JSON description (a PC's is ~100 KB).
pub const MAX_VMDESC: usize = 64 << 20;

/// A FULL section header: `(section id, id string, instance id, bytes)`.
fn header(buf: &[u8]) -> Option<(u32, &[u8], u32, usize)> {
    let mut c = Cursor::new(buf);
    if c.u8().ok()? != wire::SECTION_FULL {
        return None;
    }
    let sid = c.be32().ok()?;
    let id = c.idstr().ok()?;
    let inst = c.be32().ok()?;
    let _version = c.be32().ok()?;
    wire::plausible_idstr(id).then_some((sid, id, inst, c.pos()))
}

/// The end of the initial stream's device part in `buf` (which starts at
/// the first FULL section or at EOF): `Ok(Some((devices, total)))` where
/// `buf[..devices]` is the sections plus EOF and `total` includes the
/// description; `Ok(None)` when more bytes are needed.
pub fn find_end(buf: &[u8]) -> Result<Option<(usize, usize)>, StreamError> {
    if buf.len() > MAX_DEVICE_PART + MAX_VMDESC {
        return Err(StreamError::TooLarge {
            what: "initial device state",
            len: buf.len() as u64,
            max: (MAX_DEVICE_PART + MAX_VMDESC) as u64,
        });
    }
    // QEMU's last byte before it waits is the JSON's closing brace.
    if buf.last() != Some(&b'}') {
        return Ok(None);
    }
    let mut sections: Vec<(String, u32)> = Vec::new();
    let mut p = 0usize;
    loop {
        match buf.get(p) {
            None => return Ok(None),
            Some(&wire::VM_EOF) => {
                return match tail(buf, p)? {
                    Some(total) => {
                        check_description(&buf[p + 6..total], &sections)?;
                        Ok(Some((p + 1, total)))
                    }
                    None => Ok(None),
                }
            }
            Some(&wire::SECTION_FULL) => {}
            Some(&other) => {
                return Err(StreamError::BadDeviceState(format!(
                    "byte 0x{other:02x} at {p} where a device section or EOF must start"
                )))
            }
        }
        let Some((sid, id, inst, hlen)) = header(&buf[p..]) else {
            return Err(StreamError::BadDeviceState(format!(
                "malformed device section header at {p}"
            )));
        };
        let mut footer = [wire::SECTION_FOOTER, 0, 0, 0, 0];
        footer[1..].copy_from_slice(&sid.to_be_bytes());
        let mut from = p + hlen;
        let next = loop {
            let Some(i) = find(&buf[from..], &footer) else {
                return Ok(None);
            };
            let n = from + i + footer.len();
            // A real boundary is followed by another section or by EOF
            // and the description ending exactly at the end.
            let ok = match buf.get(n) {
                Some(&wire::SECTION_FULL) => header(&buf[n..]).is_some(),
                Some(&wire::VM_EOF) => matches!(tail(buf, n), Ok(Some(_))),
                _ => false,
            };
            if ok {
                break n;
            }
            from = from + i + 1;
        };
        sections.push((String::from_utf8_lossy(id).into_owned(), inst));
        p = next;
    }
}

/// EOF at `p` followed by VMDESCRIPTION: the end of the description if it
/// ends exactly at the end of `buf`.
fn tail(buf: &[u8], p: usize) -> Result<Option<usize>, StreamError> {
    let mut c = Cursor::new(&buf[p..]);
    let (Ok(wire::VM_EOF), Ok(kind), Ok(len)) = (c.u8(), c.u8(), c.be32()) else {
        return Ok(None);
    };
    if kind != wire::VMDESCRIPTION {
        return Err(StreamError::BadDeviceState(format!(
            "EOF followed by 0x{kind:02x}, not the description (suppress-vmdesc is not supported)"
        )));
    }
    let len = len as usize;
    if len > MAX_VMDESC {
        return Err(StreamError::TooLarge {
            what: "device description",
            len: len as u64,
            max: MAX_VMDESC as u64,
        });
    }
    let end = p + 6 + len;
    if end > buf.len() {
        Ok(None)
    } else if end < buf.len() {
        Err(StreamError::TrailingBytes(buf.len() - end))
    } else {
        Ok(Some(end))
    }
}

fn check_description(json: &[u8], sections: &[(String, u32)]) -> Result<(), StreamError> {
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| StreamError::BadDeviceState(format!("description is not JSON: {e}")))?;
    let devices = v
        .get("devices")
        .and_then(Value::as_array)
        .ok_or_else(|| StreamError::BadDeviceState("description has no device list".into()))?;
    let described: Vec<(String, u32)> = devices
        .iter()
        .map(|d| {
            (
                d.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned(),
                d.get("instance_id")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX) as u32,
            )
        })
        .collect();
    if described != sections {
        return Err(StreamError::BadDeviceState(format!(
            "found {} sections ({:?}...), QEMU describes {} ({:?}...)",
            sections.len(),
            sections.first(),
            described.len(),
            described.first()
        )));
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Checks the shape of a checkpoint's device blob (FULL sections + EOF,
/// from `qemu_save_device_state`): what the replica will load.
pub fn check_blob(blob: &[u8]) -> Result<(), StreamError> {
    match (blob.first(), blob.last()) {
        (Some(&wire::SECTION_FULL), Some(&wire::VM_EOF)) => {}
        (Some(&wire::VM_EOF), Some(_)) if blob.len() == 1 => {}
        _ => {
            return Err(StreamError::BadDeviceBlob(format!(
                "{} bytes, not device sections ending in EOF",
                blob.len()
            )))
        }
    }
    if header(blob).is_none() && blob.len() > 1 {
        return Err(StreamError::BadDeviceBlob(
            "malformed first section header".into(),
        ));
    }
    Ok(())
}
