//! The replication engine's sans-IO parts: output commit and pacing. The
//! `protect` and `standby` shells drive them (issue 7).

pub mod blockmap;
pub mod disk_image;
pub mod disksync;
pub mod output_commit;
pub mod pacer;
pub mod precopy;
pub mod progress;
pub mod protect;
pub mod release_gate;
pub mod standby;
pub mod verify;

pub use output_commit::{BufferFull, OutputBuffer};
pub use pacer::{Decision, Pacer};
