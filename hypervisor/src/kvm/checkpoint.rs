//! Checkpoints of a running micro-VM: [`ProtectedGuest`] for [`Vm`].
//!
//! A checkpoint pauses every vCPU (kicked out of `KVM_RUN`, I/O of the last
//! exit completed, waiting at a pause point) and the network device's
//! workers (transmit worker and receive pump: the device lock is taken and
//! the device marked paused, so no frame leaves and nothing is written into
//! guest memory until resume; frames arriving meanwhile wait in the
//! device's pending list, which is part of its state). Block requests and
//! console output are served in the vCPU threads, so they are quiescent
//! with the vCPUs. That instant is the epoch boundary: `at_pause` runs
//! there. Then the dirty log is read and reset (KVM's bitmap for guest
//! writes OR'ed with vm-memory's bitmap for the VMM's own writes), the dirty
//! pages are copied into the staging buffer, every vCPU thread reads its own
//! registers, the devices save their structs, and the VM resumes.
//!
//! With manual dirty-log protection, "reset" spares the hot pages (see
//! `hot_pages`): they stay writable and dirty in KVM's log, so every
//! checkpoint reports and copies them again until they cool down.
//!
//! Dirty pages found by a pre-copy round or a checkpoint but not yet copied
//! wait in a pending bitmap, so no write is ever lost between rounds. The
//! first round (pre-copy or checkpoint) after start or restore carries
//! every frame: the full memory image.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::devices::net::Net;
use super::error::{Error, Result};
use super::hot_pages::{Config as HotPagesConfig, HotPages, HotStats};
use super::memory::{self, PAGE_SIZE};
use super::state::{ClockState, TransportState, VmState};
use super::vm::{PauseFail, Vm};
use crate::guest::{Checkpoint, GuestError, ProtectedGuest};

/// How long a pause may take before the checkpoint gives up.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Dirty tracking across checkpoints and pre-copy rounds.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// The full image went out (first round done).
    synced: bool,
    /// Frames known dirty and not yet copied, one bit each.
    pending: Vec<u64>,
    /// The engine paused the guest (`ProtectedGuest::pause`): a checkpoint
    /// taken meanwhile leaves it paused.
    held: bool,
    /// Manual dirty-log protection is on: reading KVM's log leaves the
    /// pages writable until `memory::clear_dirty_log`.
    manual: bool,
    /// The hot-page policy (only with manual protection).
    hot: Option<HotPages>,
}

impl Tracker {
    pub(crate) fn new(manual: bool, config: HotPagesConfig, frames: u64) -> Tracker {
        let hot = (manual && config.enabled).then(|| HotPages::new(config, frames));
        if let Some(h) = &hot {
            tracing::info!(
                budget_pages = h.stats().budget,
                "hot pages on: pages rewritten epoch after epoch stay writable between checkpoints"
            );
        }
        Tracker {
            manual,
            hot,
            ..Default::default()
        }
    }

    /// Whether KVM's log is cleared by the VMM (manual protection).
    pub(crate) fn manual(&self) -> bool {
        self.manual
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn backend(e: Error) -> GuestError {
    GuestError::Backend(e.to_string())
}

impl Vm {
    fn frames(&self) -> u64 {
        self.shared.mem.last_addr().0 / PAGE_SIZE as u64 + 1
    }

    /// Folds the dirty log (guest and VMM writes) into the pending set; on
    /// the first call, marks every frame pending instead (and resets the
    /// logs, so later rounds see only later writes). With manual
    /// protection, clears (write-protects) the reported pages except the
    /// hot ones, before any of them is copied: a write after the clear
    /// faults and is logged again, one before it is in the copy. At a
    /// checkpoint (`epoch_end`) the hot-page policy promotes and cools.
    fn collect_dirty(&mut self, epoch_end: bool) -> Result<()> {
        let frames = self.frames();
        let log = memory::read_dirty_log(&self.vm_fd, &self.shared.mem)?;
        let words = frames.div_ceil(64) as usize;
        let t = &mut self.tracker;
        if !t.synced {
            if t.manual {
                memory::clear_dirty_log(&self.vm_fd, &self.shared.mem, &log.guest)?;
            }
            if let Some(h) = &mut t.hot {
                h.reset();
            }
            t.pending = vec![u64::MAX; words];
            if !frames.is_multiple_of(64) {
                t.pending[words - 1] = (1u64 << (frames % 64)) - 1;
            }
            t.synced = true;
            return Ok(());
        }
        if t.manual {
            let clear = match &mut t.hot {
                Some(h) if epoch_end => h.checkpoint(&log.guest),
                Some(h) => h.between(&log.guest),
                None => log.guest.clone(),
            };
            memory::clear_dirty_log(&self.vm_fd, &self.shared.mem, &clear)?;
        }
        t.pending.resize(words, 0);
        // One memslot, at guest-physical 0 (memory::create): bit i of the
        // log is frame i.
        for ((p, g), v) in t.pending.iter_mut().zip(&log.guest).zip(&log.vmm) {
            *p |= g | v;
        }
        Ok(())
    }

    /// Shows the hot-page policy what the checkpoint copied (after the
    /// resume: the staging copy does not change, and hashing it need not
    /// hold the guest).
    fn observe_hot(&mut self, out: &Checkpoint) {
        if let Some(h) = &mut self.tracker.hot {
            for (frame, page) in out.page_slices(PAGE_SIZE) {
                h.observe(frame, page);
            }
        }
    }

    /// Counters of the hot-page policy (`None`: off, or no manual
    /// dirty-log protection on this host).
    pub fn hot_pages(&self) -> Option<HotStats> {
        self.tracker.hot.as_ref().map(HotPages::stats)
    }

    /// Moves up to `max` pending frames (ascending) into `out` with their
    /// current contents.
    fn copy_pending(&mut self, max: usize, out: &mut Checkpoint) -> Result<()> {
        out.frames.clear();
        for (w, word) in self.tracker.pending.iter_mut().enumerate() {
            while *word != 0 && out.frames.len() < max {
                let bit = word.trailing_zeros();
                *word &= !(1u64 << bit);
                out.frames.push(w as u64 * 64 + u64::from(bit));
            }
            if out.frames.len() >= max {
                break;
            }
        }
        out.pages.resize(out.frames.len() * PAGE_SIZE, 0);
        let region = self
            .shared
            .mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| Error::Memory("no RAM at guest-physical 0".into()))?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let len = region.len() as usize;
        // Copy runs of consecutive frames with one memcpy each.
        let mut i = 0;
        while i < out.frames.len() {
            let first = out.frames[i];
            let mut n = 1;
            while i + n < out.frames.len() && out.frames[i + n] == first + n as u64 {
                n += 1;
            }
            let off = first as usize * PAGE_SIZE;
            let bytes = n * PAGE_SIZE;
            if off + bytes > len {
                return Err(Error::Memory(format!("frame {first} outside RAM")));
            }
            // SAFETY: [off, off+bytes) lies inside the region's mapping,
            // which lives as long as `self`; the destination is our own
            // buffer. Guest writes racing with the copy (pre-copy) only
            // tear the copy, and such pages are dirty again.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    host.add(off),
                    out.pages.as_mut_ptr().add(i * PAGE_SIZE),
                    bytes,
                );
            }
            i += n;
        }
        Ok(())
    }

    fn net(&self) -> Option<MutexGuard<'_, Net>> {
        self.net.as_ref().map(|n| lock(n))
    }

    /// Stops vCPUs (which read their own state on the way in when
    /// `capture`), then device workers.
    fn pause_all(&mut self, capture: bool) -> std::result::Result<(), GuestError> {
        if !self.shared.is_running() {
            return Err(GuestError::NotRunning);
        }
        self.shared.request_pause(capture);
        match self.shared.wait_paused(PAUSE_TIMEOUT) {
            Ok(()) => {}
            Err(f) => {
                self.shared.resume_vcpus();
                return Err(match f {
                    PauseFail::NotRunning => GuestError::NotRunning,
                    PauseFail::Timeout => GuestError::PauseTimeout(PAUSE_TIMEOUT),
                });
            }
        }
        if let Some(mut n) = self.net() {
            n.set_paused(true);
        }
        Ok(())
    }

    /// Resumes device workers, then vCPUs; returns the instant the vCPUs
    /// were let go (the end of the pause as the guest sees it).
    fn resume_all(&mut self) -> Instant {
        if let Some(mut n) = self.net() {
            n.set_paused(false);
        }
        let t = Instant::now();
        self.shared.resume_vcpus();
        t
    }

    /// The VM's complete state, and how long the slowest vCPU took to read
    /// its registers; the VM must be paused.
    fn capture_state(&self) -> Result<(VmState, Duration)> {
        let (vcpus, vcpu_time) = self.shared.capture_vcpus(PAUSE_TIMEOUT)?;
        let clock = self.vm_fd.get_clock().ok().map(|c| ClockState {
            clock: c.clock,
            flags: c.flags,
        });
        let state = VmState {
            mem_size: self.shared.mem.last_addr().0 + 1,
            tsc_khz: self.tsc_khz,
            ready: self.shared.is_ready(),
            clock,
            vcpus,
            console: self.shared.console().save(),
            transports: self
                .transports
                .iter()
                .map(|(t, tr)| TransportState {
                    device_type: *t,
                    regs: lock(tr).save(),
                })
                .collect(),
            net: self.net().map(|n| n.save()),
            block: self.block.as_ref().map(|b| lock(b).save()),
        };
        Ok((state, vcpu_time))
    }

    fn checkpoint_paused(
        &mut self,
        out: &mut Checkpoint,
        at_pause: &mut dyn FnMut(),
        t0: Instant,
    ) -> Result<Duration> {
        at_pause();
        self.collect_dirty(true)?;
        let t_log = Instant::now();
        self.copy_pending(usize::MAX, out)?;
        let t_copy = Instant::now();
        let (state, vcpu_time) = self.capture_state()?;
        state.encode(&mut out.state);
        let t_state = Instant::now();
        out.timings.dirty_log = t_log - t0;
        out.timings.copy = t_copy - t_log;
        out.timings.state = t_state - t_copy + vcpu_time;
        Ok(vcpu_time)
    }

    /// Empties `out` for a new round, keeping the staging buffer's length
    /// (so it is not zero-filled again every epoch; `copy_pending` sizes it).
    fn reset_out(out: &mut Checkpoint) {
        out.frames.clear();
        out.state.clear();
        out.timings = Default::default();
    }
}

impl ProtectedGuest for Vm {
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    fn frame_count(&self) -> u64 {
        self.frames()
    }

    fn precopy_round(
        &mut self,
        max_frames: usize,
        out: &mut Checkpoint,
    ) -> std::result::Result<(), GuestError> {
        Self::reset_out(out);
        if !self.shared.is_running() {
            out.pages.clear();
            return Err(GuestError::NotRunning);
        }
        let t0 = Instant::now();
        self.collect_dirty(false).map_err(backend)?;
        let t_log = Instant::now();
        self.copy_pending(max_frames, out).map_err(backend)?;
        let t_copy = Instant::now();
        out.timings.dirty_log = t_log - t0;
        out.timings.copy = t_copy - t_log;
        Ok(())
    }

    fn restart_sync(&mut self) {
        // The next collect marks every frame pending and resets the logs.
        self.tracker.synced = false;
        self.tracker.pending.clear();
    }

    fn checkpoint(
        &mut self,
        out: &mut Checkpoint,
        at_pause: &mut dyn FnMut(),
    ) -> std::result::Result<(), GuestError> {
        Self::reset_out(out);
        let t0 = Instant::now();
        if !self.tracker.held {
            if let Err(e) = self.pause_all(true) {
                out.pages.clear();
                return Err(e);
            }
        }
        let t_stop = Instant::now();
        let r = self.checkpoint_paused(out, at_pause, t_stop);
        let t_end = if self.tracker.held {
            Instant::now()
        } else {
            self.resume_all()
        };
        // The vCPUs read their registers while stopping: that time is
        // reported under `state`, not `stop`.
        let vcpu_time = *r.as_ref().unwrap_or(&Duration::ZERO);
        out.timings.stop = (t_stop - t0).saturating_sub(vcpu_time);
        out.timings.total = t_end - t0;
        if r.is_err() {
            out.frames.clear();
            out.pages.clear();
        } else {
            self.observe_hot(out);
        }
        r.map(|_| ()).map_err(backend)
    }

    fn pause(&mut self) -> std::result::Result<(), GuestError> {
        if !self.tracker.held {
            self.pause_all(false)?;
            self.tracker.held = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> std::result::Result<(), GuestError> {
        if self.tracker.held {
            self.tracker.held = false;
            self.resume_all();
        }
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.shared.is_running()
    }

    fn frame_reader(&self) -> Option<crate::guest::FrameReader> {
        // The regions are reference-counted: the reader stays valid as
        // long as it is held, like any other handle on guest memory.
        let mem = self.shared.mem.clone();
        Some(std::sync::Arc::new(move |first, out: &mut [u8]| {
            use vm_memory::Bytes;
            let addr = first
                .checked_mul(PAGE_SIZE as u64)
                .ok_or_else(|| GuestError::Backend(format!("frame {first} out of range")))?;
            mem.read_slice(out, GuestAddress(addr))
                .map_err(|e| GuestError::Backend(format!("reading frames from {first}: {e}")))
        }))
    }
}
