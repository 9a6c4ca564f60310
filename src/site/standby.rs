//! The standby side of a site daemon: one endpoint for every VM this site
//! backs up, each VM's replica and takeover in a task of its own.

use std::path::PathBuf;
use std::sync::Arc;

use netops::bgp::Speaker;
use tracing::{info, warn};
use wan::transport::{Endpoint, TransportConfig};

use super::control::ControlRouter;
use super::group::{units, Unit};
use super::{takeover, tls_paths, Launcher, StopSignal, VmEnd, VmTask};
use crate::addresses::Addresses;
use crate::arbiter::demux::Router;
use crate::arbiter::link::LinkKind;
use crate::arbiter::StartAs;
use crate::cli::failover_setup;
use crate::config::{Backend, Config, Vm};
use crate::engine::standby::{self, StandbyError, StandbyOptions, Takeover};

/// The VMs a standby at `site` serves: those it backs up; failing that,
/// those it is primary for (after a takeover or switchover the other site
/// runs them, and a standby here protects them back).
pub fn standby_vms(cfg: &Config, site: &str) -> Vec<Vm> {
    let backed_up: Vec<Vm> = cfg
        .vms
        .iter()
        .filter(|v| v.backup == site)
        .cloned()
        .collect();
    if !backed_up.is_empty() {
        return backed_up;
    }
    cfg.vms
        .iter()
        .filter(|v| v.primary == site)
        .cloned()
        .collect()
}

/// The site's replication endpoint: any other configured site may
/// connect; each stream is then held to its VM's own peer by the router.
pub fn bind(cfg: &Config, site: &str) -> Result<Endpoint, String> {
    let me = cfg
        .site(site)
        .ok_or_else(|| format!("no site named {site:?} in [[sites]]"))?;
    let mut tcfg = TransportConfig::new(tls_paths(&me.tls));
    tcfg.allowed_clients = cfg
        .sites
        .iter()
        .filter(|s| s.name != site)
        .map(|s| s.name.clone())
        .collect();
    tcfg.fec = cfg.replication.fec();
    tcfg.congestion = cfg.replication.congestion();
    Endpoint::bind(me.listen, tcfg).map_err(|e| format!("endpoint {}: {e}", me.listen))
}

/// What every VM of the standby daemon shares.
pub struct StandbySite {
    pub site: String,
    /// Every VM's link to the witness dials from here.
    pub failover_endpoint: wan::transport::Endpoint,
    pub state_dir: PathBuf,
    pub router: Router,
    pub published: crate::metrics::Published,
    pub control: ControlRouter,
    pub speaker: Option<Arc<Speaker>>,
}

impl Launcher for StandbySite {
    fn select(&self, cfg: &Config) -> Vec<Unit> {
        units(cfg, standby_vms(cfg, &self.site))
    }

    fn launch(&mut self, cfg: Arc<Config>, unit: Unit, stop: StopSignal) -> VmTask {
        if unit.is_group() {
            crate::metrics::set_members(
                &self.published,
                unit.name(),
                unit.members.iter().map(|m| m.name.clone()).collect(),
            );
        }
        let vm = &unit.vm;
        let peer = if vm.backup == self.site {
            vm.primary.clone()
        } else {
            vm.backup.clone()
        };
        // Routed at once: the primary may connect as soon as the daemon
        // says it listens.
        let (listener, control) = self.router.add(&vm.name, &peer);
        let ctx = VmContext {
            failover_endpoint: self.failover_endpoint.clone(),
            site: self.site.clone(),
            state_dir: self.state_dir.clone(),
            published: self.published.clone(),
            control: self.control.clone(),
            speaker: self.speaker.clone(),
        };
        Box::pin(async move { ctx.serve(cfg, unit, peer, listener, control, stop).await })
    }

    fn forget(&mut self, vm: &str) {
        self.router.remove(vm);
        self.control.unregister(vm);
        crate::metrics::unpublish_vm(&self.published, vm);
    }
}

struct VmContext {
    failover_endpoint: wan::transport::Endpoint,
    site: String,
    state_dir: PathBuf,
    published: crate::metrics::Published,
    control: ControlRouter,
    speaker: Option<Arc<Speaker>>,
}

impl VmContext {
    async fn serve(
        self,
        cfg: Arc<Config>,
        unit: Unit,
        peer_name: String,
        listener: crate::arbiter::demux::ReplicationListener,
        control: tokio::sync::mpsc::Receiver<crate::arbiter::demux::ControlStream>,
        stop: StopSignal,
    ) -> VmEnd {
        let cfg = &*cfg;
        let Unit { vm, members } = unit;
        if vm.backend == Backend::Xen {
            // A replica this build could never resume: say so now, not at
            // the takeover.
            return VmEnd::Config(format!(
                "vms.{}.backend = \"xen\": this build has no Xen backend",
                vm.name
            ));
        }
        let (Some(me), Some(peer)) = (cfg.site(&self.site), cfg.site(&peer_name)) else {
            return VmEnd::Config(format!("vms.{}: unknown site", vm.name));
        };
        // The standby's copy of the disk image (a group's: of each
        // member's) gives its size; its content arrives with the initial
        // synchronisation.
        let disk_bytes = match super::group::unit_disk(&vm, &members).map(|d| d.bytes()) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return VmEnd::Config(format!("vms.{}.disk: {e}", vm.name)),
            None => 0,
        };
        let opts = StandbyOptions {
            site: self.site.clone(),
            primary: peer_name.clone(),
            vm: vm.name.clone(),
            listen: me.listen,
            tls: tls_paths(&me.tls),
            replica_dir: standby::replica_dir(&self.state_dir, &vm.name),
            page_size: 4096,
            frames: if vm.backend == Backend::Qemu {
                hypervisor::qemu::frame_count(vm.memory_mib)
            } else {
                vm.memory_mib * 256
            },
            disk_bytes,
            max_epoch_bytes: cfg.replication_for(&vm).max_epoch_mib << 20,
            // The VM's home is this site (it was taken over elsewhere):
            // the image it ran from here seeds a checksum resync.
            seed_disk: if vm.primary == self.site {
                super::group::unit_disk(&vm, &members)
            } else {
                None
            },
        };
        let takeover = match failover_setup::start(
            cfg,
            &vm,
            &self.site,
            StartAs::Backup,
            LinkKind::Accept(control),
            Some(&self.failover_endpoint),
        ) {
            Ok(Some((arbiter, events))) => {
                let addresses = match Addresses::for_vm(cfg, &self.site, &vm, self.speaker.clone())
                {
                    Ok(a) => Some(a),
                    Err(e) => return VmEnd::Config(e.to_string()),
                };
                let protect = super::protect::protect_options(
                    cfg.replication_for(&vm),
                    &vm,
                    me,
                    peer,
                    None,
                    std::time::Duration::from_secs(5),
                );
                Some(Takeover {
                    arbiter,
                    events,
                    activate: takeover::run_after_takeover(
                        vm.clone(),
                        members,
                        protect,
                        takeover::ProtectBack {
                            me: me.clone(),
                            peer: peer.clone(),
                            replication: cfg.replication.clone(),
                        },
                        self.published.clone(),
                        self.control.clone(),
                    ),
                    addresses,
                })
            }
            Ok(None) => {
                warn!(vm = %vm.name, "no [witness] configured: no automatic takeover (use --activate by hand)");
                None
            }
            Err(e) => return VmEnd::Config(e),
        };
        let r = standby::run_with(
            opts,
            listener,
            None,
            stop.stopped(),
            Some(self.published.clone()),
            takeover,
        )
        .await;
        match r {
            Ok(stats) => {
                info!(vm = %vm.name, ?stats, "standby stopped");
                VmEnd::Stopped
            }
            Err(StandbyError::Superseded { token }) => VmEnd::Superseded { token },
            Err(e) => VmEnd::Failed(e.to_string()),
        }
    }
}
