//! RAM records inside a "ram" section (migration/ram.c, `ram_load_precopy`):
//! a be64 holding a page offset in its high bits and `RAM_SAVE_FLAG_*` in
//! the low 12, then per flag: the block list (MEM_SIZE), one fill byte
//! (ZERO), 4096 bytes (PAGE), nothing (EOS). A page record names its
//! block (u8 length + id string) unless CONTINUE says "same as before".

use super::error::StreamError;
use super::wire::{self, Cursor, Short};

/// Most RAM blocks a machine may declare (a PC has about ten).
pub const MAX_BLOCKS: usize = 1024;

/// One RAM block of the block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's id string ("mem", "pc.bios", "/rom@etc/acpi/tables", ...).
    pub idstr: String,
    /// Bytes in use.
    pub used_length: u64,
}

/// A page's contents as the record carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData<'a> {
    /// The 4096 bytes.
    Bytes(&'a [u8]),
    /// Every byte is this value (QEMU only writes 0).
    Fill(u8),
}

impl PageData<'_> {
    /// Writes the page into `out` (4096 bytes).
    pub fn write_to(&self, out: &mut [u8]) {
        match self {
            PageData::Bytes(b) => out.copy_from_slice(b),
            PageData::Fill(v) => out.fill(*v),
        }
    }
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// The block list (the section's first record).
    MemSize(Vec<RamBlock>),
    /// A page of block `block` (index into the block list) at `offset`.
    Page {
        block: usize,
        offset: u64,
        data: PageData<'a>,
    },
    /// End of the section's records.
    Eos,
}

/// Parses one record at `c`. `blocks` is the current block list and
/// `last` the block of the previous page record (for CONTINUE); `at` is
/// the stream offset of the record, for errors. `Ok(Err(Short))`: not all
/// of the record has arrived.
pub fn parse<'a>(
    c: &mut Cursor<'a>,
    blocks: &[RamBlock],
    last: Option<usize>,
    at: u64,
) -> Result<Result<Record<'a>, Short>, StreamError> {
    let addr = match c.be64() {
        Ok(a) => a,
        Err(s) => return Ok(Err(s)),
    };
    let flags = addr & !wire::PAGE_MASK;
    let offset = addr & wire::PAGE_MASK;
    let kind = flags & !wire::RAM_CONTINUE;
    let cont = flags & wire::RAM_CONTINUE != 0;
    match kind {
        wire::RAM_MEM_SIZE if !cont => parse_block_list(c, offset),
        wire::RAM_EOS if !cont && offset == 0 => Ok(Ok(Record::Eos)),
        wire::RAM_ZERO | wire::RAM_PAGE => {
            if blocks.is_empty() {
                return Err(StreamError::PageBeforeBlocks);
            }
            let block = if cont {
                last.ok_or(StreamError::ContinueWithoutBlock)?
            } else {
                let name = match c.idstr() {
                    Ok(n) => n,
                    Err(s) => return Ok(Err(s)),
                };
                blocks
                    .iter()
                    .position(|b| b.idstr.as_bytes() == name)
                    .ok_or_else(|| {
                        StreamError::UnknownBlock(String::from_utf8_lossy(name).into_owned())
                    })?
            };
            // `last` came from this same block list, but be defensive.
            let b = blocks.get(block).ok_or(StreamError::ContinueWithoutBlock)?;
            if offset >= b.used_length {
                return Err(StreamError::OffsetOutOfBlock {
                    block: b.idstr.clone(),
                    offset,
                    len: b.used_length,
                });
            }
            let data = if kind == wire::RAM_ZERO {
                match c.u8() {
                    Ok(v) => PageData::Fill(v),
                    Err(s) => return Ok(Err(s)),
                }
            } else {
                match c.take(wire::PAGE_SIZE) {
                    Ok(d) => PageData::Bytes(d),
                    Err(s) => return Ok(Err(s)),
                }
            };
            Ok(Ok(Record::Page {
                block,
                offset,
                data,
            }))
        }
        _ => Err(StreamError::UnsupportedRamFlags { flags, at }),
    }
}

fn parse_block_list<'a>(
    c: &mut Cursor<'a>,
    total: u64,
) -> Result<Result<Record<'a>, Short>, StreamError> {
    let mut left = total;
    let mut blocks = Vec::new();
    while left > 0 {
        if blocks.len() >= MAX_BLOCKS {
            return Err(StreamError::BadBlockList(format!(
                "more than {MAX_BLOCKS} blocks"
            )));
        }
        let name = match c.idstr() {
            Ok(n) => n,
            Err(s) => return Ok(Err(s)),
        };
        let len = match c.be64() {
            Ok(l) => l,
            Err(s) => return Ok(Err(s)),
        };
        if !wire::plausible_idstr(name) {
            return Err(StreamError::BadBlockList(format!(
                "block name {:?} is not an id string",
                String::from_utf8_lossy(name)
            )));
        }
        let idstr = String::from_utf8_lossy(name).into_owned();
        if len == 0 || len > left || len % wire::PAGE_SIZE as u64 != 0 {
            return Err(StreamError::BadBlockList(format!(
                "block {idstr:?} has length 0x{len:x} with 0x{left:x} left of the total"
            )));
        }
        if blocks.iter().any(|b: &RamBlock| b.idstr == idstr) {
            return Err(StreamError::BadBlockList(format!("block {idstr:?} twice")));
        }
        left -= len;
        blocks.push(RamBlock {
            idstr,
            used_length: len,
        });
    }
    if blocks.is_empty() {
        return Err(StreamError::BadBlockList("no blocks".into()));
    }
    Ok(Ok(Record::MemSize(blocks)))
}

/// Appends the MEM_SIZE record for `blocks`.
pub fn put_block_list(out: &mut Vec<u8>, blocks: &[RamBlock]) {
    let total: u64 = blocks.iter().map(|b| b.used_length).sum();
    out.extend_from_slice(&(total | wire::RAM_MEM_SIZE).to_be_bytes());
    for b in blocks {
        wire::put_idstr(out, b.idstr.as_bytes());
        out.extend_from_slice(&b.used_length.to_be_bytes());
    }
}

/// Appends one page record; `last` tracks the previous record's block so
/// CONTINUE is used as QEMU does. All-zero pages become ZERO records.
pub fn put_page(
    out: &mut Vec<u8>,
    blocks: &[RamBlock],
    last: &mut Option<usize>,
    block: usize,
    offset: u64,
    data: &[u8],
) {
    let zero = data.iter().all(|&b| b == 0);
    let mut head = offset & wire::PAGE_MASK;
    head |= if zero { wire::RAM_ZERO } else { wire::RAM_PAGE };
    let cont = *last == Some(block);
    if cont {
        head |= wire::RAM_CONTINUE;
    }
    out.extend_from_slice(&head.to_be_bytes());
    if !cont {
        wire::put_idstr(out, blocks[block].idstr.as_bytes());
        *last = Some(block);
    }
    if zero {
        out.push(0);
    } else {
        out.extend_from_slice(data);
    }
}

/// Appends the EOS record.
pub fn put_eos(out: &mut Vec<u8>) {
    out.extend_from_slice(&wire::RAM_EOS.to_be_bytes());
}
