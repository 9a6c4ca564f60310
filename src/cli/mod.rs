//! The `remus-wan` command line: one file per subcommand.

mod bench;
mod bench_client;
mod bench_codec;
mod bench_failback;
mod bench_fleet;
mod bench_protect;
mod bench_resync;
mod bench_sched;
mod certs;
mod common;
mod config;
pub mod exit;
pub(crate) mod failover_setup;
mod logging;
pub(crate) mod protect;
mod signals;
mod standby;
mod status;
mod switchover;
mod verify;
pub mod vm;
mod witness;

use clap::{Parser, Subcommand};

pub use logging::LogFormat;

const ABOUT: &str =
    "Keep a running VM alive, with its open TCP connections, when its whole datacenter goes dark";

const LONG_ABOUT: &str = "\
remus-wan checkpoints a running virtual machine many times a second at its
primary site, ships each checkpoint delta-compressed over QUIC to a backup
site in another datacenter, and holds the VM's network output until the
backup has acknowledged the checkpoint it belongs to. When the primary site
fails, a witness at a third site arbitrates, the backup resumes the VM from
its last committed checkpoint and moves the VM's addresses (BGP or DNS).

One configuration file describes the whole deployment; every process picks
its own part with --site. Start with `remus-wan certs init` on each party
and `remus-wan config check`.";

const AFTER_HELP: &str = "\
Roles:
  standby --site dc2        hold the replica of the VM backed up at dc2
  protect web1 --site dc2   protect VM web1 towards site dc2 (run at the primary)
  witness                   arbitrate which site may run each VM (third site)
  status                    figures of the protect/standby processes on this host
  switchover web1 --to dc2  move web1 by plan, with no loss (asks the local protect process)
  verify web1 [--repair]    prove the replica equals the primary (docs/verify.md)
With a [witness] in the configuration, the standby takes over by itself when
the primary site fails, and a primary cut from both the backup and the
witness fences itself (docs/failover.md, docs/operations.md).

Exit codes: 0 success, 1 failure, 2 usage error, 3 invalid configuration,
4 refused (would overwrite keys, missing permission), 5 superseded (another
site runs the VM now: this process stopped its copy; do not restart it),
6 verify found differences, 7 verify --repair found differences and repaired
them all.
Logs go to stderr; RUST_LOG sets the filter (default: info).
Documentation: docs/ in the source tree (operations.md, configuration.md).";

#[derive(Debug, Parser)]
#[command(name = "remus-wan", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "REMUS_WAN_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a configuration file: structure, and with --site the files that party needs.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Create the deployment's certificate authority and per-site certificates (mutual TLS).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Run a VM of the configuration on the built-in micro-VM (foreground).
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Start a VM here and protect it towards its backup site: checkpoint
    /// it every epoch, replicate over QUIC, release its network output
    /// only once the backup has committed the epoch it belongs to.
    Protect(protect::ProtectArgs),
    /// Hold the replica of the VM this site backs up: receive, verify and
    /// commit each epoch all-or-nothing, then acknowledge it.
    Standby(standby::StandbyArgs),
    /// Show, per VM, state, epoch rate, pause p50/p99, dirty pages, bytes
    /// raw vs wire, compression, lag, RTT and output held (from the
    /// processes' /status endpoints; /metrics serves Prometheus).
    Status(status::StatusArgs),
    /// Benchmarks that print our figures beside a baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the witness: the third-site arbiter that grants each VM's lease
    /// to one site at a time, with a fencing token that only grows.
    Witness(witness::WitnessArgs),
    /// Move a protected VM to its backup site by plan, with no loss: a
    /// final checkpoint, the lease handed over by the witness, the VM
    /// resumed at the backup, its addresses moved. Asks the `protect`
    /// process on this host.
    Switchover(switchover::SwitchoverArgs),
    /// Prove the replica equals the primary: compare page and block
    /// hashes at commit points while the VM runs (as DRBD's online
    /// verify); list every difference; with --repair resend them. Asks
    /// the `protect` process on this host.
    Verify(verify::VerifyArgs),
}

impl Cli {
    /// Runs the command; the returned code is the process exit status.
    pub fn run(self) -> exit::Code {
        logging::init(self.log_format);
        match self.command {
            Command::Config(c) => c.run(),
            Command::Certs(c) => c.run(),
            Command::Vm(c) => c.run(),
            Command::Witness(c) => c.run(),
            Command::Standby(c) => c.run(),
            Command::Protect(c) => c.run(),
            Command::Bench(c) => c.run(),
            Command::Status(c) => c.run(),
            Command::Switchover(c) => c.run(),
            Command::Verify(c) => c.run(),
        }
    }
}
