//! `backend = "qemu"`: a Linux VM in QEMU, from its `[[vms]]` entry.

use hypervisor::qemu::{
    Accel, DirtyTracking, LinuxImage, QemuGuest, QemuNetSpec, QemuSpec, TapBridge,
};
use hypervisor::Seams;

use crate::config;

/// The QEMU description of `vm`; QEMU's sockets and log go to a folder of
/// this process under the system's temporary folder.
pub fn spec_from_config(vm: &config::Vm) -> Result<QemuSpec, String> {
    let (Some(kernel), Some(initrd)) = (vm.kernel.clone(), vm.initramfs.clone()) else {
        return Err(format!(
            "vms.{}: backend \"qemu\" needs `kernel` and `initramfs` (cargo xtask guest-image --linux)",
            vm.name
        ));
    };
    let n = &vm.network;
    let super::kvm_vm::GuestNet {
        mac,
        address,
        gateway,
    } = super::kvm_vm::guest_net(vm, "the Linux guest image is configured over IPv4")?;
    // Unix socket paths are short: a short folder name.
    let run_dir = std::env::temp_dir().join(format!("rw-{}-{}", vm.name, std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let spec = QemuSpec::new(&vm.name, LinuxImage { kernel, initrd }, run_dir)
        .memory_mib(vm.memory_mib)
        .accel(match vm.accel {
            config::Accel::Auto => Accel::Auto,
            config::Accel::Kvm => Accel::Kvm,
            config::Accel::Tcg => Accel::Tcg,
        })
        .dirty_tracking(match vm.dirty_tracking {
            config::DirtyTracking::Auto => DirtyTracking::Auto,
            config::DirtyTracking::WriteProtect => DirtyTracking::WriteProtect,
            config::DirtyTracking::Colo => DirtyTracking::Colo,
            config::DirtyTracking::Compare => DirtyTracking::Compare,
        })
        .vcpus(vm.vcpus)
        .network(QemuNetSpec {
            mac,
            address: Some((address, n.address.prefix_len())),
            gateway,
        });
    Ok(match &vm.disk {
        Some(d) => spec.disk(d),
        None => spec,
    })
}

/// Seams for a QEMU guest: its transmitted frames, and its disk writes
/// when it has a disk (remus-wan's NBD server hands them to the hook).
pub fn seams(capture: &crate::engine::protect::Capture, spec: &QemuSpec) -> Seams {
    let s = capture.seams();
    Seams {
        frame_sink: s.frame_sink,
        write_hook: spec.disk.as_ref().and(s.write_hook),
    }
}

/// The guest's NIC on its tap.
pub fn bridge(guest: &QemuGuest, vm: &config::Vm) -> Result<TapBridge, String> {
    let port = guest
        .net()
        .map(|n| n.guest_port())
        .ok_or_else(|| format!("VM {}: no network backend", vm.name))?;
    TapBridge::start(&vm.network.tap, port).map_err(|e| format!("VM {}: {e}", vm.name))
}
