//! Identity map of the low 4 GiB with 2 MiB pages, user-accessible, so a
//! ring-3 guest reaches its RAM and the virtio-mmio windows.

use super::layout::{PD, PDPT, PD_COUNT, PML4};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const FLAGS: u64 = PRESENT | WRITABLE | USER;

/// `(guest-physical address, little-endian 8-byte entries)` for every table.
pub fn tables() -> Vec<(u64, Vec<u64>)> {
    let mut out = Vec::new();
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT | FLAGS;
    out.push((PML4, pml4));
    let mut pdpt = vec![0u64; 512];
    for i in 0..PD_COUNT {
        pdpt[i as usize] = (PD + i * 0x1000) | FLAGS;
    }
    out.push((PDPT, pdpt));
    for i in 0..PD_COUNT {
        let pd = (0..512u64)
            .map(|j| ((i * 512 + j) << 21) | FLAGS | HUGE)
            .collect();
        out.push((PD + i * 0x1000, pd));
    }
    out
}

/// Value for CR3.
pub const CR3: u64 = PML4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_mmio_window_identity() {
        let t = tables();
        let addr: u64 = 0xd000_0000;
        let pd_index = (addr >> 30) as usize;
        let (base, pd) = &t[2 + pd_index];
        assert_eq!(*base, PD + pd_index as u64 * 0x1000);
        let e = pd[((addr >> 21) & 511) as usize];
        assert_eq!(e & !0xfff, addr);
        assert_eq!(e & USER, USER);
    }
}
