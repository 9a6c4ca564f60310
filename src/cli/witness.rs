//! `remus-wan witness --config FILE [--state-dir DIR] [--init [--token-floor N]]`.

use std::path::PathBuf;

use clap::Args;

use super::common;
use super::exit::Code;
use crate::witness::{
    LeaseStore, LeaseStoreError, VmSites, WitnessError, WitnessOptions, WitnessServer,
};

#[derive(Debug, Args)]
pub struct WitnessArgs {
    /// The deployment's configuration file (its [witness] section, its
    /// sites and its VMs with their primary and backup sites).
    #[arg(long, short)]
    config: PathBuf,
    /// Where the lease records are kept (fsynced before every grant). A
    /// directory that does not exist yet is created with a new state (first
    /// start); one that exists must hold the witness's state file.
    #[arg(long, default_value = "/var/lib/remus-wan")]
    state_dir: PathBuf,
    /// Create a new witness state in --state-dir, then exit: for a first
    /// start in a directory that already exists, or after the state file
    /// was lost. Never overwrites a state file. Its tokens begin above the
    /// host's clock in microseconds, so they exceed any token an earlier
    /// state granted.
    #[arg(long)]
    init: bool,
    /// With --init: tokens of the new state also begin above this one
    /// (the highest token the sites report, if the host's clock may have
    /// been set back).
    #[arg(long, requires = "init", value_name = "TOKEN")]
    token_floor: Option<u64>,
}

impl WitnessArgs {
    pub fn run(self) -> Code {
        self.witness().unwrap_or_else(|code| code)
    }

    fn witness(self) -> Result<Code, Code> {
        let cfg = common::load_config(&self.config)?;
        let Some(w) = &cfg.witness else {
            eprintln!(
                "error: {}: `witness`: expected a [witness] section to run a witness",
                self.config.display()
            );
            return Err(Code::Config);
        };
        if self.init {
            return Ok(init(&self));
        }
        common::require_files(&cfg, &w.name)?;
        let opts = WitnessOptions {
            listen: w.listen,
            tls: common::tls_paths(&w.tls),
            sites: cfg.sites.iter().map(|s| s.name.clone()).collect(),
            // One lease per VM, and one per consistency group (its members
            // fail over together under the group's name).
            vms: cfg
                .vms
                .iter()
                .map(|v| VmSites {
                    vm: v.name.clone(),
                    primary: v.primary.clone(),
                    backup: v.backup.clone(),
                })
                .chain(cfg.groups.iter().filter_map(|g| {
                    let first = cfg.vm(g.vms.first()?)?;
                    Some(VmSites {
                        vm: g.name.clone(),
                        primary: first.primary.clone(),
                        backup: first.backup.clone(),
                    })
                }))
                .collect(),
            timers: cfg.failover.timers(),
            state_dir: self.state_dir,
        };
        let rt = common::runtime()?;
        Ok(rt.block_on(async move {
            let shutdown = super::signals::shutdown();
            let server = match WitnessServer::bind(opts) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return match e {
                        // The state needs the operator: like a bad
                        // configuration, restarting will not help.
                        WitnessError::Store(e) if e.is_state_problem() => Code::Config,
                        WitnessError::UnknownSite { .. } => Code::Config,
                        _ => Code::Failure,
                    };
                }
            };
            server.run(shutdown).await;
            Code::Success
        }))
    }
}

fn init(args: &WitnessArgs) -> Code {
    match LeaseStore::init(&args.state_dir, args.token_floor) {
        Ok(store) => {
            println!(
                "witness state created in {}: tokens begin above {}; now start the witness \
                 without --init",
                args.state_dir.display(),
                store.token_floor()
            );
            Code::Success
        }
        Err(e @ LeaseStoreError::Exists { .. }) => {
            eprintln!("error: {e}");
            Code::Refused
        }
        Err(e) => {
            eprintln!("error: {e}");
            Code::Failure
        }
    }
}
