//! Device models. None of them assumes the guest runs in ring 3: they see
//! port and MMIO accesses and guest memory, nothing else.

pub mod block;
pub mod bus;
pub mod console;
pub mod doorbell;
pub mod net;
pub mod tap;
pub mod virtio;
