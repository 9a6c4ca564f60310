//! The standby's replica of one VM on disk: guest memory image, disk image,
//! device/vCPU state, and the number of the last committed epoch.
//!
//! An epoch reaches the replica in three steps: its decoded pages, disk
//! writes and state are written to a journal; the journal is renamed into
//! place (the commit point); the journal is applied to the images and
//! removed. A standby killed at any moment reopens to exactly the last
//! committed epoch: before the rename, the epoch never happened; after it,
//! the journal is replayed (applying it twice writes the same bytes).
//!
//! Writes are not fsynced per epoch: that would cost milliseconds per
//! epoch for a case (the standby host losing power) where the replica is
//! not needed — the primary still runs. Instead the host's boot id is
//! recorded, and a replica that has seen a reboot asks for a full resync.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use serde::{Deserialize, Serialize};
use wan::codec::{CodecError, PageSink, PageSource, StagedEpoch};

use super::journal::{io, Journal, JournalError, JournalWriter};

const MEMORY: &str = "memory.img";
const DISK: &str = "disk.img";
const STATE: &str = "state.bin";
const META: &str = "meta.json";
const JOURNAL: &str = "journal";
const JOURNAL_TMP: &str = "journal.tmp";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("replica in {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("replica in {dir} cannot be trusted ({reason}): a full resync is needed")]
    NeedsResync { dir: PathBuf, reason: String },
    #[error("epoch refused, replica unchanged: {0}")]
    Codec(#[from] CodecError),
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("disk write at {offset} + {len} lies beyond the replica disk of {size} bytes")]
    DiskWriteOutOfRange { offset: u64, len: usize, size: u64 },
}

/// What is known about the replica, kept in `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub vm: String,
    pub page_size: usize,
    pub frames: u64,
    pub disk_bytes: u64,
    /// Last committed epoch; `None` before the first.
    pub epoch: Option<u64>,
    /// Fencing token the last epoch carried.
    pub token: u64,
    /// True once the replica is a VM that can be resumed (the initial
    /// synchronisation is over); pre-copy rounds leave it false.
    pub consistent: bool,
    /// The host boot the files were written under.
    pub boot_id: String,
    /// Lineage of the primary's written-block map the replica was
    /// synchronised under (0: unknown). Only a consistent replica of the
    /// primary's lineage can be resynchronised by the blocks written since.
    #[serde(default)]
    pub lineage: u64,
}

pub struct ReplicaStore {
    dir: PathBuf,
    meta: Meta,
    memory: MmapMut,
    disk: Option<File>,
    /// An epoch passed its commit point but could not be applied whole
    /// (an I/O error mid-apply, e.g. a full disk): memory and disk may hold
    /// part of it, so the replica is no committed epoch until the journal,
    /// still on disk, has been replayed whole.
    half_applied: Option<HalfApplied>,
    /// Test seam: the next apply fails after the pages, before the disk.
    fail_next_apply: bool,
}

#[derive(Debug, Clone)]
struct HalfApplied {
    /// Whether the epoch, once applied, makes the replica resumable.
    consistent: bool,
    reason: String,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore")
            .field("dir", &self.dir)
            .field("meta", &self.meta)
            .finish()
    }
}

impl ReplicaStore {
    /// Creates an empty (all-zero) replica, replacing whatever was there.
    pub fn create(
        dir: &Path,
        vm: &str,
        page_size: usize,
        frames: u64,
        disk_bytes: u64,
    ) -> Result<Self, StoreError> {
        let e = |what| {
            move |source| StoreError::Io {
                dir: dir.to_owned(),
                what,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(e("create directory"))?;
        for stale in [JOURNAL, JOURNAL_TMP, STATE] {
            match fs::remove_file(dir.join(stale)) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e("remove old file")(err))
                }
                _ => {}
            }
        }
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(MEMORY))
            .map_err(e("create memory image"))?;
        mem.set_len(frames * page_size as u64)
            .map_err(e("size memory image"))?;
        let disk = if disk_bytes > 0 {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(DISK))
                .map_err(e("create disk image"))?;
            f.set_len(disk_bytes).map_err(e("size disk image"))?;
            Some(f)
        } else {
            None
        };
        // SAFETY: the file is ours (created above) and only this process
        // maps it; its length is fixed for the mapping's lifetime.
        let memory = unsafe { MmapMut::map_mut(&mem) }.map_err(e("map memory image"))?;
        let meta = Meta {
            vm: vm.to_owned(),
            page_size,
            frames,
            disk_bytes,
            epoch: None,
            token: 0,
            consistent: false,
            boot_id: boot_id(),
            lineage: 0,
        };
        let mut s = Self {
            dir: dir.to_owned(),
            meta,
            memory,
            disk,
            half_applied: None,
            fail_next_apply: false,
        };
        s.write_meta()?;
        Ok(s)
    }

    /// Opens an existing replica and recovers it to its last committed
    /// epoch (replaying a committed journal if the standby died mid-apply).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let e = |what| {
            move |source| StoreError::Io {
                dir: dir.to_owned(),
                what,
                source,
            }
        };
        let resync = |reason: String| StoreError::NeedsResync {
            dir: dir.to_owned(),
            reason,
        };
        let text = fs::read_to_string(dir.join(META)).map_err(e("read meta.json"))?;
        let meta: Meta =
            serde_json::from_str(&text).map_err(|err| resync(format!("meta.json: {err}")))?;
        if meta.boot_id != boot_id() {
            return Err(resync(
                "the host rebooted since it was written (writes are not fsynced)".into(),
            ));
        }
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(MEMORY))
            .map_err(e("open memory image"))?;
        let want = meta.frames * meta.page_size as u64;
        let have = mem.metadata().map_err(e("stat memory image"))?.len();
        if have != want {
            return Err(resync(format!(
                "memory image is {have} bytes, expected {want}"
            )));
        }
        let disk = if meta.disk_bytes > 0 {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join(DISK))
                    .map_err(e("open disk image"))?,
            )
        } else {
            None
        };
        // SAFETY: as in `create`.
        let memory = unsafe { MmapMut::map_mut(&mem) }.map_err(e("map memory image"))?;
        let mut s = Self {
            dir: dir.to_owned(),
            meta,
            memory,
            disk,
            half_applied: None,
            fail_next_apply: false,
        };
        // An uncommitted journal is an epoch that never happened.
        let _ = fs::remove_file(dir.join(JOURNAL_TMP));
        match fs::read(dir.join(JOURNAL)) {
            Ok(bytes) => {
                let j = Journal::parse(&bytes)
                    .map_err(|err| resync(format!("committed journal unreadable: {err}")))?;
                tracing::warn!(vm = %s.meta.vm, epoch = j.epoch, "replaying the journal of an epoch interrupted mid-apply");
                s.replay(&j)?;
                fs::remove_file(dir.join(JOURNAL)).map_err(e("remove journal"))?;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(e("read journal")(err)),
        }
        Ok(s)
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest memory image as of the last committed epoch.
    pub fn memory(&self) -> &[u8] {
        &self.memory
    }

    /// The device/vCPU state of the last committed epoch.
    pub fn state(&self) -> Result<Vec<u8>, StoreError> {
        match fs::read(self.dir.join(STATE)) {
            Ok(b) => Ok(b),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(StoreError::Io {
                dir: self.dir.clone(),
                what: "read state",
                source,
            }),
        }
    }

    /// Reads from the replica disk image.
    pub fn read_disk(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let Some(d) = &self.disk else {
            return Err(StoreError::DiskWriteOutOfRange {
                offset,
                len: buf.len(),
                size: 0,
            });
        };
        d.read_exact_at(buf, offset)
            .map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                what: "read disk image",
                source,
            })
    }

    /// Commits a verified epoch: journal, commit point, apply. On error
    /// nothing of the epoch is visible and the replica keeps its last
    /// committed epoch. Returns the committed epoch number (to acknowledge).
    pub fn commit(
        &mut self,
        staged: StagedEpoch,
        token: u64,
        consistent: bool,
    ) -> Result<u64, StoreError> {
        if self.half_applied.is_some() {
            self.finish_half_applied()?;
        }
        let mut sink = JournalSink {
            store: self,
            writer: None,
            epoch: None,
            token,
        };
        let applied = staged.apply(&mut sink)?;
        let writer = sink
            .writer
            .take()
            .unwrap_or_else(|| JournalWriter::new(applied.epoch, token, self.meta.page_size));
        for w in &applied.disk_writes {
            let end = w.offset.checked_add(w.data.len() as u64);
            if end.is_none_or(|end| end > self.meta.disk_bytes) {
                return Err(StoreError::DiskWriteOutOfRange {
                    offset: w.offset,
                    len: w.data.len(),
                    size: self.meta.disk_bytes,
                });
            }
        }
        let disk: Vec<(u64, &[u8])> = applied
            .disk_writes
            .iter()
            .map(|w| (w.offset, &w.data[..]))
            .collect();
        let bytes = writer.finish(&disk, &applied.state_blob);
        let tmp = self.dir.join(JOURNAL_TMP);
        let fin = self.dir.join(JOURNAL);
        fs::write(&tmp, &bytes).map_err(|err| io(&tmp, err))?;
        crate::faults::point("standby.journaled");
        fs::rename(&tmp, &fin).map_err(|err| io(&fin, err))?;
        // Committed. From here a crash replays the journal on open().
        let journal = Journal::parse(&bytes)?;
        self.meta.consistent = consistent;
        if let Err(e) = self.replay(&journal) {
            // Part of the epoch may be in memory or on disk: this replica
            // is no committed epoch now, and must not be resumed. The
            // journal stays; the next commit (or open) replays it whole.
            tracing::error!(vm = %self.meta.vm, epoch = journal.epoch, error = %e, "epoch committed but not applied whole: the replica is unusable until its journal is replayed");
            self.half_applied = Some(HalfApplied {
                consistent,
                reason: e.to_string(),
            });
            // In memory only: after a crash, open() replays the journal
            // and the replica is that epoch, as meta.json still says.
            self.meta.consistent = false;
            return Err(e);
        }
        fs::remove_file(&fin).map_err(|err| io(&fin, err))?;
        Ok(applied.epoch)
    }

    /// Replays the journal of a half-applied epoch; the replica is that
    /// epoch again, or still unusable (a full resync is needed). Call it
    /// before decoding the next epoch against this replica.
    pub fn finish_half_applied(&mut self) -> Result<(), StoreError> {
        let Some(h) = self.half_applied.clone() else {
            return Ok(());
        };
        let fin = self.dir.join(JOURNAL);
        let dir = self.dir.clone();
        let unusable = |reason: String| StoreError::NeedsResync {
            dir: dir.clone(),
            reason,
        };
        let bytes = fs::read(&fin).map_err(|err| {
            unusable(format!(
                "half-applied epoch ({}), its journal unreadable: {err}",
                h.reason
            ))
        })?;
        let journal = Journal::parse(&bytes)
            .map_err(|err| unusable(format!("half-applied epoch, journal: {err}")))?;
        self.meta.consistent = h.consistent;
        if let Err(e) = self.replay(&journal) {
            self.meta.consistent = false;
            let _ = self.write_meta();
            return Err(unusable(format!(
                "half-applied epoch still cannot be applied: {e}"
            )));
        }
        fs::remove_file(&fin).map_err(|err| io(&fin, err))?;
        self.half_applied = None;
        tracing::info!(vm = %self.meta.vm, epoch = journal.epoch, "half-applied epoch replayed whole");
        Ok(())
    }

    /// Whether an epoch is half applied (the replica cannot be resumed).
    pub fn is_half_applied(&self) -> bool {
        self.half_applied.is_some()
    }

    /// Test seam: makes the next apply fail after its pages were written
    /// and before its disk writes (as a full disk would).
    #[doc(hidden)]
    pub fn fail_next_apply_for_test(&mut self) {
        self.fail_next_apply = true;
    }

    fn replay(&mut self, j: &Journal<'_>) -> Result<(), StoreError> {
        let ps = self.meta.page_size;
        if j.page_size != ps {
            return Err(StoreError::NeedsResync {
                dir: self.dir.clone(),
                reason: format!("journal page size {} != replica {}", j.page_size, ps),
            });
        }
        for (frame, data) in &j.pages {
            let Some(at) = frame_offset(*frame, ps, self.meta.frames) else {
                return Err(StoreError::NeedsResync {
                    dir: self.dir.clone(),
                    reason: format!("journal frame {frame} beyond memory"),
                });
            };
            let dst = &mut self.memory[at..at + ps];
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
        if std::mem::take(&mut self.fail_next_apply) {
            return Err(StoreError::Io {
                dir: self.dir.clone(),
                what: "write disk image",
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        if let Some(disk) = &self.disk {
            for (off, data) in &j.disk_writes {
                disk.write_all_at(data, *off)
                    .map_err(|source| StoreError::Io {
                        dir: self.dir.clone(),
                        what: "write disk image",
                        source,
                    })?;
            }
        }
        let tmp = self.dir.join("state.tmp");
        fs::write(&tmp, j.state).map_err(|err| io(&tmp, err))?;
        fs::rename(&tmp, self.dir.join(STATE)).map_err(|err| io(&tmp, err))?;
        self.meta.epoch = Some(j.epoch);
        self.meta.token = j.token;
        self.write_meta()
    }

    /// The disk image's path (whether or not the replica has a disk).
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The open disk image, if the replica has one.
    pub fn disk_file(&self) -> Option<&File> {
        self.disk.as_ref()
    }

    /// Fills the (new) replica's disk from `from`, a disk of the same size
    /// (one image, or a group's images back to back): sparse-aware, a
    /// reflink where the filesystem allows. Returns the bytes copied.
    pub fn seed_disk(
        &mut self,
        from: &crate::engine::disk_image::DiskImage,
    ) -> Result<u64, StoreError> {
        let e = |what| {
            let dir = self.dir.clone();
            move |source| StoreError::Io { dir, what, source }
        };
        let to = self.dir.join(DISK);
        self.disk = None;
        let copied = crate::engine::disksync::copy_sparse(from, &to, self.meta.disk_bytes)
            .map_err(e("seed disk image"))?;
        self.disk = Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&to)
                .map_err(e("open disk image"))?,
        );
        Ok(copied)
    }

    /// Records the lineage the replica is synchronised under.
    pub fn set_lineage(&mut self, lineage: u64) -> Result<(), StoreError> {
        self.meta.lineage = lineage;
        self.write_meta()
    }

    /// Marks the replica resumable (end of the initial synchronisation).
    pub fn set_consistent(&mut self) -> Result<(), StoreError> {
        self.meta.consistent = true;
        self.write_meta()
    }

    /// The VM now runs from this replica (its disk image is the running
    /// VM's disk): it no longer is the state of any committed epoch. A
    /// standby started later on this folder must not offer it for a
    /// takeover, nor build deltas on it: it needs a full resync.
    pub fn mark_diverged(&mut self) -> Result<(), StoreError> {
        self.meta.consistent = false;
        self.write_meta()
    }

    fn write_meta(&mut self) -> Result<(), StoreError> {
        let e = |what| {
            let dir = self.dir.clone();
            move |source| StoreError::Io { dir, what, source }
        };
        let text = serde_json::to_string_pretty(&self.meta)
            .map_err(|err| e("encode meta.json")(std::io::Error::other(err.to_string())))?;
        let tmp = self.dir.join("meta.tmp");
        fs::write(&tmp, text).map_err(e("write meta.json"))?;
        fs::rename(&tmp, self.dir.join(META)).map_err(e("rename meta.json"))
    }
}

fn frame_offset(frame: u64, page_size: usize, frames: u64) -> Option<usize> {
    (frame < frames).then(|| frame as usize * page_size)
}

/// The current boot of this host (Linux); a constant elsewhere.
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

impl PageSource for ReplicaStore {
    fn page_size(&self) -> usize {
        self.meta.page_size
    }
    fn frame_count(&self) -> u64 {
        self.meta.frames
    }
    fn committed_epoch(&self) -> Option<u64> {
        self.meta.epoch
    }
    fn page(&self, frame: u64) -> &[u8] {
        let ps = self.meta.page_size;
        // The decoder only asks for frames below frame_count().
        let at = frame_offset(frame, ps, self.meta.frames).unwrap_or(0);
        &self.memory[at..at + ps]
    }
}

/// Receives the pages of an epoch from `StagedEpoch::apply` and writes them
/// into the journal instead of the replica.
struct JournalSink<'a> {
    store: &'a ReplicaStore,
    writer: Option<JournalWriter>,
    epoch: Option<u64>,
    token: u64,
}

impl JournalSink<'_> {
    fn writer(&mut self) -> &mut JournalWriter {
        let ps = self.store.meta.page_size;
        let token = self.token;
        // The epoch number is patched in set_committed_epoch; 0 until then.
        self.writer
            .get_or_insert_with(|| JournalWriter::new(0, token, ps))
    }
}

impl PageSource for JournalSink<'_> {
    fn page_size(&self) -> usize {
        self.store.page_size()
    }
    fn frame_count(&self) -> u64 {
        self.store.frame_count()
    }
    fn committed_epoch(&self) -> Option<u64> {
        self.store.committed_epoch()
    }
    fn page(&self, frame: u64) -> &[u8] {
        self.store.page(frame)
    }
}

impl PageSink for JournalSink<'_> {
    fn page_mut(&mut self, frame: u64) -> &mut [u8] {
        let store = self.store;
        self.writer().page_from(frame, store.page(frame))
    }
    fn write_page(&mut self, frame: u64, data: &[u8]) {
        self.writer().page(frame, data);
    }
    fn zero_page(&mut self, frame: u64) {
        self.writer().zero_page(frame);
    }
    fn set_committed_epoch(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
        self.writer().set_epoch(epoch);
    }
}
