//! `remus-wan witness --config FILE`.

use std::path::PathBuf;

use clap::Args;

use super::exit::Code;
use crate::config::Config;
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
        let cfg = match Config::load(&self.config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return Code::Config;
            }
        };
        let Some(w) = &cfg.witness else {
            eprintln!(
                "error: {}: `witness`: expected a [witness] section to run a witness",
                self.config.display()
            );
            return Code::Config;
        };
        let issues = cfg.check_files(&w.name);
        if !issues.is_empty() {
            for i in issues {
                eprintln!("error: {i}");
            }
            return Code::Config;
        }
        let opts = WitnessOptions {
            listen: w.listen,
            tls: wan::transport::TlsPaths {
                ca: w.tls.ca.clone(),
                cert: w.tls.cert.clone(),
                key: w.tls.key.clone(),
            },
            sites: cfg.sites.iter().map(|s| s.name.clone()).collect(),
            timers: cfg.failover.timers(),
            state_dir: self.state_dir,
        };
        let rt = match tokio::runtime::Runtime::new() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return Code::Failure;
            }
        };
        rt.block_on(async move {
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
        })
    }
}
