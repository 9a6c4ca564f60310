//! virtio-net. Transmitted frames leave through a [`FrameSink`] (the tap,
//! or the replication engine, which holds them until their epoch commits).
//! Received frames are written into the guest's receive buffers at once.

mod rx_pump;
mod tx_worker;

pub use rx_pump::spawn_rx_pump;
pub use tx_worker::{spawn_tx_worker, TX_POLL};

use std::collections::VecDeque;
use std::io::{Read, Write};
use virtio_queue::{Queue, QueueState, QueueT};

use super::doorbell::Doorbell;
use super::virtio::{read_config_bytes, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::kvm::memory::GuestMemoryMmap;

/// VIRTIO_NET_F_MAC.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Header before every frame when VERSION_1 is negotiated.
pub const HDR_LEN: usize = 12;
/// Largest frame accepted from the guest (no offloads: MTU 1500 + header).
pub const MAX_FRAME: usize = 1514;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Frames kept while the guest has no receive buffer posted.
const MAX_PENDING_RX: usize = 256;

pub use crate::seams::FrameSink;

/// Counters of the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Frames dropped (no buffer, too big, malformed chain).
    pub dropped: u64,
}

/// Saved state of a virtio-net device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    /// MAC address.
    pub mac: [u8; 6],
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The receive and transmit queues.
    pub queues: Vec<QueueState>,
    /// Whether the device was activated.
    pub activated: bool,
    /// Received frames not yet delivered.
    pub pending_rx: Vec<Vec<u8>>,
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    acked_features: u64,
    queues: Vec<Queue>,
    mem: Option<GuestMemoryMmap>,
    sink: Box<dyn FrameSink>,
    pending_rx: VecDeque<Vec<u8>>,
    stats: NetStats,
    /// When set, transmit notifications wake the transmit worker instead
    /// of being served in the vCPU thread.
    tx_worker: Option<Doorbell>,
    /// Checkpoint pause: no frame leaves and nothing is written into guest
    /// memory (received frames wait in `pending_rx`).
    paused: bool,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Net {
    /// A device with `mac` whose transmitted frames go to `sink`.
    pub fn new(mac: [u8; 6], sink: Box<dyn FrameSink>) -> Self {
        Net {
            mac,
            acked_features: 0,
            queues: (0..2)
                .map(|_| Queue::new(QUEUE_SIZE).expect("constant queue size is valid"))
                .collect(),
            mem: None,
            sink,
            pending_rx: VecDeque::new(),
            stats: NetStats::default(),
            tx_worker: None,
            paused: false,
        }
    }

    /// Pauses or resumes the device. Callers hold the device lock, so once
    /// this returns no worker is inside a transmit or a delivery, and none
    /// starts until resume. Resuming wakes the transmit worker (the guest
    /// may have queued frames without notifying).
    pub fn set_paused(&mut self, on: bool) {
        self.paused = on;
        if !on {
            if let Some(kick) = &self.tx_worker {
                kick.ring();
            }
        }
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Restores a saved state into a device built from the same spec; an
    /// activated device uses `mem` from now on.
    pub fn restore(&mut self, s: &NetState, mem: &GuestMemoryMmap) -> Result<(), String> {
        if s.mac != self.mac {
            return Err(format!(
                "saved MAC {:02x?} differs from the configured {:02x?}",
                s.mac, self.mac
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.acked_features & !self.avail_features() != 0 {
            return Err(format!(
                "acked features {:#x} were never offered",
                s.acked_features
            ));
        }
        let mut queues = Vec::new();
        for q in &s.queues {
            let q = Queue::try_from(*q).map_err(|e| format!("queue: {e:?}"))?;
            if s.activated && q.ready() && !q.is_valid(mem) {
                return Err("a ready queue lies outside guest memory".into());
            }
            queues.push(q);
        }
        self.queues = queues;
        self.acked_features = s.acked_features;
        self.pending_rx = s.pending_rx.iter().take(MAX_PENDING_RX).cloned().collect();
        self.mem = s.activated.then(|| mem.clone());
        Ok(())
    }

    /// Hands transmit processing to a worker woken by `kick` (see
    /// [`spawn_tx_worker`]).
    pub fn set_tx_worker(&mut self, kick: Doorbell) {
        self.tx_worker = Some(kick);
    }

    /// Turns the guest's transmit notifications on or off. Turning them on
    /// returns whether frames were queued meanwhile (so the caller drains
    /// again instead of missing them).
    pub fn set_tx_notify(&mut self, on: bool) -> bool {
        let Some(mem) = self.mem.as_ref() else {
            return false;
        };
        if self.paused {
            return false;
        }
        let q = &mut self.queues[TX];
        if on {
            q.enable_notification(mem).unwrap_or(true)
        } else {
            let _ = q.disable_notification(mem);
            false
        }
    }

    /// Replaces the transmit sink (the engine takes over output).
    pub fn set_sink(&mut self, sink: Box<dyn FrameSink>) {
        self.sink = sink;
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Saves the device state.
    pub fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            acked_features: self.acked_features,
            queues: self.queues.iter().map(|q| q.state()).collect(),
            activated: self.mem.is_some(),
            pending_rx: self.pending_rx.iter().cloned().collect(),
        }
    }

    /// A frame arrived for the guest: deliver it now, or keep it until the
    /// guest posts a buffer. Returns whether anything reached the guest.
    pub fn receive(&mut self, frame: &[u8]) -> bool {
        if self.mem.is_none() {
            self.stats.dropped += 1;
            return false;
        }
        if !self.paused && self.pending_rx.is_empty() && self.deliver(frame) {
            return true;
        }
        if self.pending_rx.len() >= MAX_PENDING_RX {
            self.pending_rx.pop_front();
            self.stats.dropped += 1;
        }
        self.pending_rx.push_back(frame.to_vec());
        self.flush_pending()
    }

    /// Whether received frames wait for guest buffers.
    pub fn has_pending(&self) -> bool {
        !self.pending_rx.is_empty()
    }

    /// Delivers waiting frames into buffers the guest posted since; returns
    /// whether anything reached the guest.
    pub fn flush_pending(&mut self) -> bool {
        if self.paused {
            return false;
        }
        let mut any = false;
        while let Some(f) = self.pending_rx.pop_front() {
            if !self.deliver(&f) {
                self.pending_rx.push_front(f);
                break;
            }
            any = true;
        }
        any
    }

    /// Writes one frame into the next receive buffer; `false` when the
    /// guest has none posted.
    fn deliver(&mut self, frame: &[u8]) -> bool {
        let Some(mem) = self.mem.as_ref() else {
            return false;
        };
        let q = &mut self.queues[RX];
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut written = 0u32;
        match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= HDR_LEN + frame.len() => {
                let mut hdr = [0u8; HDR_LEN];
                hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
                if w.write_all(&hdr).and_then(|_| w.write_all(frame)).is_ok() {
                    written = (HDR_LEN + frame.len()) as u32;
                    self.stats.rx_frames += 1;
                } else {
                    self.stats.dropped += 1;
                }
            }
            _ => self.stats.dropped += 1,
        }
        if let Err(e) = q.add_used(mem, head, written) {
            tracing::warn!("virtio-net: cannot return rx buffer: {e}");
        }
        true
    }

    /// Sends the frames the guest queued; returns how many chains were
    /// consumed.
    pub fn process_tx(&mut self) -> usize {
        let Some(mem) = self.mem.as_ref().filter(|_| !self.paused) else {
            return 0;
        };
        let mut done = 0;
        let mut frame = Vec::with_capacity(HDR_LEN + MAX_FRAME);
        // Bounded: at most one pass over the ring per notification.
        for _ in 0..QUEUE_SIZE {
            let q = &mut self.queues[TX];
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            frame.clear();
            let ok = match chain.reader(mem) {
                Ok(r) => {
                    let n = r.available_bytes();
                    (HDR_LEN..=HDR_LEN + MAX_FRAME).contains(&n)
                        && r.take(n as u64).read_to_end(&mut frame).is_ok()
                }
                Err(_) => false,
            };
            if ok {
                self.stats.tx_frames += 1;
                self.sink.send(&frame[HDR_LEN..]);
            } else {
                self.stats.dropped += 1;
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                tracing::warn!("virtio-net: cannot return tx buffer: {e}");
            }
            done += 1;
        }
        done
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }
    fn acked_features(&self) -> u64 {
        self.acked_features
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (link up; only read if STATUS was negotiated).
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6] = 1;
        read_config_bytes(&cfg, offset, data);
    }
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), String> {
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err("driver did not accept VIRTIO_F_VERSION_1".into());
        }
        // The guest need not notify us of new receive buffers (an exit
        // each): the receive thread retries while frames wait.
        if let Err(e) = self.queues[RX].disable_notification(&mem) {
            return Err(format!("cannot set up the receive queue: {e}"));
        }
        self.mem = Some(mem);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }
    fn notify(&mut self, index: u16) {
        match index as usize {
            RX => {
                self.flush_pending();
            }
            TX => match &self.tx_worker {
                Some(kick) => kick.ring(),
                None => {
                    self.process_tx();
                }
            },
            _ => {}
        }
    }
    fn reset(&mut self) {
        self.mem = None;
        self.acked_features = 0;
        self.pending_rx.clear();
        for q in &mut self.queues {
            q.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::kvm::devices::virtio::testing::*;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);
    impl FrameSink for Collect {
        fn send(&mut self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    fn net() -> (Net, Collect) {
        let sink = Collect::default();
        let mut n = Net::new([0x52, 0x54, 0, 0, 0, 1], Box::new(sink.clone()));
        n.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
        (n, sink)
    }

    #[test]
    fn transmit_strips_the_header_and_drops_malformed_chains() {
        let mem = memory();
        let (mut n, sink) = net();
        let rx = queue(&mem, 0);
        let tx = queue(&mem, 0x4000);
        n.queues_mut()[RX] = device_queue(&rx);
        n.queues_mut()[TX] = device_queue(&tx);
        n.activate(mem.clone()).unwrap();
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(DATA))
            .unwrap();
        mem.write_slice(b"frame-bytes", GuestAddress(DATA + 0x100))
            .unwrap();
        // Header and frame in two descriptors.
        chain(&tx, 0, &[(DATA, HDR_LEN as u32, 0), (DATA + 0x100, 11, 0)]);
        // Shorter than a header.
        chain(&tx, 2, &[(DATA, 4, 0)]);
        // Larger than any frame.
        chain(&tx, 3, &[(DATA, 0x8000, 0)]);
        // Outside guest RAM.
        chain(&tx, 4, &[(u64::MAX - 8, 64, 0)]);
        n.notify(TX as u16);
        assert_eq!(used_idx(&tx), 4);
        assert_eq!(*sink.0.lock().unwrap(), vec![b"frame-bytes".to_vec()]);
        assert_eq!(n.stats().tx_frames, 1);
        assert_eq!(n.stats().dropped, 3);
    }

    #[test]
    fn receive_fills_posted_buffers_and_holds_frames_until_one_is_posted() {
        let mem = memory();
        let (mut n, _) = net();
        let rx = queue(&mem, 0);
        let tx = queue(&mem, 0x4000);
        n.queues_mut()[RX] = device_queue(&rx);
        n.queues_mut()[TX] = device_queue(&tx);
        n.activate(mem.clone()).unwrap();
        assert!(!n.receive(b"early"), "no buffer posted yet");
        assert!(n.has_pending());
        chain(&rx, 0, &[(DATA, 2048, WRITE)]);
        assert!(n.flush_pending());
        assert_eq!(used(&rx, 0), (0, (HDR_LEN + 5) as u32));
        assert_eq!(read(&mem, DATA + HDR_LEN as u64, 5), b"early");
        // num_buffers = 1
        assert_eq!(read(&mem, DATA + 10, 2), [1, 0]);
        // A buffer too small for the frame is returned empty, not overrun.
        chain(&rx, 1, &[(DATA + 0x1000, 8, WRITE)]);
        assert!(n.receive(&[7u8; 100]));
        assert_eq!(used(&rx, 1), (1, 0));
        assert!(read(&mem, DATA + 0x1000, 16).iter().all(|&b| b == 0));
        assert_eq!(n.stats().rx_frames, 1);
    }
}
