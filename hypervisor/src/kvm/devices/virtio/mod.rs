//! Virtio devices and their MMIO transport.

pub mod mmio;
#[cfg(test)]
pub(crate) mod testing;

use virtio_queue::Queue;

use crate::kvm::memory::GuestMemoryMmap;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device id of virtio-net.
pub const TYPE_NET: u32 = 1;
/// Device id of virtio-blk.
pub const TYPE_BLOCK: u32 = 2;

/// A virtio device behind a transport. The device owns its queues, so its
/// saved state is the device struct's state alone.
pub trait VirtioDevice: Send {
    /// Virtio device id.
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`).
    fn acked_features(&self) -> u64;
    /// Records the driver's accepted features.
    fn set_acked_features(&mut self, features: u64);
    /// The virtqueues.
    fn queues(&self) -> &[Queue];
    /// The virtqueues, mutable (the transport configures them).
    fn queues_mut(&mut self) -> &mut [Queue];
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start serving the queues.
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), String>;
    /// Whether `activate` succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// The driver notified queue `index`.
    fn notify(&mut self, index: u16);
    /// The driver reset the device.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes of a little-endian config space at `offset`;
/// out-of-range bytes read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
