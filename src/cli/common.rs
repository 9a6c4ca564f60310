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

/// Why the control token of the process at a control address cannot be
/// read (the message names the file; `denied`: a permission problem).
pub struct TokenError {
    pub message: String,
    pub denied: bool,
}

/// The control token of the process serving `addr` (None: no process
/// there wrote one), for the commands that post control requests.
pub fn control_token(
    run_dir: &Path,
    addr: std::net::SocketAddr,
) -> Result<Option<String>, TokenError> {
    let file = crate::metrics::control_token_path(run_dir, addr.port());
    match crate::metrics::read_control_token(&file) {
        Ok(t) => Ok(Some(t)),
        // No process here (or one that wrote no token: it says so).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TokenError {
            denied: e.kind() == std::io::ErrorKind::PermissionDenied,
            message: format!(
                "{addr}: cannot read the control token {}: {e} (run this as the user running the process, root in production)",
                file.display()
            ),
        }),
    }
}
