//! Disk synchronisation by difference: choosing how a sync fills the new
//! replica's disk, hashing blocks (holes cost nothing), copying a seed
//! image sparsely, and the hash-batch state machine of a checksum resync.
//!
//! A checksum resync (failback: the standby holds an old copy of the disk)
//! is driven by the primary: it asks the standby for the hashes of
//! [`HASH_BATCH`] blocks at a time, at most [`HASH_BATCHES_AHEAD`] batches
//! requested or waiting, and compares them with its own blocks as pre-copy
//! steps have room; only blocks that differ travel. The standby answers one
//! request at a time from its seeded replica. Neither side holds more than
//! a few batches of hashes (8 bytes a block), whatever the disk size.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use wan::session::wire::{DiskSyncMode, ReplicaReport};

pub use super::blockmap::BLOCK_SIZE;
use super::disk_image::{DiskImage, DiskRead};

/// Blocks per hash request: 4096 × 64 KiB = 256 MiB of disk, 32 KiB of
/// hashes (the largest the frame allows).
pub const HASH_BATCH: u32 = wan::session::wire::MAX_HASH_BLOCKS;
/// Hash batches requested or received and not yet compared, at most.
pub const HASH_BATCHES_AHEAD: usize = 2;

/// How the primary fills the new replica's disk, from what the standby
/// says it holds and what the primary's block map knows.
pub fn choose_mode(
    report: Option<&ReplicaReport>,
    lineage: Option<u64>,
    disk_bytes: u64,
    force_full: bool,
) -> (DiskSyncMode, u64) {
    let Some(r) = report else {
        return (DiskSyncMode::Full, 0);
    };
    if force_full || disk_bytes == 0 {
        return (DiskSyncMode::Full, 0);
    }
    if r.consistent
        && r.disk_bytes == disk_bytes
        && r.epoch > 0
        && lineage.is_some_and(|l| l != 0 && l == r.lineage)
    {
        return (DiskSyncMode::Incremental, r.epoch);
    }
    if r.seed_bytes == disk_bytes {
        return (DiskSyncMode::Checksum, 0);
    }
    (DiskSyncMode::Full, 0)
}

/// The hash of a block of zeros of `len` bytes.
fn zero_hash(len: usize) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&vec![0u8; len])
}

/// Hashes blocks `first..first + count` of a disk image of `disk_bytes`
/// (xxh3-64 of each block's bytes; the last block may be short). Holes are
/// not read. `buf` is reused between calls (one block).
pub fn hash_blocks(
    file: &impl DiskRead,
    disk_bytes: u64,
    first: u64,
    count: u32,
    buf: &mut Vec<u8>,
) -> std::io::Result<Vec<u64>> {
    let full_zero = zero_hash(BLOCK_SIZE as usize);
    let mut out = Vec::with_capacity(count as usize);
    for b in first..first.saturating_add(u64::from(count)) {
        let off = b.saturating_mul(BLOCK_SIZE);
        if off >= disk_bytes {
            break;
        }
        let len = (disk_bytes - off).min(BLOCK_SIZE);
        if file.is_hole(off, len) {
            out.push(if len == BLOCK_SIZE {
                full_zero
            } else {
                zero_hash(len as usize)
            });
            continue;
        }
        buf.resize(len as usize, 0);
        file.read_disk(buf, off)?;
        out.push(xxhash_rust::xxh3::xxh3_64(buf));
    }
    Ok(out)
}

/// Reads block `b` of a disk of `disk_bytes` (the last one may be short).
pub fn read_block(
    file: &impl DiskRead,
    disk_bytes: u64,
    b: u64,
) -> std::io::Result<(u64, Vec<u8>)> {
    let off = b * BLOCK_SIZE;
    let len = disk_bytes.saturating_sub(off).min(BLOCK_SIZE) as usize;
    let mut buf = vec![0u8; len];
    file.read_disk(&mut buf, off)?;
    Ok((off, buf))
}

/// Copies the disk `from` (one image, or a group's images back to back)
/// into `to` (created, `len` bytes), keeping holes: a reflink where the
/// filesystem allows (one image), else only the data ranges (SEEK_DATA /
/// SEEK_HOLE) in 1 MiB pieces. Returns the bytes copied (0 for a reflink).
pub fn copy_sparse(from: &DiskImage, to: &Path, len: u64) -> std::io::Result<u64> {
    let dst = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(to)?;
    if let [one] = from.parts() {
        let src = File::open(one)?;
        // FICLONE = _IOW(0x94, 9, int)
        const FICLONE: libc::c_ulong = 0x4004_9409;
        // SAFETY: both descriptors are open files of ours; the ioctl takes
        // the source descriptor by value.
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
        if r == 0 {
            dst.set_len(len)?;
            return Ok(0);
        }
    }
    dst.set_len(len)?;
    let mut copied = 0u64;
    let mut start = 0u64;
    for part in from.parts() {
        let src = File::open(part)?;
        let n = src.metadata()?.len();
        copied += copy_data(&src, n.min(len.saturating_sub(start)), &dst, start)?;
        start += n;
    }
    Ok(copied)
}

/// Copies the data ranges of the first `src_len` bytes of `src` into
/// `dst` from byte `at_dst` on; returns the bytes copied.
fn copy_data(src: &File, src_len: u64, dst: &File, at_dst: u64) -> std::io::Result<u64> {
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    // Bounded: every turn moves `at` forward or ends.
    while at < src_len {
        // SAFETY: lseek on our descriptor.
        let data = unsafe { libc::lseek(src.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            src_len
        } else {
            (hole as u64).min(src_len)
        };
        let mut p = data;
        while p < end {
            let n = ((end - p) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], p)?;
            dst.write_all_at(&buf[..n], at_dst + p)?;
            p += n as u64;
            copied += n as u64;
        }
        at = end.max(data + 1);
    }
    Ok(copied)
}

/// A peer's hash answer that does not fit what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashSyncError {
    #[error("hashes for block {got} arrived, none were asked for")]
    Unrequested { got: u64 },
    #[error("hashes for block {got} arrived, block {expected} was asked for first")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("{got} hashes for a request of {asked} blocks from block {first}")]
    WrongCount { first: u64, asked: u32, got: usize },
}

/// The primary's side of a checksum resync (sans-IO): which hash batches
/// to ask for, and which blocks to compare next.
#[derive(Debug, Clone)]
pub struct HashSync {
    blocks: u64,
    next_request: u64,
    /// Asked for, in order, not yet answered: (first block, count).
    asked: VecDeque<(u64, u32)>,
    /// Answered, not yet compared: (first block, hashes, next index).
    ready: VecDeque<(u64, Vec<u64>, usize)>,
    pub compared: u64,
}

impl HashSync {
    pub fn new(blocks: u64) -> Self {
        Self {
            blocks,
            next_request: 0,
            asked: VecDeque::new(),
            ready: VecDeque::new(),
            compared: 0,
        }
    }

    /// The next batch to ask for, if the window has room.
    pub fn poll_request(&mut self) -> Option<(u64, u32)> {
        if self.next_request >= self.blocks
            || self.asked.len() + self.ready.len() >= HASH_BATCHES_AHEAD
        {
            return None;
        }
        let first = self.next_request;
        let count = (self.blocks - first).min(u64::from(HASH_BATCH)) as u32;
        self.next_request += u64::from(count);
        self.asked.push_back((first, count));
        Some((first, count))
    }

    /// A request could not be sent (the session is down): ask again later.
    pub fn unsent(&mut self, first: u64) {
        if self.asked.back().is_some_and(|(f, _)| *f == first) {
            self.asked.pop_back();
            self.next_request = first;
        }
    }

    /// The standby's hashes of a batch (answers come in request order).
    pub fn on_hashes(&mut self, first: u64, hashes: Vec<u64>) -> Result<(), HashSyncError> {
        let Some(&(want, count)) = self.asked.front() else {
            return Err(HashSyncError::Unrequested { got: first });
        };
        if first != want {
            return Err(HashSyncError::OutOfOrder {
                got: first,
                expected: want,
            });
        }
        if hashes.len() != count as usize {
            return Err(HashSyncError::WrongCount {
                first,
                asked: count,
                got: hashes.len(),
            });
        }
        self.asked.pop_front();
        self.ready.push_back((first, hashes, 0));
        Ok(())
    }

    /// The connection was lost: answers to outstanding requests will not
    /// come; they are asked again.
    pub fn connection_lost(&mut self) {
        if let Some(&(first, _)) = self.asked.front() {
            self.next_request = first;
        }
        self.asked.clear();
    }

    /// The next block to compare and the standby's hash of it.
    pub fn next_block(&mut self) -> Option<(u64, u64)> {
        // Bounded: each turn consumes a hash or drops an exhausted batch.
        loop {
            let (first, hashes, i) = self.ready.front_mut()?;
            if let Some(&h) = hashes.get(*i) {
                let b = *first + *i as u64;
                *i += 1;
                if *i >= hashes.len() {
                    self.ready.pop_front();
                }
                self.compared += 1;
                return Some((b, h));
            }
            self.ready.pop_front();
        }
    }

    /// Every block compared.
    pub fn done(&self) -> bool {
        self.next_request >= self.blocks
            && self.asked.is_empty()
            && self.ready.iter().all(|(_, h, i)| *i >= h.len())
    }

    /// Nothing to compare until an answer arrives.
    pub fn waiting(&self) -> bool {
        !self.done() && self.ready.iter().all(|(_, h, i)| *i >= h.len())
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn modes_follow_what_the_standby_holds() {
        let r = ReplicaReport {
            lineage: 7,
            epoch: 100,
            consistent: true,
            disk_bytes: 1 << 20,
            seed_bytes: 1 << 20,
        };
        assert_eq!(
            choose_mode(Some(&r), Some(7), 1 << 20, false),
            (DiskSyncMode::Incremental, 100)
        );
        assert_eq!(
            choose_mode(Some(&r), Some(7), 1 << 20, true).0,
            DiskSyncMode::Full
        );
        assert_eq!(
            choose_mode(Some(&r), Some(8), 1 << 20, false).0,
            DiskSyncMode::Checksum
        );
        assert_eq!(
            choose_mode(Some(&r), None, 1 << 20, false).0,
            DiskSyncMode::Checksum
        );
        let diverged = ReplicaReport {
            consistent: false,
            ..r
        };
        assert_eq!(
            choose_mode(Some(&diverged), Some(7), 1 << 20, false).0,
            DiskSyncMode::Checksum
        );
        let no_seed = ReplicaReport {
            consistent: false,
            seed_bytes: 0,
            ..r
        };
        assert_eq!(
            choose_mode(Some(&no_seed), Some(7), 1 << 20, false).0,
            DiskSyncMode::Full
        );
        assert_eq!(
            choose_mode(None, Some(7), 1 << 20, false).0,
            DiskSyncMode::Full
        );
        assert_eq!(
            choose_mode(Some(&r), Some(7), 2 << 20, false).0,
            DiskSyncMode::Full
        );
    }

    #[test]
    fn hash_batches_are_asked_a_few_at_a_time_and_checked() {
        let blocks = u64::from(HASH_BATCH) * 2 + 5;
        let mut s = HashSync::new(blocks);
        assert!(s.waiting());
        assert_eq!(s.poll_request(), Some((0, HASH_BATCH)));
        assert_eq!(s.poll_request(), Some((u64::from(HASH_BATCH), HASH_BATCH)));
        assert_eq!(s.poll_request(), None, "window full");
        assert_eq!(
            s.on_hashes(u64::from(HASH_BATCH), vec![0; HASH_BATCH as usize]),
            Err(HashSyncError::OutOfOrder {
                got: u64::from(HASH_BATCH),
                expected: 0
            })
        );
        assert!(matches!(
            s.on_hashes(0, vec![1; 3]),
            Err(HashSyncError::WrongCount { .. })
        ));
        s.on_hashes(0, (0..u64::from(HASH_BATCH)).collect())
            .unwrap();
        assert!(!s.waiting());
        assert_eq!(s.next_block(), Some((0, 0)));
        assert_eq!(s.next_block(), Some((1, 1)));
        // The link drops: the second request is asked again.
        s.connection_lost();
        assert_eq!(s.poll_request(), Some((u64::from(HASH_BATCH), HASH_BATCH)));
        assert_eq!(s.poll_request(), None, "one batch ready, one asked: full");
        while s.next_block().is_some() {}
        s.on_hashes(u64::from(HASH_BATCH), vec![0; HASH_BATCH as usize])
            .unwrap();
        assert_eq!(s.poll_request(), Some((2 * u64::from(HASH_BATCH), 5)));
        assert_eq!(s.poll_request(), None);
        s.on_hashes(2 * u64::from(HASH_BATCH), vec![0; 5]).unwrap();
        while s.next_block().is_some() {}
        assert!(s.done());
        assert_eq!(s.compared, blocks);
        assert_eq!(
            s.on_hashes(0, vec![]),
            Err(HashSyncError::Unrequested { got: 0 })
        );
    }

    proptest! {
        /// Whatever the peer answers, in whatever order, the state machine
        /// neither panics nor compares a block twice, nor holds more than
        /// the window; honest answers compare every block exactly once.
        #[test]
        fn any_answers_are_safe(blocks in 0u64..20_000, script in proptest::collection::vec((any::<u8>(), any::<u64>(), 0usize..5000), 0..60)) {
            let mut s = HashSync::new(blocks);
            let mut seen = std::collections::HashSet::new();
            for (op, first, n) in script {
                match op % 4 {
                    0 => { s.poll_request(); }
                    1 => { let _ = s.on_hashes(first % (blocks + 1), vec![0; n]); }
                    2 => if let Some((b, _)) = s.next_block() { prop_assert!(seen.insert(b)); prop_assert!(b < blocks); },
                    _ => s.connection_lost(),
                }
                prop_assert!(s.asked.len() + s.ready.len() <= HASH_BATCHES_AHEAD + 1);
            }
            let mut s = HashSync::new(blocks);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..(blocks / u64::from(HASH_BATCH) + 2) * 3 {
                while let Some((f, c)) = s.poll_request() {
                    s.on_hashes(f, vec![0; c as usize]).unwrap();
                }
                while let Some((b, _)) = s.next_block() { prop_assert!(seen.insert(b)); }
            }
            prop_assert!(s.done());
            prop_assert_eq!(seen.len() as u64, blocks);
        }
    }

    #[test]
    fn sparse_copy_and_hashes_see_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let len = 5 * BLOCK_SIZE + 1000;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&a)
            .unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&[7u8; 3000], 2 * BLOCK_SIZE + 10).unwrap();
        f.write_all_at(&[9u8; 10], len - 10).unwrap();
        copy_sparse(&DiskImage::file(&a), &b, len).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let g = File::open(&b).unwrap();
        let mut buf = Vec::new();
        let ha = hash_blocks(&f, len, 0, 100, &mut buf).unwrap();
        let hb = hash_blocks(&g, len, 0, 100, &mut buf).unwrap();
        assert_eq!(ha.len(), 6);
        assert_eq!(ha, hb);
        let data = std::fs::read(&a).unwrap();
        for (i, h) in ha.iter().enumerate() {
            let s = i * BLOCK_SIZE as usize;
            let e = (s + BLOCK_SIZE as usize).min(data.len());
            assert_eq!(*h, xxhash_rust::xxh3::xxh3_64(&data[s..e]), "block {i}");
        }
    }

    /// A group's disk seeds a replica as one: each member's data lands at
    /// the member's place, holes stay holes, a short disk is cut at `len`.
    #[test]
    fn a_groups_images_seed_one_disk_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let image = |name: &str, len: u64, data: &[(u64, u8)]| {
            let p = dir.path().join(name);
            let f = File::create(&p).unwrap();
            f.set_len(len).unwrap();
            for &(at, b) in data {
                f.write_all_at(&[b; 4096], at).unwrap();
            }
            p
        };
        let a = image("a", 3 * BLOCK_SIZE, &[(10, 1), (2 * BLOCK_SIZE, 2)]);
        let b = image("b", 2 * BLOCK_SIZE, &[(0, 3), (BLOCK_SIZE + 5, 4)]);
        let to = dir.path().join("disk.img");
        let len = 5 * BLOCK_SIZE;
        let copied = copy_sparse(
            &DiskImage::members("g", vec![a.clone(), b.clone()]),
            &to,
            len,
        )
        .unwrap();
        let mut want = std::fs::read(&a).unwrap();
        want.extend(std::fs::read(&b).unwrap());
        assert_eq!(std::fs::read(&to).unwrap(), want);
        assert!(copied < len, "holes are not copied ({copied} bytes)");
        // A replica shorter than the images takes what fits.
        copy_sparse(&DiskImage::members("g", vec![a, b]), &to, 4 * BLOCK_SIZE).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), want[..4 * BLOCK_SIZE as usize]);
    }
}
