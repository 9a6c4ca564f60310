//! `remus-wan standby --config FILE --site NAME`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::common;
use super::exit::Code;
use crate::addresses::Addresses;
use crate::arbiter::demux::Router;
use crate::engine::standby;
use crate::site::control::ControlRouter;
use crate::site::standby::{standby_vms, StandbySite};
use crate::site::{self, takeover, VmEnd};

#[derive(Debug, Args)]
pub struct StandbyArgs {
    /// The deployment's configuration file. SIGHUP reloads it: VMs added
    /// for this site start being served, VMs removed stop, the others go
    /// on untouched.
    #[arg(long, short)]
    config: PathBuf,
    /// This site: it holds the replica of every VM whose `backup` it is
    /// (all on one endpoint, the site's `listen` address).
    #[arg(long)]
    site: String,
    /// Where replicas are kept (`<state-dir>/replicas/<vm>/`).
    #[arg(long, default_value = "/var/lib/remus-wan")]
    state_dir: PathBuf,
    /// Serve Prometheus metrics (/metrics) and status (/status) of every
    /// VM here.
    #[arg(long, default_value = "127.0.0.1:9478")]
    metrics: std::net::SocketAddr,
    /// Take over by hand: resume the VM from the replica's last committed
    /// epoch, here, attached to its tap (stop the standby first). Runs the
    /// VM until SIGTERM. With a [witness] configured, the standby takes over
    /// on its own; this is for deployments without one.
    #[arg(long)]
    activate: bool,
    /// With --activate, the VM to resume (needed when the site backs up
    /// several), or a consistency group's name: all its members resume
    /// from the group's replica, at the same checkpoint (a member's own
    /// name is refused with the group's).
    #[arg(long, requires = "activate")]
    vm: Option<String>,
}

impl StandbyArgs {
    pub fn run(self) -> Code {
        self.standby().unwrap_or_else(|code| code)
    }

    fn standby(self) -> Result<Code, Code> {
        let cfg = common::load_config(&self.config)?;
        common::require_files(&cfg, &self.site)?;
        if cfg.site(&self.site).is_none() {
            return Err(Code::Config); // require_files named the problem
        }
        let vms = standby_vms(&cfg, &self.site);
        if vms.is_empty() {
            eprintln!(
                "error: no VM in {} has `backup` or `primary` = \"{}\": nothing to stand by for",
                self.config.display(),
                self.site
            );
            return Err(Code::Config);
        }
        if self.activate {
            // What is replicated here: a VM, or a consistency group as one.
            let units = site::group::units(&cfg, vms.clone());
            let unit = match (&self.vm, units.as_slice()) {
                (Some(name), _) => match units.iter().find(|u| u.name() == name) {
                    Some(u) => u,
                    None => {
                        match units
                            .iter()
                            .find(|u| u.members.iter().any(|m| &m.name == name))
                        {
                            Some(g) => eprintln!(
                                "error: {name} is in consistency group {}, which is activated as a whole: --vm {}",
                                g.name(),
                                g.name()
                            ),
                            None => eprintln!(
                                "error: site {} holds no replica of a VM named {name:?}",
                                self.site
                            ),
                        }
                        return Err(Code::Config);
                    }
                },
                (None, [unit]) => unit,
                (None, _) => {
                    eprintln!(
                        "error: site {} backs up {} VMs or groups: name the one to activate with --vm",
                        self.site,
                        units.len()
                    );
                    return Err(Code::Usage);
                }
            };
            let dir = standby::replica_dir(&self.state_dir, unit.name());
            return Ok(match takeover::activate_by_hand(unit, &dir) {
                Ok(()) => Code::Success,
                Err(e) => {
                    eprintln!("error: {e}");
                    Code::Failure
                }
            });
        }
        let rt = common::runtime()?;
        let cfg = Arc::new(cfg);
        Ok(rt.block_on(async move {
            let shutdown = super::signals::shutdown();
            let endpoint = match site::standby::bind(&cfg, &self.site) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Code::Failure;
                }
            };
            let published = crate::metrics::Published::default();
            let control = ControlRouter::default();
            if let Err(e) =
                crate::metrics::serve_with_control(self.metrics, published.clone(), control.slot())
                    .await
            {
                eprintln!("error: metrics endpoint {}: {e}", self.metrics);
                return Code::Failure;
            }
            let speaker = match Addresses::site_speaker(&cfg, &self.site).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Code::Config;
                }
            };
            let router = Router::serve(endpoint.clone());
            let failover_endpoint = match cfg
                .site(&self.site)
                .ok_or_else(|| "no such site".to_owned())
                .and_then(super::failover_setup::ephemeral_endpoint)
            {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: failover endpoint: {e}");
                    return Code::Failure;
                }
            };
            let launcher = StandbySite {
                failover_endpoint: failover_endpoint.clone(),
                site: self.site.clone(),
                state_dir: self.state_dir.clone(),
                router: router.clone(),
                published,
                control,
                speaker: speaker.clone(),
            };
            let addr = endpoint
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let fleet = site::run_fleet(launcher, cfg.clone(), self.config.clone(), async {
                // Routes are in place once the fleet started: say so then.
                tracing::info!(site = %self.site, %addr, vms = ?router.vms(), "standby listening");
                shutdown.await
            });
            let ends = fleet.await;
            if let Some(s) = speaker.and_then(|s| Arc::try_unwrap(s).ok()) {
                s.shutdown().await;
            }
            endpoint.close();
            failover_endpoint.close();
            exit_code(&ends)
        }))
    }
}

/// The process's exit code from how its VMs ended.
pub fn exit_code(ends: &std::collections::BTreeMap<String, VmEnd>) -> Code {
    match site::overall(ends) {
        VmEnd::Stopped => Code::Success,
        VmEnd::Superseded { token } => {
            eprintln!("error: another site runs the VM now (fencing token {token}): not restarting it here");
            Code::Superseded
        }
        VmEnd::Config(e) => {
            eprintln!("error: {e}");
            Code::Config
        }
        VmEnd::Failed(e) => {
            eprintln!("error: {e}");
            Code::Failure
        }
    }
}
