//! `remus-wan witness --config FILE`.

use std::path::PathBuf;

use clap::Args;

use super::common;
use super::exit::Code;
use crate::witness::{WitnessOptions, WitnessServer};

#[derive(Debug, Args)]
pub struct WitnessArgs {
    /// The deployment's configuration file (its [witness] section).
    #[arg(long, short)]
    config: PathBuf,
    /// Where the lease records are kept (fsynced before every grant).
    #[arg(long, default_value = "/var/lib/remus-wan")]
    state_dir: PathBuf,
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
        common::require_files(&cfg, &w.name)?;
        let opts = WitnessOptions {
            listen: w.listen,
            tls: common::tls_paths(&w.tls),
            sites: cfg.sites.iter().map(|s| s.name.clone()).collect(),
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
                    return Code::Failure;
                }
            };
            server.run(shutdown).await;
            Code::Success
        }))
    }
}
