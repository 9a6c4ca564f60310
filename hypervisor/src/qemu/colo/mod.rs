//! remus-wan as the local COLO secondary ("sink") of the QEMU it runs.
//!
//! With migration capability `x-colo`, QEMU migrates the guest once and
//! then, at each checkpoint, stops it and sends only the pages it dirtied
//! since the previous checkpoint plus the device state, and waits for its
//! peer's replies: QEMU's own dirty tracking makes the pause O(dirty
//! pages) instead of O(guest RAM). Sans-IO parts (one concept per file):
//!
//! - [`wire`]: stream constants and a bounds-checked reader;
//! - [`records`]: RAM records (block list, pages, EOS);
//! - [`devices`]: delimiting the device part of the initial stream;
//! - [`message`]: COLO control messages;
//! - [`stream`]: the incremental parser of everything QEMU sends;
//! - [`writer`]: the stream a replica QEMU loads (and test streams);
//! - [`envelope`]: the state blob a COLO checkpoint carries;
//! - [`layout`]: RAM blocks in the engine's frame numbering.
//!
//! [`sink`] is the thin shell: the migration socket, QMP, the protocol.

pub mod devices;
pub mod envelope;
pub mod error;
pub mod layout;
pub mod message;
pub mod records;
pub mod sink;
pub mod stream;
pub mod version;
pub mod wire;
pub mod writer;

pub use envelope::ColoState;
pub use error::StreamError;
pub use layout::{frame_count, Layout, RESERVE_FRAMES};
pub use message::ColoMessage;
pub use stream::{Event, StreamParser};

#[cfg(test)]
mod sink_tests;
#[cfg(test)]
mod tests;
