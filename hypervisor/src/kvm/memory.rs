//! Guest RAM: anonymous mmap through vm-memory, one KVM memslot per region,
//! dirty logging on every slot. The vm-memory bitmap records the pages the
//! VMM itself writes (rings, received frames, block reads), which KVM's log
//! does not see.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::error::{Error, Result};

/// Guest memory with a per-page bitmap of VMM writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Page size of the dirty logs.
pub const PAGE_SIZE: usize = 4096;

/// Allocates `size` bytes of RAM at guest-physical 0 and registers it with
/// KVM with dirty logging on.
pub fn create(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap> {
    let size = usize::try_from(size).map_err(|_| Error::Memory("size too large".into()))?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| Error::Memory(format!("cannot allocate {size} bytes: {e}")))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping lives as long as `mem`, which the VM keeps for
        // its whole life (the VM fd is dropped before the memory).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

/// Returns and clears the dirty pages of every slot: KVM's log (guest
/// writes) OR'ed with vm-memory's bitmap (VMM writes). One bit per page,
/// slot after slot.
pub fn take_dirty_log(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let len = region.len() as usize;
        let mut kvm = vm
            .get_dirty_log(slot as u32, len)
            .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
        let vmm = std::ops::Deref::deref(region).bitmap().get_and_reset();
        for (k, v) in kvm.iter_mut().zip(vmm) {
            *k |= v;
        }
        out.extend(kvm);
    }
    Ok(out)
}

/// Number of set bits in a dirty log.
pub fn count_dirty(log: &[u64]) -> usize {
    log.iter().map(|w| w.count_ones() as usize).sum()
}
