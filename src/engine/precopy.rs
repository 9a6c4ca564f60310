//! Full synchronisation by iterative pre-copy, one epoch at a time: the
//! whole memory and disk while the guest runs, then rounds of what it
//! dirtied meanwhile, until a round is small (or the last round has
//! passed); then the first checkpoint. The `protect` shell takes one step
//! whenever the link has room, so a sync of many GiB over a slow link never
//! runs ahead of what the backup acknowledges, and failover verdicts,
//! commits and operator requests are handled between steps.
//!
//! The disk image is read in chunks as the steps go (never whole in
//! memory). Writes the guest makes meanwhile are captured by the write hook
//! and travel in the same pre-copy epochs, after the chunks: a chunk holds
//! every write made before it was read, and a captured write applied after
//! it leaves the newest data, whichever of the two was first.

use std::path::Path;

use wan::session::wire::DiskSyncMode;
use wan::session::EpochKind;

use super::blockmap::{BlockMap, BLOCK_SIZE};
use super::disk_image::{DiskFile, DiskImage};
use super::disksync::{hash_blocks, read_block, HashSync};

/// Largest pre-copy epoch, in pages (16 MiB). A VM that already serves
/// (resumed at takeover) releases its output between steps only, so a
/// step is kept short: its copy and encoding hold the output meanwhile.
pub const PRECOPY_PAGES: usize = 4 * 1024;
/// Disk bytes read into one pre-copy epoch at most.
pub const PRECOPY_DISK_BYTES: usize = 16 << 20;
/// Size of one disk chunk.
const DISK_CHUNK: usize = 1 << 20;
/// Rounds over the memory at most before the first checkpoint.
pub const PRECOPY_MAX_ROUNDS: usize = 5;
/// A round that found fewer dirty pages than this costs less than a
/// checkpoint's pause: stop pre-copying.
const SMALL_ROUND_PAGES: usize = 1024;
/// Pre-copy epochs sent and not yet acknowledged at most.
pub const PRECOPY_IN_FLIGHT: usize = 4;

/// Reads a disk image in chunks, front to back.
#[derive(Debug)]
pub struct DiskCursor {
    image: DiskImage,
    file: DiskFile,
    len: u64,
    offset: u64,
}

impl DiskCursor {
    pub fn open(image: &DiskImage) -> std::io::Result<Self> {
        let file = image.open()?;
        let len = file.len();
        Ok(Self {
            image: image.clone(),
            file,
            len,
            offset: 0,
        })
    }

    pub fn path(&self) -> &Path {
        self.image.path()
    }

    pub fn done(&self) -> bool {
        self.offset >= self.len
    }

    /// Bytes read so far and in all.
    pub fn progress(&self) -> (u64, u64) {
        (self.offset, self.len)
    }

    /// The next chunks, `budget` bytes at most.
    pub fn next_chunks(&mut self, budget: usize) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        while !self.done() && taken < budget {
            let n = ((self.len - self.offset) as usize).min(DISK_CHUNK);
            let mut buf = vec![0u8; n];
            self.file.read_exact_at(&mut buf, self.offset)?;
            out.push((self.offset, buf));
            self.offset += n as u64;
            taken += n;
        }
        Ok(out)
    }
}

/// Blocks written after `since` (the standby's replica epoch), read front
/// to back as the block map lists them.
#[derive(Debug)]
pub struct MapCursor {
    file: DiskFile,
    disk_bytes: u64,
    since: u64,
    next: u64,
    blocks: u64,
}

impl MapCursor {
    pub fn open(image: &DiskImage, disk_bytes: u64, since: u64) -> std::io::Result<Self> {
        Ok(Self {
            file: image.open()?,
            disk_bytes,
            since,
            next: 0,
            blocks: super::blockmap::blocks_of(disk_bytes),
        })
    }

    pub fn since(&self) -> u64 {
        self.since
    }

    /// The next blocks the map says were written after `since`, `budget`
    /// bytes at most. The map is read under the capture lock by the caller.
    pub fn next_blocks(
        &mut self,
        map: &BlockMap,
        budget: usize,
    ) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        while taken < budget {
            let Some(b) = map.next_written_after(self.since, self.next) else {
                self.next = self.blocks;
                break;
            };
            self.next = b + 1;
            let (off, data) = read_block(&self.file, self.disk_bytes, b)?;
            taken += data.len();
            out.push((off, data));
        }
        Ok(out)
    }
}

/// A checksum resync's disk side: the standby's hashes in batches, the
/// blocks that differ read from the image.
#[derive(Debug)]
pub struct ChecksumCursor {
    file: DiskFile,
    disk_bytes: u64,
    pub sync: HashSync,
    /// The full epoch that opens the sync: hash requests wait until it is
    /// committed (the standby seeds the replica as it applies it).
    pub opening_epoch: Option<u64>,
    pub same_blocks: u64,
    buf: Vec<u8>,
}

impl ChecksumCursor {
    pub fn open(image: &DiskImage, disk_bytes: u64) -> std::io::Result<Self> {
        Ok(Self {
            file: image.open()?,
            disk_bytes,
            sync: HashSync::new(super::blockmap::blocks_of(disk_bytes)),
            opening_epoch: None,
            same_blocks: 0,
            buf: Vec::new(),
        })
    }

    /// Compares the blocks whose hashes arrived; returns those that differ,
    /// `budget` bytes at most.
    pub fn next_blocks(&mut self, budget: usize) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        while taken < budget {
            let Some((b, theirs)) = self.sync.next_block() else {
                break;
            };
            let ours = hash_blocks(&self.file, self.disk_bytes, b, 1, &mut self.buf)?;
            if ours.first() == Some(&theirs) {
                self.same_blocks += 1;
                continue;
            }
            let (off, data) = read_block(&self.file, self.disk_bytes, b)?;
            taken += data.len();
            out.push((off, data));
        }
        Ok(out)
    }
}

/// Where the disk of a sync comes from.
#[derive(Debug)]
pub enum DiskSource {
    /// Not chosen yet: at the first step, once the standby said what it
    /// holds (the disk image and its size).
    Pending(DiskImage, u64),
    /// Every chunk, onto a replica disk of zeros.
    Full(DiskCursor),
    /// Blocks written after the standby's epoch, onto a copy of its replica.
    Incremental(MapCursor),
    /// Blocks whose hashes differ, onto a copy of the standby's old disk.
    Checksum(ChecksumCursor),
}

impl DiskSource {
    pub fn done(&self) -> bool {
        match self {
            Self::Pending(..) => false,
            Self::Full(c) => c.done(),
            Self::Incremental(m) => m.next >= m.blocks,
            Self::Checksum(c) => c.sync.done(),
        }
    }

    pub fn mode(&self) -> Option<DiskSyncMode> {
        match self {
            Self::Pending(..) => None,
            Self::Full(_) => Some(DiskSyncMode::Full),
            Self::Incremental(_) => Some(DiskSyncMode::Incremental),
            Self::Checksum(_) => Some(DiskSyncMode::Checksum),
        }
    }

    /// Nothing to read until the standby answers a hash request.
    pub fn waiting(&self) -> bool {
        matches!(self, Self::Checksum(c) if c.sync.waiting())
    }

    /// Disk bytes gone through (read, listed or compared) and in all.
    pub fn progress(&self) -> (u64, u64) {
        match self {
            Self::Pending(_, len) => (0, *len),
            Self::Full(c) => c.progress(),
            Self::Incremental(m) => ((m.next * BLOCK_SIZE).min(m.disk_bytes), m.disk_bytes),
            Self::Checksum(c) => (
                (c.sync.compared * BLOCK_SIZE).min(c.disk_bytes),
                c.disk_bytes,
            ),
        }
    }
}

/// Where a pre-copy stands.
#[derive(Debug)]
pub struct PreCopy {
    pub round: usize,
    pub round_pages: usize,
    pub sent_pages: u64,
    pub epochs: u64,
    pub disk: Option<DiskSource>,
    /// A memory pass found fewer pages than an epoch holds: the rest of
    /// round 0 is the disk alone.
    pub memory_caught_up: bool,
    /// Disk bytes the sync itself sent (chunks or blocks, not the writes
    /// captured meanwhile) and how many blocks.
    pub disk_sent_bytes: u64,
    pub disk_sent_blocks: u64,
    pub started: std::time::Instant,
}

/// What the shell does after a pre-copy step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Another pre-copy epoch of the same round.
    More,
    /// A round ended; the next one starts.
    RoundDone { round: usize, pages: usize },
    /// Pre-copy is over: take the first checkpoint.
    Finished { round: usize, pages: usize },
}

impl PreCopy {
    pub fn new(disk: Option<DiskSource>) -> Self {
        Self {
            round: 0,
            round_pages: 0,
            sent_pages: 0,
            epochs: 0,
            disk,
            memory_caught_up: false,
            disk_sent_bytes: 0,
            disk_sent_blocks: 0,
            started: std::time::Instant::now(),
        }
    }

    /// Whether a step now would only spin: memory is caught up and the
    /// disk waits for the standby's hashes.
    pub fn idle(&self) -> bool {
        self.epochs > 0
            && self.memory_caught_up
            && self.disk.as_ref().is_some_and(DiskSource::waiting)
    }

    /// The kind of the next epoch: the first one of a sync is full (the
    /// backup starts a new replica from it).
    pub fn kind(&self) -> EpochKind {
        if self.epochs == 0 {
            EpochKind::Full
        } else {
            EpochKind::Delta
        }
    }

    /// Whether a step that found `pages` pages and `disk_bytes` of disk
    /// data has anything to send (the first epoch always goes: it opens
    /// the new replica).
    pub fn worth_sending(&self, pages: usize, disk_bytes: usize) -> bool {
        self.epochs == 0 || pages > 0 || disk_bytes > 0
    }

    /// Records a step of `pages` pages (`sent`: whether an epoch went out).
    pub fn stepped(&mut self, pages: usize, sent: bool) -> Step {
        self.round_pages += pages;
        if pages < PRECOPY_PAGES {
            self.memory_caught_up = true;
        }
        if sent {
            self.epochs += 1;
            self.sent_pages += pages as u64;
        }
        let disk_done = self.disk.as_ref().is_none_or(DiskSource::done);
        if pages >= PRECOPY_PAGES || !disk_done {
            return Step::More;
        }
        let (round, round_pages) = (self.round, self.round_pages);
        let small = round > 0 && round_pages < SMALL_ROUND_PAGES;
        if small || round + 1 >= PRECOPY_MAX_ROUNDS {
            return Step::Finished {
                round,
                pages: round_pages,
            };
        }
        self.round += 1;
        self.round_pages = 0;
        Step::RoundDone {
            round,
            pages: round_pages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_end_when_small_or_after_the_last() {
        let mut p = PreCopy::new(None);
        assert_eq!(p.kind(), EpochKind::Full);
        // Round 0: the whole memory in two epochs.
        assert_eq!(p.stepped(PRECOPY_PAGES, true), Step::More);
        assert_eq!(p.kind(), EpochKind::Delta);
        assert_eq!(
            p.stepped(100, true),
            Step::RoundDone {
                round: 0,
                pages: PRECOPY_PAGES + 100
            }
        );
        // Round 1 is large, round 2 small: finished.
        assert_eq!(
            p.stepped(3000, true),
            Step::RoundDone {
                round: 1,
                pages: 3000
            }
        );
        assert_eq!(
            p.stepped(10, true),
            Step::Finished {
                round: 2,
                pages: 10
            }
        );
        assert_eq!(p.sent_pages, (PRECOPY_PAGES + 3110) as u64);
    }

    #[test]
    fn a_guest_that_dirties_fast_stops_after_the_last_round() {
        let mut p = PreCopy::new(None);
        let mut steps = 0;
        loop {
            steps += 1;
            match p.stepped(PRECOPY_PAGES / 2, true) {
                Step::Finished { round, .. } => {
                    assert_eq!(round, PRECOPY_MAX_ROUNDS - 1);
                    break;
                }
                _ => assert!(steps < 100),
            }
        }
    }

    #[test]
    fn the_disk_keeps_a_round_going_until_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..(3 * DISK_CHUNK + 10)).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mut cursor = DiskCursor::open(&DiskImage::file(&path)).unwrap();
        let first = cursor.next_chunks(2 * DISK_CHUNK).unwrap();
        assert_eq!(first.len(), 2);
        let mut p = PreCopy::new(Some(DiskSource::Full(cursor)));
        assert_eq!(p.stepped(10, true), Step::More);
        let Some(DiskSource::Full(c)) = p.disk.as_mut() else {
            unreachable!()
        };
        let rest = c.next_chunks(usize::MAX).unwrap();
        let mut image = Vec::new();
        for (off, chunk) in first.iter().chain(rest.iter()) {
            assert_eq!(*off as usize, image.len());
            image.extend_from_slice(chunk);
        }
        assert_eq!(image, data);
        assert!(matches!(p.stepped(10, true), Step::RoundDone { .. }));
    }
}
