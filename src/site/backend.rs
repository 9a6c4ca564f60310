//! The hypervisor backends of the site daemon, behind one trait: the
//! daemon starts a guest (primary side) or resumes one from its replica
//! (takeover) without knowing which backend runs it, and the one place
//! that reads `vms.<vm>.backend` is [`for_vm`].

use std::path::PathBuf;

use hypervisor::group::GroupGuest;
use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::qemu::{QemuGuest, TapBridge};
use hypervisor::ProtectedGuest;

use super::group::GroupRelease;
use super::VmEnd;
use crate::config::{Backend, Vm};
use crate::engine::protect::Capture;
use crate::replica::ReplicaStore;

/// A hypervisor backend of the site daemon: how it starts a VM's guest
/// here, and how it resumes one from a replica at takeover. Both block
/// (guest set-up, QEMU's start): call them off the runtime's threads.
///
/// `members` is a consistency group's members (the unit's `vm` is then
/// the group as one VM, see [`super::group::group_as_vm`]), empty for a
/// plain VM; only the KVM micro-VM backend runs groups. The guest's
/// transmitted frames and disk writes go to `capture` (held until their
/// epoch commits), in either case.
pub trait GuestBackend: Send + Sync {
    /// Starts `vm`'s guest (or its group's members) fresh.
    /// `console_log` is where a micro-VM's console goes.
    fn start(
        &self,
        vm: &Vm,
        members: &[Vm],
        capture: &Capture,
        console_log: Option<PathBuf>,
    ) -> Result<Started, VmEnd>;

    /// Resumes `vm`'s guest (or its group's members) from `store`'s last
    /// committed epoch, with the replica's disk in place of the
    /// configured one.
    fn restore(
        &self,
        vm: &Vm,
        members: &[Vm],
        store: &ReplicaStore,
        capture: &Capture,
    ) -> Result<Started, String>;
}

/// A backend this build cannot run a VM with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vms.{vm}.backend = \"{backend}\": this build has no {name} backend")]
pub struct UnsupportedBackend {
    pub vm: String,
    /// The configured value.
    pub backend: &'static str,
    name: &'static str,
}

/// The backend `vm` runs under (its `backend` key).
pub fn for_vm(vm: &Vm) -> Result<Box<dyn GuestBackend>, UnsupportedBackend> {
    match vm.backend {
        Backend::Kvm => Ok(Box::new(super::kvm_vm::KvmBackend)),
        Backend::Qemu => Ok(Box::new(super::qemu_vm::QemuBackend)),
        Backend::Xen => Err(UnsupportedBackend {
            vm: vm.name.clone(),
            backend: "xen",
            name: "Xen",
        }),
    }
}

/// A guest a backend started or resumed, and what releases its committed
/// output. The types differ by backend; [`Started::run`] hands each to
/// code generic over the guest.
pub enum Started {
    Kvm(Box<hypervisor::kvm::Vm>, Option<Box<dyn FrameSink>>),
    Group(GroupGuest, GroupRelease),
    /// The bridge between the guest's NIC and its tap must live as long as
    /// the guest is protected.
    Qemu(Box<QemuGuest>, TapBridge),
}

/// What the site daemon does with a started guest, whatever its type
/// (builds its `Protector` and runs it).
pub trait RunGuest {
    type Output;

    /// `release` takes the guest's committed frames; `keep` must be held
    /// until the guest is no longer protected, then dropped.
    fn run<G: ProtectedGuest + 'static>(
        self,
        guest: G,
        release: Option<Box<dyn FrameSink>>,
        keep: Keep,
    ) -> Self::Output;
}

/// What a guest needs kept alive beside it (QEMU's tap bridge).
pub type Keep = Option<Box<dyn Send>>;

impl Started {
    pub fn run<R: RunGuest>(self, r: R) -> R::Output {
        match self {
            Started::Kvm(guest, release) => r.run(*guest, release, None),
            Started::Group(guest, release) => {
                r.run(guest, Some(Box::new(release) as Box<dyn FrameSink>), None)
            }
            Started::Qemu(guest, bridge) => {
                let release = Some(bridge.sink());
                r.run(*guest, release, Some(Box::new(bridge) as Box<dyn Send>))
            }
        }
    }
}

/// The refusal of a backend that runs no consistency groups.
pub(super) fn no_groups(vm: &Vm, backend: &str) -> String {
    format!(
        "group {}: backend \"{backend}\" runs no consistency groups (this build groups micro-VMs only)",
        vm.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(backend: Backend) -> Vm {
        let text = "[[sites]]\nname = \"dc1\"\nlisten = \"127.0.0.1:1\"\n[sites.tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[sites]]\nname = \"dc2\"\nlisten = \"127.0.0.1:2\"\n[sites.tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[vms]]\nname = \"web1\"\nprimary = \"dc1\"\nbackup = \"dc2\"\nguest_image = \"g\"\nmemory_mib = 32\n\
             [vms.network]\ntap = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"192.0.2.10/24\"\n";
        let cfg = crate::config::Config::parse(
            text,
            std::path::Path::new("t"),
            std::path::Path::new("/"),
            Vec::new(),
        )
        .expect("config");
        let mut v = cfg.vms[0].clone();
        // Set after validation: a configuration naming Xen is valid, one
        // naming QEMU needs a kernel this test has no use for.
        v.backend = backend;
        v
    }

    #[test]
    fn xen_is_refused_naming_the_vm_and_the_key() {
        let Err(e) = for_vm(&vm(Backend::Xen)) else {
            panic!("xen accepted");
        };
        assert_eq!(e.vm, "web1");
        assert_eq!(e.backend, "xen");
        assert_eq!(
            e.to_string(),
            "vms.web1.backend = \"xen\": this build has no Xen backend"
        );
    }

    #[test]
    fn kvm_and_qemu_have_backends() {
        assert!(for_vm(&vm(Backend::Kvm)).is_ok());
        assert!(for_vm(&vm(Backend::Qemu)).is_ok());
    }

    /// A group reaching the QEMU backend (the configuration refuses one)
    /// is refused, not started as one QEMU guest.
    #[test]
    fn qemu_runs_no_groups() {
        let group = vm(Backend::Qemu);
        let member = group.clone();
        let capture = Capture::new(1 << 20);
        let qemu = for_vm(&group).expect("a backend");
        match qemu.start(&group, std::slice::from_ref(&member), &capture, None) {
            Err(VmEnd::Config(e)) => assert_eq!(
                e,
                "group web1: backend \"qemu\" runs no consistency groups (this build groups micro-VMs only)"
            ),
            Err(e) => panic!("unexpected refusal {e:?}"),
            Ok(_) => panic!("a group started under QEMU"),
        }
    }
}
