//! `remus-wan protect [VM] --site BACKUP --config FILE`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::common;
use super::exit::Code;
use crate::addresses::Addresses;
use crate::site::control::ControlRouter;
use crate::site::protect::{ProtectSite, Selection};
use crate::site::{self};

#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// The VM to protect (a [[vms]] name) or consistency group (a
    /// [[groups]] name: its VMs are protected together); it is started
    /// here. Without it, every VM and group backed up at --site is started
    /// and protected by this one process (a site daemon).
    vm: Option<String>,
    /// The backup site to protect towards (the VMs' `backup`).
    #[arg(long)]
    site: String,
    /// The deployment's configuration file. SIGHUP reloads it (without a
    /// VM name): VMs added start, VMs removed stop, the others go on
    /// untouched.
    #[arg(long, short)]
    config: PathBuf,
    /// Guest console log file (with several VMs: FILE.<vm> for each).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Serve Prometheus metrics (/metrics) and status (/status) here; also
    /// where `remus-wan switchover` and `remus-wan verify` reach this
    /// process (from this host only).
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
        let selection = match &self.vm {
            Some(name) => {
                let group = cfg.groups.iter().find(|g| &g.name == name);
                let vm = match group {
                    Some(g) => g.vms.first().and_then(|m| cfg.vm(m)),
                    None => cfg.vm(name),
                };
                let Some(vm) = vm else {
                    eprintln!(
                        "error: {}: no VM or group named {:?} in [[vms]] / [[groups]]",
                        self.config.display(),
                        name
                    );
                    return Err(Code::Config);
                };
                if group.is_none() {
                    if let Some(g) = cfg.groups.iter().find(|g| g.vms.contains(name)) {
                        eprintln!(
                            "error: VM {name} is in consistency group {:?}: its members are protected together (remus-wan protect {} --site {})",
                            g.name, g.name, self.site
                        );
                        return Err(Code::Config);
                    }
                }
                if vm.backup != self.site {
                    eprintln!(
                        "error: {name} is backed up at {:?} (`vms.backup`), not at {:?}",
                        vm.backup, self.site
                    );
                    return Err(Code::Config);
                }
                Selection::One(name.clone())
            }
            None => {
                let mut primaries: Vec<&str> = cfg
                    .vms
                    .iter()
                    .filter(|v| v.backup == self.site)
                    .map(|v| v.primary.as_str())
                    .collect();
                primaries.sort();
                primaries.dedup();
                match primaries.as_slice() {
                    [p] => Selection::All {
                        primary: (*p).to_owned(),
                        backup: self.site.clone(),
                    },
                    [] => {
                        eprintln!(
                            "error: {}: no VM has `backup` = {:?}: nothing to protect",
                            self.config.display(),
                            self.site
                        );
                        return Err(Code::Config);
                    }
                    several => {
                        eprintln!(
                            "error: the VMs backed up at {:?} run at several sites ({}): name a VM, or run one protect per site",
                            self.site,
                            several.join(", ")
                        );
                        return Err(Code::Config);
                    }
                }
            }
        };
        let vms = selection.select(&cfg);
        let Some(first) = vms.first() else {
            return Err(Code::Config);
        };
        let home = first.vm.primary.clone();
        common::require_files(&cfg, &home)?;
        let Some(me) = cfg.site(&home).cloned() else {
            return Err(Code::Config);
        };
        let rt = common::runtime()?;
        let cfg = Arc::new(cfg);
        Ok(rt.block_on(async move {
            let shutdown = super::signals::shutdown();
            let published = crate::metrics::Published::default();
            let control = ControlRouter::default();
            if let Err(e) =
                crate::metrics::serve_with_control(self.metrics, published.clone(), control.slot())
                    .await
            {
                eprintln!("error: metrics endpoint {}: {e}", self.metrics);
                return Code::Failure;
            }
            let endpoint = match site::protect::bind(&me, &cfg.replication) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Code::Failure;
                }
            };
            let failover_endpoint = match super::failover_setup::ephemeral_endpoint(&me) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Code::Failure;
                }
            };
            let speaker = match Addresses::site_speaker(&cfg, &home).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Code::Config;
                }
            };
            let launcher = ProtectSite {
                selection,
                endpoint: endpoint.clone(),
                failover_endpoint: failover_endpoint.clone(),
                published,
                control,
                speaker: speaker.clone(),
                console_log: self.console_log.clone(),
                several: self.vm.is_none(),
                report_every: Duration::from_secs_f64(self.report_every.max(0.1)),
            };
            let ends = site::run_fleet(launcher, cfg.clone(), self.config.clone(), shutdown).await;
            if let Some(s) = speaker.and_then(|s| Arc::try_unwrap(s).ok()) {
                s.shutdown().await;
            }
            endpoint.close();
            failover_endpoint.close();
            super::standby::exit_code(&ends)
        }))
    }
}
