//! The primary's written-block map (in the spirit of DRBD's bitmap and
//! activity log): for each block of the disk, the last epoch that wrote it.
//! After a link outage or a standby restart, a standby that still holds a
//! consistent replica of the same lineage at committed epoch C needs only
//! the blocks whose entry is above C.
//!
//! The map is a file beside the disk image (`<disk>.blockmap`), mapped
//! shared: an entry is updated in the page cache by the write hook, which
//! runs before the guest's write reaches the image, so a block is never on
//! the disk without its entry. What survives:
//! - protect killed (any signal, panic): the page cache holds every entry
//!   written, the map is reopened as it was;
//! - the host rebooted (entries not yet written back are lost): the boot id
//!   in the header differs, the map is recreated under a new lineage, and
//!   the next sync cannot be incremental (a checksum or full one);
//! - a map that is missing, truncated or of another disk size: recreated
//!   under a new lineage, likewise.
//!
//! ```text
//! "RWBMAP01" | block_size u32 | 0 u32 | disk_bytes u64 | lineage u64 | max_epoch u64 | boot u64 | 0 u64 ×2
//! blocks × u64 last writing epoch (0: not written since the map was made)
//! ```
//! Little-endian, 64-byte header.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

/// Size of a tracked block: 64 KiB. Small enough that a scattered 1 % of
/// written 4 KiB pages costs little more than the pages themselves once
/// compressed (a partly-written block also carries its unchanged, mostly
/// compressible, rest), large enough that the map of a 500 GiB disk is 62.5
/// MiB of entries (and a hash batch of 4096 blocks covers 256 MiB).
pub const BLOCK_SIZE: u64 = 64 << 10;
const MAGIC: &[u8; 8] = b"RWBMAP01";
const HEADER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BlockMapError {
    #[error("block map {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The map of one disk.
pub struct BlockMap {
    path: PathBuf,
    map: MmapMut,
    blocks: u64,
}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMap")
            .field("path", &self.path)
            .field("blocks", &self.blocks)
            .field("lineage", &self.lineage())
            .finish()
    }
}

/// Where the map of `disk` lives.
pub fn map_path(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".blockmap");
    PathBuf::from(p)
}

/// Number of blocks of a disk of `bytes`.
pub fn blocks_of(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_SIZE)
}

impl BlockMap {
    /// Opens the map of a disk of `disk_bytes` at `path`, or makes a new one
    /// (new lineage, nothing written) when there is none usable. The bool
    /// says whether it was made anew.
    pub fn open_or_create(path: &Path, disk_bytes: u64) -> Result<(Self, bool), BlockMapError> {
        let e = |what| {
            move |source| BlockMapError::Io {
                path: path.to_owned(),
                what,
                source,
            }
        };
        let blocks = blocks_of(disk_bytes);
        let len = HEADER as u64 + blocks * 8;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(e("open"))?;
        let have = file.metadata().map_err(e("stat"))?.len();
        if have != len {
            file.set_len(0).map_err(e("truncate"))?;
            file.set_len(len).map_err(e("size"))?;
        }
        // SAFETY: the file is this process's (protect owns the disk it
        // maps the blocks of); its length is fixed while mapped.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(e("map"))?;
        let mut m = Self {
            path: path.to_owned(),
            map,
            blocks,
        };
        let valid = &m.map[..8] == MAGIC
            && m.u32_at(8) == BLOCK_SIZE as u32
            && m.u64_at(16) == disk_bytes
            && m.u64_at(24) != 0
            && m.u64_at(40) == boot();
        if valid {
            return Ok((m, false));
        }
        tracing::info!(map = %path.display(), "new written-block map (none usable): the next sync cannot be incremental");
        m.map.fill(0);
        m.map[..8].copy_from_slice(MAGIC);
        m.set_u32(8, BLOCK_SIZE as u32);
        m.set_u64(16, disk_bytes);
        m.set_u64(24, random_nonzero());
        m.set_u64(32, 0);
        m.set_u64(40, boot());
        m.map.flush().map_err(e("flush"))?;
        Ok((m, true))
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut a = [0; 4];
        a.copy_from_slice(&self.map[at..at + 4]);
        u32::from_le_bytes(a)
    }
    fn u64_at(&self, at: usize) -> u64 {
        let mut a = [0; 8];
        a.copy_from_slice(&self.map[at..at + 8]);
        u64::from_le_bytes(a)
    }
    fn set_u32(&mut self, at: usize, v: u32) {
        self.map[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u64(&mut self, at: usize, v: u64) {
        self.map[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// The map's identity: a replica built by a sync under this map carries
    /// it, and only such a replica can be resynchronised incrementally.
    pub fn lineage(&self) -> u64 {
        self.u64_at(24)
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn disk_bytes(&self) -> u64 {
        self.u64_at(16)
    }

    /// Highest epoch any write was recorded under (the next session numbers
    /// above it, so entries of an earlier process compare correctly).
    pub fn max_epoch(&self) -> u64 {
        self.u64_at(32)
    }

    /// Notes that epochs up to `epoch` exist (numbering only grows).
    pub fn note_epoch(&mut self, epoch: u64) {
        if epoch > self.max_epoch() {
            self.set_u64(32, epoch);
        }
    }

    /// The last epoch that wrote `block`.
    pub fn entry(&self, block: u64) -> u64 {
        if block >= self.blocks {
            return 0;
        }
        self.u64_at(HEADER + block as usize * 8)
    }

    /// Records a write of `len` bytes at `offset` in `epoch` (entries only
    /// grow: an entry from a previous process numbered higher stays).
    pub fn record(&mut self, offset: u64, len: usize, epoch: u64) {
        if len == 0 || self.blocks == 0 {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset.saturating_add(len as u64 - 1) / BLOCK_SIZE).min(self.blocks - 1);
        for b in first..=last {
            if self.entry(b) < epoch {
                self.set_u64(HEADER + b as usize * 8, epoch);
            }
        }
        self.note_epoch(epoch);
    }

    /// The first block at or after `from` written after epoch `since`.
    pub fn next_written_after(&self, since: u64, from: u64) -> Option<u64> {
        (from..self.blocks).find(|&b| self.entry(b) > since)
    }

    /// How many blocks were written after `since`.
    pub fn count_written_after(&self, since: u64) -> u64 {
        (0..self.blocks).filter(|&b| self.entry(b) > since).count() as u64
    }

    /// Starts writing the dirty pages back (a safe point: end of a sync).
    pub fn flush_async(&self) {
        if let Err(e) = self.map.flush_async() {
            tracing::warn!(map = %self.path.display(), error = %e, "block map write-back failed");
        }
    }
}

impl Drop for BlockMap {
    fn drop(&mut self) {
        let _ = self.map.flush();
    }
}

/// This boot of the host, as a number.
fn boot() -> u64 {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    xxhash_rust::xxh3::xxh3_64(id.trim().as_bytes())
}

/// A random non-zero u64 (0 means "no lineage").
pub fn random_nonzero() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    let mut v = u64::from_le_bytes(b);
    if n != 8 {
        // Never expected on Linux; the clock and pid still differ per map.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        v ^= xxhash_rust::xxh3::xxh3_64(
            &[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat(),
        );
    }
    v.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_a_new_size_makes_a_new_lineage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img.blockmap");
        let disk = 10 * BLOCK_SIZE + 100;
        let (mut m, fresh) = BlockMap::open_or_create(&p, disk).unwrap();
        assert!(fresh);
        assert_eq!(m.blocks(), 11);
        let lineage = m.lineage();
        assert_ne!(lineage, 0);
        m.record(BLOCK_SIZE - 1, 2, 7); // straddles blocks 0 and 1
        m.record(10 * BLOCK_SIZE, 100, 9); // the partial last block
        m.record(10 * BLOCK_SIZE + 50, 1 << 30, 3); // runs past the end: clipped, lower epoch kept out
        assert_eq!(
            (m.entry(0), m.entry(1), m.entry(2), m.entry(10)),
            (7, 7, 0, 9)
        );
        assert_eq!(m.max_epoch(), 9);
        assert_eq!(m.next_written_after(7, 0), Some(10));
        assert_eq!(m.next_written_after(0, 2), Some(10));
        assert_eq!(m.count_written_after(0), 3);
        assert_eq!(m.count_written_after(9), 0);
        drop(m);
        let (m, fresh) = BlockMap::open_or_create(&p, disk).unwrap();
        assert!(!fresh);
        assert_eq!(m.lineage(), lineage);
        assert_eq!((m.entry(1), m.entry(10), m.max_epoch()), (7, 9, 9));
        drop(m);
        let (m, fresh) = BlockMap::open_or_create(&p, disk + BLOCK_SIZE).unwrap();
        assert!(fresh);
        assert_ne!(m.lineage(), lineage);
        assert_eq!(m.count_written_after(0), 0);
    }

    #[test]
    fn a_corrupt_header_makes_a_new_map() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let (mut m, _) = BlockMap::open_or_create(&p, 4 * BLOCK_SIZE).unwrap();
        m.record(0, 1, 5);
        let lineage = m.lineage();
        drop(m);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&p, bytes).unwrap();
        let (m, fresh) = BlockMap::open_or_create(&p, 4 * BLOCK_SIZE).unwrap();
        assert!(fresh);
        assert_ne!(m.lineage(), lineage);
        assert_eq!(m.entry(0), 0);
    }
}
