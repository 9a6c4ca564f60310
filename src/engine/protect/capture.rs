//! What the engine hands the VM it protects: a frame sink that holds the
//! guest's transmitted frames and a disk write hook that captures its
//! writes, both attributed to the epoch under way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hypervisor::kvm::devices::block::WriteHook;
use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::Seams;
use tracing::info;

use super::ProtectError;
use crate::engine::blockmap::BlockMap;
use crate::engine::disk_image::DiskImage;
use crate::engine::output_commit::OutputBuffer;

/// Transmitted frames and disk writes, attributed to epochs.
#[derive(Debug)]
pub struct EpochIo {
    pub output: OutputBuffer,
    pub disk: Vec<(u64, Vec<u8>)>,
    /// The disk's written-block map (see `blockmap.rs`), when tracked.
    pub map: Option<BlockMap>,
    /// The epoch the writes captured now travel in (the map records it).
    pub open_epoch: u64,
    /// Whether captured writes are kept to travel with an epoch. Off while
    /// no epoch can leave (waiting for a peer, backing off): a sync always
    /// follows, and it reads the disk itself (the whole disk, the blocks
    /// the map recorded, or the blocks whose hashes differ), so keeping
    /// the writes would only grow memory for as long as the outage lasts.
    pub buffering: bool,
}

impl EpochIo {
    /// The captured writes leave in `epoch`: later ones travel in the next.
    pub fn drain_disk(&mut self, epoch: u64) -> Vec<(u64, Vec<u8>)> {
        self.open_epoch = epoch + 1;
        if let Some(m) = &mut self.map {
            m.note_epoch(epoch);
        }
        std::mem::take(&mut self.disk)
    }
}

/// Frames the guest transmits go into the output buffer.
struct HoldFrames {
    io: Arc<Mutex<EpochIo>>,
    dropped: Arc<AtomicU64>,
}

impl FrameSink for HoldFrames {
    fn send(&mut self, frame: &[u8]) {
        let full = match self.io.lock() {
            Ok(mut io) => io.output.hold(frame.to_vec()).is_err(),
            Err(_) => true,
        };
        if full {
            // Like a NIC with a full queue: TCP retransmits it. Never
            // released early.
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Disk writes of the running epoch, replicated with it.
struct CaptureWrites {
    io: Arc<Mutex<EpochIo>>,
}

impl WriteHook for CaptureWrites {
    fn on_write(&mut self, offset: u64, data: &[u8]) {
        if let Ok(mut io) = self.io.lock() {
            // The hook runs before the write reaches the image: the map
            // entry is never behind the disk (see blockmap.rs).
            let epoch = io.open_epoch;
            if let Some(m) = &mut io.map {
                m.record(offset, data.len(), epoch);
            }
            if io.buffering {
                io.disk.push((offset, data.to_vec()));
            }
        }
    }
}

/// What the engine shares with the VM it protects.
#[derive(Clone)]
pub struct Capture {
    pub io: Arc<Mutex<EpochIo>>,
    pub dropped_frames: Arc<AtomicU64>,
}

impl Capture {
    pub fn new(output_limit: usize) -> Self {
        Self {
            io: Arc::new(Mutex::new(EpochIo {
                output: OutputBuffer::new(1, output_limit),
                disk: Vec::new(),
                map: None,
                open_epoch: 1,
                buffering: true,
            })),
            dropped_frames: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Tracks the blocks the guest writes to `disk` in its block map
    /// (`<disk>.blockmap` for one image). Call it before the guest starts,
    /// so no write escapes the map.
    pub fn track_disk(&self, disk: &DiskImage) -> Result<(), ProtectError> {
        let len = disk.bytes().map_err(|source| ProtectError::Disk {
            path: disk.path().to_owned(),
            source,
        })?;
        let path = disk.map_path();
        let (map, fresh) = BlockMap::open_or_create(path, len)
            .map_err(|e| ProtectError::Session(e.to_string()))?;
        info!(map = %path.display(), lineage = format!("{:016x}", map.lineage()), fresh, max_epoch = map.max_epoch(), "written-block map");
        if let Ok(mut io) = self.io.lock() {
            io.open_epoch = map.max_epoch() + 1;
            io.map = Some(map);
        }
        Ok(())
    }

    /// The seams to build the protected VM with.
    pub fn seams(&self) -> Seams {
        Seams {
            frame_sink: Some(self.frame_sink()),
            write_hook: Some(self.write_hook()),
        }
    }

    /// Where the guest's transmitted frames are held.
    pub fn frame_sink(&self) -> Box<dyn FrameSink> {
        Box::new(HoldFrames {
            io: self.io.clone(),
            dropped: self.dropped_frames.clone(),
        })
    }

    /// What captures the guest's disk writes into the open epoch.
    pub fn write_hook(&self) -> Box<dyn WriteHook> {
        Box::new(CaptureWrites {
            io: self.io.clone(),
        })
    }
}
