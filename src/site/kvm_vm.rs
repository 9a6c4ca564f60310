//! `backend = "kvm"`: the built-in micro-VM, from its `[[vms]]` entry.

use std::net::IpAddr;

use hypervisor::kvm::{NetSpec, VmSpec};

use crate::config::{self, Backend};

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
