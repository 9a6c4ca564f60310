//! The primary side of a site daemon: each VM started here runs under a
//! protector of its own, all replicating over one endpoint (one UDP port;
//! each VM's session is a QUIC connection of its own on it, with its own
//! congestion controller, so one VM's resync cannot hold another's commits
//! behind it in a shared stream, and one VM's session reset touches no
//! other VM).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::ProtectedGuest;
use netops::bgp::Speaker;
use tracing::info;
use wan::transport::{Endpoint, TransportConfig};

use super::backend::{self, Keep, RunGuest};
use super::control::ControlRouter;
use super::group::{units, Unit};
use super::{tls_paths, Launcher, StopSignal, VmEnd, VmTask};
use crate::addresses::Addresses;
use crate::arbiter::StartAs;
use crate::cli::failover_setup;
use crate::config::{Config, Replication, Site, Vm};
use crate::engine::disk_image::DiskImage;
use crate::engine::protect::{Capture, ProtectError, ProtectOptions, Protector};

/// Protection of `vm` running at site `me` towards site `peer`.
pub fn protect_options(
    r: &crate::config::Replication,
    vm: &Vm,
    me: &Site,
    peer: &Site,
    disk: Option<DiskImage>,
    report_every: Duration,
) -> ProtectOptions {
    ProtectOptions {
        site: me.name.clone(),
        backup: peer.name.clone(),
        vm: vm.name.clone(),
        backup_addr: peer.connect_addr(),
        bind: std::net::SocketAddr::new(me.listen.ip(), 0),
        endpoint: None,
        tls: tls_paths(&me.tls),
        interval: Duration::from_millis(r.epoch_interval_ms),
        max_in_flight: r.max_epochs_in_flight,
        zstd_level: r.compression_level,
        cache_bytes: (r.page_cache_mib << 20) as usize,
        output_limit: (r.output_buffer_mib << 20) as usize,
        max_epoch_bytes: r.max_epoch_mib << 20,
        disk,
        report_every,
    }
}

/// The endpoint every VM of the daemon replicates from (an ephemeral port
/// of site `me`'s address), with FEC and the congestion controller as
/// `[replication]` says.
pub fn bind(me: &Site, replication: &Replication) -> Result<Endpoint, String> {
    let mut tcfg = TransportConfig::new(tls_paths(&me.tls));
    tcfg.fec = replication.fec();
    tcfg.congestion = replication.congestion();
    Endpoint::bind(std::net::SocketAddr::new(me.listen.ip(), 0), tcfg)
        .map_err(|e| format!("replication endpoint: {e}"))
}

/// Which VMs a protect daemon runs.
#[derive(Debug, Clone)]
pub enum Selection {
    /// This one VM.
    One(String),
    /// Every VM running at `primary` and backed up at `backup`.
    All { primary: String, backup: String },
}

impl Selection {
    /// The units selected in `cfg`: `One` names a VM or a group.
    pub fn select(&self, cfg: &Config) -> Vec<Unit> {
        let vms = cfg
            .vms
            .iter()
            .filter(|v| match self {
                Selection::One(name) => {
                    &v.name == name
                        || cfg
                            .groups
                            .iter()
                            .any(|g| &g.name == name && g.vms.contains(&v.name))
                }
                Selection::All { primary, backup } => &v.primary == primary && &v.backup == backup,
            })
            .cloned()
            .collect();
        units(cfg, vms)
    }
}

/// What every VM of the protect daemon shares.
pub struct ProtectSite {
    pub selection: Selection,
    pub endpoint: Endpoint,
    /// Every VM's failover links (to the witness, to the backup) dial from
    /// here: one UDP socket apart from replication's.
    pub failover_endpoint: Endpoint,
    pub published: crate::metrics::Published,
    pub control: ControlRouter,
    pub speaker: Option<Arc<Speaker>>,
    /// Guest console log: this file for one VM, `<file>.<vm>` for each of
    /// several.
    pub console_log: Option<PathBuf>,
    pub several: bool,
    pub report_every: Duration,
}

impl Launcher for ProtectSite {
    fn select(&self, cfg: &Config) -> Vec<Unit> {
        self.selection.select(cfg)
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
        let console_log = self.console_log.as_ref().map(|p| {
            if self.several {
                let mut s = p.clone().into_os_string();
                s.push(format!(".{}", vm.name));
                PathBuf::from(s)
            } else {
                p.clone()
            }
        });
        let ctx = VmContext {
            endpoint: self.endpoint.clone(),
            failover_endpoint: self.failover_endpoint.clone(),
            published: self.published.clone(),
            control: self.control.clone(),
            speaker: self.speaker.clone(),
            console_log,
            report_every: self.report_every,
        };
        Box::pin(async move { ctx.serve(cfg, unit, stop).await })
    }

    fn forget(&mut self, vm: &str) {
        self.control.unregister(vm);
        crate::metrics::unpublish_vm(&self.published, vm);
    }
}

struct VmContext {
    endpoint: Endpoint,
    failover_endpoint: Endpoint,
    published: crate::metrics::Published,
    control: ControlRouter,
    speaker: Option<Arc<Speaker>>,
    console_log: Option<PathBuf>,
    report_every: Duration,
}

impl VmContext {
    async fn serve(self, cfg: Arc<Config>, unit: Unit, stop: StopSignal) -> VmEnd {
        let Unit { vm, members } = unit;
        let (Some(primary), Some(backup)) = (cfg.site(&vm.primary), cfg.site(&vm.backup)) else {
            return VmEnd::Config(format!("vms.{}: unknown site", vm.name));
        };
        let mut opts = protect_options(
            cfg.replication_for(&vm),
            &vm,
            primary,
            backup,
            super::group::unit_disk(&vm, &members),
            self.report_every,
        );
        opts.endpoint = Some(self.endpoint.clone());
        let capture = Capture::new(opts.output_limit);
        if let Some(disk) = &opts.disk {
            // Before the guest starts: every write it makes is in the map.
            if let Err(e) = capture.track_disk(disk) {
                return VmEnd::Failed(e.to_string());
            }
        }
        // Starting a guest blocks (QEMU's start, KVM set-up): off the
        // runtime's threads, so other VMs' checkpoints go on meanwhile.
        let started = {
            let vm = vm.clone();
            let seams_capture = capture.clone();
            let console_log = self.console_log.clone();
            tokio::task::spawn_blocking(move || {
                backend::for_vm(&vm)
                    .map_err(|e| VmEnd::Config(e.to_string()))?
                    .start(&vm, &members, &seams_capture, console_log)
            })
            .await
            .unwrap_or_else(|e| Err(VmEnd::Failed(format!("starting the guest: {e}"))))
        };
        let started = match started {
            Ok(s) => s,
            Err(end) => return end,
        };
        started
            .run(Protect {
                ctx: &self,
                cfg: &cfg,
                vm: &vm,
                opts,
                capture,
                stop,
            })
            .await
    }

    /// Metrics, control, failover, then protection until stopped.
    async fn protect<G: ProtectedGuest>(
        &self,
        cfg: &Config,
        vm: &Vm,
        protector: Result<Protector<G>, ProtectError>,
        stop: StopSignal,
    ) -> VmEnd {
        let (Some(primary), Some(backup)) = (cfg.site(&vm.primary), cfg.site(&vm.backup)) else {
            return VmEnd::Config(format!("vms.{}: unknown site", vm.name));
        };
        let mut protector = match protector {
            Ok(p) => p,
            Err(e) => return VmEnd::Failed(e.to_string()),
        };
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(4);
        protector.accept_control(control_rx);
        self.control.register(&vm.name, control_tx);
        protector.publish_to(self.published.clone());
        let to_backup =
            match failover_setup::dial_peer(primary, backup, Some(&self.failover_endpoint)) {
                Ok(link) => link,
                Err(e) => return VmEnd::Failed(e),
            };
        match failover_setup::start(
            cfg,
            vm,
            &primary.name,
            StartAs::Primary,
            to_backup,
            Some(&self.failover_endpoint),
        ) {
            Ok(Some((arbiter, events))) => {
                let addresses =
                    match Addresses::for_vm(cfg, &primary.name, vm, self.speaker.clone()) {
                        Ok(a) => Some(a),
                        Err(e) => return VmEnd::Config(e.to_string()),
                    };
                protector.with_failover(arbiter, events, addresses);
            }
            Ok(None) => tracing::warn!(
                vm = %vm.name,
                "no [witness] configured: output is released on commit alone and there is no automatic takeover"
            ),
            Err(e) => return VmEnd::Config(e),
        }
        match protector.run(stop.stopped()).await {
            Ok(stats) => {
                info!(
                    vm = %vm.name,
                    epochs = stats.epochs,
                    committed = stats.committed,
                    "protection stopped"
                );
                VmEnd::Stopped
            }
            Err(ProtectError::Demoted { token, .. }) => VmEnd::Superseded { token },
            Err(e) => VmEnd::Failed(e.to_string()),
        }
    }
}

/// Protection of a guest this daemon started, whatever its backend.
struct Protect<'a> {
    ctx: &'a VmContext,
    cfg: &'a Config,
    vm: &'a Vm,
    opts: ProtectOptions,
    capture: Capture,
    stop: StopSignal,
}

impl<'a> RunGuest for Protect<'a> {
    type Output = Pin<Box<dyn Future<Output = VmEnd> + Send + 'a>>;

    fn run<G: ProtectedGuest + 'static>(
        self,
        guest: G,
        release: Option<Box<dyn FrameSink>>,
        keep: Keep,
    ) -> Self::Output {
        Box::pin(async move {
            let protector = Protector::new(self.opts, guest, self.capture, release);
            let end = self
                .ctx
                .protect(self.cfg, self.vm, protector, self.stop)
                .await;
            drop(keep);
            end
        })
    }
}
