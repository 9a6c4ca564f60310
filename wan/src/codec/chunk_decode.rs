//! Decompressing an epoch's record chunks on several threads, when at
//! least two of them are zstd frames large enough to pay for a thread
//! (`decoder.rs`, `worth_helpers`).
//!
//! Chunks are independent zstd frames: a `BLOCK_ZSTD_REFS` chunk's prefix
//! is committed replica content, which the decoder only reads while it
//! decodes an epoch, so each thread assembles the prefix of the chunk it
//! takes and the frames can be decompressed in any order. The records are
//! read in chunk order on the calling thread, each chunk as soon as it is
//! ready; errors therefore come out in the order a single thread finds
//! them (a chunk's zstd error before its records', an earlier chunk's
//! record error before a later chunk's zstd error), which the fuzzing
//! harness checks on every input.
//!
//! zstd's sequence decoding dominates a chunk of real guest memory (the
//! recorded `sort` trace: 1.5-1.6 GB/s of dirty pages on one core, two
//! thirds of it in zstd): the second core lifts it to about 2 GB/s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::block::RawBlock;
use super::cpu_time::Stopwatch;
use super::error::CodecError;
use super::format::BLOCK_ZSTD_REFS;
use super::memory::PageSource;
use super::prefix::PrefixDecompressor;

/// One record chunk, located, with its prefix frames listed and checked.
pub(crate) struct ChunkJob<'a> {
    /// Records the chunk holds (its header's count).
    pub records: u32,
    pub block: RawBlock<'a>,
    /// `BLOCK_ZSTD_REFS`: the zstd frame after the frame list.
    pub refs_frame: &'a [u8],
    /// `BLOCK_ZSTD_REFS`: the frames whose committed content is the
    /// prefix, in order, each checked against the replica's frame count.
    pub refs: Vec<u64>,
}

/// The zstd contexts one thread decompresses chunks with.
pub(crate) struct ChunkDecompressor {
    pub dz: zstd::bulk::Decompressor<'static>,
    pub pd: PrefixDecompressor,
    /// A `BLOCK_ZSTD_REFS` chunk's prefix, reused.
    prefix: Vec<u8>,
}

impl ChunkDecompressor {
    pub(crate) fn new() -> Result<Self, CodecError> {
        let dz = zstd::bulk::Decompressor::new()
            .map_err(|e| CodecError::corrupt(format!("zstd decompressor: {e}")))?;
        let pd = PrefixDecompressor::new()
            .ok_or_else(|| CodecError::corrupt("zstd decompressor: no memory"))?;
        Ok(ChunkDecompressor {
            dz,
            pd,
            prefix: Vec::new(),
        })
    }

    /// Decompresses `job` into `out`: exactly its raw length or an error.
    pub(crate) fn run<S: PageSource + ?Sized>(
        &mut self,
        job: &ChunkJob<'_>,
        replica: &S,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        if job.block.method == BLOCK_ZSTD_REFS {
            self.refs(job.refs_frame, &job.refs, replica, job.block.raw_len, out)
        } else {
            job.block.decode_into(out, &mut self.dz, "record chunk")
        }
    }

    /// A `BLOCK_ZSTD_REFS` chunk's zstd frame `z` with the committed
    /// content of `frames` (checked against the replica's frame count) as
    /// prefix, which must decode to exactly `raw_len` bytes.
    pub(crate) fn refs<S: PageSource + ?Sized>(
        &mut self,
        z: &[u8],
        frames: &[u64],
        replica: &S,
        raw_len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        self.prefix.clear();
        for &f in frames {
            self.prefix.extend_from_slice(replica.page(f));
        }
        // The records are decoded right after the prefix, in one buffer:
        // zstd then sees one contiguous window, not a prefix elsewhere in
        // memory (its slower external-dictionary path), and the copy out
        // costs less than that (decode 1-4 % faster on the recorded
        // traces).
        let prefix_len = self.prefix.len();
        self.prefix.resize(prefix_len + raw_len as usize, 0);
        let (prefix, records) = self.prefix.split_at_mut(prefix_len);
        let n = self
            .pd
            .decompress(z, prefix, records)
            .map_err(|e| CodecError::corrupt(format!("record chunk: bad zstd block: {e}")))?;
        if n as u64 != raw_len {
            return Err(CodecError::corrupt(format!(
                "record chunk: zstd block decodes to {n} bytes, header says {raw_len}"
            )));
        }
        out.clear();
        out.extend_from_slice(records);
        Ok(())
    }
}

/// A decompressed chunk, or why it is not one.
type ChunkResult = Result<Vec<u8>, CodecError>;

/// An epoch's chunks being decompressed: helper threads take them in
/// order; the calling thread reads each chunk's records as soon as that
/// chunk is ready and, while it waits, decompresses the next one itself.
pub(crate) struct ChunkQueue<'j, 'a> {
    jobs: &'j [ChunkJob<'a>],
    next: AtomicUsize,
    done: Mutex<Done>,
    /// Signalled when a chunk is finished while the reader waits.
    ready: Condvar,
    /// Raw bytes the helpers decompressed (for `ModeChooser`).
    helper_bytes: AtomicU64,
}

/// Finished chunks not yet read, and whether the reader (the calling
/// thread, the only one that waits) is waiting: a notification is a system
/// call even when nobody waits.
struct Done {
    results: Vec<Option<ChunkResult>>,
    reader_waiting: bool,
}

/// What the calling thread did in one epoch, for `ModeChooser`: raw bytes
/// it decompressed and the CPU time that took, and time it waited.
#[derive(Default)]
pub(crate) struct CallerWork {
    pub bytes: u64,
    pub time: Duration,
    pub idle: Duration,
}

impl<'j, 'a> ChunkQueue<'j, 'a> {
    pub(crate) fn new(jobs: &'j [ChunkJob<'a>]) -> Self {
        ChunkQueue {
            jobs,
            next: AtomicUsize::new(0),
            done: Mutex::new(Done {
                results: (0..jobs.len()).map(|_| None).collect(),
                reader_waiting: false,
            }),
            ready: Condvar::new(),
            helper_bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn jobs(&self) -> &'j [ChunkJob<'a>] {
        self.jobs
    }

    /// A helper thread's loop: chunks until none is left unclaimed.
    pub(crate) fn help<S: PageSource + Sync + ?Sized>(
        &self,
        ctx: &mut ChunkDecompressor,
        replica: &S,
    ) {
        while let Some(bytes) = self.work_one(ctx, replica) {
            self.helper_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Raw bytes the helpers have decompressed so far.
    pub(crate) fn helper_bytes(&self) -> u64 {
        self.helper_bytes.load(Ordering::Relaxed)
    }

    /// No chunk is claimed after this (the epoch failed).
    pub(crate) fn stop(&self) {
        self.next.fetch_max(self.jobs.len(), Ordering::Relaxed);
    }

    /// Chunk `i`'s result: taken when a thread has finished it, else the
    /// caller decompresses the next unclaimed chunk and looks again, and
    /// waits only when every chunk is claimed.
    pub(crate) fn take<S: PageSource + Sync + ?Sized>(
        &self,
        i: usize,
        ctx: &mut ChunkDecompressor,
        replica: &S,
        me: &mut CallerWork,
    ) -> Result<Vec<u8>, CodecError> {
        loop {
            if let Some(r) = self.lock().results[i].take() {
                return r;
            }
            let watch = Stopwatch::start();
            let Some(bytes) = self.work_one(ctx, replica) else {
                break;
            };
            me.bytes += bytes;
            me.time += watch.elapsed();
        }
        let waiting = Instant::now();
        let r = self.wait_for(i);
        me.idle += waiting.elapsed();
        r
    }

    fn wait_for(&self, i: usize) -> ChunkResult {
        let mut done = self.lock();
        loop {
            if let Some(r) = done.results[i].take() {
                done.reader_waiting = false;
                return r;
            }
            done.reader_waiting = true;
            done = self
                .ready
                .wait(done)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Claims and decompresses one chunk: its raw bytes, `None` when no
    /// chunk is left.
    fn work_one<S: PageSource + Sync + ?Sized>(
        &self,
        ctx: &mut ChunkDecompressor,
        replica: &S,
    ) -> Option<u64> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let job = self.jobs.get(i)?;
        let mut buf = Vec::new();
        // A panic in zstd's bindings must not leave the reader waiting for
        // a chunk that never comes.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ctx.run(job, replica, &mut buf)
        }))
        .unwrap_or_else(|_| Err(CodecError::corrupt("record chunk: decompression failed")))
        .map(|()| buf);
        let wake = {
            let mut done = self.lock();
            done.results[i] = Some(r);
            done.reader_waiting
        };
        if wake {
            self.ready.notify_one();
        }
        Some(job.block.raw_len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Done> {
        self.done
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
