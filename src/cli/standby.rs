//! `remus-wan standby --config FILE --site NAME`.

use std::path::PathBuf;

use clap::Args;

use super::common;
use super::exit::Code;
use super::failover_setup;
use crate::addresses::Addresses;
use crate::arbiter::demux;
use crate::arbiter::link::LinkKind;
use crate::arbiter::StartAs;
use crate::engine::standby::{self, ActiveGuest, StandbyOptions, Takeover};

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
        let vms: Vec<_> = cfg.vms.iter().filter(|v| v.backup == self.site).collect();
        let vm = match vms.as_slice() {
            [vm] => *vm,
            [] => {
                eprintln!(
                    "error: no VM in {} has `backup = \"{}\"`: nothing to stand by for",
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
        let opts = StandbyOptions {
            site: self.site.clone(),
            primary: vm.primary.clone(),
            vm: vm.name.clone(),
            listen: site.listen,
            tls: common::tls_paths(&site.tls),
            replica_dir: standby::replica_dir(&self.state_dir, &vm.name),
            page_size: 4096,
            frames: vm.memory_mib * 256,
            disk_bytes,
            max_epoch_bytes: cfg.replication_for(vm).max_epoch_mib << 20,
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
            if let Err(e) = crate::metrics::serve(self.metrics, published.clone()).await {
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
                    let vm = vm.clone();
                    Some(Takeover {
                        arbiter,
                        events,
                        activate: Box::new(move |store| {
                            resume(&vm, store).map(|g| Box::new(Resumed(Some(g))) as Box<dyn ActiveGuest>)
                        }),
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
/// its tap.
fn resume(
    vm: &crate::config::Vm,
    store: &crate::replica::ReplicaStore,
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
    kvm::restore(&spec, store.memory(), &state, kvm::Seams::default())
        .map_err(|e| format!("activating VM {} from epoch {:?}: {e}", vm.name, meta.epoch))
}

/// A VM resumed at takeover, as the engine drives it.
struct Resumed(Option<hypervisor::kvm::Vm>);

impl ActiveGuest for Resumed {
    fn pause(&mut self) -> Result<(), String> {
        use hypervisor::ProtectedGuest;
        match &mut self.0 {
            Some(g) => g.pause().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
    fn resume(&mut self) -> Result<(), String> {
        use hypervisor::ProtectedGuest;
        match &mut self.0 {
            Some(g) => g.resume().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
    fn is_running(&self) -> bool {
        use hypervisor::ProtectedGuest;
        self.0.as_ref().is_some_and(|g| g.is_running())
    }
    fn stop(mut self: Box<Self>) -> Result<(), String> {
        match self.0.take() {
            Some(g) => g.shutdown().map(|_| ()).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
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
    let guest = match resume(vm, &store) {
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
