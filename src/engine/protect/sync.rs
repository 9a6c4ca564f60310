//! The driver's side of a full synchronisation: pre-copy epochs of
//! memory and disk while the guest runs, the disk's sync mode, the hash
//! exchange of a checksum resync. The core decides when a sync starts and
//! when a step is due; this reads, encodes and sends.

use hypervisor::ProtectedGuest;
use tracing::info;
use wan::session::wire::{DiskReport, DiskSync, DiskSyncMode, SyncBegin};

use super::{Phase, ProtectError, Protector};
use crate::engine::blockmap::BLOCK_SIZE;
use crate::engine::disksync::choose_mode;
use crate::engine::precopy::{
    ChecksumCursor, DiskCursor, DiskSource, MapCursor, PreCopy, Step, PRECOPY_DISK_BYTES,
    PRECOPY_PAGES,
};

impl<G: ProtectedGuest> Protector<G> {
    /// Keeps (or drops, and stops keeping) the guest's captured disk
    /// writes; see [`EpochIo::buffering`].
    pub(super) fn buffer_captured_writes(&self, on: bool) {
        if let Ok(mut io) = self.capture.io.lock() {
            io.buffering = on;
            if !on {
                io.disk = Vec::new();
            }
        }
    }

    /// The input/output of a full synchronisation's start (the core
    /// decided it and reset the release rule): the backup builds a new
    /// replica from nothing, beside the one it has until this one is
    /// consistent.
    pub(super) fn begin_sync(&mut self, why: &str) -> Result<(), ProtectError> {
        // From here writes travel again: after the sync's disk reads.
        self.buffer_captured_writes(true);
        if let Some(v) = &mut self.verify {
            // Hashes in flight are answered against a replica being
            // rebuilt: they are asked again once it is consistent.
            v.lost_all();
        }
        self.encoder.reset();
        self.guest.restart_sync();
        // Follow the session's numbering (it may have moved past ours).
        self.next_epoch = self.next_epoch.max(self.sender.status().next_epoch);
        let disk = match &self.opts.disk {
            Some(image) => {
                let len = image.bytes().map_err(|source| ProtectError::Disk {
                    path: image.path().to_owned(),
                    source,
                })?;
                Some(DiskSource::Pending(image.clone(), len))
            }
            None => None,
        };
        info!(vm = %self.opts.vm, pages = self.guest.frame_count(), disk_bytes = disk.as_ref().map(|d| d.progress().1), why, "full synchronisation: pre-copy while the guest runs");
        self.sync = Some(Box::new(PreCopy::new(disk)));
        Ok(())
    }

    /// Chooses how the sync fills the replica's disk, now that the standby
    /// said what it holds; returns the DISK_SYNC frame that goes before
    /// the sync's first (full) epoch.
    pub(super) fn resolve_disk_source(
        &mut self,
        epoch: u64,
    ) -> Result<Option<DiskSync>, ProtectError> {
        let Some(pc) = running(&mut self.sync, self.core.phase()) else {
            return Ok(None);
        };
        let Some(DiskSource::Pending(image, len)) = &pc.disk else {
            return Ok(None);
        };
        let (image, len) = (image.clone(), *len);
        let report = self.sender.status().peer_report;
        let lineage = self
            .capture
            .io
            .lock()
            .ok()
            .and_then(|io| io.map.as_ref().map(|m| m.lineage()));
        let (mode, base) = choose_mode(report.as_ref(), lineage, len, self.force_full);
        let err = |source| ProtectError::Disk {
            path: image.path().to_owned(),
            source,
        };
        let source = match mode {
            DiskSyncMode::Full => DiskSource::Full(DiskCursor::open(&image).map_err(err)?),
            DiskSyncMode::Incremental => {
                DiskSource::Incremental(MapCursor::open(&image, len, base).map_err(err)?)
            }
            DiskSyncMode::Checksum => {
                let mut c = ChecksumCursor::open(&image, len).map_err(err)?;
                c.opening_epoch = Some(epoch);
                DiskSource::Checksum(c)
            }
        };
        let written = match (mode, self.capture.io.lock()) {
            (DiskSyncMode::Incremental, Ok(io)) => {
                io.map.as_ref().map(|m| m.count_written_after(base))
            }
            _ => None,
        };
        info!(vm = %self.opts.vm, mode = mode.name(), base, blocks_written_since = written, standby = ?report, "disk synchronisation mode");
        pc.disk = Some(source);
        self.progress.start(len, mode.name());
        Ok(Some(DiskSync::Begin(SyncBegin {
            epoch,
            lineage: lineage.unwrap_or(0),
            mode,
            base,
            block_size: BLOCK_SIZE as u32,
            disk_bytes: len,
        })))
    }

    /// Asks the standby for the next hash batches of a checksum resync,
    /// once the sync's opening epoch is committed (it seeds the replica).
    pub(super) async fn pump_hash_requests(&mut self) -> Result<(), ProtectError> {
        let committed = self.sender.status().committed;
        let Some(c) = running_checksum(&mut self.sync, self.core.phase()) else {
            return Ok(());
        };
        if c.opening_epoch.is_none_or(|e| committed < e) {
            return Ok(());
        }
        // Bounded by the window of HASH_BATCHES_AHEAD batches.
        while let Some((first_block, count)) = c.sync.poll_request() {
            let sent = self
                .sender
                .send_disk_sync(DiskSync::HashRequest { first_block, count })
                .await
                .map_err(|e| ProtectError::SessionEnded(e.to_string()))?;
            if !sent {
                c.sync.unsent(first_block);
                break;
            }
        }
        Ok(())
    }

    /// The standby's answer to a hash request.
    pub(super) fn on_disk_report(&mut self, r: DiskReport) -> Result<(), ProtectError> {
        let Some(c) = running_checksum(&mut self.sync, self.core.phase()) else {
            return Ok(());
        };
        match r {
            DiskReport::Hashes {
                first_block,
                hashes,
            } => c
                .sync
                .on_hashes(first_block, hashes)
                .map_err(|e| ProtectError::Session(format!("checksum resync: {e}"))),
            DiskReport::NoSeed { first_block } => {
                self.force_full = true;
                Err(ProtectError::Session(format!(
                    "checksum resync: the standby has no seeded replica to hash (block {first_block}); a full one follows"
                )))
            }
            DiskReport::Replica(_) => Ok(()),
        }
    }

    /// One pre-copy epoch: pages dirtied (all of them at first), a share of
    /// the disk and the writes captured meanwhile; at the end of the last
    /// round, the first checkpoint.
    pub(super) async fn precopy_step(&mut self) -> Result<(), ProtectError> {
        let Some(pc) = running(&mut self.sync, self.core.phase()) else {
            return Ok(());
        };
        let prelude = if pc.epochs == 0 {
            let epoch = self.next_epoch;
            self.resolve_disk_source(epoch)?
        } else {
            None
        };
        let Some(pc) = running(&mut self.sync, self.core.phase()) else {
            return Ok(());
        };
        let read = match &mut pc.disk {
            None | Some(DiskSource::Pending(..)) => Ok(Vec::new()),
            Some(DiskSource::Full(d)) => d.next_chunks(PRECOPY_DISK_BYTES),
            Some(DiskSource::Incremental(m)) => match self.capture.io.lock() {
                Ok(io) => match &io.map {
                    Some(map) => m.next_blocks(map, PRECOPY_DISK_BYTES),
                    None => Ok(Vec::new()),
                },
                Err(_) => Ok(Vec::new()),
            },
            Some(DiskSource::Checksum(c)) => c.next_blocks(PRECOPY_DISK_BYTES),
        };
        let mut disk = read.map_err(|source| ProtectError::Disk {
            path: self
                .opts
                .disk
                .as_ref()
                .map(|d| d.path().to_owned())
                .unwrap_or_default(),
            source,
        })?;
        pc.disk_sent_bytes += disk.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        pc.disk_sent_blocks += disk.len() as u64;
        if let Some(d) = &pc.disk {
            let (done, total) = d.progress();
            self.progress.update(done, total, pc.disk_sent_bytes);
            if let Ok(mut st) = self.stats.lock() {
                st.sync_progress = Some((done, total));
            }
        }
        let mut cp = std::mem::take(&mut self.staging);
        tokio::task::block_in_place(|| self.guest.precopy_round(PRECOPY_PAGES, &mut cp))?;
        // Captured writes after the chunks (see precopy.rs).
        if let Ok(mut io) = self.capture.io.lock() {
            disk.append(&mut io.drain_disk(self.next_epoch));
        }
        let n = cp.frames.len();
        let disk_bytes: usize = disk.iter().map(|(_, d)| d.len()).sum();
        let Some(pc) = running(&mut self.sync, self.core.phase()) else {
            return Ok(());
        };
        let send = pc.worth_sending(n, disk_bytes);
        let kind = pc.kind();
        if send {
            let pages: Vec<(u64, &[u8])> = cp.page_slices(self.guest.page_size()).collect();
            let dw: Vec<(u64, &[u8])> = disk.iter().map(|(o, d)| (*o, &d[..])).collect();
            let epoch = self.next_epoch;
            let bytes =
                tokio::task::block_in_place(|| self.encoder.encode(epoch, &pages, &[], &dw));
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    self.staging = cp;
                    return Err(e.into());
                }
            };
            self.account(
                n as u64,
                (n * self.guest.page_size() + disk_bytes) as u64,
                bytes.len() as u64,
                None,
            );
            let pushed = self.push_with(kind, bytes, prelude).await;
            self.staging = cp;
            pushed?;
            if let Ok(mut st) = self.stats.lock() {
                st.precopy_epochs += 1;
            }
        } else {
            self.staging = cp;
        }
        // A VM that already serves keeps serving while its standby fills.
        self.flush_output();
        let Some(pc) = running(&mut self.sync, self.core.phase()) else {
            return Ok(());
        };
        match pc.stepped(n, send) {
            Step::More => {}
            Step::RoundDone { round, pages } => {
                info!(vm = %self.opts.vm, round, pages, sent_pages = pc.sent_pages, "pre-copy round done");
            }
            Step::Finished { round, pages } => {
                info!(vm = %self.opts.vm, round, pages, sent_pages = pc.sent_pages, epochs = pc.epochs, "pre-copy done: first checkpoint");
                if let Some(d) = &pc.disk {
                    let mode = d.mode().map_or("none", DiskSyncMode::name);
                    let compared = match d {
                        DiskSource::Checksum(c) => c.sync.compared,
                        _ => 0,
                    };
                    let (_, total) = d.progress();
                    info!(
                        vm = %self.opts.vm,
                        mode,
                        disk_bytes = total,
                        sent_bytes = pc.disk_sent_bytes,
                        sent_blocks = pc.disk_sent_blocks,
                        compared_blocks = compared,
                        took_ms = pc.started.elapsed().as_millis() as u64,
                        "disk synchronised"
                    );
                    if let Ok(mut st) = self.stats.lock() {
                        st.syncs += 1;
                        st.sync_mode = mode;
                        st.sync_disk_bytes = pc.disk_sent_bytes;
                        st.sync_disk_blocks = pc.disk_sent_blocks;
                        st.sync_blocks_compared = compared;
                        st.sync_disk_bytes_total += pc.disk_sent_bytes;
                        st.sync_progress = None;
                    }
                    if d.mode() == Some(DiskSyncMode::Full) {
                        self.force_full = false;
                    }
                    self.progress.finish();
                    if let Ok(io) = self.capture.io.lock() {
                        if let Some(m) = &io.map {
                            m.flush_async();
                        }
                    }
                }
                // The first checkpoint follows, as the core's action.
                self.core.handle_precopy_finished();
            }
        }
        if self.core.phase() != Phase::PreCopy {
            self.sync = None;
        }
        Ok(())
    }
}

/// The synchronisation in progress: `sync` while the phase is pre-copy
/// (a free function over the two fields, so the caller keeps using its
/// other fields — the sender — while it holds the pre-copy).
fn running(sync: &mut Option<Box<PreCopy>>, phase: Phase) -> Option<&mut PreCopy> {
    sync.as_deref_mut().filter(|_| phase == Phase::PreCopy)
}

/// The checksum resync of the synchronisation in progress, when that is
/// how its disk is being brought over.
fn running_checksum(sync: &mut Option<Box<PreCopy>>, phase: Phase) -> Option<&mut ChecksumCursor> {
    match &mut running(sync, phase)?.disk {
        Some(DiskSource::Checksum(c)) => Some(c),
        _ => None,
    }
}
