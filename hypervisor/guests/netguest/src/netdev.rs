//! smoltcp device on top of virtio-drivers' polling virtio-net.

use alloc::rc::Rc;
use core::cell::RefCell;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::mmio::MmioTransport;

use crate::hal::IdentityHal;

/// Receive/transmit queue size.
pub const QUEUE: usize = 64;
/// Receive buffer size (header + MTU-sized frame).
pub const BUF_LEN: usize = 2048;

/// The virtio-net driver type.
pub type Nic = VirtIONet<IdentityHal, MmioTransport<'static>, QUEUE>;

/// The smoltcp device.
pub struct Device(pub Rc<RefCell<Nic>>);

/// A received frame.
pub struct RxToken(Rc<RefCell<Nic>>, RxBuffer);
/// Room to send a frame.
pub struct TxToken(Rc<RefCell<Nic>>);

impl phy::Device for Device {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken)> {
        let buf = self.0.borrow_mut().receive().ok()?;
        Some((RxToken(self.0.clone(), buf), TxToken(self.0.clone())))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken> {
        Some(TxToken(self.0.clone()))
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
        let RxToken(nic, buf) = self;
        let r = f(buf.packet());
        // A buffer that cannot be recycled shrinks the ring; nothing else to do.
        let _ = nic.borrow_mut().recycle_rx_buffer(buf);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut nic = self.0.borrow_mut();
        let mut tx = nic.new_tx_buffer(len);
        let r = f(tx.packet_mut());
        let _ = nic.send(tx);
        r
    }
}
