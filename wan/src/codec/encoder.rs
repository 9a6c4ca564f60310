//! The sender side: turns one epoch's dirty pages, state blob and disk writes
//! into wire bytes, keeping the page cache that deltas and duplicate
//! references are computed against.

use std::collections::VecDeque;
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_128;

use super::block::put_block;
use super::chunk_plan::{ChunkCtx, ChunkPlan, Outcome, PrefixTry};
use super::digest::{Digests, PageDigest};
use super::error::CodecError;
use super::fasthash::{map_with_capacity, U64Map};
use super::format::{
    Header, HEADER_LEN, MIN_VERSION, NO_BASE, REC_DELTA_RLE, REC_DELTA_ZSTD, REC_FULL_RAW,
    REC_FULL_ZSTD, REC_PREFIX_ZSTD, REC_REF, REC_ZERO, VERSION_PREFIX, VERSION_REFS,
};
use super::helper_threads::HelperThreads;
use super::page_cache::PageCache;
use super::parallel::{helper_loop, ModeChooser, Pipeline, Shared, Spare};
use super::rle::{measure_xor, write_xor, xor_into, DeltaScan};
use super::wire::{put_uleb, uleb_len, zigzag};
use super::xref::{self, FingerprintIndex};

/// Over an epoch's last pages a chunk is at most this fraction of the
/// input left, and at least [`TAIL_CHUNK_MIN`] (`Encoder::chunk_limit`).
const TAIL_CHUNK_DIVISOR: usize = 16;
const TAIL_CHUNK_MIN: usize = 16 << 10;

/// Pages ahead of the page pass whose bytes are fetched into the cache.
const PREFETCH_AHEAD: usize = 1;

/// A changed page whose XOR delta against its last-sent content has
/// runs (it is under a page) and is longer than this is sent raw, with
/// that content in its chunk's zstd prefix (`Encoder::own_refs`).
const OWN_REF_MIN_DELTA: usize = 256;

/// Encoder settings. `Default` gives 4 KiB pages, a 64 MiB cache, zstd level 3.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Written into every epoch; the decoder rejects epochs of another VM.
    pub vm_id: u64,
    /// Bytes per page; a power of two in 512..=65536.
    pub page_size: usize,
    /// Memory for cached page contents (deltas and duplicate sources).
    pub cache_budget_bytes: usize,
    /// zstd level for pages, chunks, state and disk data.
    pub zstd_level: i32,
    /// Records are grouped into chunks of about this many bytes, each chunk
    /// compressed as one zstd frame when that pays; shorter over an epoch's
    /// last pages (down to 16 KiB), so that threads finish together.
    pub chunk_bytes: usize,
    /// A delta whose run-length coding is at most this long is taken without
    /// trying zstd: a zstd frame has ~10 bytes of overhead, so it can win
    /// only a few bytes here, and skipping it is what keeps sparse writes fast.
    /// (Per-page mode only.)
    pub rle_accept_bytes: usize,
    /// `false` (default, "batched"): no zstd per page; each page is the
    /// smallest of zero / duplicate / RLE delta / raw, and zstd compresses
    /// whole chunks of records, which is both faster (one frame per chunk,
    /// not per page) and smaller (matches across pages). `true`: each page
    /// also tries XOR-then-zstd and page-then-zstd and keeps the smallest.
    pub per_page_zstd: bool,
    /// A changed page's last-sent content serves as zstd prefix for its
    /// new content. It catches what the XOR misses: content that moved
    /// within the page (database pages inserting rows, sorted arrays) and
    /// changed bytes that match other content. With chunk prefixes
    /// (`chunk_refs > 0`, batched mode) a page whose XOR delta has runs but
    /// is over 256 bytes goes raw with that content in its chunk's prefix
    /// (wire version 3). Otherwise a changed page whose XOR delta is not
    /// small (over `rle_accept_bytes`) is also compressed as one zstd
    /// frame with that content as prefix (`REC_PREFIX_ZSTD`, wire version
    /// 2), taken when it is under half the delta it replaces, or under an
    /// eighth of the page when the alternative is the raw page (with chunk
    /// prefixes these attempts no longer paid on the recorded traces: bytes
    /// within 0.3 % without them, 3-7 % faster). `false`: neither.
    pub prefix_zstd: bool,
    /// Threads that compress an epoch's chunks (the calling thread included).
    /// Chunks are independent zstd frames, so extra threads change nothing on
    /// the wire: the bytes are the same for every count. The page pass
    /// (cache, deltas, duplicates) always runs on the calling thread; the
    /// batched mode's prefix attempts run with their chunk's zstd. `1` (or
    /// `0`) compresses on the calling thread only. With more, an epoch large
    /// enough for two chunks uses the helpers unless the last epoch that did
    /// gained less than 10 % from them (estimated within that epoch); then
    /// helpers are retried after 2, 4, 8, then every 16 epochs: helpers on a
    /// core that is busy with something else only slow the epoch down.
    /// Default:
    /// [`EncoderConfig::default_threads`].
    pub threads: usize,
    /// zstd's fast match finder, with small tables, for every frame the
    /// encoder writes, at the level's entropy coding (levels >= 1; see
    /// `match_finder.rs`): about 1.3x faster on real-guest traces for bytes
    /// within 0.5 %. `false`: the level's own match finder. The decoder
    /// reads either.
    pub fast_match_finder: bool,
    /// Most cached pages a chunk may name as its zstd prefix
    /// (`BLOCK_ZSTD_REFS`, wire version 3; xref.rs): pages whose sub-page
    /// fingerprints the chunk's raw pages share, so that content found in
    /// the guest at another alignment compresses as matches, and (batched
    /// mode) the last-sent content of the chunk's pages whose XOR delta is
    /// partial but long: such a page goes raw, and zstd codes it as
    /// matches into its old content plus what changed, where the delta's
    /// runs hide what the new bytes have in common with anything else.
    /// `0`: never (versions 1 and 2 only).
    pub chunk_refs: usize,
}

impl EncoderConfig {
    /// The machine's available parallelism, at most 4 (zstd on 64 KiB
    /// chunks rarely keeps more busy behind one page pass).
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    }
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            vm_id: 0,
            page_size: 4096,
            cache_budget_bytes: 64 << 20,
            zstd_level: 3,
            // 64 KiB, not 256: each chunk's prefix frames are chosen by its
            // own raw pages' votes, so smaller chunks get closer prefixes
            // (recorded traces: sort, gzip and copy 0.3-1.2 % fewer bytes,
            // db 3.3 % more), zstd's tables stay in cache (per core
            // +3-10 %), and the helper thread starts sooner and the last
            // chunk is shorter (two threads: +20-48 %). docs/benchmarks.md.
            chunk_bytes: 64 << 10,
            rle_accept_bytes: 128,
            per_page_zstd: false,
            prefix_zstd: true,
            threads: Self::default_threads(),
            fast_match_finder: true,
            chunk_refs: 64,
        }
    }
}

/// How the pages of one or more epochs were encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub epochs: u64,
    pub pages: u64,
    /// Dirty pages whose content equals what the replica already holds: no record.
    pub unchanged: u64,
    pub zero: u64,
    pub duplicate: u64,
    pub delta_rle: u64,
    pub delta_zstd: u64,
    pub full_zstd: u64,
    pub full_raw: u64,
    /// Pages compressed with their last-sent content as zstd prefix.
    pub prefix_zstd: u64,
    /// Pages sent raw with their last-sent content in their chunk's zstd
    /// prefix (also counted in `full_raw`).
    pub own_prefix: u64,
    /// Bytes of dirty pages handed in (`pages * page_size`).
    pub page_bytes: u64,
    /// Bytes on the wire, headers and trailers included.
    pub wire_bytes: u64,
}

impl EncodeStats {
    pub fn add(&mut self, o: &EncodeStats) {
        self.epochs += o.epochs;
        self.pages += o.pages;
        self.unchanged += o.unchanged;
        self.zero += o.zero;
        self.duplicate += o.duplicate;
        self.delta_rle += o.delta_rle;
        self.delta_zstd += o.delta_zstd;
        self.full_zstd += o.full_zstd;
        self.full_raw += o.full_raw;
        self.prefix_zstd += o.prefix_zstd;
        self.own_prefix += o.own_prefix;
        self.page_bytes += o.page_bytes;
        self.wire_bytes += o.wire_bytes;
    }
}

/// Where the page pass hands a full chunk, with the calling thread's
/// compression state and where the outcomes of prefix attempts go; returns
/// an empty chunk for the next records.
type ChunkSink<'a> = dyn FnMut(&mut ChunkCtx, ChunkPlan, &mut Vec<Outcome>) -> ChunkPlan + 'a;

/// The sender's codec state for one protected VM.
pub struct Encoder {
    cfg: EncoderConfig,
    cache: PageCache,
    /// The calling thread's zstd contexts (chunks, prefix frames, blocks).
    ctx: ChunkCtx,
    /// Compression contexts of the helper threads (`threads - 1`), one per
    /// slot of a round (helper_threads.rs), kept between epochs.
    helpers: Vec<Mutex<ChunkCtx>>,
    /// The threads that use them, started on the first epoch with helpers
    /// and kept (helper_threads.rs).
    threads: Option<HelperThreads>,
    /// Emptied chunk buffers of the multi-threaded path, for reuse.
    spare_chunks: Spare,
    /// Helpers or not, from how fast each mode has been lately.
    mode: ModeChooser,
    /// Last epoch of the current chain: the base of the next epoch.
    chain_tail: Option<u64>,
    in_flight: VecDeque<u64>,
    acknowledged: Option<u64>,
    totals: EncodeStats,
    // Scratch reused across pages and epochs.
    /// The chunk the page pass is filling.
    chunk: ChunkPlan,
    /// Outcomes of the current epoch's deferred prefix attempts.
    outcomes: Vec<Outcome>,
    /// The current page's delta as measured, written if it is what goes.
    delta: DeltaScan,
    xor: Vec<u8>,
    zbuf: Vec<u8>,
    zbest: Vec<u8>,
    epoch_hashes: U64Map<u32>,
    seen: U64Map<()>,
    /// The current epoch holds a `REC_PREFIX_ZSTD` record: written as
    /// version 2.
    uses_prefix: bool,
    /// A chunk of the current epoch names prefix frames: version 3.
    uses_refs: bool,
    /// Sub-page fingerprints of the pages sent raw, and the votes of the
    /// current chunk's raw pages for the frames that sent them before.
    xref: FingerprintIndex,
    votes: U64Map<u32>,
    /// Frames of the current chunk sent raw with their last-sent content
    /// as part of the chunk's prefix, and that content (copied: the cache
    /// slot takes the new bytes as the page pass moves on). The replica
    /// still holds it when the epoch is decoded: the frame's committed
    /// content is what was last sent.
    own_refs: Vec<u64>,
    /// Prefix candidates tried and taken in the current epoch, and in how
    /// many candidates one is tried this epoch (1, or [`PREFIX_SAMPLE`]
    /// after an epoch where under one try in eight paid: fresh content
    /// such as random pages then costs one zstd call in 16 candidates).
    prefix_tries: u32,
    prefix_hits: u32,
    prefix_every: u32,
    prefix_tick: u32,
    /// Raw pages fingerprinted with votes in the current epoch, those
    /// whose fingerprints were found, and in how many raw pages one is
    /// fingerprinted this epoch (1, or [`XREF_SAMPLE`] after an epoch
    /// where under one in 16 found anything: fresh random content then
    /// costs a sixteenth of the fingerprinting).
    xref_sampled: u32,
    xref_found: u32,
    xref_every: u32,
    xref_tick: u32,
}

/// See `Encoder::xref_every`. Fingerprinting a raw page costs about as
/// much as the rest of its encoding where zstd does not run (synthetic
/// random trace: 1,400 -> 730 MB/s per core with every page sampled).
const XREF_SAMPLE: u32 = 16;

/// See `Encoder::prefix_every`.
const PREFIX_SAMPLE: u32 = 16;

impl Encoder {
    /// Fails only if zstd cannot allocate a context or the page size is invalid.
    pub fn new(cfg: EncoderConfig) -> Result<Self, CodecError> {
        let ps = cfg.page_size as u64;
        if !ps.is_power_of_two()
            || !(super::format::MIN_PAGE_SIZE..=super::format::MAX_PAGE_SIZE).contains(&ps)
        {
            return Err(CodecError::PageSizeMismatch {
                expected: 4096,
                found: ps,
            });
        }
        let chunk_bytes = cfg
            .chunk_bytes
            .clamp(1, (super::format::MAX_CHUNK_RAW as usize) / 2);
        let chunk_refs = cfg.chunk_refs.min(super::format::MAX_CHUNK_REFS as usize);
        let new_ctx = || {
            ChunkCtx::new(cfg.zstd_level, cfg.fast_match_finder, cfg.page_size)
                .map_err(|e| CodecError::corrupt(format!("zstd compressor: {e}")))
        };
        let ctx = new_ctx()?;
        let helpers = (1..cfg.threads.max(1))
            .map(|_| new_ctx().map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Encoder {
            cache: PageCache::new(cfg.page_size, cfg.cache_budget_bytes),
            ctx,
            helpers,
            threads: None,
            spare_chunks: Spare::default(),
            mode: ModeChooser::default(),
            chain_tail: None,
            in_flight: VecDeque::new(),
            acknowledged: None,
            totals: EncodeStats::default(),
            chunk: ChunkPlan {
                raw: Vec::with_capacity(chunk_bytes + 2 * cfg.page_size),
                ..ChunkPlan::default()
            },
            outcomes: Vec::new(),
            delta: DeltaScan::default(),
            xor: vec![0; cfg.page_size],
            zbuf: vec![0; cfg.page_size],
            zbest: vec![0; cfg.page_size],
            epoch_hashes: map_with_capacity(0),
            seen: map_with_capacity(0),
            uses_prefix: false,
            uses_refs: false,
            xref: FingerprintIndex::new(),
            votes: map_with_capacity(0),
            own_refs: Vec::new(),
            prefix_tries: 0,
            prefix_hits: 0,
            prefix_every: 1,
            prefix_tick: 0,
            xref_sampled: 0,
            xref_found: 0,
            xref_every: 1,
            xref_tick: 0,
            cfg: EncoderConfig {
                chunk_bytes,
                chunk_refs,
                ..cfg
            },
        })
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// Totals over every epoch encoded so far.
    pub fn stats(&self) -> EncodeStats {
        self.totals
    }

    /// The epoch the next encoded epoch will be based on.
    pub fn base_epoch(&self) -> Option<u64> {
        self.chain_tail
    }

    /// Epochs encoded and not yet acknowledged nor invalidated, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = u64> + '_ {
        self.in_flight.iter().copied()
    }

    /// Pages currently cached.
    pub fn cached_pages(&self) -> usize {
        self.cache.len()
    }

    /// Pages the cache budget allows.
    pub fn cache_capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Encodes one epoch into a new buffer. See [`Encoder::encode_into`].
    pub fn encode(
        &mut self,
        epoch: u64,
        pages: &[(u64, &[u8])],
        state_blob: &[u8],
        disk_writes: &[(u64, &[u8])],
    ) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.encode_into(epoch, pages, state_blob, disk_writes, &mut out)?;
        Ok(out)
    }

    /// Encodes one epoch into `out` (cleared first) and returns how.
    ///
    /// `epoch` must be greater than the previous epoch of the chain. Each frame
    /// may appear once. The input is checked before any state changes, so an
    /// error leaves the encoder as it was. Once this returns `Ok`, the encoder
    /// assumes the replica will apply the epoch: if it is not sent or not
    /// applied, call [`Encoder::invalidate_from`] with it.
    pub fn encode_into(
        &mut self,
        epoch: u64,
        pages: &[(u64, &[u8])],
        state_blob: &[u8],
        disk_writes: &[(u64, &[u8])],
        out: &mut Vec<u8>,
    ) -> Result<EncodeStats, CodecError> {
        self.check_input(epoch, pages, state_blob, disk_writes)?;
        let base = self.chain_tail;
        out.clear();
        out.resize(HEADER_LEN, 0);

        let mut st = EncodeStats {
            epochs: 1,
            pages: pages.len() as u64,
            page_bytes: (pages.len() * self.cfg.page_size) as u64,
            ..EncodeStats::default()
        };
        // Helper threads pay only when the epoch can fill several chunks,
        // and only when a core is free for them (see `ModeChooser`). Either
        // way the bytes are the same.
        let input = pages.len().saturating_mul(self.cfg.page_size);
        self.begin_pass();
        let helpers = !self.helpers.is_empty()
            && input >= 2 * self.cfg.chunk_bytes
            && self.mode.use_helpers();
        let (records, chunks) = if helpers {
            self.encode_pages_parallel(epoch, pages, &mut st, out)
        } else {
            self.encode_pages(epoch, pages, None, &mut st, &mut |ctx, plan, outcomes| {
                ctx.finish(&plan, out, outcomes);
                plan
            })
        };
        self.apply_outcomes(&mut st);

        // Small blobs never shrink enough to pay for a zstd frame.
        let worth = |raw: &[u8]| raw.len() > 256;
        put_block(
            out,
            state_blob,
            worth(state_blob).then_some(&mut self.ctx.zc),
            &mut self.ctx.scratch,
        );
        for &(offset, data) in disk_writes {
            out.extend_from_slice(&offset.to_le_bytes());
            put_block(
                out,
                data,
                worth(data).then_some(&mut self.ctx.zc),
                &mut self.ctx.scratch,
            );
        }

        let body_len = (out.len() - HEADER_LEN) as u64;
        let mut header = Vec::with_capacity(HEADER_LEN);
        Header {
            version: if self.uses_refs {
                VERSION_REFS
            } else if self.uses_prefix {
                VERSION_PREFIX
            } else {
                MIN_VERSION
            },
            flags: 0,
            page_size: self.cfg.page_size as u32,
            vm_id: self.cfg.vm_id,
            epoch,
            base_epoch: base.unwrap_or(NO_BASE),
            record_count: records,
            chunk_count: chunks,
            disk_write_count: disk_writes.len() as u32,
            body_len,
        }
        .write(&mut header);
        out[..HEADER_LEN].copy_from_slice(&header);
        let sum = xxh3_128(out);
        out.extend_from_slice(&sum.to_le_bytes());

        st.wire_bytes = out.len() as u64;
        self.totals.add(&st);
        self.chain_tail = Some(epoch);
        self.in_flight.push_back(epoch);
        Ok(st)
    }

    /// Tests: always (`Some(true)`) or never use the helper threads,
    /// whatever the timings say.
    #[cfg(test)]
    pub(crate) fn force_helpers(&mut self, forced: Option<bool>) {
        self.mode.forced = forced;
    }

    /// The page pass: one record per page that needs one, in page order,
    /// cache updated as it goes. Each full chunk of records goes to `sink`
    /// (with the record count and whether it is worth compressing), which
    /// returns an empty buffer for the next chunk. Returns (records, chunks).
    fn encode_pages(
        &mut self,
        epoch: u64,
        pages: &[(u64, &[u8])],
        digests: Option<&Digests<'_>>,
        st: &mut EncodeStats,
        sink: &mut ChunkSink<'_>,
    ) -> (u32, u32) {
        let mut records = 0u32;
        let mut chunks = 0u32;
        let mut predicted = 0u64;
        self.chunk.clear();
        self.outcomes.clear();
        for (index, &(frame, data)) in pages.iter().enumerate() {
            if let Some(&(_, ahead)) = pages.get(index + PREFETCH_AHEAD) {
                super::prefetch::page(ahead);
            }
            let pre = digests.and_then(|d| d.get(index));
            if self.encode_page(epoch, index as u32, pages, frame, data, pre, predicted, st) {
                predicted = frame.wrapping_add(1);
                records += 1;
                self.chunk.records += 1;
                // On the fallback sizes: the same boundaries whatever the
                // deferred prefix attempts give (see chunk_plan.rs).
                if self.chunk.raw.len() >= self.chunk_limit(pages.len() - index - 1) {
                    self.flush_chunk(epoch, sink);
                    chunks += 1;
                }
            }
        }
        if self.chunk.records > 0 {
            self.flush_chunk(epoch, sink);
            chunks += 1;
        }
        (records, chunks)
    }

    /// Size at which the chunk being filled is full, with `pages_left`
    /// pages of the epoch after the current one: `chunk_bytes`, down to
    /// [`TAIL_CHUNK_MIN`] over the epoch's last pages, where a chunk is
    /// at most a sixteenth of the input left. Every thread finishes its
    /// last chunk at the end of the epoch while the others may have
    /// nothing left: the last chunks being short keeps that wait short
    /// (recorded traces with two threads: 3-9 % faster; bytes gzip
    /// -2.2 %, sort -0.1 %, db +0.7 %, copy -0.4 %: shorter chunks also
    /// get closer prefix frames, except on db. An eighth gained 2-7 %
    /// with bytes within 1 %; all chunks at 32 KiB gained about as much
    /// on gzip and sort but cost db 2 % more bytes and the synthetic
    /// random trace a third of its speed on one thread). A function of the input only, like
    /// every boundary: the bytes stay the same for any thread count.
    fn chunk_limit(&self, pages_left: usize) -> usize {
        let full = self.cfg.chunk_bytes;
        (pages_left.saturating_mul(self.cfg.page_size) / TAIL_CHUNK_DIVISOR)
            .clamp(TAIL_CHUNK_MIN.min(full), full)
    }

    /// Resets the per-epoch state of the page pass and decides this
    /// epoch's sampling from the last one's outcomes.
    fn begin_pass(&mut self) {
        self.epoch_hashes.clear();
        self.uses_prefix = false;
        self.uses_refs = false;
        self.votes.clear();
        if self.prefix_tries > 0 {
            self.prefix_every = if self.prefix_hits * 8 < self.prefix_tries {
                PREFIX_SAMPLE
            } else {
                1
            };
        }
        self.prefix_tries = 0;
        // Decided only on epochs that looked fingerprints up (with a
        // base): the first image is always indexed in full.
        if self.xref_sampled > 0 {
            self.xref_every = if self.xref_found * 16 < self.xref_sampled {
                XREF_SAMPLE
            } else {
                1
            };
        }
        self.xref_sampled = 0;
        self.xref_found = 0;
        self.prefix_hits = 0;
    }

    /// [`Encoder::encode_pages`] with chunks compressed by helper threads
    /// too; same bytes in `out`.
    fn encode_pages_parallel(
        &mut self,
        epoch: u64,
        pages: &[(u64, &[u8])],
        st: &mut EncodeStats,
        out: &mut Vec<u8>,
    ) -> (u32, u32) {
        let helpers = std::mem::take(&mut self.helpers);
        let mut threads = self
            .threads
            .take()
            .unwrap_or_else(|| HelperThreads::new(helpers.len(), "codec-zstd"));
        let mut spare = std::mem::take(&mut self.spare_chunks);
        let shared = Shared::default();
        let digests = Digests::new(pages);
        let started = std::time::Instant::now();
        let cpu_at_start = super::parallel::thread_cpu_time();
        let job = |slot: usize| {
            let mut ctx = helpers[slot].lock().unwrap_or_else(|e| e.into_inner());
            helper_loop(&shared, &mut ctx, &digests);
        };
        let (counts, timing, outcomes) = threads.run(helpers.len(), &job, |offered| {
            let mut pipe = Pipeline::new(&shared, offered, &mut spare);
            let counts =
                self.encode_pages(epoch, pages, Some(&digests), st, &mut |ctx, plan, _| {
                    pipe.submit(ctx, out, plan)
                });
            let mut timing = pipe.finish(&mut self.ctx, out, cpu_at_start);
            timing.add_helper_time(digests.used_helper_time());
            (counts, timing, pipe.take_outcomes())
        });
        self.outcomes.extend(outcomes);
        self.mode.record(started.elapsed(), timing);
        self.helpers = helpers;
        self.threads = Some(threads);
        self.spare_chunks = spare;
        counts
    }

    fn check_input(
        &mut self,
        epoch: u64,
        pages: &[(u64, &[u8])],
        state_blob: &[u8],
        disk_writes: &[(u64, &[u8])],
    ) -> Result<(), CodecError> {
        if let Some(prev) = self.chain_tail {
            if epoch <= prev {
                return Err(CodecError::EpochNotIncreasing {
                    epoch,
                    previous: prev,
                });
            }
        }
        if epoch == NO_BASE {
            return Err(CodecError::corrupt("epoch number u64::MAX is reserved"));
        }
        let too_big = |what, len: usize| -> Result<(), CodecError> {
            if len > u32::MAX as usize {
                return Err(CodecError::Oversized {
                    what,
                    len: len as u64,
                    limit: u64::from(u32::MAX),
                });
            }
            Ok(())
        };
        too_big("page count", pages.len())?;
        too_big("state blob", state_blob.len())?;
        too_big("disk write count", disk_writes.len())?;
        for (_, d) in disk_writes {
            too_big("disk write", d.len())?;
        }
        self.seen.clear();
        self.seen.reserve(pages.len());
        for &(frame, data) in pages {
            if data.len() != self.cfg.page_size {
                return Err(CodecError::PageSizeMismatch {
                    expected: self.cfg.page_size as u64,
                    found: data.len() as u64,
                });
            }
            if self.seen.insert(frame, ()).is_some() {
                return Err(CodecError::DuplicateFrame { frame });
            }
        }
        Ok(())
    }

    /// Chooses and appends the record of one page; updates the cache.
    /// Returns false when the page needs no record (content unchanged).
    #[allow(clippy::too_many_arguments)]
    fn encode_page(
        &mut self,
        epoch: u64,
        index: u32,
        pages: &[(u64, &[u8])],
        frame: u64,
        data: &[u8],
        pre: Option<PageDigest>,
        predicted: u64,
        st: &mut EncodeStats,
    ) -> bool {
        let ps = self.cfg.page_size;
        let PageDigest { hash, zero } = pre.unwrap_or_else(|| PageDigest::of(data));
        let head = |chunk: &mut Vec<u8>, kind: u8| {
            chunk.push(kind);
            put_uleb(chunk, zigzag(frame.wrapping_sub(predicted) as i64));
        };
        let cached = self.cache.get(frame);

        if zero {
            if cached.is_some_and(is_zero) {
                st.unchanged += 1;
                return false;
            }
            head(&mut self.chunk.raw, REC_ZERO);
            st.zero += 1;
            self.cache.store(frame, data, hash, epoch);
            return true;
        }

        // Duplicate of a page sent earlier in this epoch (its content is in
        // the input), or of a frame whose last-sent content the cache holds.
        let mut dup = None;
        if let Some(&i) = self.epoch_hashes.get(&hash) {
            let (f, d) = pages[i as usize];
            if d == data {
                dup = Some(f);
            }
        }
        if dup.is_none() {
            if let Some((f, d)) = self.cache.find_by_hash(hash) {
                if d == data {
                    dup = Some(f);
                }
            }
        }
        self.epoch_hashes.insert(hash, index);
        match dup {
            Some(f) if f == frame => {
                st.unchanged += 1;
                self.cache.store(frame, data, hash, epoch);
                return false;
            }
            Some(f) => {
                head(&mut self.chunk.raw, REC_REF);
                put_uleb(&mut self.chunk.raw, zigzag(f.wrapping_sub(frame) as i64));
                st.duplicate += 1;
                self.cache.store(frame, data, hash, epoch);
                return true;
            }
            None => {}
        }

        // Candidates, smallest wins: (payload size including its length prefix).
        let mut best_kind = REC_FULL_RAW;
        let mut best_len = ps;
        let mut best_payload = ps;
        // Per page, a raw page that zstd could not shrink is incompressible;
        // batched, nothing has been compressed yet.
        let mut dense = self.cfg.per_page_zstd;
        if let Some(old) = cached {
            // Measured only: the delta is written below if it is what goes.
            if let Some(n) = measure_xor(data, old, ps - 1, &mut self.delta) {
                if n == 0 {
                    st.unchanged += 1;
                    self.cache.store(frame, data, hash, epoch);
                    return false;
                }
                best_kind = REC_DELTA_RLE;
                best_len = n + uleb_len(n as u64);
                best_payload = n;
                dense = false;
            }
            if self.cfg.per_page_zstd && best_len > self.cfg.rle_accept_bytes {
                xor_into(&mut self.xor, data, old);
                let cap = best_len.saturating_sub(2);
                if let Ok(n) = self
                    .ctx
                    .zc
                    .compress_to_buffer(&self.xor[..], &mut self.zbuf[..cap])
                {
                    if n + uleb_len(n as u64) < best_len {
                        best_kind = REC_DELTA_ZSTD;
                        best_len = n + uleb_len(n as u64);
                        best_payload = n;
                        std::mem::swap(&mut self.zbuf, &mut self.zbest);
                        dense = true;
                    }
                }
            }
        }
        let own_ref = cached.filter(|_| {
            best_kind == REC_DELTA_RLE && best_len > OWN_REF_MIN_DELTA && self.own_ref_allowed()
        });
        if let Some(old) = own_ref {
            best_kind = REC_FULL_RAW;
            best_len = ps;
            best_payload = ps;
            self.own_refs.push(frame);
            self.chunk.reserve_headroom(self.cfg.chunk_refs * ps);
            self.chunk.prefix.extend_from_slice(old);
            st.own_prefix += 1;
        }
        if !self.cfg.per_page_zstd && best_kind == REC_DELTA_RLE && best_payload > ps / 2 {
            // Batched: zstd runs over the whole chunk, where a raw page
            // compresses at least as well as a delta this dense.
            best_kind = REC_FULL_RAW;
            best_len = ps;
            best_payload = ps;
        }
        let prefix_candidate = !self.own_refs_on()
            && self.cfg.prefix_zstd
            && cached.is_some()
            && best_len > self.cfg.rle_accept_bytes
            && best_kind != REC_DELTA_ZSTD;
        // None: not tried (no candidate, or backing off); Some(paid).
        let mut prefix_paid = None;
        // Batched: the target of the attempt left to the chunk's thread.
        let mut deferred = None;
        let sampled = prefix_candidate && {
            self.prefix_tick = self.prefix_tick.wrapping_add(1);
            self.prefix_tick.is_multiple_of(self.prefix_every)
        };
        if let Some(old) = cached.filter(|_| sampled && self.cache.prefix_worth_trying(frame)) {
            prefix_paid = Some(false);
            self.prefix_tries += 1;
            // What the alternative is likely to cost once the chunk's zstd
            // has run over it (RLE deltas shrink about twice; a raw page
            // whose old content does not help as prefix compresses alone
            // about as well as in the chunk): the prefix frame, already
            // compressed, must beat that.
            let target = if best_kind == REC_FULL_RAW {
                ps / 8
            } else {
                best_len / 2
            };
            if self.cfg.per_page_zstd {
                // Per page, the full-page zstd below competes with it: tried
                // here, in order.
                if let Some(n) = self
                    .ctx
                    .pz
                    .compress(data, old, &mut self.zbest[..target.min(ps)])
                {
                    if n + uleb_len(n as u64) < target {
                        prefix_paid = Some(true);
                        self.prefix_hits += 1;
                        best_kind = REC_PREFIX_ZSTD;
                        best_len = n + uleb_len(n as u64);
                        best_payload = n;
                        dense = true;
                    }
                }
            } else {
                // Batched: deferred to whichever thread finishes the chunk
                // (chunk_plan.rs); the outcome comes back with it.
                deferred = Some(target);
                self.chunk.pages.extend_from_slice(data);
                self.chunk.pages.extend_from_slice(old);
            }
        }
        if prefix_candidate && deferred.is_none() {
            self.cache.prefix_outcome(frame, prefix_paid);
        }
        if self.cfg.per_page_zstd && best_len > self.cfg.rle_accept_bytes {
            let cap = best_len.saturating_sub(2);
            if let Ok(n) = self.ctx.zc.compress_to_buffer(data, &mut self.zbuf[..cap]) {
                if n + uleb_len(n as u64) < best_len {
                    best_kind = REC_FULL_ZSTD;
                    best_len = n + uleb_len(n as u64);
                    best_payload = n;
                    std::mem::swap(&mut self.zbuf, &mut self.zbest);
                    dense = true;
                }
            }
        }

        let kind_at = self.chunk.raw.len();
        head(&mut self.chunk.raw, best_kind);
        let payload_at = self.chunk.raw.len();
        match best_kind {
            REC_DELTA_RLE => {
                put_uleb(&mut self.chunk.raw, best_payload as u64);
                // Still the content measured above: the cache changes
                // only at the end of this page.
                if let Some(old) = self.cache.get(frame) {
                    let at = self.chunk.raw.len();
                    write_xor(&self.delta, data, old, &mut self.chunk.raw);
                    debug_assert_eq!(self.chunk.raw.len() - at, best_payload);
                }
                st.delta_rle += 1;
            }
            REC_DELTA_ZSTD | REC_FULL_ZSTD | REC_PREFIX_ZSTD => {
                let n = best_payload;
                put_uleb(&mut self.chunk.raw, n as u64);
                self.chunk.raw.extend_from_slice(&self.zbest[..n]);
                match best_kind {
                    REC_DELTA_ZSTD => st.delta_zstd += 1,
                    REC_FULL_ZSTD => st.full_zstd += 1,
                    _ => {
                        st.prefix_zstd += 1;
                        self.uses_prefix = true;
                    }
                }
            }
            _ => {
                self.chunk.raw.extend_from_slice(data);
                st.full_raw += 1;
                self.xref_tick = self.xref_tick.wrapping_add(1);
                let base = self.chain_tail.is_some();
                // An epoch without base (the whole image after a reset) is
                // indexed in full whatever the last epochs found.
                if self.cfg.chunk_refs > 0
                    && (!base || self.xref_tick.is_multiple_of(self.xref_every))
                {
                    // Votes only where the epoch has a base: without one
                    // the replica's committed content may not be used.
                    let votes = base.then_some(&mut self.votes);
                    let found = self.xref.add_page(frame, data, votes);
                    if base {
                        self.xref_sampled += 1;
                        self.xref_found += u32::from(found);
                    }
                }
            }
        }
        if let Some(target) = deferred {
            self.chunk.tries.push(PrefixTry {
                frame,
                kind_at,
                payload_at,
                end: self.chunk.raw.len(),
                target,
            });
        }
        if dense {
            self.chunk.dense += best_len;
        }
        self.cache.store(frame, data, hash, epoch);
        true
    }

    /// Whether the page being encoded may be sent raw with its last-sent
    /// content in the chunk's prefix: [`Encoder::own_refs_on`], an epoch
    /// with a base (the replica's committed content may be used),
    /// and room left in the chunk's prefix.
    fn own_ref_allowed(&self) -> bool {
        self.own_refs_on() && self.chain_tail.is_some() && self.own_refs.len() < self.cfg.chunk_refs
    }

    /// Whether changed pages use their last-sent content as prefix within
    /// their chunk's prefix (rather than in a frame of their own).
    fn own_refs_on(&self) -> bool {
        self.cfg.prefix_zstd && !self.cfg.per_page_zstd && self.cfg.chunk_refs > 0
    }

    fn flush_chunk(&mut self, epoch: u64, sink: &mut ChunkSink<'_>) {
        if !self.votes.is_empty() || !self.own_refs.is_empty() {
            // Frames sent in an earlier epoch: their cached bytes are the
            // replica's committed content when this epoch applies (the
            // cache invariant); a frame rewritten earlier in this epoch
            // holds new bytes in the cache and old ones in the replica
            // (the chunk's own pages are such frames: their old bytes were
            // copied as the page pass went).
            let cache = &self.cache;
            let room = self.cfg.chunk_refs - self.own_refs.len();
            let mut refs = xref::choose(&self.votes, room, |f| {
                cache.sent_epoch(f).is_some_and(|e| e < epoch)
            });
            let ps = self.cfg.page_size;
            self.chunk.reserve_headroom(self.cfg.chunk_refs * ps);
            // The voted frames right before the own pages' old content
            // (which is right after the headroom): closest to the records,
            // and in the chunk's page order, come the own pages.
            let mut start = self.chunk.headroom;
            refs.retain(|&f| cache.get(f).is_some());
            start -= refs.len() * ps;
            for (i, &f) in refs.iter().enumerate() {
                if let Some(page) = cache.get(f) {
                    self.chunk.prefix[start + i * ps..][..ps].copy_from_slice(page);
                }
            }
            refs.append(&mut self.own_refs);
            if refs.is_empty() {
                self.chunk.prefix.truncate(self.chunk.headroom);
            } else {
                self.chunk.prefix_start = start;
                self.chunk.records_at = self.chunk.prefix.len();
                let ChunkPlan { prefix, raw, .. } = &mut self.chunk;
                prefix.extend_from_slice(raw);
            }
            self.uses_refs |= !refs.is_empty();
            self.chunk.refs = refs;
            self.votes.clear();
        }
        let plan = std::mem::take(&mut self.chunk);
        let mut next = sink(&mut self.ctx, plan, &mut self.outcomes);
        next.clear();
        self.chunk = next;
    }

    /// The deferred prefix attempts of the epoch are done: their records,
    /// the cache's back-off and the next epoch's sampling learn the outcome.
    fn apply_outcomes(&mut self, st: &mut EncodeStats) {
        for o in self.outcomes.drain(..) {
            self.cache.prefix_outcome(o.frame, Some(o.paid));
            if o.paid {
                self.prefix_hits += 1;
                self.uses_prefix = true;
                st.prefix_zstd += 1;
                match o.fallback {
                    REC_DELTA_RLE => st.delta_rle -= 1,
                    _ => st.full_raw -= 1,
                }
            }
        }
    }

    /// The replica has committed `epoch` (and so every epoch before it).
    /// Epochs the encoder does not know are ignored.
    pub fn acknowledge(&mut self, epoch: u64) {
        if self.chain_tail.is_none_or(|t| epoch > t) {
            return;
        }
        while self.in_flight.front().is_some_and(|&e| e <= epoch) {
            self.in_flight.pop_front();
        }
        self.acknowledged = Some(self.acknowledged.map_or(epoch, |a| a.max(epoch)));
    }

    /// Epochs `epoch` and later are lost or rejected: they will never be
    /// applied. Frames they carried are forgotten (sent whole next time, never
    /// referenced), and the next epoch is based on the last earlier epoch.
    pub fn invalidate_from(&mut self, epoch: u64) -> Result<(), CodecError> {
        if let Some(a) = self.acknowledged {
            if epoch <= a {
                return Err(CodecError::AlreadyAcknowledged {
                    epoch,
                    acknowledged: a,
                });
            }
        }
        self.cache.remove_sent_since(epoch);
        self.in_flight.retain(|&e| e < epoch);
        self.chain_tail = self.in_flight.back().copied().or(self.acknowledged);
        Ok(())
    }

    /// The replica's copy of these frames is known to differ from what was
    /// last sent (online verify found it): their next records carry them
    /// whole; nothing is encoded against, or as a reference to, the
    /// content sent before.
    pub fn forget_frames(&mut self, frames: &[u64]) {
        for &f in frames {
            self.cache.remove(f);
        }
    }

    /// Forgets everything (new replica, or its state is unknown): the next
    /// epoch has no base and references no earlier content.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.xref.clear();
        self.in_flight.clear();
        self.chain_tail = None;
        self.acknowledged = None;
    }
}

/// Whole-page zero test. OR-folding 64-byte blocks vectorizes, and most
/// non-zero pages exit in the first block.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}
