//! Why protection of a VM stopped or a step of it failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Transport(#[from] wan::transport::TransportError),
    #[error("guest: {0}")]
    Guest(#[from] hypervisor::GuestError),
    #[error("codec: {0}")]
    Codec(#[from] wan::codec::CodecError),
    #[error("replication session: {0}")]
    Session(String),
    /// The session cannot go on (its task ended, or it failed for good):
    /// a new one is needed.
    #[error("replication session ended: {0}")]
    SessionEnded(String),
    #[error("site {site} took the VM over under fencing token {token}: stopped here for good")]
    Demoted { site: String, token: u64 },
    #[error("reading the disk image {path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
