//! The standby's side of replication: the on-disk replica of each VM and
//! the journal that makes every epoch all-or-nothing.

mod journal;
mod store;

pub use journal::{Journal, JournalError, JournalWriter};
pub use store::{Meta, ReplicaStore, StoreError};
