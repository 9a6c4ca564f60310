//! Virtio-MMIO transport, version 2 (virtio 1.x "modern" layout).
//!
//! Drivers poll the used rings; the `InterruptStatus` register reports
//! used-buffer events for drivers that look, but no interrupt is injected
//! (the micro-VM has no interrupt controller yet).

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::VirtioDevice;
use crate::kvm::devices::bus::MmioDevice;
use crate::kvm::memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x554d_4551; // "QEMU", what drivers expect to see

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 0x40;
    /// FAILED.
    pub const FAILED: u32 = 0x80;
}

/// Saved state of the transport (the device and its queues save their own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmioTransportState {
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub acked_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// Device status.
    pub device_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
}

/// The transport of one virtio device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    state: MmioTransportState,
}

impl MmioTransport {
    /// Wraps `device`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryMmap) -> Self {
        MmioTransport {
            device,
            mem,
            state: MmioTransportState::default(),
        }
    }

    /// Saves the transport registers.
    pub fn save(&self) -> MmioTransportState {
        self.state
    }

    /// Restores the transport registers.
    pub fn restore(&mut self, s: MmioTransportState) {
        self.state = s;
    }

    fn dev(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_queue(&self, f: impl FnOnce(&mut virtio_queue::Queue)) {
        // Queue registers only change before DRIVER_OK.
        if self.state.device_status & status::DRIVER_OK != 0 {
            return;
        }
        let sel = self.state.queue_select as usize;
        if let Some(q) = self.dev().queues_mut().get_mut(sel) {
            f(q);
        }
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let s = &self.state;
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => 2,
            REG_DEVICE_ID => self.dev().device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match s.features_select {
                0 => self.dev().avail_features() as u32,
                1 => (self.dev().avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .dev()
                .queues()
                .get(s.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .dev()
                .queues()
                .get(s.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => s.interrupt_status,
            REG_STATUS => s.device_status,
            REG_CONFIG_GENERATION => s.config_generation,
            _ => {
                tracing::trace!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_u32(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.state.features_select = v,
            REG_DRIVER_FEATURES_SEL => self.state.acked_features_select = v,
            REG_DRIVER_FEATURES => {
                if self.state.device_status & status::FEATURES_OK != 0 {
                    return;
                }
                let mut dev = self.dev();
                let avail = dev.avail_features();
                let acked = dev.acked_features();
                let new = match self.state.acked_features_select {
                    0 => (acked & !0xffff_ffff) | u64::from(v),
                    1 => (acked & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => acked,
                };
                // A driver accepting what we never offered gets only the offer.
                dev.set_acked_features(new & avail);
            }
            REG_QUEUE_SEL => self.state.queue_select = v,
            REG_QUEUE_NUM => self.with_queue(|q| q.set_size(v as u16)),
            REG_QUEUE_READY => self.with_queue(|q| q.set_ready(v == 1)),
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY => {
                if self.state.device_status & status::DRIVER_OK != 0 {
                    let mut dev = self.dev();
                    if dev.is_activated() {
                        dev.notify(v as u16);
                    }
                }
            }
            REG_INTERRUPT_ACK => self.state.interrupt_status &= !v,
            REG_STATUS => self.set_status(v),
            _ => tracing::trace!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.dev().reset();
            let cfg = self.state.config_generation;
            self.state = MmioTransportState {
                config_generation: cfg.wrapping_add(1),
                ..Default::default()
            };
            return;
        }
        let old = self.state.device_status;
        // Status bits only ever get added, except through reset.
        let new = old | v;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let mut dev = self.dev();
            let event_idx = dev.acked_features() & (1 << 29) != 0;
            for q in dev.queues_mut() {
                q.set_event_idx(event_idx);
            }
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            let mem = self.mem.clone();
            let mut dev = self.dev();
            let valid = dev.queues().iter().all(|q| !q.ready() || q.is_valid(&mem));
            let result = if valid {
                dev.activate(mem)
            } else {
                Err("a ready queue has invalid addresses or size".to_string())
            };
            if let Err(e) = result {
                tracing::warn!(
                    "virtio device type {} failed to activate: {e}",
                    dev.device_type()
                );
                drop(dev);
                self.state.device_status = new | status::NEEDS_RESET;
                return;
            }
        }
        self.state.device_status = new;
    }
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.dev().read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_u32(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.dev().write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_u32(offset, u32::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::Queue;

    use super::*;
    use crate::kvm::devices::virtio::testing::memory;

    struct Fake {
        acked: u64,
        queues: Vec<Queue>,
        active: bool,
        notified: Vec<u16>,
        resets: usize,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            7
        }
        fn avail_features(&self) -> u64 {
            (1 << 32) | 0b101
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn set_acked_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn queues(&self) -> &[Queue] {
            &self.queues
        }
        fn queues_mut(&mut self) -> &mut [Queue] {
            &mut self.queues
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(&mut self, _: GuestMemoryMmap) -> Result<(), String> {
            self.active = true;
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active
        }
        fn notify(&mut self, i: u16) {
            self.notified.push(i);
        }
        fn reset(&mut self) {
            self.active = false;
            self.acked = 0;
            self.resets += 1;
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup() -> (Arc<Mutex<Fake>>, MmioTransport) {
        let dev = Arc::new(Mutex::new(Fake {
            acked: 0,
            queues: vec![Queue::new(16).unwrap()],
            active: false,
            notified: Vec::new(),
            resets: 0,
        }));
        let t = MmioTransport::new(dev.clone(), memory());
        (dev, t)
    }

    #[test]
    fn identifies_and_negotiates_only_offered_features() {
        let (dev, mut t) = setup();
        assert_eq!(rd(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 7);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | 0b101);
        let mut cfg = [0u8; 2];
        t.read(REG_CONFIG + 2, &mut cfg);
        assert_eq!(cfg, [3, 4]);
        // Odd-sized or misaligned register accesses are ignored.
        t.write(REG_STATUS, &[1]);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn activates_notifies_and_resets() {
        let (dev, mut t) = setup();
        for s in [status::ACKNOWLEDGE, status::DRIVER, status::FEATURES_OK] {
            wr(&mut t, REG_STATUS, s);
        }
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
        wr(&mut t, REG_QUEUE_NUM, 16);
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        wr(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        wr(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        wr(&mut t, REG_QUEUE_READY, 1);
        // Notifications before DRIVER_OK are dropped.
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        wr(&mut t, REG_STATUS, status::DRIVER_OK);
        assert!(dev.lock().unwrap().active);
        // Queue registers are frozen once running.
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x9000);
        assert_eq!(dev.lock().unwrap().queues[0].desc_table(), 0x1000);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(dev.lock().unwrap().notified, vec![0]);
        let saved = t.save();
        assert_eq!(saved.device_status & status::DRIVER_OK, status::DRIVER_OK);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        t.restore(saved);
        assert_eq!(rd(&mut t, REG_STATUS), saved.device_status);
    }

    #[test]
    fn a_ready_queue_outside_memory_fails_activation() {
        let (dev, mut t) = setup();
        wr(&mut t, REG_STATUS, status::FEATURES_OK);
        wr(&mut t, REG_QUEUE_NUM, 16);
        wr(&mut t, REG_QUEUE_DESC_HIGH, 0x10);
        wr(&mut t, REG_QUEUE_READY, 1);
        wr(&mut t, REG_STATUS, status::DRIVER_OK);
        assert!(!dev.lock().unwrap().active);
        assert_ne!(rd(&mut t, REG_STATUS) & status::NEEDS_RESET, 0);
    }
}
