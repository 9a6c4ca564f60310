//! What the long-running commands share: loading the configuration,
//! checking a party's files, the async runtime. Each returns the exit code
//! to end with, after printing why.

use std::path::Path;

use super::exit::Code;
use crate::config::{self, Config};

pub fn load_config(path: &Path) -> Result<Config, Code> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        Code::Config
    })
}

/// The files `party` (a site or the witness) needs on this host.
pub fn require_files(cfg: &Config, party: &str) -> Result<(), Code> {
    let issues = cfg.check_files(party);
    if issues.is_empty() {
        return Ok(());
    }
    for i in issues {
        eprintln!("error: {i}");
    }
    Err(Code::Config)
}

pub fn runtime() -> Result<tokio::runtime::Runtime, Code> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        Code::Failure
    })
}

pub fn tls_paths(tls: &config::Tls) -> wan::transport::TlsPaths {
    wan::transport::TlsPaths {
        ca: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    }
}
