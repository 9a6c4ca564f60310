//! The witness (third site): grants each VM's lease to one site at a time.

pub mod frame;
mod server;
mod store;

pub use server::{VmSites, WitnessError, WitnessOptions, WitnessServer};
pub use store::{LeaseStore, LeaseStoreError, Opened, StoredLease};
