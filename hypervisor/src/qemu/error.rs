//! Errors of the `qemu` backend, worded so a user can act on them.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong running a guest in QEMU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The QEMU binary cannot be found or started.
    #[error("cannot start {binary}: {source} (install QEMU: apt-get install qemu-system-x86)", binary = binary.display())]
    QemuMissing {
        /// The binary we tried.
        binary: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A guest image (kernel, initramfs) is missing.
    #[error("Linux guest image {path}: {source} (build it with `cargo xtask guest-image --linux`)", path = path.display())]
    GuestImage {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited (or was never ready); `log` is the end of its output.
    #[error("QEMU exited ({status}) while {what}; its output ends with:\n{log}")]
    QemuExited {
        /// What we were waiting for.
        what: String,
        /// Exit status as text.
        status: String,
        /// Last lines of QEMU's stderr/stdout.
        log: String,
    },
    /// A wait had a deadline and missed it.
    #[error("timed out after {after:?} while {what}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// QMP answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QMP sent something that is not the protocol.
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
    /// Saving or loading the device state (a migration) failed.
    #[error("device state {what} failed: {desc}")]
    Migration {
        /// "save" or "load".
        what: &'static str,
        /// QEMU's description, or ours.
        desc: String,
    },
    /// A checkpoint or replica does not fit this VM.
    #[error("cannot restore the replica: {0}")]
    Restore(String),
    /// The VM description is invalid or asks for something not built yet.
    #[error("invalid QEMU VM specification: {0}")]
    Spec(String),
    /// COLO dirty tracking was asked for but this QEMU cannot do it.
    #[error("dirty tracking \"colo\" unavailable: {0}")]
    ColoUnsupported(#[from] super::colo::version::Unsupported),
    /// The COLO sink failed (the guest was let run on).
    #[error("COLO sink: {0}")]
    Sink(#[from] super::colo::sink::SinkError),
    /// Kernel write tracking of guest RAM failed or is unavailable.
    #[error("dirty tracking \"write-protect\": {0}")]
    WriteTracking(#[from] super::write_protect::WpError),
    /// Operating-system error.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with this module's error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
