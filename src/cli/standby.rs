//! `remus-wan standby --config FILE --site NAME`.

use std::path::PathBuf;

use clap::Args;

use super::common;
use super::exit::Code;
use super::failover_setup;
use super::qemu_vm;
use crate::addresses::Addresses;
use crate::arbiter::demux;
use crate::arbiter::link::LinkKind;
use crate::arbiter::StartAs;
use crate::config::Backend;
use crate::engine::protect::{Capture, ProtectError, ProtectOptions, Protector};
use crate::engine::standby::{self, ActiveEnd, StandbyOptions, Takeover};
use hypervisor::qemu::QemuGuest;

#[derive(Debug, Args)]
pub struct StandbyArgs {
    /// The deployment's configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// This site: it holds the replica of every VM whose `backup` it is.
    #[arg(long)]
    site: String,
    /// Where replicas are kept (`<state-dir>/replicas/<vm>/`).
    #[arg(long, default_value = "/var/lib/remus-wan")]
    state_dir: PathBuf,
    /// Serve Prometheus metrics (/metrics) and status (/status) here.
    #[arg(long, default_value = "127.0.0.1:9478")]
    metrics: std::net::SocketAddr,
    /// Take over by hand: resume the VM from the replica's last committed
    /// epoch, here, attached to its tap (stop the standby first). Runs the
    /// VM until SIGTERM. With a [witness] configured, the standby takes over
    /// on its own; this is for deployments without one.
    #[arg(long)]
    activate: bool,
}

impl StandbyArgs {
    pub fn run(self) -> Code {
        self.standby().unwrap_or_else(|code| code)
    }

    fn standby(self) -> Result<Code, Code> {
        let cfg = common::load_config(&self.config)?;
        common::require_files(&cfg, &self.site)?;
        let Some(site) = cfg.site(&self.site) else {
            return Err(Code::Config); // require_files named the problem
        };
        // The VMs this site backs up; failing that, the VMs it is primary
        // for (after a takeover or switchover the other site runs them,
        // and a standby here protects them back).
        let mut vms: Vec<_> = cfg.vms.iter().filter(|v| v.backup == self.site).collect();
        if vms.is_empty() {
            vms = cfg.vms.iter().filter(|v| v.primary == self.site).collect();
        }
        let vm = match vms.as_slice() {
            [vm] => *vm,
            [] => {
                eprintln!(
                    "error: no VM in {} has `backup` or `primary` = \"{}\": nothing to stand by for",
                    self.config.display(),
                    self.site
                );
                return Err(Code::Config);
            }
            _ => {
                eprintln!(
                    "error: site {} backs up {} VMs; this version serves one VM per site endpoint",
                    self.site,
                    vms.len()
                );
                return Err(Code::Config);
            }
        };
        if vm.backend == Backend::Xen {
            // A replica this build could never resume: say so now, not at
            // the takeover.
            eprintln!(
                "error: vms.{}.backend = \"xen\": this build has no Xen backend",
                vm.name
            );
            return Err(Code::Config);
        }
        // The standby's copy of the disk image gives its size; its content
        // arrives with the initial synchronisation.
        let disk_bytes = match &vm.disk {
            Some(p) => match std::fs::metadata(p) {
                Ok(m) => m.len(),
                Err(e) => {
                    eprintln!("error: `disk` {}: {e}", p.display());
                    return Err(Code::Config);
                }
            },
            None => 0,
        };
        if self.activate {
            return Ok(activate(
                vm,
                &standby::replica_dir(&self.state_dir, &vm.name),
            ));
        }
        let peer_name = if vm.backup == self.site {
            vm.primary.clone()
        } else {
            vm.backup.clone()
        };
        let Some(peer) = cfg.site(&peer_name).cloned() else {
            return Err(Code::Config);
        };
        let opts = StandbyOptions {
            site: self.site.clone(),
            primary: peer_name.clone(),
            vm: vm.name.clone(),
            listen: site.listen,
            tls: common::tls_paths(&site.tls),
            replica_dir: standby::replica_dir(&self.state_dir, &vm.name),
            page_size: 4096,
            frames: if vm.backend == Backend::Qemu {
                hypervisor::qemu::frame_count(vm.memory_mib)
            } else {
                vm.memory_mib * 256
            },
            disk_bytes,
            max_epoch_bytes: cfg.replication_for(vm).max_epoch_mib << 20,
            // The VM's home is this site (it was taken over elsewhere):
            // the image it ran from here seeds a checksum resync.
            seed_disk: if vm.primary == self.site {
                vm.disk.clone()
            } else {
                None
            },
        };
        let rt = common::runtime()?;
        let cfg = &cfg;
        Ok(rt.block_on(async move {
            let shutdown = super::signals::shutdown();
            let endpoint = match standby::bind(&opts) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Code::Failure;
                }
            };
            let published = crate::metrics::Published::default();
            let control_slot = crate::metrics::ControlSlot::default();
            if let Err(e) =
                crate::metrics::serve_with_control(self.metrics, published.clone(), control_slot.clone())
                    .await
            {
                eprintln!("error: metrics endpoint {}: {e}", self.metrics);
                return Code::Failure;
            }
            // One endpoint: the primary's replication sessions and its
            // failover control stream arrive on it.
            let (listener, control) = demux::split(endpoint.clone());
            let takeover = match failover_setup::start(
                cfg,
                vm,
                &self.site,
                StartAs::Backup,
                LinkKind::Accept(control),
            ) {
                Ok(Some((arbiter, events))) => {
                    let addresses = match Addresses::start(cfg, &self.site, vm).await {
                        Ok(a) => Some(a),
                        Err(e) => {
                            eprintln!("error: {e}");
                            return Code::Config;
                        }
                    };
                    let protect = super::protect::protect_options(
                        cfg.replication_for(vm),
                        vm,
                        site,
                        &peer,
                        None,
                        std::time::Duration::from_secs(5),
                    );
                    Some(Takeover {
                        arbiter,
                        events,
                        activate: run_after_takeover(
                            vm.clone(),
                            protect,
                            peer.clone(),
                            site.clone(),
                            published.clone(),
                            control_slot,
                        ),
                        addresses,
                    })
                }
                Ok(None) => {
                    tracing::warn!(vm = %vm.name, "no [witness] configured: no automatic takeover (use --activate by hand)");
                    None
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return Code::Config;
                }
            };
            match standby::run_with(opts, listener, endpoint, shutdown, Some(published), takeover)
                .await
            {
                Ok(stats) => {
                    tracing::info!(?stats, "standby stopped");
                    Code::Success
                }
                Err(e @ standby::StandbyError::Superseded { .. }) => {
                    eprintln!("error: {e}");
                    Code::Superseded
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Code::Failure
                }
            }
        }))
    }
}

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
    let mut spec = super::vm::spec_from_config(vm).map_err(|e| e.to_string())?;
    if vm.disk.is_some() {
        spec = spec.disk(store.dir().join("disk.img"));
    }
    let state = store.state().map_err(|e| e.to_string())?;
    // A process that held the tap may still be exiting (a switchover
    // between two sites on one host, or a restart): wait for it a little.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let attempt = kvm::restore(&spec, store.memory(), &state, seams());
        match attempt {
            Err(kvm::Error::Tap { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                tracing::warn!(vm = %vm.name, "tap busy (its previous user is exiting): retrying");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => {
                return other.map_err(|e| {
                    format!("activating VM {} from epoch {:?}: {e}", vm.name, meta.epoch)
                })
            }
        }
    }
}

/// What runs the VM once this standby has taken over: the VM resumed
/// from the replica under a `Protector` that holds the lease, serves
/// unprotected while the old primary's site is down, and synchronises to a
/// standby there as soon as one answers (protection the other way).
fn run_after_takeover(
    vm: crate::config::Vm,
    mut opts: ProtectOptions,
    peer: crate::config::Site,
    me: crate::config::Site,
    published: crate::metrics::Published,
    control: crate::metrics::ControlSlot,
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
            .redirect_peer(super::failover_setup::dial_peer(&me, &peer)?);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        if let Ok(mut c) = control.lock() {
            *c = Some(tx);
        }
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

/// Resumes the VM from its replica in this process (`--activate`).
fn activate(vm: &crate::config::Vm, dir: &std::path::Path) -> Code {
    use hypervisor::kvm;

    let store = match crate::replica::ReplicaStore::open(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Code::Failure;
        }
    };
    let epoch = store.meta().epoch;
    if let Err(e) = kvm::termination::install() {
        eprintln!("error: cannot handle SIGTERM: {e}");
        return Code::Failure;
    }
    let guest = match resume(vm, &store, hypervisor::Seams::default) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return Code::Failure;
        }
    };
    drop(store);
    tracing::info!(vm = %vm.name, epoch = ?epoch, "VM activated from the replica");
    while !guest.wait(std::time::Duration::from_millis(200)) {
        if kvm::termination::requested() {
            break;
        }
    }
    match guest.shutdown() {
        Ok(_) => Code::Success,
        Err(e) => {
            eprintln!("error: VM {}: {e}", vm.name);
            Code::Failure
        }
    }
}
