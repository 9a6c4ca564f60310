//! `remus-wan vm run --config FILE --vm NAME`: run one VM of the
//! configuration on the built-in micro-VM, in the foreground, until the
//! guest exits or SIGTERM/SIGINT arrives.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use hypervisor::kvm::{self, ConsoleSpec, Exit, NetSpec, VmSpec, Workload};

use super::exit::Code;
use crate::config::{self, Backend};

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

/// A VM's network settings as both backends take them (IPv4).
pub struct GuestNet {
    pub mac: [u8; 6],
    pub address: std::net::Ipv4Addr,
    pub gateway: Option<std::net::Ipv4Addr>,
}

/// Parses `vm.network`; `v4_only` says why an IPv6 address is refused.
pub fn guest_net(vm: &config::Vm, v4_only: &str) -> Result<GuestNet, String> {
    let n = &vm.network;
    let mac = NetSpec::parse_mac(&n.mac)
        .ok_or_else(|| format!("vms.{}.network.mac: expected 52:54:00:xx:xx:xx", vm.name))?;
    let IpAddr::V4(address) = n.address.addr() else {
        return Err(format!("vms.{}.network.address: {v4_only}", vm.name));
    };
    let gateway = match n.gateway {
        None => None,
        Some(IpAddr::V4(g)) => Some(g),
        Some(IpAddr::V6(_)) => {
            return Err(format!("vms.{}.network.gateway: IPv4 expected", vm.name))
        }
    };
    Ok(GuestNet {
        mac,
        address,
        gateway,
    })
}

/// Converts a configured VM into the hypervisor's plain description.
pub fn spec_from_config(vm: &config::Vm) -> Result<VmSpec, String> {
    if vm.backend != Backend::Kvm {
        return Err(format!(
            "vms.{}.backend is {:?}; `vm run` runs the built-in micro-VM (backend = \"kvm\")",
            vm.name, vm.backend
        ));
    }
    let image = vm.guest_image.clone().ok_or_else(|| {
        format!(
            "vms.{}.guest_image is required for backend \"kvm\"",
            vm.name
        )
    })?;
    let vcpus =
        u8::try_from(vm.vcpus).map_err(|_| format!("vms.{}.vcpus: at most 255", vm.name))?;
    let n = &vm.network;
    let GuestNet {
        mac,
        address,
        gateway,
    } = guest_net(vm, "the micro-VM guest speaks IPv4 only")?;
    let mut spec = VmSpec::new(&vm.name, image)
        .memory_mib(vm.memory_mib)
        .vcpus(vcpus)
        .network(NetSpec {
            tap: n.tap.clone(),
            mac,
            address,
            prefix_len: n.address.prefix_len(),
            gateway,
        });
    if let Some(d) = &vm.disk {
        spec = spec.disk(d);
    }
    Ok(spec)
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
