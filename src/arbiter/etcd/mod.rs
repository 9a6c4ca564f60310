//! etcd as the arbiter ("witness backend") of a fleet: each VM's lease is
//! an etcd key on an etcd lease, under the built-in witness's rules (see
//! [`rules`]). The site's [`failover::Site`] is unchanged: its link to the
//! witness is replaced by one that answers its `LeaseRequest`/`Handover`
//! from etcd and hands it the same `LeaseReply`s.

pub mod rules;

#[cfg(feature = "etcd")]
mod client;
#[cfg(feature = "etcd")]
pub use client::{etcd_loop, EtcdKv, EtcdLink, EtcdLinkError};

#[cfg(test)]
mod mem;
#[cfg(test)]
mod tests;
