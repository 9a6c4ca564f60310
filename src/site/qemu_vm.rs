//! `backend = "qemu"`: a Linux VM in QEMU, from its `[[vms]]` entry.

use hypervisor::qemu::{
    Accel, DirtyTracking, LinuxImage, QemuGuest, QemuNetSpec, QemuSpec, TapBridge,
};
use hypervisor::Seams;
use std::path::PathBuf;
use tracing::info;

use super::backend::{no_groups, GuestBackend, Started};
use super::VmEnd;
use crate::config;
use crate::engine::protect::Capture;
use crate::replica::ReplicaStore;

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
pub fn seams(capture: &Capture, spec: &QemuSpec) -> Seams {
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

/// A Linux VM in QEMU as the site daemon's backend (no groups).
pub struct QemuBackend;

impl GuestBackend for QemuBackend {
    fn start(
        &self,
        vm: &config::Vm,
        members: &[config::Vm],
        capture: &Capture,
        _console_log: Option<PathBuf>,
    ) -> Result<Started, VmEnd> {
        if !members.is_empty() {
            return Err(VmEnd::Config(no_groups(vm, "qemu")));
        }
        let spec = spec_from_config(vm).map_err(VmEnd::Config)?;
        let guest = QemuGuest::start(&spec, seams(capture, &spec))
            .map_err(|e| VmEnd::Failed(format!("VM {}: {e}", vm.name)))?;
        info!(
            vm = %vm.name,
            dirty_tracking = ?guest.dirty_tracking(),
            "QEMU started"
        );
        let bridge = bridge(&guest, vm).map_err(VmEnd::Failed)?;
        Ok(Started::Qemu(Box::new(guest), bridge))
    }

    fn restore(
        &self,
        vm: &config::Vm,
        members: &[config::Vm],
        store: &ReplicaStore,
        capture: &Capture,
    ) -> Result<Started, String> {
        if !members.is_empty() {
            return Err(no_groups(vm, "qemu"));
        }
        let meta = store.meta();
        if !meta.consistent {
            return Err("the replica never reached a consistent checkpoint".into());
        }
        let mut spec = spec_from_config(vm)?;
        if spec.disk.is_some() {
            spec.disk = Some(store.dir().join("disk.img"));
        }
        let state = store.state().map_err(|e| e.to_string())?;
        let guest = QemuGuest::restore(&spec, store.memory(), &state, seams(capture, &spec))
            .map_err(|e| format!("activating VM {} from epoch {:?}: {e}", vm.name, meta.epoch))?;
        let bridge = bridge(&guest, vm)?;
        Ok(Started::Qemu(Box::new(guest), bridge))
    }
}
