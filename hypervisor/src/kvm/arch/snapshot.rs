//! Reading and writing a vCPU's complete state (x86_64): what KVM keeps
//! about a vCPU that the guest can observe.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, kvm_xsave, CpuId, Msrs};
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
/// `cpuid` is what the vCPU was given at build or restore.
pub fn capture(
    vcpu: &VcpuFd,
    index: u32,
    parked: bool,
    msrs: &[u32],
    cpuid: &[kvm_cpuid_entry2],
) -> Result<VcpuState> {
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
        cpuid: cpuid.to_vec(),
    })
}

/// Feature leaves whose bits a guest may rely on: (leaf, sub-leaf).
const FEATURE_LEAVES: [(u32, u32); 3] = [(1, 0), (7, 0), (0x8000_0001, 0)];

/// The saved CPUID, if this host's KVM can offer every feature bit of it
/// the guest may use; otherwise which leaf it cannot.
pub fn check_cpuid(
    saved: &[kvm_cpuid_entry2],
    supported: &CpuId,
) -> std::result::Result<CpuId, String> {
    for (leaf, sub) in FEATURE_LEAVES {
        let find = |entries: &[kvm_cpuid_entry2]| {
            entries
                .iter()
                .find(|e| e.function == leaf && e.index == sub)
                .map(|e| [e.ebx, e.ecx, e.edx])
        };
        let (Some(want), Some(have)) = (find(saved), find(supported.as_slice())) else {
            continue;
        };
        // Leaf 1 EBX holds the APIC id and counts, not features.
        let from = usize::from(leaf == 1);
        for r in from..3 {
            if want[r] & !have[r] != 0 {
                return Err(format!(
                    "this host's KVM lacks CPU features the guest was given (CPUID leaf {leaf:#x}.{sub} register {r}: {:#x})",
                    want[r] & !have[r]
                ));
            }
        }
    }
    CpuId::from_entries(saved).map_err(|e| format!("saved CPUID: {e:?}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ebx: 0xff00_0000,
            ..Default::default()
        }
    }

    #[test]
    fn a_guest_keeps_its_cpuid_only_where_the_host_offers_it() {
        let host = CpuId::from_entries(&[leaf(1, 0b1111, 0b11), leaf(7, 0, 0)]).unwrap();
        // A different APIC id (leaf 1 EBX) is no feature.
        let same = [leaf(1, 0b0101, 0b01), leaf(7, 0, 0)];
        assert_eq!(check_cpuid(&same, &host).unwrap().as_slice(), &same);
        let more = [leaf(1, 0b1_0000, 0), leaf(7, 0, 0)];
        let e = check_cpuid(&more, &host).unwrap_err();
        assert!(e.contains("lacks CPU features"), "{e}");
    }
}
