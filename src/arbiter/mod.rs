//! Failover wiring: one VM's [`failover::Site`] state machine over the
//! sites' authenticated QUIC connections (to the witness, and between the
//! two sites), and the demultiplexing of a site endpoint into replication
//! and failover control streams.

pub mod demux;
pub mod etcd;
pub mod link;
mod shell;

pub use shell::{spawn, ArbiterHandle, ArbiterOptions, Snapshot, StartAs};
