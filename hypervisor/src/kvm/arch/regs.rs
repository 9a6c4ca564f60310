//! Initial vCPU state: long mode, paging on, ring 3.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs};

use super::{gdt, layout, paging};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Special registers for a ring-3 long-mode entry. `base` is the state KVM
/// reported (it carries the APIC base and interrupt bitmap we keep).
pub fn sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = gdt::segment(gdt::USER_CS, true, 3);
    let data = gdt::segment(gdt::USER_DS, false, 3);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = gdt::tss_segment();
    s.gdt.base = layout::GDT;
    s.gdt.limit = (gdt::gdt_entries().len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = paging::CR3;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    s.efer = EFER_LME | EFER_LMA | EFER_NXE;
    s
}

/// General registers: entry point, stack, and the two arguments.
pub fn regs(entry: u64, stack_top: u64, boot_info: u64, vcpu_index: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top,
        rbp: 0,
        rdi: boot_info,
        rsi: vcpu_index,
        // Bit 1 is reserved and must be set; IF, IOPL stay clear.
        rflags: 0x2,
        ..Default::default()
    }
}

/// FPU in its reset state with SSE exceptions masked.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// XCR0 with the given feature mask.
pub fn xcrs(xcr0: u64) -> kvm_xcrs {
    let mut x = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    x.xcrs[0].xcr = 0;
    x.xcrs[0].value = xcr0;
    x
}
