use std::process::ExitCode;

use clap::Parser;
use remus_wan::cli::Cli;

fn main() -> ExitCode {
    Cli::parse().run().into()
}
