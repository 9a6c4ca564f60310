//! zstd's match finder for the encoder's frames, when
//! [`EncoderConfig::fast_match_finder`](super::EncoderConfig) is on.
//!
//! The level's own match finder (level 3: "double fast" with 128 Ki-entry
//! tables) was half of the encoder's time on real-guest traces, yet the
//! bytes hardly depend on it: what zstd finds in a chunk is mostly whole
//! runs that a single hash of 5-byte sequences finds too. On the recorded
//! traces (docs/benchmarks.md) the settings below changed the bytes by
//! under 0.5 % either way and made the encoder about 1.3x faster. The
//! level still sets everything else (entropy coding, literal compression).
//! The decoder is unaffected: any match finder writes standard frames.

use zstd::zstd_safe::{CCtx, CParameter, Strategy};

/// Chunks of records (up to a few hundred KiB): a 16 Ki-entry hash table
/// stays in the L1/L2 caches; a 256 KiB window covers a whole chunk.
const CHUNK: [CParameter; 4] = [
    CParameter::Strategy(Strategy::ZSTD_fast),
    CParameter::HashLog(14),
    CParameter::MinMatch(5),
    CParameter::WindowLog(18),
];

/// One page with its previous content as prefix (8 KiB in all for 4 KiB
/// pages): a 4 Ki-entry table, and 4-byte matches, since the page's
/// changes are often small shifts of short fields.
const PREFIX: [CParameter; 3] = [
    CParameter::Strategy(Strategy::ZSTD_fast),
    CParameter::HashLog(12),
    CParameter::MinMatch(4),
];

/// Chunks with other pages as prefix (`BLOCK_ZSTD_REFS`): up to 256 KiB
/// of prefix and 64 KiB of records. A 64 Ki-entry table; the level's
/// "double fast" finder, with its two 128 Ki-entry tables, found 2 %
/// more on sort and db for 10-20 % of the two-thread encode speed on
/// gzip and db (recorded traces; 16 Ki entries: sort 2 % more bytes).
const REFS: [CParameter; 3] = [
    CParameter::Strategy(Strategy::ZSTD_fast),
    CParameter::HashLog(16),
    CParameter::MinMatch(5),
];

/// Whether the override applies at `level`: negative levels are already
/// the fast match finder, with their own acceleration.
fn applies(level: i32) -> bool {
    level >= 1
}

/// A compressor for record chunks, state and disk data.
pub(super) fn chunk_compressor(
    level: i32,
    fast: bool,
) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut zc = zstd::bulk::Compressor::new(level)?;
    if fast && applies(level) {
        for p in CHUNK {
            zc.set_parameter(p)?;
        }
    }
    Ok(zc)
}

/// Sets the referencing chunks' match finder on a context whose level is set.
pub(super) fn tune_refs(ctx: &mut CCtx<'_>, level: i32, fast: bool) -> Option<()> {
    tune(ctx, &REFS, level, fast)
}

/// Sets the prefix frames' match finder on a context whose level is set.
pub(super) fn tune_prefix(ctx: &mut CCtx<'_>, level: i32, fast: bool) -> Option<()> {
    tune(ctx, &PREFIX, level, fast)
}

fn tune(ctx: &mut CCtx<'_>, params: &[CParameter], level: i32, fast: bool) -> Option<()> {
    if fast && applies(level) {
        for &p in params {
            ctx.set_parameter(p).ok()?;
        }
    }
    Some(())
}
