//! CPUID for a vCPU: KVM's supported list, with the APIC id set per vCPU.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Supported CPUID adjusted for vCPU `index`.
pub fn for_vcpu(kvm: &Kvm, index: u8) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC id in EBX[31:24].
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
            // x2APIC id.
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    Ok(cpuid)
}

/// The XSAVE features (XCR0) the guest gets: x87, SSE, AVX when available
/// (from CPUID leaf 0xD sub-leaf 0).
pub fn xcr0(cpuid: &CpuId) -> u64 {
    let supported = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .unwrap_or(0x3);
    // x87 | SSE | AVX; the guest does not need AVX-512 or AMX state.
    (supported & 0x7) | 0x1
}
