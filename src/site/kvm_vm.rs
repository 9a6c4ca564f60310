//! `backend = "kvm"`: the built-in micro-VM, from its `[[vms]]` entry.

use std::net::IpAddr;
use std::path::PathBuf;

use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::kvm::{NetSpec, VmSpec};

use super::backend::{GuestBackend, Started};
use super::VmEnd;
use crate::config::{self, Backend};
use crate::engine::protect::Capture;
use crate::replica::ReplicaStore;

/// A VM's network settings as both backends take them (IPv4).
pub struct GuestNet {
    pub mac: [u8; 6],
    pub address: std::net::Ipv4Addr,
    pub gateway: Option<std::net::Ipv4Addr>,
}

/// Parses `vm.network`; `v4_only` says why an IPv6 address is refused.
pub fn guest_net(vm: &config::Vm, v4_only: &str) -> Result<GuestNet, String> {
    let n = &vm.network;
    let mac = NetSpec::parse_mac(&n.mac)
        .ok_or_else(|| format!("vms.{}.network.mac: expected 52:54:00:xx:xx:xx", vm.name))?;
    let IpAddr::V4(address) = n.address.addr() else {
        return Err(format!("vms.{}.network.address: {v4_only}", vm.name));
    };
    let gateway = match n.gateway {
        None => None,
        Some(IpAddr::V4(g)) => Some(g),
        Some(IpAddr::V6(_)) => {
            return Err(format!("vms.{}.network.gateway: IPv4 expected", vm.name))
        }
    };
    Ok(GuestNet {
        mac,
        address,
        gateway,
    })
}

/// Converts a configured VM into the hypervisor's plain description.
pub fn spec_from_config(vm: &config::Vm) -> Result<VmSpec, String> {
    if vm.backend != Backend::Kvm {
        return Err(format!(
            "vms.{}.backend is {:?}; `vm run` runs the built-in micro-VM (backend = \"kvm\")",
            vm.name, vm.backend
        ));
    }
    let image = vm.guest_image.clone().ok_or_else(|| {
        format!(
            "vms.{}.guest_image is required for backend \"kvm\"",
            vm.name
        )
    })?;
    let vcpus =
        u8::try_from(vm.vcpus).map_err(|_| format!("vms.{}.vcpus: at most 255", vm.name))?;
    let n = &vm.network;
    let GuestNet {
        mac,
        address,
        gateway,
    } = guest_net(vm, "the micro-VM guest speaks IPv4 only")?;
    let mut spec = VmSpec::new(&vm.name, image)
        .memory_mib(vm.memory_mib)
        .vcpus(vcpus)
        .network(NetSpec {
            tap: n.tap.clone(),
            mac,
            address,
            prefix_len: n.address.prefix_len(),
            gateway,
        });
    if let Some(d) = &vm.disk {
        spec = spec.disk(d);
    }
    Ok(spec)
}

/// The built-in micro-VM as the site daemon's backend; it also runs
/// consistency groups (of micro-VMs).
pub struct KvmBackend;

impl GuestBackend for KvmBackend {
    fn start(
        &self,
        vm: &config::Vm,
        members: &[config::Vm],
        capture: &Capture,
        console_log: Option<PathBuf>,
    ) -> Result<Started, VmEnd> {
        if !members.is_empty() {
            return super::group::start_members(members, capture)
                .map(|(g, r)| Started::Group(g, r))
                .map_err(VmEnd::Failed);
        }
        let spec =
            spec_from_config(vm)
                .map_err(VmEnd::Config)?
                .console(hypervisor::kvm::ConsoleSpec {
                    log_file: console_log,
                    to_terminal: false,
                });
        let g = hypervisor::kvm::Vm::start(&spec, capture.seams())
            .map_err(|e| VmEnd::Failed(format!("VM {}: {e}", vm.name)))?;
        let release = g.tap().map(|t| Box::new(t) as Box<dyn FrameSink>);
        Ok(Started::Kvm(Box::new(g), release))
    }

    fn restore(
        &self,
        vm: &config::Vm,
        members: &[config::Vm],
        store: &ReplicaStore,
        capture: &Capture,
    ) -> Result<Started, String> {
        if members.is_empty() {
            let guest = resume(vm, store, || capture.seams())?;
            let release = guest.tap().map(|t| Box::new(t) as Box<dyn FrameSink>);
            return Ok(Started::Kvm(Box::new(guest), release));
        }
        // Every member resumes from the group's one replica, at the same
        // committed epoch.
        let meta = store.meta();
        if !meta.consistent {
            return Err("the group's replica never reached a consistent checkpoint".into());
        }
        let state = store.state().map_err(|e| e.to_string())?;
        let (guest, release) = super::group::resume_members(
            members,
            store.memory(),
            &state,
            &store.disk_path(),
            capture,
        )
        .map_err(|e| {
            format!(
                "activating group {} from epoch {:?}: {e}",
                vm.name, meta.epoch
            )
        })?;
        Ok(Started::Group(guest, release))
    }
}

/// Resumes the VM from the replica's last committed epoch, attached to
/// its tap (through the seams `seams` makes).
pub fn resume(
    vm: &config::Vm,
    store: &ReplicaStore,
    seams: impl Fn() -> hypervisor::Seams,
) -> Result<hypervisor::kvm::Vm, String> {
    use hypervisor::kvm;

    let meta = store.meta();
    if !meta.consistent {
        return Err(format!(
            "the replica in {} never reached a consistent checkpoint (initial synchronisation unfinished): nothing to resume",
            store.dir().display()
        ));
    }
    let mut spec = spec_from_config(vm)?;
    if vm.disk.is_some() {
        spec = spec.disk(store.dir().join("disk.img"));
    }
    let state = store.state().map_err(|e| e.to_string())?;
    super::takeover::restore_retrying(&vm.name, || {
        kvm::restore(&spec, store.memory(), &state, seams())
    })
    .map_err(|e| format!("activating VM {} from epoch {:?}: {e}", vm.name, meta.epoch))
}
