//! The MMIO bus: guest-physical windows to devices.

use std::sync::{Arc, Mutex};

/// A device reached through MMIO exits.
pub trait MmioDevice: Send {
    /// Read `data.len()` bytes at `offset` into the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` into the window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared MMIO device.
pub type SharedMmio = Arc<Mutex<dyn MmioDevice>>;

/// Non-overlapping windows, sorted by base.
#[derive(Default, Clone)]
pub struct MmioBus {
    windows: Vec<(u64, u64, SharedMmio)>,
}

impl MmioBus {
    /// Adds a window; refuses overlaps.
    pub fn insert(&mut self, base: u64, size: u64, dev: SharedMmio) -> Result<(), String> {
        let end = base.checked_add(size).ok_or("window overflows")?;
        if self
            .windows
            .iter()
            .any(|(b, s, _)| base < b + s && *b < end)
        {
            return Err(format!("MMIO window {base:#x}+{size:#x} overlaps another"));
        }
        self.windows.push((base, size, dev));
        self.windows.sort_by_key(|w| w.0);
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&SharedMmio, u64)> {
        self.windows.iter().find_map(|(b, s, d)| {
            let off = addr.checked_sub(*b)?;
            (off + len as u64 <= *s).then_some((d, off))
        })
    }

    /// Dispatches a read; `false` when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((d, off)) => {
                d.lock().unwrap_or_else(|e| e.into_inner()).read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((d, off)) => {
                d.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_and_refuses_overlap() {
        let mut bus = MmioBus::default();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        assert!(bus
            .insert(0x10f0, 0x100, Arc::new(Mutex::new(Echo(2))))
            .is_err());
        let mut b = [0u8; 4];
        assert!(bus.read(0x1002, &mut b));
        assert_eq!(b, [3; 4]);
        assert!(!bus.read(0x10fe, &mut b), "straddles the end");
        assert!(!bus.read(0x0, &mut b));
        assert!(bus.write(0x1000, &[7]));
        assert!(bus.read(0x1000, &mut b));
        assert_eq!(b, [7; 4]);
    }
}
