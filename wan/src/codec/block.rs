//! Length-prefixed blocks, stored or zstd-compressed: the container for
//! record chunks, the state blob and disk-write data.
//!
//! `method u8 | raw_len u32 | stored_len u32 | stored_len bytes`

use super::error::CodecError;
use super::format::{BLOCK_STORED, BLOCK_ZSTD, BLOCK_ZSTD_REFS};
use super::prefix::RefsCompressor;
use super::wire::Reader;
use super::wire::{put_uleb, zigzag};

/// Appends `raw` as a block, compressed when `compressor` is given and that
/// is smaller. `scratch` is reused between calls to avoid allocation.
pub fn put_block(
    out: &mut Vec<u8>,
    raw: &[u8],
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    scratch: &mut Vec<u8>,
) {
    if let Some(zc) = compressor {
        // Room for exactly one byte less than raw: zstd gives up as soon as
        // it cannot win. Exactly, not "at least": zstd's choices depend on
        // the room it is given (with more room it sometimes compresses a
        // block that it stores with less), so room left over from what this
        // buffer held before would make the bytes depend on which thread,
        // with which history, compressed the chunk. (A `Vec` destination
        // offers its whole spare capacity.)
        let room = raw.len().saturating_sub(1);
        if scratch.len() < room {
            scratch.resize(room, 0);
        }
        if raw.len() > 64 {
            if let Ok(n) = zc.compress_to_buffer(raw, &mut scratch[..room]) {
                if n < raw.len() {
                    out.push(BLOCK_ZSTD);
                    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
                    out.extend_from_slice(&(n as u32).to_le_bytes());
                    out.extend_from_slice(&scratch[..n]);
                    return;
                }
            }
        }
    }
    out.push(BLOCK_STORED);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(raw);
}

/// Appends `raw` as a `BLOCK_ZSTD_REFS` block whose prefix is `prefix`,
/// the content of `refs` concatenated; false (nothing appended) when that
/// is not smaller than `raw`. The room given to zstd depends only on
/// `raw`, as in [`put_block`], so the bytes do not depend on the thread.
pub fn put_refs_block(
    out: &mut Vec<u8>,
    raw: &[u8],
    refs: &[u64],
    prefix: &[u8],
    rz: &mut RefsCompressor,
    scratch: &mut Vec<u8>,
) -> bool {
    let room = raw.len().saturating_sub(1);
    if scratch.len() < room {
        scratch.resize(room, 0);
    }
    let Some(n) = rz.compress(raw, prefix, &mut scratch[..room]) else {
        return false;
    };
    let mut head = Vec::with_capacity(2 + 3 * refs.len());
    put_uleb(&mut head, refs.len() as u64);
    let mut predicted = 0u64;
    for &f in refs {
        put_uleb(&mut head, zigzag(f.wrapping_sub(predicted) as i64));
        predicted = f.wrapping_add(1);
    }
    let stored = head.len() + n;
    if stored >= raw.len() {
        return false;
    }
    out.push(BLOCK_ZSTD_REFS);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&(stored as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&scratch[..n]);
    true
}

/// A block as read from the wire, not yet decompressed.
pub struct RawBlock<'a> {
    pub method: u8,
    pub raw_len: u64,
    pub stored: &'a [u8],
}

/// Reads a block header and its bytes; rejects a raw length above `limit`
/// and `BLOCK_ZSTD_REFS` unless `refs_allowed` (record chunks of a
/// version-3 epoch; the caller checks the base).
pub fn read_block<'a>(
    r: &mut Reader<'a>,
    what: &'static str,
    limit: u64,
    refs_allowed: bool,
) -> Result<RawBlock<'a>, CodecError> {
    let method = r.u8()?;
    let raw_len = u64::from(r.u32()?);
    let stored_len = r.u32()?;
    if raw_len > limit {
        return Err(CodecError::Oversized {
            what,
            len: raw_len,
            limit,
        });
    }
    match method {
        BLOCK_STORED if u64::from(stored_len) != raw_len => {
            return Err(CodecError::corrupt(format!(
                "{what}: stored block with stored length {stored_len} != raw length {raw_len}"
            )))
        }
        BLOCK_STORED | BLOCK_ZSTD => {}
        BLOCK_ZSTD_REFS if refs_allowed => {}
        m => {
            return Err(CodecError::corrupt(format!(
                "{what}: unknown block method {m}"
            )))
        }
    }
    let stored = r.bytes(stored_len as usize)?;
    Ok(RawBlock {
        method,
        raw_len,
        stored,
    })
}

impl RawBlock<'_> {
    /// Decodes into `out` (cleared first); exactly `raw_len` bytes or an error.
    pub fn decode_into(
        &self,
        out: &mut Vec<u8>,
        dz: &mut zstd::bulk::Decompressor<'static>,
        what: &'static str,
    ) -> Result<(), CodecError> {
        out.clear();
        if self.method == BLOCK_STORED {
            out.extend_from_slice(self.stored);
            return Ok(());
        }
        // Into the spare capacity: zstd writes every byte it reports, so
        // zeroing the buffer first would only cost a pass over it.
        out.reserve(self.raw_len as usize);
        let n = dz
            .decompress_to_buffer(self.stored, out)
            .map_err(|e| CodecError::corrupt(format!("{what}: bad zstd block: {e}")))?;
        if n as u64 != self.raw_len {
            return Err(CodecError::corrupt(format!(
                "{what}: zstd block decodes to {n} bytes, header says {}",
                self.raw_len
            )));
        }
        Ok(())
    }
}
