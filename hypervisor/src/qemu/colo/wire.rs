//! Constants of QEMU's migration stream (migration/savevm.c, ram.c,
//! colo.c) and a bounds-checked big-endian reader over a byte slice.

/// "QEVM".
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU writes since 2.x.
pub const FILE_VERSION: u32 = 3;
/// The 8 header bytes.
pub const HEADER: [u8; 8] = [b'Q', b'E', b'V', b'M', 0, 0, 0, 3];

/// Section types (savevm.c `QEMU_VM_*`).
pub const VM_EOF: u8 = 0x00;
pub const SECTION_START: u8 = 0x01;
pub const SECTION_PART: u8 = 0x02;
pub const SECTION_END: u8 = 0x03;
pub const SECTION_FULL: u8 = 0x04;
pub const SUBSECTION: u8 = 0x05;
pub const VMDESCRIPTION: u8 = 0x06;
pub const CONFIGURATION: u8 = 0x07;
pub const COMMAND: u8 = 0x08;
pub const SECTION_FOOTER: u8 = 0x7e;

/// Commands (savevm.c `enum qemu_vm_cmd`) we accept; the rest are
/// postcopy/packaged machinery we never enable.
pub const CMD_OPEN_RETURN_PATH: u16 = 1;
pub const CMD_PING: u16 = 2;
pub const CMD_ENABLE_COLO: u16 = 8;
pub const CMD_SWITCHOVER_START: u16 = 11;

/// RAM record flags (ram.c `RAM_SAVE_FLAG_*`), in the low bits of the
/// be64 that also carries the page offset.
pub const RAM_FULL: u64 = 0x01;
pub const RAM_ZERO: u64 = 0x02;
pub const RAM_MEM_SIZE: u64 = 0x04;
pub const RAM_PAGE: u64 = 0x08;
pub const RAM_EOS: u64 = 0x10;
pub const RAM_CONTINUE: u64 = 0x20;
/// Target page size of x86 (and the record flag mask below it).
pub const PAGE_SIZE: usize = 4096;
pub const PAGE_MASK: u64 = !(PAGE_SIZE as u64 - 1);

/// The RAM section's id string and version (ram.c).
pub const RAM_IDSTR: &str = "ram";
pub const RAM_VERSION: u32 = 4;

/// Not enough bytes yet (the caller waits for more); distinct from a
/// malformed stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short;

/// A cursor over bytes received so far. Every read either succeeds or
/// says [`Short`]: the parser then retries the whole item later.
#[derive(Debug, Clone, Copy)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if self.remaining() < n {
            return Err(Short);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn peek(&self) -> Result<u8, Short> {
        self.buf.get(self.pos).copied().ok_or(Short)
    }

    pub fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.take(1)?[0])
    }

    pub fn be16(&mut self) -> Result<u16, Short> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn be32(&mut self) -> Result<u32, Short> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn be64(&mut self) -> Result<u64, Short> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A u8 length and that many bytes (QEMU's idstr encoding).
    pub fn idstr(&mut self) -> Result<&'a [u8], Short> {
        let n = self.u8()? as usize;
        self.take(n)
    }
}

/// Appends a u8-length-prefixed string (callers keep it under 256 bytes).
pub fn put_idstr(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&s[..n]);
}

/// Whether `s` looks like a QEMU id string (printable ASCII, non-empty).
pub fn plausible_idstr(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&c| (0x20..0x7f).contains(&c))
}
