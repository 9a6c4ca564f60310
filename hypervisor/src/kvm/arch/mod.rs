//! x86_64 specifics: memory layout, page tables, GDT/TSS, CPUID and the
//! initial register state. The device models know nothing of this.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;
pub mod snapshot;
