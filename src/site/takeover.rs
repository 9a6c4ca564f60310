//! Takeover: what runs a VM once its standby holds the lease. The VM
//! resumes from the replica's last committed epoch, here, under a
//! protector that holds the lease, serves unprotected while the old
//! primary's site is down, and protects the VM back towards it as soon as
//! a standby answers there.

use super::backend::{self, Keep, RunGuest};
use super::control::ControlRouter;
use crate::engine::disk_image::DiskImage;
use crate::engine::protect::{Capture, ProtectError, ProtectOptions, Protector};
use crate::engine::standby::{self, ActiveEnd};

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

/// Where a taken-over VM is protected back to: from this site `me` to
/// `peer`, with the site's `[replication]` settings.
pub struct ProtectBack {
    pub me: crate::config::Site,
    pub peer: crate::config::Site,
    pub replication: crate::config::Replication,
}

/// What runs the VM once this standby has taken over: the VM resumed
/// from the replica under a `Protector` that holds the lease, serves
/// unprotected while the old primary's site is down, and synchronises to a
/// standby there as soon as one answers (protection the other way).
pub fn run_after_takeover(
    vm: crate::config::Vm,
    members: Vec<crate::config::Vm>,
    mut opts: ProtectOptions,
    back: ProtectBack,
    published: crate::metrics::Published,
    control: ControlRouter,
) -> standby::Activate {
    let ProtectBack {
        me,
        peer,
        replication,
    } = back;
    Box::new(move |store, act| {
        // Bound at the takeover, with the site's transport settings (FEC,
        // congestion controller), as the protect daemon's own endpoint is.
        opts.endpoint = Some(super::protect::bind(&me, &replication)?);
        let capture = Capture::new(opts.output_limit);
        if super::group::unit_disk(&vm, &members).is_some() {
            // The replica's one image (a group's members' disks back to
            // back), tracked before the VM resumes, so no write escapes
            // the map.
            let disk = DiskImage::file(store.disk_path());
            capture.track_disk(&disk).map_err(|e| e.to_string())?;
            opts.disk = Some(disk);
        }
        // The resumed guest under its protector, with what must live as
        // long as it (QEMU's tap bridge).
        let start = backend::for_vm(&vm)
            .map_err(|e| e.to_string())?
            .restore(&vm, &members, store, &capture)?
            .run(ProtectResumed { opts, capture })?;
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

/// What runs a resumed VM once its takeover completes.
type Start = Box<dyn FnOnce(Failover) -> standby::RunActive + Send>;

/// The protector of a guest resumed from the replica, whatever its
/// backend; it runs once the takeover hands it the failover.
struct ProtectResumed {
    opts: ProtectOptions,
    capture: Capture,
}

impl RunGuest for ProtectResumed {
    type Output = Result<Start, String>;

    fn run<G: hypervisor::ProtectedGuest + 'static>(
        self,
        guest: G,
        release: Option<Box<dyn hypervisor::FrameSink>>,
        keep: Keep,
    ) -> Self::Output {
        let protector =
            Protector::new(self.opts, guest, self.capture, release).map_err(|e| e.to_string())?;
        Ok(Box::new(move |f: Failover| {
            protect_after_takeover(protector, f, keep)
        }))
    }
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
    keep: Keep,
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

/// Resumes the VM, or every member of the group, from its replica in this
/// process (`standby --activate`): takeover by hand, for deployments
/// without a witness. Runs until every guest has stopped or SIGTERM.
pub fn activate_by_hand(unit: &super::group::Unit, dir: &std::path::Path) -> Result<(), String> {
    use hypervisor::kvm;

    let store = crate::replica::ReplicaStore::open(dir).map_err(|e| e.to_string())?;
    let meta = store.meta();
    let epoch = meta.epoch;
    kvm::termination::install().map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let guests = if unit.is_group() {
        if !meta.consistent {
            return Err(format!(
                "the replica in {} never reached a consistent checkpoint (initial synchronisation unfinished): nothing to resume",
                store.dir().display()
            ));
        }
        let state = store.state().map_err(|e| e.to_string())?;
        super::group::activate_members(&unit.members, store.memory(), &state, &store.disk_path())?
    } else {
        vec![super::kvm_vm::resume(
            &unit.vm,
            &store,
            hypervisor::Seams::default,
        )?]
    };
    drop(store);
    tracing::info!(vm = %unit.name(), epoch = ?epoch, members = unit.members.len(), "VM activated from the replica");
    let mut running = guests;
    let mut result = Ok(());
    while !running.is_empty() {
        let mut still = Vec::new();
        for g in running {
            if g.wait(std::time::Duration::from_millis(
                200 / unit.members.len().max(1) as u64,
            )) {
                if let Err(e) = g.shutdown() {
                    result = Err(format!("VM {}: {e}", unit.name()));
                }
            } else {
                still.push(g);
            }
        }
        running = still;
        if kvm::termination::requested() {
            for g in running.drain(..) {
                if let Err(e) = g.shutdown() {
                    result = Err(format!("VM {}: {e}", unit.name()));
                }
            }
        }
    }
    result
}
