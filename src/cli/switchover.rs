//! `remus-wan switchover VM --to SITE`: a planned move, asked of the
//! `protect` process running the VM on this host, with that process's
//! control token (a file only the user running it can read: see
//! [`crate::metrics::control_token_path`]).

use std::path::PathBuf;

use clap::Args;

use super::common;
use super::exit::Code;

#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// The VM to move.
    vm: String,
    /// The site to move it to (the other site of the VM: its backup, or
    /// its primary when the VM runs at the backup after a takeover).
    #[arg(long)]
    to: String,
    /// The deployment's configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Control address of the process running the VM here (its
    /// --metrics): protect serves 127.0.0.1:9477, a standby that took over
    /// 127.0.0.1:9478; each is tried in turn.
    #[arg(long = "control", default_values = ["127.0.0.1:9477", "127.0.0.1:9478"])]
    controls: Vec<std::net::SocketAddr>,
    /// Directory of the processes' control token files (default:
    /// /run/remus-wan as root; the processes must use the same).
    #[arg(long, env = crate::metrics::RUN_DIR_ENV)]
    run_dir: Option<PathBuf>,
}

impl SwitchoverArgs {
    pub fn run(self) -> Code {
        let cfg = match common::load_config(&self.config) {
            Ok(c) => c,
            Err(code) => return code,
        };
        let Some(vm) = cfg.vm(&self.vm) else {
            eprintln!(
                "error: {}: no VM named {:?} in [[vms]]",
                self.config.display(),
                self.vm
            );
            return Code::Config;
        };
        if vm.backup != self.to && vm.primary != self.to {
            eprintln!(
                "error: VM {} runs at {:?} or {:?} (`vms.primary`, `vms.backup`), not {:?}",
                vm.name, vm.primary, vm.backup, self.to
            );
            return Code::Usage;
        }
        if cfg.witness.is_none() {
            eprintln!("error: switchover needs a [witness] in the configuration: the witness hands the lease over");
            return Code::Config;
        }
        eprintln!(
            "switching {} over to {} (final checkpoint, lease hand-over, resume at {})...",
            vm.name, self.to, self.to
        );
        let path = format!("/switchover/{}", vm.name);
        let run_dir = self.run_dir.clone().unwrap_or_else(crate::metrics::run_dir);
        let mut errors = Vec::new();
        let mut denied = false;
        for addr in &self.controls {
            let token = match super::common::control_token(&run_dir, *addr) {
                Ok(t) => t,
                Err(e) => {
                    denied |= e.denied;
                    errors.push(e.message);
                    continue;
                }
            };
            match crate::metrics::post_control(*addr, &path, token.as_deref()) {
                Ok((200, msg)) => {
                    println!("{msg}");
                    return Code::Success;
                }
                Ok((409, msg)) => {
                    eprintln!("error: refused: {msg}");
                    return Code::Refused;
                }
                // Not the process running the VM (a standby that has
                // not taken over): try the next one.
                Ok((404, msg)) => errors.push(format!("{addr}: {msg}")),
                // Token missing or wrong: another process may still be
                // the one running the VM.
                Ok((403, msg)) => {
                    denied = true;
                    errors.push(format!("{addr}: refused: {msg}"));
                }
                Ok((code, msg)) => {
                    eprintln!("error: {addr} answered {code}: {msg}");
                    return Code::Failure;
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        if denied {
            eprintln!(
                "error: not allowed to control the process running {} ({})",
                vm.name,
                errors.join("; ")
            );
            return Code::Refused;
        }
        eprintln!(
            "error: no process running {} here ({}): run this on the host where it runs",
            vm.name,
            errors.join("; ")
        );
        Code::Failure
    }
}
