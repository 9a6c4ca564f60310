//! Exit codes that mean something to scripts and service managers.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Success = 0,
    /// A runtime failure (I/O, peer, guest).
    Failure = 1,
    /// Bad command line (clap uses 2 as well).
    Usage = 2,
    /// The configuration file is unreadable or invalid.
    Config = 3,
    /// The command refused to act: it would overwrite keys, or lacks a
    /// permission it needs.
    Refused = 4,
    /// Another site runs the VM now (it took over, or a switchover handed
    /// it over): this process stopped its copy and must not restart it.
    Superseded = 5,
    /// `verify`: the replica differs from the primary (differences left).
    Differences = 6,
    /// `verify --repair`: differences were found, and all were repaired.
    Repaired = 7,
}

impl From<Code> for ExitCode {
    fn from(c: Code) -> Self {
        ExitCode::from(c as u8)
    }
}
