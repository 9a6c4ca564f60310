//! `remus-wan switchover VM --to SITE`: a planned move, asked of the
//! `protect` process running the VM on this host.

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
        let mut errors = Vec::new();
        for addr in &self.controls {
            match crate::metrics::post_control(*addr, &path) {
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
                Ok((code, msg)) => {
                    eprintln!("error: {addr} answered {code}: {msg}");
                    return Code::Failure;
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        eprintln!(
            "error: no process running {} here ({}): run this on the host where it runs",
            vm.name,
            errors.join("; ")
        );
        Code::Failure
    }
}
