//! Guest RAM: anonymous mmap through vm-memory, one KVM memslot per region,
//! dirty logging on every slot. The vm-memory bitmap records the pages the
//! VMM itself writes (rings, received frames, block reads), which KVM's log
//! does not see. With manual protection (see `hot_pages`) reading KVM's log
//! and clearing it are two calls, so the caller can leave pages writable.

use kvm_bindings::{
    kvm_userspace_memory_region, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
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

/// `KVM_CLEAR_DIRTY_LOG`, which kvm-ioctls does not wrap.
mod ioctls {
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}

/// Switches the VM to manual dirty-log protection
/// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): `KVM_GET_DIRTY_LOG` then leaves
/// the pages it reports dirty and writable, and [`clear_dirty_log`]
/// write-protects the ones the caller chooses. Call before [`create`], so
/// every slot starts write-protected as usual. `Err` says why not (the
/// caller falls back to the log clearing itself).
pub fn enable_manual_protect(vm: &VmFd) -> std::result::Result<(), String> {
    let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    // Returns the supported flags; bit 0 is the protection itself.
    let flags = vm.check_extension_raw(libc::c_ulong::from(cap));
    if flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 == 0 {
        return Err(format!(
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not supported by this kernel (flags {flags:#x})"
        ));
    }
    let enable = kvm_bindings::kvm_enable_cap {
        cap,
        // Not KVM_DIRTY_LOG_INITIALLY_SET: the first read must report only
        // real writes, as the plain log does.
        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&enable)
        .map_err(|e| format!("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) failed: {e}"))
}

/// One read of the dirty logs, one bit per page, slot after slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyLog {
    /// KVM's log: guest writes.
    pub guest: Vec<u64>,
    /// vm-memory's bitmap: the VMM's own writes (reset by the read).
    pub vmm: Vec<u64>,
}

impl DirtyLog {
    /// Guest or VMM written.
    pub fn union(&self) -> Vec<u64> {
        self.guest
            .iter()
            .zip(&self.vmm)
            .map(|(g, v)| g | v)
            .collect()
    }
}

/// Reads the dirty pages of every slot. KVM's log is cleared (and its
/// pages write-protected) by the read unless manual protection is on,
/// then by [`clear_dirty_log`]; the VMM bitmap is always reset.
pub fn read_dirty_log(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<DirtyLog> {
    let mut out = DirtyLog::default();
    for (slot, region) in mem.iter().enumerate() {
        let len = region.len() as usize;
        let kvm = vm
            .get_dirty_log(slot as u32, len)
            .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
        let mut vmm = std::ops::Deref::deref(region).bitmap().get_and_reset();
        // Both are one bit per 4 KiB page of the region, rounded up to
        // whole words: the same length.
        vmm.resize(kvm.len(), 0);
        out.guest.extend(kvm);
        out.vmm.extend(vmm);
    }
    Ok(out)
}

/// Clears the pages set in `bits` (one bit per page, slot after slot, as
/// [`read_dirty_log`] returns them) from KVM's log and write-protects
/// them, so their next guest write is logged again. Manual protection
/// only. Words of `bits` that are zero cost nothing in the kernel.
pub fn clear_dirty_log(vm: &VmFd, mem: &GuestMemoryMmap, bits: &[u64]) -> Result<()> {
    let mut word = 0usize;
    for (slot, region) in mem.iter().enumerate() {
        let pages = region.len() as usize / PAGE_SIZE;
        let words = pages.div_ceil(64);
        let Some(slot_bits) = bits.get(word..word + words) else {
            return Err(Error::Memory(format!(
                "dirty bitmap of {} words too short for slot {slot}",
                bits.len()
            )));
        };
        word += words;
        if slot_bits.iter().all(|&w| w == 0) {
            continue;
        }
        let num_pages = u32::try_from(pages)
            .map_err(|_| Error::Memory(format!("slot {slot} too large to clear")))?;
        let arg = kvm_bindings::kvm_clear_dirty_log {
            slot: slot as u32,
            // The whole slot: first_page 0 is 64-aligned, and the kernel
            // takes a page count that is not a multiple of 64 when it
            // reaches the end of the slot.
            num_pages,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: slot_bits.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: `vm` is a VM fd; `arg` points at `words` u64s, one bit
        // for each of the slot's `num_pages` pages, which the kernel only
        // reads (copy_from_user) during the call.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, ioctls::KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret != 0 {
            return Err(Error::Kvm {
                what: "KVM_CLEAR_DIRTY_LOG",
                source: kvm_ioctls::Error::last(),
            });
        }
    }
    Ok(())
}

/// Returns and clears the dirty pages of every slot: KVM's log (guest
/// writes) OR'ed with vm-memory's bitmap (VMM writes). One bit per page,
/// slot after slot. `manual`: the VM has manual protection on
/// ([`enable_manual_protect`]), so the read is followed by a clear.
pub fn take_dirty_log(vm: &VmFd, mem: &GuestMemoryMmap, manual: bool) -> Result<Vec<u64>> {
    let log = read_dirty_log(vm, mem)?;
    if manual {
        clear_dirty_log(vm, mem, &log.guest)?;
    }
    Ok(log.union())
}

/// Number of set bits in a dirty log.
pub fn count_dirty(log: &[u64]) -> usize {
    log.iter().map(|w| w.count_ones() as usize).sum()
}
