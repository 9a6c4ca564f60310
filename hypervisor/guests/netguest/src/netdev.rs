//! smoltcp device on virtio-drivers' raw virtio-net: receive buffers stay
//! posted, transmits do not wait for their completion (so a burst of frames
//! can be queued at once and reclaimed later).

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;

use crate::hal::IdentityHal;

/// Receive/transmit queue size.
pub const QUEUE: usize = 64;
/// Receive buffer size (header + MTU-sized frame).
pub const BUF_LEN: usize = 2048;
/// How many times `transmit` waits for the device when the ring is full.
const FULL_WAITS: usize = 20;

/// The NIC: the raw driver and the buffers lent to the device.
pub struct Nic {
    raw: VirtIONetRaw<IdentityHal, MmioTransport<'static>, QUEUE>,
    rx: Vec<Option<Box<[u8]>>>,
    tx: Vec<Option<Vec<u8>>>,
    tx_free: Vec<Vec<u8>>,
}

impl Nic {
    /// Initializes the device and posts every receive buffer.
    pub fn new(transport: MmioTransport<'static>) -> Option<Nic> {
        let raw = VirtIONetRaw::new(transport).ok()?;
        let mut nic = Nic {
            raw,
            rx: (0..QUEUE).map(|_| None).collect(),
            tx: (0..QUEUE).map(|_| None).collect(),
            tx_free: Vec::new(),
        };
        for _ in 0..QUEUE {
            nic.post(vec![0u8; BUF_LEN].into_boxed_slice());
        }
        Some(nic)
    }

    fn post(&mut self, mut buf: Box<[u8]>) {
        // SAFETY: the buffer is kept in `self.rx` until the device is done.
        if let Ok(t) = unsafe { self.raw.receive_begin(&mut buf) } {
            if let Some(slot) = self.rx.get_mut(t as usize) {
                *slot = Some(buf);
            }
        }
    }

    /// The next received frame: (buffer, header length, frame length).
    fn receive(&mut self) -> Option<(Box<[u8]>, usize, usize)> {
        for _ in 0..QUEUE {
            let t = self.raw.poll_receive()?;
            let mut buf = self.rx.get_mut(t as usize)?.take()?;
            // SAFETY: `buf` is the buffer posted with token `t`.
            match unsafe { self.raw.receive_complete(t, &mut buf) } {
                Ok((h, n)) if h + n <= buf.len() => return Some((buf, h, n)),
                _ => self.post(buf),
            }
        }
        None
    }

    /// Takes back the transmit buffers the device is done with.
    fn reclaim(&mut self) {
        while let Some(t) = self.raw.poll_transmit() {
            let Some(buf) = self.tx.get_mut(t as usize).and_then(Option::take) else {
                return;
            };
            // SAFETY: `buf` is the buffer queued with token `t`.
            let _ = unsafe { self.raw.transmit_complete(t, &buf) };
            self.tx_free.push(buf);
        }
    }

    fn can_send(&mut self) -> bool {
        self.reclaim();
        self.raw.can_send()
    }

    fn send_with<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut buf = self.tx_free.pop().unwrap_or_default();
        buf.clear();
        buf.resize(32 + len, 0);
        let h = self.raw.fill_buffer_header(&mut buf).unwrap_or(12);
        buf.truncate(h + len);
        let r = f(&mut buf[h..]);
        // SAFETY: the buffer is kept in `self.tx` until the device is done.
        match unsafe { self.raw.transmit_begin(&buf) } {
            Ok(t) if (t as usize) < self.tx.len() => self.tx[t as usize] = Some(buf),
            _ => self.tx_free.push(buf),
        }
        r
    }
}

/// The smoltcp device.
pub struct Device(pub Rc<RefCell<Nic>>);

/// A received frame.
pub struct RxToken(Rc<RefCell<Nic>>, Box<[u8]>, usize, usize);
/// Room to send a frame.
pub struct TxToken(Rc<RefCell<Nic>>);

impl phy::Device for Device {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken)> {
        let (buf, h, n) = self.0.borrow_mut().receive()?;
        Some((RxToken(self.0.clone(), buf, h, n), TxToken(self.0.clone())))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken> {
        let mut nic = self.0.borrow_mut();
        for _ in 0..FULL_WAITS {
            if nic.can_send() {
                return Some(TxToken(self.0.clone()));
            }
            // The device is still draining the ring: give it the CPU.
            guest_rt::idle(50);
        }
        None
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = None;
        caps
    }
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let RxToken(nic, buf, h, n) = self;
        let r = f(&buf[h..h + n]);
        nic.borrow_mut().post(buf);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.borrow_mut().send_with(len, f)
    }
}
