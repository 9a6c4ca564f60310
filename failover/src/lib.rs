//! Heartbeats, failure detection, witness arbitration and leases, and the
//! failover / fencing / switchover state machine (see docs/design.md).
//!
//! Everything here is sans-IO: [`Site`] and [`Witness`] take messages and
//! the time and return messages to send and events for the engine. The
//! engine carries the messages over the sites' QUIC connections; tests drive
//! them on a simulated network with simulated clocks.
//!
//! Transport requirement: messages between two parties are delivered in
//! order (one QUIC stream per pair) or not at all.

mod message;
mod site;
mod timers;
pub mod wire;
mod witness;

pub use message::{Message, SiteId, Stance};
pub use site::{Event, Output, Site};
pub use timers::{Timers, TimersError};
pub use witness::{LeaseRecord, Witness, WitnessOutput};
