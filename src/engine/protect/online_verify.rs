//! The driver's side of `remus-wan verify`: starting a run, the hashes
//! read at a checkpoint's pause and sent after its epoch, the figures.

use hypervisor::ProtectedGuest;
use tracing::{info, warn};
use wan::session::wire::VerifyRegion;

use super::Protector;
use crate::engine::verify::{self, VerifyRun};

impl<G: ProtectedGuest> Protector<G> {
    /// After epoch `epoch` went to the session: the verify request that
    /// follows it, and the bookkeeping of repairs.
    pub(super) async fn verify_sent(
        &mut self,
        epoch: u64,
        repairs: &[(VerifyRegion, u64)],
        slice: Option<verify::Slice>,
        at_pause: verify::AtPause,
    ) {
        let Some(v) = &mut self.verify else { return };
        if let Some(e) = at_pause.error {
            warn!(vm = %self.opts.vm, error = %e, "verify: reading the primary failed; run stopped");
            v.abort(&e);
            self.verify_finished();
            self.publish_verify();
            return;
        }
        for &(region, unit) in repairs {
            v.repair_sent(region, unit);
        }
        if !repairs.is_empty() {
            info!(vm = %self.opts.vm, epoch, units = repairs.len(), "verify: differing pages/blocks resent whole");
        }
        if let (Some(s), Some(h)) = (slice, at_pause.hashes) {
            let req = v.hashed(s, epoch, h);
            let id = req.id;
            if !matches!(self.sender.push_verify(req).await, Ok(true)) {
                if let Some(v) = &mut self.verify {
                    v.lost(id);
                }
            }
        }
        self.publish_verify();
    }

    /// `remus-wan verify`: starts a run (answered at once with its number).
    pub(super) fn begin_verify(
        &mut self,
        vm: &str,
        scope: verify::Scope,
        repair: bool,
    ) -> Result<String, String> {
        if vm != self.opts.vm {
            return Err(format!("this process protects {}, not {vm}", self.opts.vm));
        }
        if let Some(v) = self.verify.as_ref().filter(|v| !v.is_finished()) {
            return Err(format!(
                "verify run {} is under way: wait for it (remus-wan status)",
                v.progress().run
            ));
        }
        if scope.memory && self.frame_reader.is_none() {
            return Err(
                "this guest backend cannot read guest memory at the pause: use --disk-only".into(),
            );
        }
        let disk_bytes = match &self.opts.disk {
            Some(d) if scope.disk => d
                .bytes()
                .map_err(|e| format!("cannot read the disk image {d}: {e}"))?,
            _ => 0,
        };
        if scope.disk && !scope.memory && disk_bytes == 0 {
            return Err(format!("{vm} has no disk to verify"));
        }
        let run = self.verify_done.runs + 1;
        let layout = verify::Layout {
            page_size: self.guest.page_size() as u32,
            frames: if scope.memory {
                self.guest.frame_count()
            } else {
                0
            },
            disk_bytes,
        };
        let v = VerifyRun::new(run, layout, scope, repair);
        let total = v.progress().slices_total;
        info!(vm = %self.opts.vm, run, slices = total, frames = layout.frames, disk_bytes, repair, "verify: run starts (one slice per checkpoint)");
        self.verify_done.runs = run;
        self.verify = Some(v);
        if self.verify.as_ref().is_some_and(|v| v.is_finished()) {
            self.verify_finished();
        }
        self.publish_verify();
        Ok(format!("verify run {run} started: {total} slices"))
    }

    /// A run ended: its figures join the totals, a summary is logged.
    pub(super) fn verify_finished(&mut self) {
        let Some(v) = &self.verify else { return };
        let p = v.progress();
        let t = &mut self.verify_done;
        t.pages_checked += p.pages_checked;
        t.blocks_checked += p.blocks_checked;
        t.mismatches += p.mismatches;
        t.repaired += p.repaired;
        if p.state == "failed" {
            warn!(vm = %self.opts.vm, run = p.run, error = ?p.error, "verify failed");
        } else if p.mismatches == 0 {
            info!(vm = %self.opts.vm, run = p.run, pages = p.pages_checked, blocks = p.blocks_checked, "verify done: the replica is identical");
        } else {
            warn!(vm = %self.opts.vm, run = p.run, pages = p.pages_checked, blocks = p.blocks_checked, differences = p.mismatches, repaired = p.repaired, "verify done: the replica differed");
        }
    }

    /// Puts the verify figures where status and metrics read them.
    pub(super) fn publish_verify(&self) {
        let Some(v) = &self.verify else { return };
        let p = v.progress();
        let mut totals = self.verify_done.clone();
        if !v.is_finished() {
            totals.pages_checked += p.pages_checked;
            totals.blocks_checked += p.blocks_checked;
            totals.mismatches += p.mismatches;
            totals.repaired += p.repaired;
        }
        if let Ok(mut st) = self.stats.lock() {
            st.verify = Some(p.clone());
            st.verify_totals = totals;
        }
    }
}
