//! Port output (every `out` exits to the VMM: use sparingly).

/// 32-bit `out`.
pub fn out32(port: u16, value: u32) {
    // SAFETY: the TSS I/O bitmap lets ring 3 reach these ports; the VMM
    // handles them.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// 8-bit `out`.
pub fn out8(port: u16, value: u8) {
    // SAFETY: as for `out32`.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}
