//! Guest backends: the `Guest` trait the replication engine drives, and its
//! backends (`kvm`: the built-in micro-VM; `qemu`; `xen`). See docs/design.md.

pub mod group;
pub mod guest;
pub mod guest_build;
pub mod kvm;
pub mod netns;
pub mod qemu;
pub mod seams;

pub use guest::{Checkpoint, FrameReader, GuestError, PauseTimings, ProtectedGuest};
pub use seams::{FrameSink, Seams, WriteHook};

/// The guest-memory crate our memory types come from (callers read pages
/// through its `Bytes` trait).
pub use vm_memory;
