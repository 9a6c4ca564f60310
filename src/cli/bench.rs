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
}

impl BenchCommand {
    pub fn run(self) -> Code {
        match self {
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
