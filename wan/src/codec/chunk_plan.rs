//! A chunk of page records as the page pass leaves it, and how it becomes
//! wire bytes: deferred `REC_PREFIX_ZSTD` attempts, then the chunk's zstd.
//!
//! The prefix attempt (one zstd frame per candidate page, with the page's
//! previous content as prefix) was the calling thread's largest cost. It
//! only decides between two encodings of one record, and no later decision
//! of the page pass depends on which one wins, so the page pass writes
//! the fallback record (RLE delta or raw page), notes the attempt with
//! copies of both page versions, and the attempt runs when the chunk is
//! finished: on whichever thread compresses the chunk. Chunk boundaries
//! are decided on the fallback sizes, so the records of each chunk, and
//! therefore the bytes, are the same for every thread count.

use super::block::{put_block, put_refs_block};
use super::format::REC_PREFIX_ZSTD;
use super::prefix::{PrefixCompressor, RefsCompressor};
use super::wire::{put_uleb, uleb_len};

/// One deferred prefix attempt within [`ChunkPlan::raw`].
#[derive(Debug, Clone, Copy)]
pub(super) struct PrefixTry {
    /// The frame, for the cache's back-off once the outcome is known.
    pub frame: u64,
    /// Offset of the fallback record's kind byte.
    pub kind_at: usize,
    /// Offset of its payload (after the frame delta), and its end.
    pub payload_at: usize,
    pub end: usize,
    /// The prefix frame (length prefix included) must be under this.
    pub target: usize,
}

/// What an attempt gave, for the encoder's statistics and back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Outcome {
    pub frame: u64,
    /// Kind of the fallback record (`REC_DELTA_RLE` or `REC_FULL_RAW`).
    pub fallback: u8,
    pub paid: bool,
}

/// A full chunk from the page pass.
#[derive(Debug, Default)]
pub(super) struct ChunkPlan {
    /// The records, each attempt written as its fallback.
    pub raw: Vec<u8>,
    pub records: u32,
    /// Bytes of records already compressed or found incompressible.
    pub dense: usize,
    pub tries: Vec<PrefixTry>,
    /// For attempt i: the new page at `2 i`, its previous content at
    /// `2 i + 1` (in pages). Copies: the cache slot is overwritten as soon
    /// as the page pass moves on.
    pub pages: Vec<u8>,
    /// Frames whose committed content is the chunk's zstd prefix
    /// (`BLOCK_ZSTD_REFS`, see xref.rs); empty: an ordinary block.
    pub refs: Vec<u64>,
    /// Their content (copied: the cache moves on), then a copy of the
    /// records: zstd then sees one contiguous window, prefix and records,
    /// without a further copy (see [`ChunkPlan::window`]). The content
    /// sits at the end of `headroom` bytes: the chunk's own pages' old
    /// content goes in as the page pass reaches them, right after the
    /// headroom, and the frames voted for, known only when the chunk
    /// closes, go right before it (`Encoder::flush_chunk`).
    pub prefix: Vec<u8>,
    /// Where the prefix content starts in `prefix`, and where the records
    /// start.
    pub prefix_start: usize,
    pub records_at: usize,
    /// Bytes kept at the start of `prefix` for the voted frames.
    pub headroom: usize,
}

impl ChunkPlan {
    pub fn clear(&mut self) {
        self.raw.clear();
        self.records = 0;
        self.dense = 0;
        self.tries.clear();
        self.pages.clear();
        self.refs.clear();
        // The headroom stays: zeroing it again for every chunk would cost
        // as much as the copies the layout saves.
        self.prefix.truncate(self.headroom);
        self.prefix_start = 0;
        self.records_at = 0;
    }

    /// Makes room for `headroom` bytes before the prefix content: once per
    /// buffer, kept by [`ChunkPlan::clear`].
    pub fn reserve_headroom(&mut self, headroom: usize) {
        if self.headroom != headroom || self.prefix.len() < headroom {
            self.prefix.clear();
            self.prefix.resize(headroom, 0);
            self.headroom = headroom;
        }
    }

    /// A referencing chunk's prefix and records, back to back.
    fn window(&self) -> (&[u8], &[u8]) {
        self.prefix[self.prefix_start..].split_at(self.records_at - self.prefix_start)
    }

    /// Whether finishing the chunk is more than copying it: a zstd pass or
    /// prefix attempts. (Decided again on the resolved records.)
    pub fn needs_work(&self) -> bool {
        !self.tries.is_empty()
            || !self.refs.is_empty()
            || worth_compressing(self.dense, self.raw.len())
    }
}

/// A chunk made mostly of compressed or incompressible records is not
/// worth a zstd pass.
fn worth_compressing(dense: usize, len: usize) -> bool {
    dense * 2 < len
}

/// The compression state one thread needs to finish chunks.
pub(super) struct ChunkCtx {
    pub zc: zstd::bulk::Compressor<'static>,
    pub pz: PrefixCompressor,
    rz: RefsCompressor,
    pub scratch: Vec<u8>,
    resolved: Vec<u8>,
    zbuf: Vec<u8>,
    page_size: usize,
}

impl ChunkCtx {
    pub fn new(level: i32, fast_match_finder: bool, page_size: usize) -> std::io::Result<Self> {
        Ok(ChunkCtx {
            zc: super::match_finder::chunk_compressor(level, fast_match_finder)?,
            pz: PrefixCompressor::new(level, fast_match_finder)
                .ok_or_else(|| std::io::Error::other("zstd: no memory"))?,
            rz: RefsCompressor::new(level, fast_match_finder)
                .ok_or_else(|| std::io::Error::other("zstd: no memory"))?,
            scratch: Vec::new(),
            resolved: Vec::new(),
            zbuf: vec![0; page_size],
            page_size,
        })
    }

    /// Appends `records u32 | block` of `plan` to `wire`, each
    /// attempt's outcome appended to `outcomes`. Deterministic: the same
    /// plan gives the same bytes on any thread.
    pub fn finish(&mut self, plan: &ChunkPlan, wire: &mut Vec<u8>, outcomes: &mut Vec<Outcome>) {
        let dense = self.resolve(plan, outcomes);
        let records: &[u8] = if plan.tries.is_empty() {
            &plan.raw
        } else {
            &self.resolved
        };
        wire.extend_from_slice(&plan.records.to_le_bytes());
        // Chunks that name prefix frames never carry deferred prefix
        // attempts (a changed page's old content goes into the chunk's
        // prefix instead: `Encoder::own_refs_on`), so their records are
        // the ones laid out after the prefix.
        debug_assert!(plan.refs.is_empty() || plan.tries.is_empty());
        if !plan.refs.is_empty() && plan.tries.is_empty() {
            // The prefix right before the records in one buffer (laid out
            // so by the page pass): zstd then sees one contiguous window
            // and runs its plain match finder, not the slower
            // external-dictionary variant it uses for a prefix elsewhere
            // in memory (10 % of the encoder's samples on sort before;
            // the bytes are the same either way).
            let (prefix, records) = plan.window();
            if put_refs_block(
                wire,
                records,
                &plan.refs,
                prefix,
                &mut self.rz,
                &mut self.scratch,
            ) {
                return;
            }
        }
        let zc = worth_compressing(dense, records.len()).then_some(&mut self.zc);
        put_block(wire, records, zc, &mut self.scratch);
    }

    /// Runs the attempts, writing the records into `self.resolved` with
    /// each paying attempt in place of its fallback; returns the chunk's
    /// dense bytes.
    fn resolve(&mut self, plan: &ChunkPlan, outcomes: &mut Vec<Outcome>) -> usize {
        let mut dense = plan.dense;
        if plan.tries.is_empty() {
            return dense;
        }
        let ps = self.page_size;
        let out = &mut self.resolved;
        out.clear();
        let mut pos = 0;
        for (i, t) in plan.tries.iter().enumerate() {
            let new = &plan.pages[2 * i * ps..(2 * i + 1) * ps];
            let old = &plan.pages[(2 * i + 1) * ps..(2 * i + 2) * ps];
            let cap = t.target.min(ps);
            let n = self
                .pz
                .compress(new, old, &mut self.zbuf[..cap])
                .filter(|&n| n + uleb_len(n as u64) < t.target);
            outcomes.push(Outcome {
                frame: t.frame,
                fallback: plan.raw[t.kind_at],
                paid: n.is_some(),
            });
            if let Some(n) = n {
                out.extend_from_slice(&plan.raw[pos..t.kind_at]);
                out.push(REC_PREFIX_ZSTD);
                out.extend_from_slice(&plan.raw[t.kind_at + 1..t.payload_at]);
                put_uleb(out, n as u64);
                out.extend_from_slice(&self.zbuf[..n]);
                dense += n + uleb_len(n as u64);
                pos = t.end;
            }
        }
        out.extend_from_slice(&plan.raw[pos..]);
        dense
    }
}
