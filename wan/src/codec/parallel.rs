//! Compressing an epoch's record chunks on more than one thread.
//!
//! Each chunk is an independent block (its own zstd frame), so chunks can be
//! compressed in any order on any thread; only their order on the wire is
//! fixed. The encoder's page pass (cache lookups, deltas, duplicate
//! detection, cache updates) stays on the calling thread and in page order,
//! exactly as with one thread: only the finishing of full chunks moves
//! (their deferred `REC_PREFIX_ZSTD` attempts, then their zstd pass:
//! chunk_plan.rs).
//! The wire bytes are identical whatever the thread count (zstd's output
//! depends only on the input, the parameters and the library version, not on
//! which context compresses it), so the decoder and the format do not change.
//!
//! Shape: helper threads (kept by the encoder and lent to one `encode_into`
//! call at a time: helper_threads.rs) first hash pages ahead of the page
//! pass (digest.rs), then take chunks from a queue and hand back finished
//! blocks; the calling thread queues each chunk
//! as the page pass fills it, compresses the oldest queued chunk itself when
//! the helpers fall behind, writes finished blocks to the output in order,
//! and at the end of the pass helps drain the queue. When the other cores are
//! busy a helper can be descheduled in the middle of a chunk; the calling
//! thread then compresses that chunk too (the result is the same, whichever
//! finishes first is used), so a stalled helper costs at most about one
//! chunk's compression, never a scheduler time slice or more.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::chunk_plan::{ChunkCtx, ChunkPlan, Outcome};
use super::digest::Digests;

/// How long the calling thread, with nothing left to do, waits for a helper
/// to finish a chunk before compressing that chunk itself: twice as long as
/// the slowest chunk it compressed itself in this epoch (a helper that is
/// running finishes within that), or this when it compressed none.
const TAKEOVER_DEFAULT: Duration = Duration::from_millis(2);
const TAKEOVER_MIN: Duration = Duration::from_micros(200);

/// Chooses, epoch by epoch, between compressing on the calling thread alone
/// and with the helpers. Helpers pay only when a core is free for them: on a
/// machine whose other cores are busy they wait for a time slice while the
/// epoch waits for them, or take one from the calling thread.
///
/// After each epoch with helpers it estimates, from that same epoch (so the
/// content of the epoch does not matter), how long the calling thread alone
/// would have taken: its own CPU time plus the helpers' raw chunk bytes at
/// the CPU time per byte it took to compress chunks itself. That over the
/// wall time is the helpers' gain. CPU time, not wall time: a helper that
/// shares the calling thread's core stretches the calling thread's wall
/// time and would look useful. (Where the thread's CPU clock is not
/// available, wall time minus the time spent waiting for helpers.)
///
/// Below [`MIN_GAIN`] the next epochs run on the calling thread alone, and
/// one runs with helpers again after 2, 4, 8, then every [`PROBE_EVERY`]
/// epochs, to see whether a core has freed up.
#[derive(Default)]
pub(super) struct ModeChooser {
    /// Gain measured in the last epoch run with helpers.
    gain: Option<f64>,
    /// Epochs on the calling thread alone before the next try of helpers.
    backoff: u32,
    /// Calling thread's compression time per raw chunk byte (moving average).
    ns_per_byte: Option<f64>,
    since_probe: u32,
    /// Tests: always this mode.
    pub(super) forced: Option<bool>,
}

/// Most epochs between two tries of the helpers when they did not pay.
const PROBE_EVERY: u32 = 16;
/// Below this estimated speedup, helpers are not worth their overhead.
const MIN_GAIN: f64 = 1.1;

/// What one epoch with helpers measured, for [`ModeChooser::record`].
#[derive(Default, Clone, Copy)]
pub(super) struct EpochTiming {
    /// CPU time of the calling thread over the whole epoch, when known.
    busy: Option<Duration>,
    /// Time the calling thread waited for helpers.
    idle: Duration,
    /// Raw chunk bytes, and time, the calling thread compressed itself.
    own_bytes: u64,
    own_time: Duration,
    /// Raw chunk bytes whose compression by a helper was used.
    helper_bytes: u64,
    /// Other work of the helpers that the calling thread used and would
    /// otherwise have done itself (page digests: digest.rs).
    helper_other: Duration,
}

impl EpochTiming {
    /// An epoch of another kind of work split the same way (the decoder's
    /// chunks: `chunk_decode.rs`).
    pub(super) fn of(
        busy: Option<Duration>,
        idle: Duration,
        own: (u64, Duration),
        helper_bytes: u64,
    ) -> Self {
        EpochTiming {
            busy,
            idle,
            own_bytes: own.0,
            own_time: own.1,
            helper_bytes,
            helper_other: Duration::ZERO,
        }
    }

    /// Counts `t` of helper work that saved the calling thread as much.
    pub(super) fn add_helper_time(&mut self, t: Duration) {
        self.helper_other += t;
    }
}

impl ModeChooser {
    /// Whether the next (large enough) epoch uses the helpers.
    pub(super) fn use_helpers(&mut self) -> bool {
        if let Some(f) = self.forced {
            return f;
        }
        match self.gain {
            Some(g) if g < MIN_GAIN => {
                self.since_probe += 1;
                if self.since_probe >= self.backoff {
                    self.since_probe = 0;
                    true
                } else {
                    false
                }
            }
            _ => true,
        }
    }

    /// One epoch with helpers took `wall` and measured `t`.
    pub(super) fn record(&mut self, wall: Duration, t: EpochTiming) {
        if t.own_bytes > 0 {
            let x = t.own_time.as_nanos() as f64 / t.own_bytes as f64;
            self.ns_per_byte = Some(self.ns_per_byte.map_or(x, |v| v + 0.5 * (x - v)));
        }
        let wall_ns = wall.as_nanos() as f64;
        let Some(rate) = self.ns_per_byte else {
            // Nothing compressed here yet to compare with: try again.
            self.gain = None;
            return;
        };
        if wall_ns <= 0.0 {
            return;
        }
        let busy = match t.busy {
            Some(cpu) => cpu.as_nanos() as f64,
            None => wall_ns - t.idle.as_nanos() as f64,
        };
        let alone = busy + t.helper_bytes as f64 * rate + t.helper_other.as_nanos() as f64;
        let gain = alone / wall_ns;
        self.gain = Some(gain);
        self.backoff = if gain < MIN_GAIN {
            (self.backoff * 2).clamp(2, PROBE_EVERY)
        } else {
            0
        };
        self.since_probe = 0;
    }

    #[cfg(test)]
    pub(super) fn gain(&self) -> Option<f64> {
        self.gain
    }
}

pub(super) use super::cpu_time::thread_cpu_time;
use super::cpu_time::Stopwatch;

/// Chunks queued per helper before the calling thread compresses one
/// itself (see `Pipeline::submit`).
const QUEUED_PER_HELPER: usize = 4;

/// Buffers of each kind kept for reuse between chunks and epochs.
const MAX_SPARE: usize = 16;

/// One chunk of records on its way from the page pass to wire bytes.
pub(super) struct ChunkJob {
    /// Position of the chunk in the epoch.
    index: usize,
    /// Shared with the calling thread, which may finish it too.
    plan: Arc<ChunkPlan>,
    /// `record count u32 | block`: exactly what goes on the wire.
    wire: Vec<u8>,
    /// Its prefix attempts' outcomes.
    outcomes: Vec<Outcome>,
    /// Finished by a helper thread.
    by_helper: bool,
}

impl ChunkJob {
    fn finish(&mut self, ctx: &mut ChunkCtx) {
        self.wire.clear();
        self.outcomes.clear();
        ctx.finish(&self.plan, &mut self.wire, &mut self.outcomes);
    }

    /// Raw bytes whose work (prefix attempts, zstd) the timing counts.
    fn work_bytes(&self) -> u64 {
        if self.plan.needs_work() {
            self.plan.raw.len() as u64
        } else {
            0
        }
    }
}

/// Emptied buffers of finished chunks, kept by the encoder for reuse.
#[derive(Default)]
pub(super) struct Spare {
    raw: Vec<ChunkPlan>,
    wire: Vec<Vec<u8>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<ChunkJob>,
    done: Vec<ChunkJob>,
    /// No more chunks will be queued: helpers leave once the queue is empty.
    closed: bool,
    /// A helper panicked; the job it held is lost (the calling thread redoes it).
    failed: bool,
    /// Helpers waiting for `work`, and whether the calling thread waits for
    /// `done`: a notification is a system call (futex wake) even when
    /// nobody waits, and with 64 KiB chunks an epoch of 8 MiB has 128 of
    /// them each way (synthetic random trace with two threads: 1,200 MB/s
    /// against 1,470 on one).
    helpers_waiting: usize,
    caller_waiting: bool,
}

/// What the calling thread and the helpers share for one epoch.
#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued or the queue is closed.
    work: Condvar,
    /// Signalled when a job is done or a helper failed.
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking holder leaves the state consistent (every critical
        // section is a push or a pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }
}

/// A helper thread's loop: compress queued chunks until the queue is closed
/// and empty.
pub(super) fn helper_loop(shared: &Shared, ctx: &mut ChunkCtx, digests: &Digests<'_>) {
    struct FailFlag<'a>(&'a Shared);
    impl Drop for FailFlag<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.lock().failed = true;
                self.0.done.notify_all();
            }
        }
    }
    let _flag = FailFlag(shared);
    loop {
        // Digests first: they shorten the page pass, which every chunk
        // waits for; once none is left ahead of the pass the helper only
        // compresses (the pass steals a chunk when too many queue).
        if digests.help() {
            continue;
        }
        let mut job = {
            let mut st = shared.lock();
            loop {
                if let Some(j) = st.queue.pop_front() {
                    break j;
                }
                if st.closed {
                    return;
                }
                st.helpers_waiting += 1;
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
                st.helpers_waiting -= 1;
            }
        };
        job.finish(ctx);
        job.by_helper = true;
        let wake = {
            let mut st = shared.lock();
            st.done.push(job);
            st.caller_waiting
        };
        if wake {
            shared.done.notify_one();
        }
    }
}

/// The calling thread's side: queues chunks, writes finished ones in order.
pub(super) struct Pipeline<'a> {
    shared: &'a Shared,
    helpers: usize,
    /// Index the next queued chunk gets.
    next: usize,
    /// Chunks before this index are on the wire.
    written: usize,
    /// Finished chunks waiting for an earlier one.
    pending: BTreeMap<usize, ChunkJob>,
    /// Chunks handed to the queue and not yet finished: what the calling
    /// thread needs to redo one that a helper holds too long.
    queued: BTreeMap<usize, Arc<ChunkPlan>>,
    spare: &'a mut Spare,
    /// Outcomes of the prefix attempts of the chunks written so far.
    outcomes: Vec<Outcome>,
    /// Longest compression of a chunk on the calling thread this epoch.
    slowest_here: Option<Duration>,
    timing: EpochTiming,
}

impl<'a> Pipeline<'a> {
    pub(super) fn new(shared: &'a Shared, helpers: usize, spare: &'a mut Spare) -> Self {
        Pipeline {
            shared,
            helpers,
            next: 0,
            written: 0,
            pending: BTreeMap::new(),
            queued: BTreeMap::new(),
            spare,
            outcomes: Vec::new(),
            slowest_here: None,
            timing: EpochTiming::default(),
        }
    }

    /// Hands over a full chunk; returns an empty one for the next.
    pub(super) fn submit(
        &mut self,
        ctx: &mut ChunkCtx,
        out: &mut Vec<u8>,
        plan: ChunkPlan,
    ) -> ChunkPlan {
        let fresh = self.spare.raw.pop().unwrap_or_default();
        let needs_work = plan.needs_work();
        let mut job = self.job(self.next, Arc::new(plan));
        self.next += 1;
        if !needs_work || self.helpers == 0 {
            // Stored as is: a copy, not worth a trip to another thread.
            job.finish(ctx);
            self.complete(job, out);
            return fresh;
        }
        self.queued.insert(job.index, Arc::clone(&job.plan));
        let (stolen, done, wake) = {
            let mut st = self.shared.lock();
            st.queue.push_back(job);
            // Far more queued than the helpers can take: they are behind (or
            // descheduled), so this thread finishes the oldest one itself.
            // Not at the first chunk waiting: the page pass is the longer
            // part of an epoch on real guest memory, and every chunk this
            // thread compresses delays it, while the helpers catch up once
            // the pass ends (the recorded traces with two threads: sort
            // 589 -> 640 MB/s, db 809 -> 889 with a queue of 4 per helper
            // instead of 1).
            let stolen = if st.queue.len() > QUEUED_PER_HELPER * self.helpers {
                st.queue.pop_front()
            } else {
                None
            };
            (stolen, std::mem::take(&mut st.done), st.helpers_waiting > 0)
        };
        if wake {
            self.shared.work.notify_one();
        }
        for j in done {
            self.complete(j, out);
        }
        if let Some(mut j) = stolen {
            self.compress_here(&mut j, ctx);
            self.complete(j, out);
        }
        fresh
    }

    fn job(&mut self, index: usize, plan: Arc<ChunkPlan>) -> ChunkJob {
        ChunkJob {
            index,
            plan,
            wire: self.spare.wire.pop().unwrap_or_default(),
            outcomes: Vec::new(),
            by_helper: false,
        }
    }

    /// The prefix attempts' outcomes of every chunk written.
    pub(super) fn take_outcomes(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.outcomes)
    }

    /// Closes the queue, helps compress what is left, and writes every
    /// remaining chunk in order.
    pub(super) fn finish(
        &mut self,
        ctx: &mut ChunkCtx,
        out: &mut Vec<u8>,
        cpu_at_start: Option<Duration>,
    ) -> EpochTiming {
        self.shared.close();
        let mut waited = false;
        while self.written < self.next {
            let mut st = self.shared.lock();
            if let Some(mut j) = st.queue.pop_front() {
                drop(st);
                self.compress_here(&mut j, ctx);
                self.complete(j, out);
            } else if !st.done.is_empty() {
                let done = std::mem::take(&mut st.done);
                drop(st);
                for j in done {
                    self.complete(j, out);
                }
                waited = false;
            } else if waited || st.failed {
                // Every unfinished chunk is held by a helper that has not
                // delivered it in time: redo the oldest one here.
                drop(st);
                self.take_over(ctx, out);
                waited = false;
            } else {
                let idle = Instant::now();
                st.caller_waiting = true;
                let (mut st, _) = self
                    .shared
                    .done
                    .wait_timeout(st, self.takeover_after())
                    .unwrap_or_else(|e| e.into_inner());
                st.caller_waiting = false;
                drop(st);
                self.timing.idle += idle.elapsed();
                waited = true;
            }
        }
        if let (Some(a), Some(b)) = (cpu_at_start, thread_cpu_time()) {
            self.timing.busy = Some(b.saturating_sub(a));
        }
        self.timing
    }

    /// Finishes the oldest chunk that is neither written nor finished.
    fn take_over(&mut self, ctx: &mut ChunkCtx, out: &mut Vec<u8>) {
        let Some((&index, plan)) = self
            .queued
            .iter()
            .find(|(i, _)| !self.pending.contains_key(i))
        else {
            return;
        };
        let plan = Arc::clone(plan);
        let mut job = self.job(index, plan);
        self.compress_here(&mut job, ctx);
        self.complete(job, out);
    }

    fn compress_here(&mut self, job: &mut ChunkJob, ctx: &mut ChunkCtx) {
        let watch = Stopwatch::start();
        job.finish(ctx);
        let took = watch.wall();
        let bytes = job.work_bytes();
        if bytes > 0 {
            self.timing.own_bytes += bytes;
            self.timing.own_time += watch.elapsed();
        }
        self.slowest_here = Some(self.slowest_here.map_or(took, |d| d.max(took)));
    }

    fn takeover_after(&self) -> Duration {
        self.slowest_here
            .map_or(TAKEOVER_DEFAULT, |d| (2 * d).max(TAKEOVER_MIN))
    }

    fn complete(&mut self, job: ChunkJob, out: &mut Vec<u8>) {
        if job.index < self.written || self.pending.contains_key(&job.index) {
            // The other copy of a chunk taken over: identical, already here.
            self.recycle(job);
            return;
        }
        if job.by_helper {
            self.timing.helper_bytes += job.work_bytes();
        }
        self.pending.insert(job.index, job);
        while let Some(mut j) = self.pending.remove(&self.written) {
            out.extend_from_slice(&j.wire);
            self.outcomes.append(&mut j.outcomes);
            self.queued.remove(&self.written);
            self.written += 1;
            self.recycle(j);
        }
    }

    fn recycle(&mut self, job: ChunkJob) {
        // Taken-over chunks add a buffer each time: keep a bounded number.
        if self.spare.wire.len() < MAX_SPARE {
            let mut wire = job.wire;
            wire.clear();
            self.spare.wire.push(wire);
        }
        // Unique once the helper and the queue map have let go of it; a
        // chunk still held elsewhere is simply not reused.
        if let Ok(mut plan) = Arc::try_unwrap(job.plan) {
            if self.spare.raw.len() < MAX_SPARE {
                plan.clear();
                self.spare.raw.push(plan);
            }
        }
    }
}

impl Drop for Pipeline<'_> {
    /// Also on unwinding: helpers waiting for work must leave, or the scope
    /// that spawned them would wait for them forever.
    fn drop(&mut self) {
        self.shared.close();
    }
}

#[cfg(test)]
mod tests {
    //! The multi-threaded encoder against the single-threaded one, in
    //! lockstep over random histories (pipelined epochs, losses with
    //! invalidation, resets, forgotten frames): every epoch's bytes must be
    //! identical, and the replica fed the multi-threaded bytes must hold the
    //! source image after each delivered epoch.

    use std::collections::{BTreeSet, VecDeque};

    use proptest::prelude::*;

    use crate::codec::synthetic::{fill_struct, fill_text, Rng};
    use crate::codec::{
        CodecError, Decoder, DecoderConfig, EncodeStats, Encoder, EncoderConfig, PageSource,
        VecMemory,
    };

    #[derive(Debug, Clone)]
    enum Op {
        /// Dirty these frames (frame, content kind, seed) and send an epoch.
        Send(Vec<(u16, u8, u64)>),
        /// The oldest epoch in flight is applied, and maybe acknowledged.
        Deliver(bool),
        /// The oldest epoch in flight is lost; later ones are rejected.
        Lose,
        Reset,
        /// Online verify found these frames different on the replica.
        Forget(Vec<u16>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => prop::collection::vec((any::<u16>(), 0u8..8, any::<u64>()), 0..48)
                .prop_map(Op::Send),
            4 => any::<bool>().prop_map(Op::Deliver),
            1 => Just(Op::Lose),
            1 => Just(Op::Reset),
            1 => prop::collection::vec(any::<u16>(), 0..4).prop_map(Op::Forget),
        ]
    }

    fn write(page: &mut [u8], kind: u8, seed: u64, other: &[u8]) {
        let mut rng = Rng::new(seed);
        match kind {
            0 => {
                // A few bytes: the delta path.
                for i in 0..1 + seed as usize % 5 {
                    let at = (seed as usize).wrapping_mul(31).wrapping_add(i * 97) % page.len();
                    page[at] = page[at].wrapping_add(1 + (seed >> 8) as u8 % 250);
                }
            }
            1 => page.fill(0),
            2 => fill_text(&mut rng, page),
            3 => fill_struct(&mut rng, page),
            4 => rng.fill(page),
            5 => {
                // Content moved within the page: prefix attempts on the
                // helpers, and chunks that zstd only just shrinks.
                let by = 1 + seed as usize % 40;
                let at = (seed >> 8) as usize % (page.len() - by);
                page.copy_within(at..page.len() - by, at + by);
            }
            6 => {
                // Another frame's content at another alignment: chunks
                // naming prefix frames (BLOCK_ZSTD_REFS).
                let at = 1 + seed as usize % (page.len() - 1);
                let n = page.len() - at;
                page[at..].copy_from_slice(&other[..n]);
            }
            _ => page.copy_from_slice(other),
        }
    }

    struct InFlight {
        epoch: u64,
        bytes: Vec<u8>,
        dirty: BTreeSet<u64>,
        image: Vec<u8>,
    }

    fn fail(e: impl std::fmt::Display) -> TestCaseError {
        TestCaseError::fail(e.to_string())
    }

    #[allow(clippy::too_many_arguments)]
    fn lockstep(
        threads: usize,
        frames: u64,
        ps: usize,
        cache_pages: usize,
        chunk_bytes: usize,
        per_page_zstd: bool,
        seed: u64,
        ops: Vec<Op>,
    ) -> Result<(), TestCaseError> {
        let mut source = vec![0u8; frames as usize * ps];
        let mut rng = Rng::new(seed);
        for (i, page) in source.chunks_exact_mut(ps).enumerate() {
            match i % 4 {
                0 => {}
                1 => fill_text(&mut rng, page),
                2 => fill_struct(&mut rng, page),
                _ => rng.fill(page),
            }
        }
        let cfg = |threads| EncoderConfig {
            vm_id: 9,
            page_size: ps,
            cache_budget_bytes: cache_pages * ps,
            zstd_level: 1 + (seed % 3) as i32,
            chunk_bytes,
            per_page_zstd,
            threads,
            ..EncoderConfig::default()
        };
        let mut one = Encoder::new(cfg(1)).map_err(fail)?;
        let mut many = Encoder::new(cfg(threads)).map_err(fail)?;
        // Whatever the wall clock says: the helpers' path is what is tested.
        many.force_helpers(Some(true));
        let mut dec = Decoder::new(DecoderConfig::default()).map_err(fail)?;
        let mut replica = VecMemory::new(frames, ps);
        let mut pending: BTreeSet<u64> = (0..frames).collect();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut epoch = 0u64;
        let (mut out_one, mut out_many) = (Vec::new(), Vec::new());

        for op in ops {
            match op {
                Op::Send(writes) => {
                    let mut order = Vec::new();
                    for (f, kind, s) in writes {
                        let f = u64::from(f) % frames;
                        let src = (s % frames) as usize * ps;
                        let other = source[src..src + ps].to_vec();
                        let at = f as usize * ps;
                        write(&mut source[at..at + ps], kind, s, &other);
                        if !order.contains(&f) {
                            order.push(f);
                        }
                    }
                    let mut dirty: BTreeSet<u64> = order.iter().copied().collect();
                    for &f in &pending {
                        if dirty.insert(f) {
                            order.push(f);
                        }
                    }
                    pending.clear();
                    let pages: Vec<(u64, &[u8])> = order
                        .iter()
                        .map(|&f| (f, &source[f as usize * ps..(f as usize + 1) * ps]))
                        .collect();
                    epoch += 1;
                    let blob = vec![epoch as u8; 300 + (seed % 700) as usize];
                    let disk = [(epoch * 8, &blob[..100])];
                    let a = one
                        .encode_into(epoch, &pages, &blob, &disk, &mut out_one)
                        .map_err(fail)?;
                    let b = many
                        .encode_into(epoch, &pages, &blob, &disk, &mut out_many)
                        .map_err(fail)?;
                    prop_assert!(out_one == out_many, "epoch {} bytes differ", epoch);
                    prop_assert_eq!(a, b);
                    in_flight.push_back(InFlight {
                        epoch,
                        bytes: out_many.clone(),
                        dirty,
                        image: source.clone(),
                    });
                }
                Op::Deliver(ack) => {
                    let Some(e) = in_flight.pop_front() else {
                        continue;
                    };
                    dec.decode(&e.bytes, &replica)
                        .map_err(fail)?
                        .apply(&mut replica)
                        .map_err(fail)?;
                    prop_assert!(replica.as_bytes() == &e.image[..], "epoch {}", e.epoch);
                    if ack {
                        one.acknowledge(e.epoch);
                        many.acknowledge(e.epoch);
                    }
                }
                Op::Lose => {
                    let Some(lost) = in_flight.pop_front() else {
                        continue;
                    };
                    pending.extend(&lost.dirty);
                    for later in in_flight.drain(..) {
                        let err = dec.decode(&later.bytes, &replica).err();
                        let mismatch = matches!(err, Some(CodecError::BaseMismatch { .. }));
                        prop_assert!(mismatch, "got {:?}", err);
                        pending.extend(&later.dirty);
                    }
                    one.invalidate_from(lost.epoch).map_err(fail)?;
                    many.invalidate_from(lost.epoch).map_err(fail)?;
                    prop_assert_eq!(one.base_epoch(), many.base_epoch());
                    let base = many.base_epoch();
                    prop_assert!(base.is_none() || base == replica.committed_epoch());
                }
                Op::Reset => {
                    in_flight.clear();
                    one.reset();
                    many.reset();
                    pending = (0..frames).collect();
                }
                Op::Forget(fs) => {
                    let fs: Vec<u64> = fs.iter().map(|&f| u64::from(f) % frames).collect();
                    one.forget_frames(&fs);
                    many.forget_frames(&fs);
                }
            }
        }
        while let Some(e) = in_flight.pop_front() {
            dec.decode(&e.bytes, &replica)
                .map_err(fail)?
                .apply(&mut replica)
                .map_err(fail)?;
            prop_assert!(replica.as_bytes() == &e.image[..], "epoch {}", e.epoch);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn codec_threads_give_the_same_bytes_and_round_trip(
            threads in 2usize..5,
            frames in 8u64..96,
            ps in prop_oneof![Just(512usize), Just(4096)],
            cache_pages in prop_oneof![Just(0usize), Just(2), Just(16), Just(128)],
            chunk_bytes in prop_oneof![Just(1usize), Just(700), Just(4096), Just(64 << 10)],
            per_page_zstd in prop::bool::weighted(0.2),
            seed in any::<u64>(),
            ops in prop::collection::vec(op(), 1..32),
        ) {
            lockstep(threads, frames, ps, cache_pages, chunk_bytes, per_page_zstd, seed, ops)?;
        }
    }

    /// The choice between helpers and the calling thread alone, from
    /// made-up timings: helpers that did half the work are kept; helpers
    /// that delivered nothing are dropped, and retried every 16 epochs.
    #[test]
    fn codec_mode_chooser_keeps_useful_helpers_only() {
        use super::{EpochTiming, ModeChooser};
        use std::time::Duration;
        let ms = Duration::from_millis;
        let mut m = ModeChooser::default();
        assert!(m.use_helpers(), "helpers are tried first");
        // 5 ns per byte here; 1 MB here and 1 MB by a helper in 10 ms of
        // wall time: alone it would have taken 15 ms.
        let useful = EpochTiming {
            busy: None,
            idle: Duration::ZERO,
            own_bytes: 1_000_000,
            own_time: ms(5),
            helper_bytes: 1_000_000,
            helper_other: Duration::ZERO,
        };
        m.record(ms(10), useful);
        let g = m.gain().expect("gain");
        assert!((g - 1.5).abs() < 1e-6, "gain {g}");
        // Digests computed by the helpers count as time saved too.
        let mut with_digests = useful;
        with_digests.add_helper_time(ms(2));
        m.record(ms(10), with_digests);
        let g = m.gain().expect("gain");
        assert!((g - 1.7).abs() < 1e-6, "gain {g}");
        assert!((0..20).all(|_| m.use_helpers()));
        // Nothing from the helpers, 2 ms spent waiting for them.
        let useless = EpochTiming {
            idle: ms(2),
            helper_bytes: 0,
            ..useful
        };
        m.record(ms(10), useless);
        // Retried after 2 epochs alone, then 4, 8, 16, 16.
        let mut tries = Vec::new();
        for _ in 0..5 {
            let alone = (0..40).take_while(|_| !m.use_helpers()).count();
            tries.push(alone + 1);
            m.record(ms(10), useless);
        }
        assert_eq!(tries, [2, 4, 8, 16, 16]);
        // Helpers that pay again are kept again.
        m.record(ms(10), useful);
        assert!((0..20).all(|_| m.use_helpers()));
    }

    /// A helper that never picks anything up (as when it is descheduled for
    /// long): the calling thread takes every queued chunk over, in order.
    #[test]
    fn codec_stalled_helpers_are_taken_over() {
        use super::{Pipeline, Shared, Spare};
        use crate::codec::chunk_plan::{ChunkCtx, ChunkPlan};
        let ctx = || ChunkCtx::new(3, true, 4096).expect("zstd");
        let (mut here, mut reference) = (ctx(), ctx());
        let shared = Shared::default();
        let mut spare = Spare::default();
        let (mut out, mut expected, mut outcomes) = (Vec::new(), Vec::new(), Vec::new());
        {
            let mut pipe = Pipeline::new(&shared, 2, &mut spare);
            for i in 0..7u32 {
                let mut raw = vec![0u8; 3000 + 500 * i as usize];
                fill_text(&mut Rng::new(u64::from(i)), &mut raw);
                // Every third chunk is "already compressed": stored.
                let dense = if i % 3 == 2 { raw.len() } else { 0 };
                let plan = ChunkPlan {
                    raw,
                    records: i,
                    dense,
                    ..ChunkPlan::default()
                };
                reference.finish(&plan, &mut expected, &mut outcomes);
                let next = pipe.submit(&mut here, &mut out, plan);
                assert!(next.raw.is_empty());
            }
            pipe.finish(&mut here, &mut out, None);
        }
        assert!(out == expected);
    }

    /// Pages whose content moves, in epochs of many chunks: with chunk
    /// prefixes, the moved pages go raw with their old content in their
    /// chunk's prefix; without, the prefix attempts run on the helpers
    /// and some pay. Either way the bytes and the counts are those of one
    /// thread.
    #[test]
    fn codec_moved_pages_on_helpers_same_bytes() {
        let chunk_prefixes = moved_pages_on_helpers(64);
        assert!(chunk_prefixes.own_prefix > 100, "{chunk_prefixes:?}");
        let attempts = moved_pages_on_helpers(0);
        assert!(attempts.prefix_zstd > 100, "{attempts:?}");
        assert_eq!(attempts.own_prefix, 0);
        assert!(chunk_prefixes.wire_bytes < attempts.wire_bytes);
    }

    fn moved_pages_on_helpers(chunk_refs: usize) -> EncodeStats {
        let (ps, frames) = (4096usize, 512u64);
        let mut memory = vec![0u8; frames as usize * ps];
        let mut rng = Rng::new(7);
        for page in memory.chunks_exact_mut(ps) {
            fill_struct(&mut rng, page);
        }
        let enc = |threads| {
            Encoder::new(EncoderConfig {
                chunk_bytes: 16 << 10,
                threads,
                chunk_refs,
                ..EncoderConfig::default()
            })
            .expect("encoder")
        };
        let (mut one, mut many) = (enc(1), enc(2));
        many.force_helpers(Some(true));
        let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
        let mut replica = VecMemory::new(frames, ps);
        for epoch in 1..=4u64 {
            if epoch > 1 {
                for (i, page) in memory.chunks_exact_mut(ps).enumerate() {
                    // Every page: most shifted, some rewritten.
                    if i % 5 == 0 {
                        fill_text(&mut rng, page);
                    } else {
                        let by = 1 + (i + epoch as usize) % 24;
                        page.copy_within(64..ps - by, 64 + by);
                    }
                }
            }
            let pages: Vec<(u64, &[u8])> = memory
                .chunks_exact(ps)
                .enumerate()
                .map(|(f, p)| (f as u64, p))
                .collect();
            let a = one.encode(epoch, &pages, b"", &[]).expect("encode");
            let b = many.encode(epoch, &pages, b"", &[]).expect("encode");
            assert!(a == b, "epoch {epoch}: bytes differ");
            assert_eq!(one.stats(), many.stats());
            dec.decode(&b, &replica)
                .expect("decode")
                .apply(&mut replica)
                .expect("apply");
            assert!(replica.as_bytes() == &memory[..], "epoch {epoch}");
        }
        many.stats()
    }

    /// Fresh pages made of other frames' content at other alignments, in
    /// epochs of many chunks: chunks name prefix frames (wire version 3),
    /// the helpers compress them, and the bytes are those of one thread.
    #[test]
    fn codec_chunk_refs_on_helpers_same_bytes() {
        let (ps, frames) = (4096usize, 512u64);
        let mut memory = vec![0u8; frames as usize * ps];
        let mut rng = Rng::new(11);
        for page in memory.chunks_exact_mut(ps) {
            fill_text(&mut rng, page);
        }
        let enc = |threads| {
            Encoder::new(EncoderConfig {
                chunk_bytes: 32 << 10,
                threads,
                ..EncoderConfig::default()
            })
            .expect("encoder")
        };
        let (mut one, mut many) = (enc(1), enc(2));
        many.force_helpers(Some(true));
        let mut plain = Encoder::new(EncoderConfig {
            chunk_bytes: 32 << 10,
            chunk_refs: 0,
            ..EncoderConfig::default()
        })
        .expect("encoder");
        let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
        let mut replica = VecMemory::new(frames, ps);
        let mut v3 = 0;
        // Three epochs: the fingerprint table keeps two holders of each
        // fingerprint, the lower half and the previous epoch's copy.
        for epoch in 1..=3u64 {
            let mut dirty: Vec<u64> = (0..frames).collect();
            if epoch > 1 {
                // The upper half: spliced from the lower half (unchanged
                // this epoch), 1..4095 bytes off the page boundary.
                dirty = (frames / 2..frames).collect();
                let half = frames / 2;
                for f in half..frames {
                    let src = (f - half + epoch) % half;
                    let next = (src + 1) % half;
                    let at = 1 + (f as usize * 977 + epoch as usize * 131) % (ps - 1);
                    let (lo, hi) = memory.split_at_mut(f as usize * ps);
                    hi[..ps - at].copy_from_slice(&lo[src as usize * ps + at..][..ps - at]);
                    hi[ps - at..ps].copy_from_slice(&lo[next as usize * ps..][..at]);
                }
            }
            let pages: Vec<(u64, &[u8])> = dirty
                .iter()
                .map(|&f| (f, &memory[f as usize * ps..(f as usize + 1) * ps]))
                .collect();
            let a = one.encode(epoch, &pages, b"", &[]).expect("encode");
            let b = many.encode(epoch, &pages, b"", &[]).expect("encode");
            assert!(a == b, "epoch {epoch}: bytes differ");
            let c = plain.encode(epoch, &pages, b"", &[]).expect("encode");
            if u16::from_le_bytes([b[4], b[5]]) == 3 {
                v3 += 1;
                // Far smaller than the text alone compresses.
                assert!(
                    b.len() * 2 < c.len(),
                    "{} bytes, {} without",
                    b.len(),
                    c.len()
                );
            }
            dec.decode(&b, &replica)
                .expect("decode")
                .apply(&mut replica)
                .expect("apply");
            assert!(replica.as_bytes() == &memory[..], "epoch {epoch}");
        }
        assert_eq!(v3, 2, "every epoch after the first names prefix frames");
    }

    /// Whole synthetic traces, large enough for dozens of 256 KiB chunks per
    /// epoch: the helpers really run concurrently with the page pass.
    #[test]
    fn codec_threads_same_bytes_on_synthetic_traces() {
        use crate::codec::synthetic::{Trace, TraceConfig, TraceKind};
        for kind in TraceKind::ALL {
            let cfg = TraceConfig {
                frames: 4096,
                dirty_pages: 1024,
                ..TraceConfig::default()
            };
            let mut trace = Trace::new(kind, cfg);
            let enc = |threads| {
                Encoder::new(EncoderConfig {
                    cache_budget_bytes: 1024 * 4096,
                    threads,
                    ..EncoderConfig::default()
                })
                .expect("encoder")
            };
            let (mut one, mut many) = (enc(1), enc(3));
            many.force_helpers(Some(true));
            let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
            let mut replica = VecMemory::new(cfg.frames, cfg.page_size);
            let mut frames = trace.all_frames();
            for epoch in 1..=6 {
                let pages = trace.pages(&frames);
                let a = one.encode(epoch, &pages, b"", &[]).expect("encode");
                let b = many.encode(epoch, &pages, b"", &[]).expect("encode");
                assert!(a == b, "{kind:?} epoch {epoch}: bytes differ");
                dec.decode(&b, &replica)
                    .expect("decode")
                    .apply(&mut replica)
                    .expect("apply");
                assert!(
                    replica.as_bytes() == trace.memory(),
                    "{kind:?} epoch {epoch}"
                );
                if epoch % 2 == 0 {
                    one.acknowledge(epoch);
                    many.acknowledge(epoch);
                }
                frames = trace.step();
            }
        }
    }
}
