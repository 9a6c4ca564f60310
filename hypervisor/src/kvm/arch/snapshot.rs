//! Reading and writing a vCPU's complete state (x86_64): what KVM keeps
//! about a vCPU that the guest can observe.

use kvm_bindings::{kvm_msr_entry, kvm_xsave, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::IntoBytes;

use crate::kvm::error::{Error, Result};
use crate::kvm::state::{VcpuState, XSAVE_SIZE};

/// The MSRs KVM lists that this vCPU can read back (probed once per VM).
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    // KVM_GET_MSRS stops at the first MSR it cannot read: drop that one and
    // retry (bounded by the list length).
    for _ in 0..=indices.len() {
        let n = read_msrs(vcpu, &indices)?.len();
        if n == indices.len() {
            return Ok(indices);
        }
        tracing::debug!("MSR {:#x} listed by KVM but not readable", indices[n]);
        indices.remove(n);
    }
    Ok(indices)
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::VcpuFailed {
        vcpu: 0,
        what: format!("MSR list: {e:?}"),
    })?;
    let n = vcpu
        .get_msrs(&mut msrs)
        .map_err(Error::kvm("KVM_GET_MSRS"))?;
    Ok(msrs.as_slice()[..n]
        .iter()
        .map(|e| (e.index, e.data))
        .collect())
}

/// Reads vCPU `index`'s state. The vCPU must be out of `KVM_RUN` with no
/// I/O pending completion.
pub fn capture(vcpu: &VcpuFd, index: u32, parked: bool, msrs: &[u32]) -> Result<VcpuState> {
    let xsave = vcpu.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?;
    Ok(VcpuState {
        index,
        parked,
        regs: vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?,
        xsave: xsave.region.as_bytes().to_vec(),
        xcrs: vcpu.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?,
        events: vcpu
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu
            .get_mp_state()
            .map_err(Error::kvm("KVM_GET_MP_STATE"))?,
        msrs: read_msrs(vcpu, msrs)?,
    })
}

/// Writes a saved state into a fresh vCPU whose CPUID is already set, in
/// the order KVM needs (special registers before the MSRs and events that
/// depend on them). MSRs KVM refuses to set again are skipped (on this
/// host: `MSR_KVM_POLL_CONTROL`) and logged.
pub fn apply(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    vcpu.set_mp_state(s.mp_state)
        .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&s.fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    let mut xsave = kvm_xsave::default();
    if s.xsave.len() != XSAVE_SIZE {
        return Err(Error::Spec(format!(
            "XSAVE area of {} bytes",
            s.xsave.len()
        )));
    }
    xsave.region.as_mut_bytes().copy_from_slice(&s.xsave);
    // SAFETY: a legacy 4 KiB kvm_xsave; the guest's XCR0 (x87|SSE|AVX)
    // keeps all of its state inside it, so KVM reads no more than that.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
    let mut rest: &[(u32, u64)] = &s.msrs;
    // KVM_SET_MSRS stops at the first MSR it refuses: skip it, go on.
    for _ in 0..=s.msrs.len() {
        if rest.is_empty() {
            break;
        }
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Spec(format!("MSRs: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if n < rest.len() {
            tracing::debug!("MSR {:#x} not restored (KVM refuses to set it)", rest[n].0);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
