//! virtio-blk on a raw image file. Every write passes a [`WriteHook`] (the
//! replication engine records it for the current epoch) before it reaches
//! the file; completions reach the guest at once.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::{Queue, QueueState, QueueT};

use super::virtio::{read_config_bytes, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::kvm::memory::GuestMemoryMmap;

/// VIRTIO_BLK_F_FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Sector size.
pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 128;
/// Largest request accepted, in bytes.
const MAX_REQUEST: usize = 1 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

pub use crate::seams::WriteHook;

/// Counters of the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Requests refused (bad range, malformed chain, I/O error).
    pub errors: u64,
}

/// Saved state of a virtio-blk device. Requests complete synchronously, so
/// none is ever in flight when the vCPUs are paused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockState {
    /// Capacity in sectors.
    pub capacity: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The request queue.
    pub queues: Vec<QueueState>,
    /// Whether the device was activated.
    pub activated: bool,
}

/// The virtio-blk device.
pub struct Block {
    file: File,
    /// The file's byte where the device's byte 0 lies (a window of a
    /// larger image: a consistency group's replica holds every member's
    /// disk back to back).
    base: u64,
    capacity: u64,
    acked_features: u64,
    queues: Vec<Queue>,
    mem: Option<GuestMemoryMmap>,
    hook: Option<Box<dyn WriteHook>>,
    stats: BlockStats,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Block {
    /// Opens `path` read-write.
    pub fn open(path: &Path) -> std::io::Result<Block> {
        let file = File::options().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Self::over(file, 0, len))
    }

    /// Opens `len` bytes of `path` from `base` read-write, as a whole disk.
    pub fn open_window(path: &Path, base: u64, len: u64) -> std::io::Result<Block> {
        let file = File::options().read(true).write(true).open(path)?;
        let have = file.metadata()?.len();
        if base.checked_add(len).is_none_or(|end| end > have) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a window of {len} bytes at {base} lies past the image's end ({have} bytes)"
                ),
            ));
        }
        Ok(Self::over(file, base, len))
    }

    fn over(file: File, base: u64, len: u64) -> Block {
        Block {
            file,
            base,
            capacity: len / SECTOR,
            acked_features: 0,
            queues: vec![Queue::new(QUEUE_SIZE).expect("constant queue size is valid")],
            mem: None,
            hook: None,
            stats: BlockStats::default(),
        }
    }

    /// Installs the write hook.
    pub fn set_write_hook(&mut self, hook: Option<Box<dyn WriteHook>>) {
        self.hook = hook;
    }

    /// Counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Saves the device state.
    pub fn save(&self) -> BlockState {
        BlockState {
            capacity: self.capacity,
            acked_features: self.acked_features,
            queues: self.queues.iter().map(|q| q.state()).collect(),
            activated: self.mem.is_some(),
        }
    }

    /// Restores a saved state into a device on the replica's disk image
    /// (which must have the saved capacity).
    pub fn restore(&mut self, s: &BlockState, mem: &GuestMemoryMmap) -> Result<(), String> {
        if s.capacity != self.capacity {
            return Err(format!(
                "saved capacity {} sectors, disk image has {}",
                s.capacity, self.capacity
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
        self.mem = s.activated.then(|| mem.clone());
        Ok(())
    }

    fn range_ok(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        let end = off.checked_add(len as u64)?;
        ((len as u64).is_multiple_of(SECTOR) && end <= self.capacity * SECTOR).then_some(off)
    }

    fn process(&mut self) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        for _ in 0..QUEUE_SIZE {
            let Some(chain) = self.queues[0].pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let used = match (chain.clone().reader(&mem), chain.writer(&mem)) {
                (Ok(r), Ok(w)) => self.request(r, w),
                _ => {
                    self.stats.errors += 1;
                    0
                }
            };
            if let Err(e) = self.queues[0].add_used(&mem, head, used) {
                tracing::warn!("virtio-blk: cannot complete request: {e}");
            }
        }
    }

    /// Serves one request; returns the bytes written into guest buffers.
    fn request<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        mut r: virtio_queue::Reader<'_, B>,
        mut w: virtio_queue::Writer<'_, B>,
    ) -> u32 {
        let mut hdr = [0u8; 16];
        let writable = w.available_bytes();
        if writable == 0 || r.read_exact(&mut hdr).is_err() {
            self.stats.errors += 1;
            return 0;
        }
        let Ok(mut status_w) = w.split_at(writable - 1) else {
            self.stats.errors += 1;
            return 0;
        };
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        let mut data_written = 0usize;
        let status = match ty {
            T_IN => {
                let len = w.available_bytes();
                match self.range_ok(sector, len).filter(|_| len <= MAX_REQUEST) {
                    Some(off) => {
                        let mut buf = vec![0u8; len];
                        match self
                            .file
                            .read_exact_at(&mut buf, self.base + off)
                            .and_then(|_| w.write_all(&buf))
                        {
                            Ok(()) => {
                                self.stats.reads += 1;
                                data_written = len;
                                S_OK
                            }
                            Err(_) => S_IOERR,
                        }
                    }
                    None => S_IOERR,
                }
            }
            T_OUT => {
                let len = r.available_bytes();
                match self.range_ok(sector, len).filter(|_| len <= MAX_REQUEST) {
                    Some(off) => {
                        let mut buf = vec![0u8; len];
                        match r.read_exact(&mut buf) {
                            Ok(()) => {
                                if let Some(h) = &mut self.hook {
                                    h.on_write(off, &buf);
                                }
                                match self.file.write_all_at(&buf, self.base + off) {
                                    Ok(()) => {
                                        self.stats.writes += 1;
                                        S_OK
                                    }
                                    Err(_) => S_IOERR,
                                }
                            }
                            Err(_) => S_IOERR,
                        }
                    }
                    None => S_IOERR,
                }
            }
            T_FLUSH => {
                if let Some(h) = &mut self.hook {
                    h.on_flush();
                }
                self.stats.flushes += 1;
                if self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let id = b"remus-wan-disk\0\0\0\0\0\0";
                let n = w.available_bytes().min(id.len());
                if w.write_all(&id[..n]).is_ok() {
                    data_written = n;
                    S_OK
                } else {
                    S_IOERR
                }
            }
            _ => S_UNSUPP,
        };
        if status != S_OK {
            self.stats.errors += 1;
        }
        if status_w.write_all(&[status]).is_err() {
            return data_written as u32;
        }
        (data_written + 1) as u32
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
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
        read_config_bytes(&self.capacity.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), String> {
        self.mem = Some(mem);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }
    fn notify(&mut self, index: u16) {
        if index == 0 {
            self.process();
        }
    }
    fn reset(&mut self) {
        self.mem = None;
        self.acked_features = 0;
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

    struct Recorder(Arc<Mutex<Vec<(u64, usize)>>>);
    impl WriteHook for Recorder {
        fn on_write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.len()));
        }
    }

    fn header(ty: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn setup() -> (tempfile::NamedTempFile, Block, GuestMemoryMmap) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 * SECTOR).unwrap();
        let blk = Block::open(f.path()).unwrap();
        (f, blk, memory())
    }

    #[test]
    fn write_passes_the_hook_then_reads_back() {
        let (f, mut blk, mem) = setup();
        let log = Arc::new(Mutex::new(Vec::new()));
        blk.set_write_hook(Some(Box::new(Recorder(log.clone()))));
        let mq = queue(&mem, 0);
        blk.queues_mut()[0] = device_queue(&mq);
        blk.activate(mem.clone()).unwrap();

        mem.write_slice(&header(T_OUT, 2), GuestAddress(DATA))
            .unwrap();
        mem.write_slice(&[0xab; 512], GuestAddress(DATA + 0x100))
            .unwrap();
        chain(
            &mq,
            0,
            &[
                (DATA, 16, 0),
                (DATA + 0x100, 512, 0),
                (DATA + 0x400, 1, WRITE),
            ],
        );
        blk.notify(0);
        assert_eq!(used_idx(&mq), 1);
        assert_eq!(read(&mem, DATA + 0x400, 1), [S_OK]);
        assert_eq!(*log.lock().unwrap(), vec![(1024, 512)]);
        let disk = std::fs::read(f.path()).unwrap();
        assert!(disk[1024..1536].iter().all(|&b| b == 0xab));

        mem.write_slice(&header(T_IN, 2), GuestAddress(DATA + 0x800))
            .unwrap();
        chain(
            &mq,
            3,
            &[
                (DATA + 0x800, 16, 0),
                (DATA + 0x1000, 512, WRITE),
                (DATA + 0x1400, 1, WRITE),
            ],
        );
        blk.notify(0);
        assert_eq!(used_idx(&mq), 2);
        assert_eq!(used(&mq, 1), (3, 513));
        assert_eq!(read(&mem, DATA + 0x1000, 512), vec![0xab; 512]);
        assert_eq!(blk.stats().writes, 1);
        assert_eq!(blk.stats().reads, 1);
    }

    /// A window of an image (a group member's part of the group's
    /// replica): the guest sees sectors 0.., the image takes them from the
    /// window's start, the hook sees the guest's offsets, and nothing
    /// outside the window is reachable.
    #[test]
    fn a_window_is_a_whole_disk_of_its_own() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 * SECTOR).unwrap();
        assert!(Block::open_window(f.path(), 6 * SECTOR, 4 * SECTOR).is_err());
        let mut blk = Block::open_window(f.path(), 4 * SECTOR, 4 * SECTOR).unwrap();
        assert_eq!(blk.save().capacity, 4);
        let mem = memory();
        let log = Arc::new(Mutex::new(Vec::new()));
        blk.set_write_hook(Some(Box::new(Recorder(log.clone()))));
        let mq = queue(&mem, 0);
        blk.queues_mut()[0] = device_queue(&mq);
        blk.activate(mem.clone()).unwrap();

        let write = |blk: &mut Block, sector: u64, head: u16, status: u64| {
            mem.write_slice(&header(T_OUT, sector), GuestAddress(DATA))
                .unwrap();
            mem.write_slice(&[0xcd; 512], GuestAddress(DATA + 0x100))
                .unwrap();
            chain(
                &mq,
                head,
                &[(DATA, 16, 0), (DATA + 0x100, 512, 0), (status, 1, WRITE)],
            );
            blk.notify(0);
            read(&mem, status, 1)[0]
        };
        assert_eq!(write(&mut blk, 2, 0, DATA + 0x400), S_OK);
        assert_eq!(
            write(&mut blk, 4, 3, DATA + 0x500),
            S_IOERR,
            "past the window"
        );
        assert_eq!(*log.lock().unwrap(), vec![(1024, 512)]);
        let disk = std::fs::read(f.path()).unwrap();
        let at = (6 * SECTOR) as usize;
        assert!(disk[at..at + 512].iter().all(|&b| b == 0xcd));
        assert!(disk[..at].iter().chain(&disk[at + 512..]).all(|&b| b == 0));
    }

    #[test]
    fn hostile_requests_get_errors_not_panics() {
        let (f, mut blk, mem) = setup();
        let mq = queue(&mem, 0);
        blk.queues_mut()[0] = device_queue(&mq);
        blk.activate(mem.clone()).unwrap();
        // Past the end of the disk.
        mem.write_slice(&header(T_OUT, 7), GuestAddress(DATA))
            .unwrap();
        chain(
            &mq,
            0,
            &[
                (DATA, 16, 0),
                (DATA + 0x100, 1024, 0),
                (DATA + 0x800, 1, WRITE),
            ],
        );
        // Sector number that overflows when turned into bytes.
        mem.write_slice(&header(T_IN, u64::MAX / 2), GuestAddress(DATA + 0x1000))
            .unwrap();
        chain(
            &mq,
            3,
            &[
                (DATA + 0x1000, 16, 0),
                (DATA + 0x1100, 512, WRITE),
                (DATA + 0x1400, 1, WRITE),
            ],
        );
        // Data buffer outside guest RAM.
        chain(
            &mq,
            6,
            &[(DATA, 16, 0), (1 << 40, 512, 0), (DATA + 0x1800, 1, WRITE)],
        );
        // Unknown request type.
        mem.write_slice(&header(99, 0), GuestAddress(DATA + 0x2000))
            .unwrap();
        chain(&mq, 9, &[(DATA + 0x2000, 16, 0), (DATA + 0x2400, 1, WRITE)]);
        // No status byte at all.
        chain(&mq, 11, &[(DATA, 16, 0)]);
        blk.notify(0);
        assert_eq!(used_idx(&mq), 5);
        assert_eq!(read(&mem, DATA + 0x800, 1), [S_IOERR]);
        assert_eq!(read(&mem, DATA + 0x1400, 1), [S_IOERR]);
        assert_eq!(read(&mem, DATA + 0x2400, 1), [S_UNSUPP]);
        assert_eq!(blk.stats().errors, 5);
        assert!(std::fs::read(f.path()).unwrap().iter().all(|&b| b == 0));
    }
}
