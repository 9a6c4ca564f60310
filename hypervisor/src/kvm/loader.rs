//! Loads a static, non-PIE x86_64 ELF image into guest RAM. Every header
//! field is checked: a hostile image gets an error, never a panic.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::abi;
use super::error::{Error, Result};
use super::memory::GuestMemoryMmap;

/// Where the image went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Entry point.
    pub entry: u64,
    /// First byte past the highest loaded segment.
    pub end: u64,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset in the file.
    pub offset: u64,
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero).
    pub memsz: u64,
}

/// Parses the ELF headers: entry point and loadable segments.
pub fn parse(image: &[u8]) -> std::result::Result<(u64, Vec<Segment>), String> {
    if image.get(0..4) != Some(b"\x7fELF") {
        return Err("no ELF magic".into());
    }
    if image.get(4) != Some(&2) || image.get(5) != Some(&1) {
        return Err("not a little-endian 64-bit ELF".into());
    }
    let e_type = u16_at(image, 16).ok_or("truncated header")?;
    let machine = u16_at(image, 18).ok_or("truncated header")?;
    if machine != 62 {
        return Err(format!("machine {machine} is not x86_64"));
    }
    if e_type != 2 {
        return Err(format!(
            "ELF type {e_type} is not ET_EXEC (position-independent images are not supported; link with -no-pie)"
        ));
    }
    let entry = u64_at(image, 24).ok_or("truncated header")?;
    let phoff = u64_at(image, 32).ok_or("truncated header")?;
    let phentsize = u16_at(image, 54).ok_or("truncated header")? as u64;
    let phnum = u16_at(image, 56).ok_or("truncated header")? as u64;
    if phentsize < 56 {
        return Err("program header entries too small".into());
    }
    let mut segs = Vec::new();
    for i in 0..phnum {
        let off = phoff
            .checked_add(i * phentsize)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or("program header offset overflows")?;
        let p_type = u32_at(image, off).ok_or("truncated program header")?;
        if p_type != 1 {
            continue;
        }
        let seg = Segment {
            offset: u64_at(image, off + 8).ok_or("truncated program header")?,
            paddr: u64_at(image, off + 24).ok_or("truncated program header")?,
            filesz: u64_at(image, off + 32).ok_or("truncated program header")?,
            memsz: u64_at(image, off + 40).ok_or("truncated program header")?,
        };
        if seg.filesz > seg.memsz {
            return Err("segment file size exceeds memory size".into());
        }
        let end = seg
            .offset
            .checked_add(seg.filesz)
            .ok_or("segment overflows")?;
        if end > image.len() as u64 {
            return Err("segment extends past the end of the file".into());
        }
        segs.push(seg);
    }
    if segs.is_empty() {
        return Err("no loadable segment".into());
    }
    Ok((entry, segs))
}

/// Reads and loads the image at `path` into fresh (zeroed) guest RAM.
pub fn load(path: &Path, mem: &GuestMemoryMmap, ram_size: u64) -> Result<Loaded> {
    let image = std::fs::read(path).map_err(|source| Error::GuestImage {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| Error::BadElf {
        path: path.to_owned(),
        reason,
    };
    let (entry, segs) = parse(&image).map_err(bad)?;
    let mut end = 0;
    let mut entry_ok = false;
    for s in &segs {
        let seg_end = s
            .paddr
            .checked_add(s.memsz)
            .ok_or_else(|| bad("segment overflows".into()))?;
        if s.paddr < abi::IMAGE_START || seg_end > ram_size {
            return Err(bad(format!(
                "segment {:#x}..{:#x} outside guest RAM {:#x}..{:#x} (memory too small?)",
                s.paddr,
                seg_end,
                abi::IMAGE_START,
                ram_size
            )));
        }
        let data = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write_slice(data, GuestAddress(s.paddr))
            .map_err(|e| bad(e.to_string()))?;
        // The rest of the segment (.bss) is already zero: guest RAM is a
        // fresh anonymous mapping.
        end = end.max(seg_end);
        entry_ok |= (s.paddr..seg_end).contains(&entry);
    }
    if !entry_ok {
        return Err(bad(format!("entry point {entry:#x} is in no segment")));
    }
    Ok(Loaded { entry, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(e_type: u16, seg: Segment, entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let p = 64;
        b[p..p + 4].copy_from_slice(&1u32.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&seg.offset.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&seg.paddr.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&seg.filesz.to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&seg.memsz.to_le_bytes());
        b
    }

    fn seg(filesz: u64) -> Segment {
        Segment {
            offset: 0,
            paddr: 0x20_0000,
            filesz,
            memsz: 0x1000,
        }
    }

    #[test]
    fn parses_exec() {
        let (entry, segs) = parse(&elf(2, seg(64), 0x20_0010)).unwrap();
        assert_eq!(entry, 0x20_0010);
        assert_eq!(segs, vec![seg(64)]);
    }

    #[test]
    fn refuses_pie_truncation_and_garbage() {
        assert!(parse(&elf(3, seg(64), 0)).unwrap_err().contains("no-pie"));
        let huge = Segment {
            memsz: 1 << 40,
            ..seg(1 << 40)
        };
        assert!(parse(&elf(2, huge, 0))
            .unwrap_err()
            .contains("past the end"));
        assert!(parse(&elf(2, seg(0x2000), 0))
            .unwrap_err()
            .contains("exceeds"));
        assert!(parse(b"hello").is_err());
        let full = elf(2, seg(64), 0);
        for n in 0..full.len() {
            let _ = parse(&full[..n]);
        }
    }
}
