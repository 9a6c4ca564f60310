//! GDT and TSS for a long-mode guest whose code runs in ring 3.
//!
//! Selectors: 0x08 kernel code, 0x10 kernel data, 0x18|3 user code,
//! 0x20|3 user data, 0x28 TSS (16-byte descriptor).

use kvm_bindings::kvm_segment;

use super::layout;

/// Kernel code selector (unused by ring-3 guests, present for completeness).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User code selector with RPL 3.
pub const USER_CS: u16 = 0x18 | 3;
/// User data selector with RPL 3.
pub const USER_DS: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;

/// Offset of the I/O permission bitmap in the TSS.
pub const IOPB_OFFSET: u16 = 104;
/// TSS size: header, 8 KiB bitmap (one bit per port), and the 0xff end byte.
pub const TSS_SIZE: usize = IOPB_OFFSET as usize + 8192 + 1;

/// A segment as KVM wants it in `kvm_sregs`.
pub fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        // Execute/read, accessed  or  read/write, accessed.
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The busy 64-bit TSS segment.
pub fn tss_segment() -> kvm_segment {
    kvm_segment {
        base: layout::TSS,
        limit: (TSS_SIZE - 1) as u32,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Encodes a `kvm_segment` as an 8-byte GDT descriptor.
fn descriptor(seg: &kvm_segment) -> u64 {
    let base = seg.base;
    let limit = u64::from(if seg.g == 1 {
        seg.limit >> 12
    } else {
        seg.limit
    });
    let access = u64::from(seg.type_)
        | (u64::from(seg.s) << 4)
        | (u64::from(seg.dpl) << 5)
        | (u64::from(seg.present) << 7);
    let flags = (u64::from(seg.avl))
        | (u64::from(seg.l) << 1)
        | (u64::from(seg.db) << 2)
        | (u64::from(seg.g) << 3);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The GDT contents: 5 plain entries and the 16-byte TSS descriptor.
pub fn gdt_entries() -> [u64; 7] {
    let tss = tss_segment();
    [
        0,
        descriptor(&segment(KERNEL_CS, true, 0)),
        descriptor(&segment(KERNEL_DS, false, 0)),
        descriptor(&segment(USER_CS, true, 3)),
        descriptor(&segment(USER_DS, false, 3)),
        descriptor(&tss),
        tss.base >> 32,
    ]
}

/// TSS bytes: all-zero I/O bitmap, so every port access from ring 3 reaches
/// the VMM instead of faulting.
pub fn tss_bytes() -> Vec<u8> {
    let mut tss = vec![0u8; TSS_SIZE];
    tss[102..104].copy_from_slice(&IOPB_OFFSET.to_le_bytes());
    tss[TSS_SIZE - 1] = 0xff;
    tss
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_code_descriptor_is_long_mode_dpl3() {
        let d = descriptor(&segment(USER_CS, true, 3));
        // present, DPL 3, code, L=1, G=1
        assert_eq!((d >> 47) & 1, 1);
        assert_eq!((d >> 45) & 3, 3);
        assert_eq!((d >> 53) & 1, 1);
        assert_eq!((d >> 55) & 1, 1);
    }

    #[test]
    fn tss_has_bitmap_and_end_byte() {
        let t = tss_bytes();
        assert_eq!(t.len(), TSS_SIZE);
        assert_eq!(u16::from_le_bytes([t[102], t[103]]), IOPB_OFFSET);
        assert_eq!(t[TSS_SIZE - 1], 0xff);
    }
}
