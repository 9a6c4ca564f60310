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
    /// The site to move it to (its backup site).
    #[arg(long)]
    to: String,
    /// The deployment's configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// The protect process's metrics/control address (its --metrics).
    #[arg(long, default_value = "127.0.0.1:9477")]
    control: std::net::SocketAddr,
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
        if vm.backup != self.to {
            eprintln!(
                "error: VM {} can move only to its backup site {:?} (`vms.backup`), not {:?}",
                vm.name, vm.backup, self.to
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
        match crate::metrics::post_control(self.control, &format!("/switchover/{}", vm.name)) {
            Ok((200, msg)) => {
                println!("{msg}");
                Code::Success
            }
            Ok((409, msg)) => {
                eprintln!("error: refused: {msg}");
                Code::Refused
            }
            Ok((code, msg)) => {
                eprintln!("error: protect process answered {code}: {msg}");
                Code::Failure
            }
            Err(e) => {
                eprintln!(
                    "error: no protect process at {} ({e}): run this on the host that protects {}",
                    self.control, vm.name
                );
                Code::Failure
            }
        }
    }
}
