//! `remus-wan bench ...`: measurements printed beside their baselines.

use clap::Subcommand;

use super::exit::Code;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Stream synthetic checkpoint epochs over an emulated WAN (RTT 0/20/50/100 ms,
    /// loss 0/0.5/2 %, 200 Mbit/s): our QUIC transport beside a TCP + TLS
    /// baseline carrying the same framing; goodput and commit latency p50/p99.
    /// Needs root (the emulated link joins two network namespaces).
    Wan {
        /// Two RTTs and two loss rates only, shorter runs.
        #[arg(long)]
        quick: bool,
    },
    /// The guest's TCP services (counter stream throughput, echo round
    /// trip) unprotected and protected at 25/50/100 ms epochs over an
    /// emulated WAN of 0 and 50 ms RTT, with link rate, compression ratio
    /// and pause; and the guest's own memory-dirtying workload (page writes
    /// per second at 1, 16 and 64 MiB working sets) with its slowdown
    /// against the unprotected guest. Needs root and KVM.
    Protect {
        /// The network guest image (default: target/guest/netguest.elf).
        #[arg(long)]
        guest_image: Option<std::path::PathBuf>,
    },
}

impl BenchCommand {
    pub fn run(self) -> Code {
        match self {
            BenchCommand::Protect { guest_image } => match super::bench_protect::run(guest_image) {
                Ok(()) => Code::Success,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Code::Failure
                }
            },
            BenchCommand::Wan { quick } => {
                let opts = if quick {
                    wan::transport::bench::BenchOptions::quick()
                } else {
                    wan::transport::bench::BenchOptions::full()
                };
                match wan::transport::bench::run(&opts) {
                    Ok(table) => {
                        println!("{table}");
                        Code::Success
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        Code::Failure
                    }
                }
            }
        }
    }
}
