//! The witness (third site): grants each VM's lease to one site at a time.

pub mod frame;
mod server;
mod store;

pub use server::{WitnessError, WitnessOptions, WitnessServer};
pub use store::{LeaseStore, LeaseStoreError, StoredLease};
