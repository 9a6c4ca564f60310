//! Test driver: lays descriptor chains into guest memory like a (possibly
//! hostile) guest driver would, and reads the used ring back.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::kvm::memory::GuestMemoryMmap;

/// RAM size of test memories.
pub const RAM: usize = 1 << 20;
/// Where test buffers live (queues are at 0).
pub const DATA: u64 = 0x1_0000;
/// VRING_DESC_F_WRITE.
pub const WRITE: u16 = 2;

/// Fresh zeroed test memory.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
}

/// A driver-side queue at `base`.
pub fn queue(mem: &GuestMemoryMmap, base: u64) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::create(mem, GuestAddress(base), 16)
}

/// The device-side view of `mq`.
pub fn device_queue(mq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Queue {
    mq.create_queue().unwrap()
}

/// Publishes one chain of `(addr, len, flags)` descriptors at table index
/// `at`.
pub fn chain(mq: &MockSplitQueue<'_, GuestMemoryMmap>, at: u16, descs: &[(u64, u32, u16)]) {
    let n = descs.len();
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let (f, next) = if i + 1 < n {
                (flags | 1, at + i as u16 + 1)
            } else {
                (flags, 0)
            };
            RawDescriptor::from(Descriptor::new(addr, len, f, next))
        })
        .collect();
    mq.add_desc_chains(&raw, at).unwrap();
}

/// `(id, len)` of used entry `i`.
pub fn used(mq: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = mq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

/// The used index.
pub fn used_idx(mq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    mq.used().idx().load()
}

/// Reads `len` bytes at `addr`.
pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
