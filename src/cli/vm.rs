//! `remus-wan vm run --config FILE --vm NAME`: run one VM of the
//! configuration on the built-in micro-VM, in the foreground, until the
//! guest exits or SIGTERM/SIGINT arrives.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use hypervisor::kvm::{self, ConsoleSpec, Exit, Workload};

use super::exit::Code;
pub use crate::site::kvm_vm::{guest_net, spec_from_config, GuestNet};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Run a VM of the configuration (backend "kvm") in the foreground. The
    /// guest's console goes to stderr (and --console-log); SIGTERM or SIGINT
    /// stops it cleanly. Build the guest image with `cargo xtask guest-image`.
    Run {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Name of the VM in the configuration.
        #[arg(long)]
        vm: String,
        /// Also append the guest's console to this file.
        #[arg(long)]
        console_log: Option<PathBuf>,
        /// Do not print the guest's console on stderr.
        #[arg(long)]
        quiet: bool,
        /// Memory-dirtying workload of the network guest: working set in
        /// 4 KiB pages (0: none).
        #[arg(long, default_value_t = 0)]
        dirty_pages: u64,
        /// Memory-dirtying workload: page writes per millisecond.
        #[arg(long, default_value_t = 0)]
        dirty_rate: u64,
    },
}

impl VmCommand {
    pub fn run(self) -> Code {
        match self {
            VmCommand::Run {
                config,
                vm,
                console_log,
                quiet,
                dirty_pages,
                dirty_rate,
            } => {
                let workload = Workload {
                    dirty_set_pages: dirty_pages,
                    dirty_pages_per_ms: dirty_rate,
                };
                run(config, &vm, console_log, quiet, workload)
            }
        }
    }
}

fn run(
    file: PathBuf,
    name: &str,
    console_log: Option<PathBuf>,
    quiet: bool,
    workload: Workload,
) -> Code {
    let cfg = match super::common::load_config(&file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(vm_cfg) = cfg.vm(name) else {
        eprintln!("error: {}: no VM named {name:?} in [[vms]]", file.display());
        return Code::Config;
    };
    let spec = match spec_from_config(vm_cfg) {
        Ok(s) => s
            .console(ConsoleSpec {
                log_file: console_log,
                to_terminal: !quiet,
            })
            .workload(workload),
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return Code::Config;
        }
    };
    if let Err(e) = kvm::termination::install() {
        eprintln!("error: cannot handle SIGTERM: {e}");
        return Code::Failure;
    }
    let vm = match kvm::Vm::start(&spec, Default::default()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("error: VM {name}: {e}");
            return error_code(&e);
        }
    };
    tracing::info!(vm = name, "running; SIGTERM or Ctrl-C stops it");
    let mut announced = false;
    while !vm.wait(Duration::from_millis(200)) {
        if !announced {
            if let Ok(t) = vm.wait_ready(Duration::ZERO) {
                tracing::info!(vm = name, "guest ready {t:.1?} after start");
                announced = true;
            }
        }
        if kvm::termination::requested() {
            tracing::info!(vm = name, "stop requested");
            break;
        }
    }
    match vm.shutdown() {
        Ok(Exit::Stopped) => Code::Success,
        Ok(Exit::Guest(0)) => Code::Success,
        Ok(Exit::Guest(code)) => {
            eprintln!("VM {name}: guest exited with code {code}");
            Code::Failure
        }
        Err(e) => {
            eprintln!("error: VM {name}: {e}");
            error_code(&e)
        }
    }
}

fn error_code(e: &kvm::Error) -> Code {
    match e {
        kvm::Error::KvmUnavailable(_) | kvm::Error::Tap { .. } => Code::Refused,
        kvm::Error::GuestImage { .. }
        | kvm::Error::BadElf { .. }
        | kvm::Error::DiskImage { .. }
        | kvm::Error::Spec(_) => Code::Config,
        _ => Code::Failure,
    }
}
