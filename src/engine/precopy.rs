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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use wan::session::EpochKind;

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
    path: PathBuf,
    file: File,
    len: u64,
    offset: u64,
}

impl DiskCursor {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            len,
            offset: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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

/// Where a pre-copy stands.
#[derive(Debug)]
pub struct PreCopy {
    pub round: usize,
    pub round_pages: usize,
    pub sent_pages: u64,
    pub epochs: u64,
    pub disk: Option<DiskCursor>,
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
    pub fn new(disk: Option<DiskCursor>) -> Self {
        Self {
            round: 0,
            round_pages: 0,
            sent_pages: 0,
            epochs: 0,
            disk,
        }
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
        if sent {
            self.epochs += 1;
            self.sent_pages += pages as u64;
        }
        let disk_done = self.disk.as_ref().is_none_or(DiskCursor::done);
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
        let mut cursor = DiskCursor::open(&path).unwrap();
        let first = cursor.next_chunks(2 * DISK_CHUNK).unwrap();
        assert_eq!(first.len(), 2);
        let mut p = PreCopy::new(Some(cursor));
        assert_eq!(p.stepped(10, true), Step::More);
        let rest = p.disk.as_mut().unwrap().next_chunks(usize::MAX).unwrap();
        let mut image = Vec::new();
        for (off, chunk) in first.iter().chain(rest.iter()) {
            assert_eq!(*off as usize, image.len());
            image.extend_from_slice(chunk);
        }
        assert_eq!(image, data);
        assert!(matches!(p.stepped(10, true), Step::RoundDone { .. }));
    }
}
