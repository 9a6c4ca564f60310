//! Moving a VM's addresses to the active site: BGP speaker, DNS dynamic
//! update (RFC 2136 + TSIG) and operator hooks. Knows nothing about VMs: it
//! takes plain values ("announce these prefixes with these attributes",
//! "withdraw", "set these records to this address", "run the hooks for this
//! event").
//!
//! - [`bgp`]: a sans-IO BGP session ([`bgp::Session`]) on `netgauze-bgp-pkt`
//!   messages and a tokio [`bgp::Speaker`] running sessions to many peers.
//! - [`policy`]: which routes a site announces when active or standby.
//! - [`dns`]: RFC 2136 UPDATE signed with TSIG (hickory).
//! - [`hooks`]: operator scripts run on failover events.
//! - [`config`]: plain configuration values mirroring `[netops]`.

pub mod bgp;
pub mod config;
pub mod dns;
pub mod hooks;
pub mod policy;
