//! Where QEMU's RAM blocks sit in the engine's frame numbering.
//!
//! The main RAM (the `memory-backend-file` with id `mem`) is frames
//! `[0, ram_pages)`, so a frame is an offset into the RAM file whatever
//! the guest-physical layout (above 3 GiB the PC splits RAM around the PCI
//! hole, but the block stays one). The other blocks (firmware, option
//! ROMs, ACPI tables: well under a MiB on a PC) follow in a fixed reserve
//! of [`RESERVE_FRAMES`], in block-list order, each starting on a frame.

use super::records::RamBlock;
use super::wire::PAGE_SIZE;

/// Frames reserved after the main RAM for the other RAM blocks (16 MiB).
pub const RESERVE_FRAMES: u64 = 4096;
/// The id of the main RAM block (`-object memory-backend-file,id=mem`).
pub const MAIN_BLOCK: &str = "mem";

/// Frames of a qemu-backend guest with `memory_mib` of RAM (main RAM plus
/// the reserve), in either dirty-tracking mode: what the standby sizes its
/// replica with.
pub fn frame_count(memory_mib: u64) -> u64 {
    memory_mib * 256 + RESERVE_FRAMES
}

/// The block list does not fit the frame numbering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("no RAM block {MAIN_BLOCK:?} in the migration stream (blocks: {0})")]
    NoMainBlock(String),
    #[error("RAM block {MAIN_BLOCK:?} has {found} bytes, the VM has {expected}")]
    MainSize { expected: u64, found: u64 },
    #[error("the non-main RAM blocks need {need} frames, {RESERVE_FRAMES} are reserved")]
    ReserveFull { need: u64 },
}

/// Frame numbering of one block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    blocks: Vec<RamBlock>,
    first: Vec<u64>,
    ram_pages: u64,
}

impl Layout {
    /// The layout of `blocks` for a VM with `ram_pages` pages of main RAM.
    pub fn new(blocks: &[RamBlock], ram_pages: u64) -> Result<Layout, LayoutError> {
        let main = blocks
            .iter()
            .position(|b| b.idstr == MAIN_BLOCK)
            .ok_or_else(|| {
                LayoutError::NoMainBlock(
                    blocks
                        .iter()
                        .map(|b| b.idstr.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })?;
        let expected = ram_pages * PAGE_SIZE as u64;
        if blocks[main].used_length != expected {
            return Err(LayoutError::MainSize {
                expected,
                found: blocks[main].used_length,
            });
        }
        let mut next = ram_pages;
        let mut first = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            if i == main {
                first.push(0);
            } else {
                first.push(next);
                next += b.used_length.div_ceil(PAGE_SIZE as u64);
            }
        }
        if next - ram_pages > RESERVE_FRAMES {
            return Err(LayoutError::ReserveFull {
                need: next - ram_pages,
            });
        }
        Ok(Layout {
            blocks: blocks.to_vec(),
            first,
            ram_pages,
        })
    }

    /// The block list.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Pages of main RAM.
    pub fn ram_pages(&self) -> u64 {
        self.ram_pages
    }

    /// Index of the main block.
    pub fn main(&self) -> usize {
        // `new` checked it is there.
        self.blocks
            .iter()
            .position(|b| b.idstr == MAIN_BLOCK)
            .unwrap_or(0)
    }

    /// The frame of the page at `offset` in block `block` (both checked by
    /// the parser against this same block list).
    pub fn frame(&self, block: usize, offset: u64) -> u64 {
        self.first.get(block).copied().unwrap_or(0) + offset / PAGE_SIZE as u64
    }

    /// `(block, first frame, pages)` of every block but the main one.
    pub fn others(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let main = self.main();
        self.blocks
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != main)
            .map(|(i, b)| (i, self.first[i], b.used_length.div_ceil(PAGE_SIZE as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, len: u64) -> RamBlock {
        RamBlock {
            idstr: id.into(),
            used_length: len,
        }
    }

    #[test]
    fn main_ram_first_then_the_reserve() {
        let l = Layout::new(
            &[
                b("pc.bios", 256 << 10),
                b("mem", 64 << 20),
                b("pc.rom", 128 << 10),
            ],
            (64 << 20) / 4096,
        )
        .unwrap();
        assert_eq!(l.frame(1, 4096), 1);
        assert_eq!(l.frame(0, 0), 16384);
        assert_eq!(l.frame(2, 0), 16384 + 64);
        assert_eq!(frame_count(64), 16384 + RESERVE_FRAMES);
        assert!(matches!(
            Layout::new(&[b("pc.bios", 4096)], 1),
            Err(LayoutError::NoMainBlock(_))
        ));
        assert!(matches!(
            Layout::new(&[b("mem", 8192)], 1),
            Err(LayoutError::MainSize { .. })
        ));
        assert!(matches!(
            Layout::new(&[b("mem", 4096), b("big", (RESERVE_FRAMES + 1) * 4096)], 1),
            Err(LayoutError::ReserveFull { .. })
        ));
    }
}
