//! Takeover: what runs a VM once its standby holds the lease. The VM
//! resumes from the replica's last committed epoch, here, under a
//! protector that holds the lease, serves unprotected while the old
//! primary's site is down, and protects the VM back towards it as soon as
//! a standby answers there.

use super::control::ControlRouter;
use super::qemu_vm;
use crate::config::Backend;
use crate::engine::protect::{Capture, ProtectError, ProtectOptions, Protector};
use crate::engine::standby::{self, ActiveEnd};
use hypervisor::qemu::QemuGuest;

/// Resumes the VM from the replica's last committed epoch, attached to
/// its tap (through the seams `seams` makes).
fn resume(
    vm: &crate::config::Vm,
    store: &crate::replica::ReplicaStore,
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
    let mut spec = super::kvm_vm::spec_from_config(vm).map_err(|e| e.to_string())?;
    if vm.disk.is_some() {
        spec = spec.disk(store.dir().join("disk.img"));
    }
    let state = store.state().map_err(|e| e.to_string())?;
    restore_retrying(&vm.name, || {
        kvm::restore(&spec, store.memory(), &state, seams())
    })
    .map_err(|e| format!("activating VM {} from epoch {:?}: {e}", vm.name, meta.epoch))
}

/// Runs `restore` until it succeeds or fails for another reason than a
/// busy tap: a process that held the tap may still be exiting (a
/// switchover between two sites on one host, or a restart), so it is
/// retried for up to 5 s.
pub fn restore_retrying(
    vm: &str,
    mut restore: impl FnMut() -> Result<hypervisor::kvm::Vm, hypervisor::kvm::Error>,
) -> Result<hypervisor::kvm::Vm, String> {
    use hypervisor::kvm;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match restore() {
            Err(kvm::Error::Tap { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                tracing::warn!(vm, "tap busy (its previous user is exiting): retrying");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other.map_err(|e| e.to_string()),
        }
    }
}

/// What runs the VM once this standby has taken over: the VM resumed
/// from the replica under a `Protector` that holds the lease, serves
/// unprotected while the old primary's site is down, and synchronises to a
/// standby there as soon as one answers (protection the other way).
pub fn run_after_takeover(
    vm: crate::config::Vm,
    members: Vec<crate::config::Vm>,
    mut opts: ProtectOptions,
    peer: crate::config::Site,
    me: crate::config::Site,
    published: crate::metrics::Published,
    control: ControlRouter,
) -> standby::Activate {
    Box::new(move |store, act| {
        let capture = Capture::new(opts.output_limit);
        if vm.disk.is_some() {
            let disk = store.dir().join("disk.img");
            // Tracked before the VM resumes, so no write escapes the map.
            capture.track_disk(&disk).map_err(|e| e.to_string())?;
            opts.disk = Some(disk);
        }
        // The resumed guest under its protector (and, for QEMU, the tap
        // bridge that must live as long as it).
        let start: Box<dyn FnOnce(Failover) -> standby::RunActive + Send> = match vm.backend {
            // A consistency group: every member resumes from the group's
            // one replica, at the same committed epoch.
            Backend::Kvm if !members.is_empty() => {
                let meta = store.meta();
                if !meta.consistent {
                    return Err("the group's replica never reached a consistent checkpoint".into());
                }
                let state = store.state().map_err(|e| e.to_string())?;
                let (guest, release) =
                    super::group::resume_members(&members, store.memory(), &state, &capture)
                        .map_err(|e| {
                            format!(
                                "activating group {} from epoch {:?}: {e}",
                                vm.name, meta.epoch
                            )
                        })?;
                let release = Some(Box::new(release) as Box<dyn hypervisor::FrameSink>);
                let protector =
                    Protector::new(opts, guest, capture, release).map_err(|e| e.to_string())?;
                Box::new(move |f: Failover| protect_after_takeover(protector, f, None))
            }
            Backend::Qemu => {
                let meta = store.meta();
                if !meta.consistent {
                    return Err("the replica never reached a consistent checkpoint".into());
                }
                let mut spec = qemu_vm::spec_from_config(&vm)?;
                if spec.disk.is_some() {
                    spec.disk = Some(store.dir().join("disk.img"));
                }
                let state = store.state().map_err(|e| e.to_string())?;
                let guest = QemuGuest::restore(
                    &spec,
                    store.memory(),
                    &state,
                    qemu_vm::seams(&capture, &spec),
                )
                .map_err(|e| {
                    format!("activating VM {} from epoch {:?}: {e}", vm.name, meta.epoch)
                })?;
                let bridge = qemu_vm::bridge(&guest, &vm)?;
                let release = Some(bridge.sink());
                let protector =
                    Protector::new(opts, guest, capture, release).map_err(|e| e.to_string())?;
                Box::new(move |f: Failover| protect_after_takeover(protector, f, Some(bridge)))
            }
            Backend::Xen => {
                return Err(format!(
                    "vms.{}.backend = \"xen\": this build has no Xen backend to resume it with",
                    vm.name
                ))
            }
            Backend::Kvm => {
                let guest = resume(&vm, store, || capture.seams())?;
                let release = guest
                    .tap()
                    .map(|t| Box::new(t) as Box<dyn hypervisor::FrameSink>);
                let protector =
                    Protector::new(opts, guest, capture, release).map_err(|e| e.to_string())?;
                Box::new(move |f: Failover| protect_after_takeover(protector, f, None))
            }
        };
        act.arbiter
            .redirect_peer(crate::cli::failover_setup::dial_peer(&me, &peer, None)?);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        control.register(&vm.name, tx);
        Ok(start(Failover {
            act,
            control: rx,
            published,
        }))
    })
}

/// What a resumed VM's protector needs from the takeover.
struct Failover {
    act: standby::Activation,
    control: tokio::sync::mpsc::Receiver<crate::metrics::ControlRequest>,
    published: crate::metrics::Published,
}

/// Runs the resumed VM under the lease, protecting it back towards the
/// old primary's site once a standby answers there.
fn protect_after_takeover<G: hypervisor::ProtectedGuest + 'static>(
    mut protector: Protector<G>,
    f: Failover,
    keep: Option<hypervisor::qemu::TapBridge>,
) -> standby::RunActive {
    protector.publish_to(f.published);
    protector.with_failover(f.act.arbiter, f.act.events, f.act.addresses);
    protector.protect_when_peer_returns();
    protector.accept_control(f.control);
    let shutdown = f.act.shutdown;
    Box::pin(async move {
        let r = protector
            .run(async move {
                let _ = shutdown.await;
            })
            .await;
        drop(keep);
        match r {
            Ok(_) => Ok(ActiveEnd::Stopped),
            Err(ProtectError::Demoted { token, .. }) => Ok(ActiveEnd::Superseded { token }),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// Resumes the VM from its replica in this process (`standby
/// --activate`): takeover by hand, for deployments without a witness.
pub fn activate_by_hand(vm: &crate::config::Vm, dir: &std::path::Path) -> Result<(), String> {
    use hypervisor::kvm;

    let store = crate::replica::ReplicaStore::open(dir).map_err(|e| e.to_string())?;
    let epoch = store.meta().epoch;
    kvm::termination::install().map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let guest = resume(vm, &store, hypervisor::Seams::default)?;
    drop(store);
    tracing::info!(vm = %vm.name, epoch = ?epoch, "VM activated from the replica");
    while !guest.wait(std::time::Duration::from_millis(200)) {
        if kvm::termination::requested() {
            break;
        }
    }
    guest
        .shutdown()
        .map(|_| ())
        .map_err(|e| format!("VM {}: {e}", vm.name))
}
