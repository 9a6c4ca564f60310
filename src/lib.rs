//! remus-wan: the engine that wires the crates together (configuration,
//! certificates, CLI commands; later the replication engine and status).

pub mod addresses;
pub mod arbiter;
pub mod certs;
pub mod cli;
pub mod config;
pub mod engine;
pub mod faults;
pub mod metrics;
pub mod replica;
pub mod site;
pub mod testbed;
pub mod witness;
