//! The driver's side of an epoch: a checkpoint (pause, close the epoch,
//! copy, resume, encode, send), the switchover's final one, and the
//! figures they add to the stats.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hypervisor::ProtectedGuest;
use wan::session::wire::DiskSync;
use wan::session::EpochKind;

use super::{Phase, ProtectError, Protector};
use crate::engine::verify;

impl<G: ProtectedGuest> Protector<G> {
    pub(super) async fn push(
        &mut self,
        kind: EpochKind,
        bytes: Vec<u8>,
    ) -> Result<u64, ProtectError> {
        self.push_with(kind, bytes, None).await
    }

    /// Pushes an epoch, preceded on the stream by `prelude` (the DISK_SYNC
    /// frame of a sync's opening epoch).
    pub(super) async fn push_with(
        &mut self,
        kind: EpochKind,
        bytes: Vec<u8>,
        prelude: Option<DiskSync>,
    ) -> Result<u64, ProtectError> {
        let want = self.next_epoch;
        let pushed = match prelude {
            Some(p) => {
                self.sender
                    .push_epoch_with_prelude(kind, Bytes::from(bytes), p)
                    .await
            }
            None => self.sender.push_epoch(kind, Bytes::from(bytes)).await,
        };
        let got = pushed.map_err(|e| ProtectError::Session(e.to_string()))?;
        if got != want {
            // The session renumbered (its backup is ahead of what this
            // process produced: a restart on either side). The epoch went
            // out under a number the encoder did not write: follow the
            // session's numbering and start over with a full resync.
            self.next_epoch = got + 1;
            return Err(ProtectError::Session(format!(
                "session numbered epoch {got}, the encoder made epoch {want}: resynchronising"
            )));
        }
        self.next_epoch += 1;
        Ok(got)
    }

    pub(super) fn account(&self, pages: u64, raw: u64, wire: u64, pause: Option<Duration>) {
        if let Ok(mut st) = self.stats.lock() {
            st.epochs += 1;
            st.dirty_pages += pages;
            st.raw_bytes += raw;
            st.wire_bytes += wire;
            if let Some(p) = pause {
                if st.pause_us.len() >= 1024 {
                    st.pause_us.remove(0);
                }
                st.pause_us.push(p.as_micros() as u64);
            }
        }
    }

    /// One checkpoint: pause, close the epoch, copy, resume, encode, send.
    pub(super) async fn checkpoint(&mut self) -> Result<u64, ProtectError> {
        let epoch = self.next_epoch;
        let io = self.capture.io.clone();
        let mut disk = Vec::new();
        let mut cp = std::mem::take(&mut self.staging);
        // Online verify: what to resend and what to hash at this pause.
        let (repairs, slice, layout) = match &mut self.verify {
            Some(v) if !v.is_finished() && self.core.phase() == Phase::Checkpointing => {
                (v.take_repairs(), v.next_slice(), Some(*v.layout()))
            }
            _ => (Vec::new(), None, None),
        };
        let reader = self.frame_reader.clone();
        let disk_path = self.opts.disk.clone();
        let mut at_pause = verify::AtPause::default();
        tokio::task::block_in_place(|| {
            self.guest.checkpoint(&mut cp, &mut || {
                if let Ok(mut io) = io.lock() {
                    io.output.close_epoch_as(epoch);
                    disk = io.drain_disk(epoch);
                }
                crate::faults::point("protect.paused");
                if let Some(l) = &layout {
                    // The guest is paused and its writes of this epoch
                    // are captured: memory and disk are exactly what the
                    // replica will hold at the commit of this epoch.
                    at_pause =
                        verify::at_pause(l, reader.as_ref(), disk_path.as_ref(), &repairs, slice);
                }
            })
        })?;
        self.core.handle_checkpoint_taken(epoch);
        let ps = self.guest.page_size();
        let mut pages: Vec<(u64, &[u8])> = cp.page_slices(ps).collect();
        if !at_pause.pages.is_empty() {
            // Resent whole: the replica's copy is not what was sent.
            let frames: Vec<u64> = at_pause.pages.iter().map(|(f, _)| *f).collect();
            self.encoder.forget_frames(&frames);
            for (f, data) in &at_pause.pages {
                if cp.frames.binary_search(f).is_err() {
                    pages.push((*f, &data[..]));
                }
            }
            pages.sort_unstable_by_key(|(f, _)| *f);
        }
        // Blocks resent come after the epoch's writes: read at the pause,
        // they already include them.
        let dw: Vec<(u64, &[u8])> = disk
            .iter()
            .chain(&at_pause.blocks)
            .map(|(o, d)| (*o, &d[..]))
            .collect();
        let disk_bytes: usize = disk.iter().map(|(_, d)| d.len()).sum();
        let bytes =
            tokio::task::block_in_place(|| self.encoder.encode(epoch, &pages, &cp.state, &dw))?;
        self.account(
            cp.frames.len() as u64,
            (cp.pages.len() + cp.state.len() + disk_bytes) as u64,
            bytes.len() as u64,
            Some(cp.timings.total),
        );
        self.staging = cp;
        let sent = self.push(EpochKind::Delta, bytes).await;
        crate::faults::point("protect.sent");
        if sent.is_ok() && layout.is_some() {
            self.verify_sent(epoch, &repairs, slice, at_pause).await;
        }
        sent
    }

    /// A switchover's first half: the final checkpoint and the pause come
    /// before the failover state machine hears of it: if either fails,
    /// nothing was started there and the VM runs on.
    pub(super) async fn final_checkpoint(&mut self) -> Result<(), ProtectError> {
        let started = Instant::now();
        let final_epoch = match self.checkpoint().await {
            Ok(e) => e,
            Err(e) => {
                self.reply_switchover(Err(format!("the final checkpoint failed: {e}")));
                return Err(e);
            }
        };
        if let Err(e) = tokio::task::block_in_place(|| self.guest.pause()) {
            self.reply_switchover(Err(format!("pausing the guest failed: {e}")));
            return Err(e.into());
        }
        self.core.handle_switchover_paused(final_epoch, started);
        Ok(())
    }
}
