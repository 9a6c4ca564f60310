//! Fixed guest-physical layout of the micro-VM (below the image at 2 MiB).
//!
//! ```text
//! 0x0000_1000  PML4
//! 0x0000_2000  PDPT
//! 0x0000_3000  4 page directories (2 MiB pages, identity map of 0..4 GiB)
//! 0x0000_7000  GDT
//! 0x0000_8000  TSS + I/O permission bitmap (8 KiB + 1)
//! 0x0000_b000  BootInfo                     (abi::BOOT_INFO)
//! 0x0000_c000  console buffer               (abi::CONSOLE_BUF)
//! 0x0020_0000  guest image                  (abi::IMAGE_START)
//!   ...        heap, then one stack per vCPU at the top of RAM
//! 0xd000_0000  virtio-mmio windows          (abi::MMIO_BASE, no memslot)
//! ```

/// PML4 table.
pub const PML4: u64 = 0x1000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0x2000;
/// First of the four page directories.
pub const PD: u64 = 0x3000;
/// Number of page directories (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;
/// Global descriptor table.
pub const GDT: u64 = 0x7000;
/// Task-state segment.
pub const TSS: u64 = 0x8000;
/// Highest RAM size the layout allows (the MMIO windows sit above it).
pub const MAX_RAM: u64 = 0xc000_0000;
/// Smallest RAM size that fits the fixed area, an image and a stack.
pub const MIN_RAM: u64 = 8 << 20;
