//! `remus-wan protect VM --site BACKUP --config FILE`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::common;
use super::exit::Code;
use super::failover_setup;
use super::qemu_vm;
use crate::addresses::Addresses;
use crate::arbiter::StartAs;
use crate::config::Backend;
use crate::engine::protect::{Capture, ProtectError, ProtectOptions, Protector};
use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::qemu::QemuGuest;
use hypervisor::ProtectedGuest;

#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// The VM to protect (a [[vms]] name); it is started here.
    vm: String,
    /// The backup site to protect it towards (the VM's `backup`).
    #[arg(long)]
    site: String,
    /// The deployment's configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Guest console log file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Serve Prometheus metrics (/metrics) and status (/status) here; also
    /// where `remus-wan switchover` reaches this process (from this host
    /// only).
    #[arg(long, default_value = "127.0.0.1:9477")]
    metrics: std::net::SocketAddr,
    /// Seconds between progress lines in the log.
    #[arg(long, default_value_t = 5.0)]
    report_every: f64,
}

impl ProtectArgs {
    pub fn run(self) -> Code {
        self.protect().unwrap_or_else(|code| code)
    }

    fn protect(self) -> Result<Code, Code> {
        let cfg = common::load_config(&self.config)?;
        let Some(vm) = cfg.vm(&self.vm) else {
            eprintln!(
                "error: {}: no VM named {:?} in [[vms]]",
                self.config.display(),
                self.vm
            );
            return Err(Code::Config);
        };
        if vm.backup != self.site {
            eprintln!(
                "error: VM {} is backed up at {:?} (`vms.backup`), not at {:?}",
                vm.name, vm.backup, self.site
            );
            return Err(Code::Config);
        }
        common::require_files(&cfg, &vm.primary)?;
        let (Some(primary), Some(backup)) = (cfg.site(&vm.primary), cfg.site(&vm.backup)) else {
            return Err(Code::Config);
        };
        let opts = protect_options(
            cfg.replication_for(vm),
            vm,
            primary,
            backup,
            vm.disk.clone(),
            Duration::from_secs_f64(self.report_every.max(0.1)),
        );
        let capture = Capture::new(opts.output_limit);
        if let Some(disk) = &opts.disk {
            // Before the guest starts: every write it makes is in the map.
            if let Err(e) = capture.track_disk(disk) {
                eprintln!("error: {e}");
                return Err(Code::Failure);
            }
        }
        let started = match vm.backend {
            Backend::Kvm => {
                let spec = match super::vm::spec_from_config(vm) {
                    Ok(s) => s.console(hypervisor::kvm::ConsoleSpec {
                        log_file: self.console_log.clone(),
                        to_terminal: false,
                    }),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Err(Code::Config);
                    }
                };
                match hypervisor::kvm::Vm::start(&spec, capture.seams()) {
                    Ok(g) => {
                        let release = g.tap().map(|t| Box::new(t) as Box<dyn FrameSink>);
                        Started::Kvm(g, release)
                    }
                    Err(e) => {
                        eprintln!("error: VM {}: {e}", vm.name);
                        return Err(Code::Failure);
                    }
                }
            }
            Backend::Qemu => {
                let spec = qemu_vm::spec_from_config(vm).map_err(|e| {
                    eprintln!("error: {e}");
                    Code::Config
                })?;
                let guest =
                    QemuGuest::start(&spec, qemu_vm::seams(&capture, &spec)).map_err(|e| {
                        eprintln!("error: VM {}: {e}", vm.name);
                        Code::Failure
                    })?;
                tracing::info!(
                    vm = %vm.name,
                    dirty_tracking = ?guest.dirty_tracking(),
                    "QEMU started"
                );
                let bridge = qemu_vm::bridge(&guest, vm).map_err(|e| {
                    eprintln!("error: {e}");
                    Code::Failure
                })?;
                Started::Qemu(Box::new(guest), bridge)
            }
            Backend::Xen => {
                eprintln!(
                    "error: vms.{}.backend = \"xen\": this build has no Xen backend",
                    vm.name
                );
                return Err(Code::Config);
            }
        };
        let rt = common::runtime()?;
        let ctx = Context {
            cfg: &cfg,
            vm,
            primary,
            backup,
            metrics: self.metrics,
        };
        Ok(rt.block_on(async move {
            match started {
                Started::Kvm(guest, release) => {
                    ctx.serve(Protector::new(opts, guest, capture, release))
                        .await
                }
                Started::Qemu(guest, bridge) => {
                    let release = Some(bridge.sink());
                    let code = ctx
                        .serve(Protector::new(opts, *guest, capture, release))
                        .await;
                    drop(bridge);
                    code
                }
            }
        }))
    }
}

/// The VM started here, by backend.
enum Started {
    Kvm(hypervisor::kvm::Vm, Option<Box<dyn FrameSink>>),
    Qemu(Box<QemuGuest>, hypervisor::qemu::TapBridge),
}

struct Context<'a> {
    cfg: &'a crate::config::Config,
    vm: &'a crate::config::Vm,
    primary: &'a crate::config::Site,
    backup: &'a crate::config::Site,
    metrics: std::net::SocketAddr,
}

impl Context<'_> {
    /// Metrics, failover, then protection until a signal or the end.
    async fn serve<G: ProtectedGuest>(
        &self,
        protector: Result<Protector<G>, ProtectError>,
    ) -> Code {
        let (cfg, vm, primary, backup) = (self.cfg, self.vm, self.primary, self.backup);
        let shutdown = super::signals::shutdown();
        let mut protector = match protector {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return Code::Failure;
            }
        };
        let published = crate::metrics::Published::default();
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(4);
        protector.accept_control(control_rx);
        let slot = crate::metrics::ControlSlot::default();
        if let Ok(mut s) = slot.lock() {
            *s = Some(control_tx);
        }
        if let Err(e) =
            crate::metrics::serve_with_control(self.metrics, published.clone(), slot).await
        {
            eprintln!("error: metrics endpoint {}: {e}", self.metrics);
            return Code::Failure;
        }
        protector.publish_to(published);
        let to_backup = match failover_setup::dial_peer(primary, backup) {
            Ok(link) => link,
            Err(e) => {
                eprintln!("error: {e}");
                return Code::Failure;
            }
        };
        match failover_setup::start(cfg, vm, &primary.name, StartAs::Primary, to_backup) {
            Ok(Some((arbiter, events))) => {
                let addresses = match Addresses::start(cfg, &primary.name, vm).await {
                    Ok(a) => Some(a),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Code::Config;
                    }
                };
                protector.with_failover(arbiter, events, addresses);
            }
            Ok(None) => tracing::warn!(
                vm = %vm.name,
                "no [witness] configured: output is released on commit alone and there is no automatic takeover"
            ),
            Err(e) => {
                eprintln!("error: {e}");
                return Code::Config;
            }
        }
        match protector.run(shutdown).await {
            Ok(stats) => {
                tracing::info!(
                    epochs = stats.epochs,
                    committed = stats.committed,
                    "protection stopped"
                );
                Code::Success
            }
            Err(e @ ProtectError::Demoted { .. }) => {
                eprintln!("error: {e}");
                Code::Superseded
            }
            Err(e) => {
                eprintln!("error: {e}");
                Code::Failure
            }
        }
    }
}

/// Protection of `vm` running at site `me` towards site `peer`.
pub fn protect_options(
    r: &crate::config::Replication,
    vm: &crate::config::Vm,
    me: &crate::config::Site,
    peer: &crate::config::Site,
    disk: Option<PathBuf>,
    report_every: Duration,
) -> ProtectOptions {
    ProtectOptions {
        site: me.name.clone(),
        backup: peer.name.clone(),
        vm: vm.name.clone(),
        backup_addr: peer.connect_addr(),
        bind: std::net::SocketAddr::new(me.listen.ip(), 0),
        tls: common::tls_paths(&me.tls),
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
