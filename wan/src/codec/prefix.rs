//! zstd with a page's previous content as prefix (`REC_PREFIX_ZSTD`):
//! reusable compression and decompression contexts.
//!
//! `zstd_safe` ties a context's lifetime to the prefix it references, which
//! would forbid keeping one context across pages whose prefixes live in a
//! cache that changes between them. zstd itself holds a prefix for one frame
//! only (`ZSTD_CCtx_refPrefix`, `ZSTD_DCtx_refPrefix`: single use), and each
//! call here resets the context's parameters and dictionaries before
//! returning, so the context never references a prefix after the call: the
//! lifetime is erased for the duration of one call only.

use zstd::zstd_safe::zstd_sys::ZSTD_MAGIC_DICTIONARY;
use zstd::zstd_safe::{CCtx, CParameter, DCtx, ResetDirective};

/// Compresses pages with a prefix; one context reused for every page.
pub(crate) struct PrefixCompressor {
    ctx: CCtx<'static>,
    level: i32,
    fast_match_finder: bool,
}

impl PrefixCompressor {
    pub(crate) fn new(level: i32, fast_match_finder: bool) -> Option<Self> {
        Some(PrefixCompressor {
            ctx: CCtx::try_create()?,
            level,
            fast_match_finder,
        })
    }

    /// `data` as one zstd frame (no content size: the decoder knows the
    /// page size) with `prefix` as its dictionary, into `out`; `None` if it
    /// does not fit or zstd fails.
    pub(crate) fn compress(&mut self, data: &[u8], prefix: &[u8], out: &mut [u8]) -> Option<usize> {
        // SAFETY: the context is used with the shortened lifetime only inside
        // this call, and the reset below drops any reference to `prefix`
        // (zstd also drops it when the frame starts) before it returns.
        let ctx: &mut CCtx<'_> = unsafe { &mut *(&mut self.ctx as *mut CCtx<'static>).cast() };
        let r = (|| {
            ctx.set_parameter(CParameter::CompressionLevel(self.level))
                .ok()?;
            ctx.set_parameter(CParameter::ContentSizeFlag(false)).ok()?;
            super::match_finder::tune_prefix(ctx, self.level, self.fast_match_finder)?;
            ctx.ref_prefix(prefix).ok()?;
            ctx.compress2(out, data).ok()
        })();
        let _ = ctx.reset(ResetDirective::SessionAndParameters);
        r
    }
}

/// Compresses record chunks with other pages as prefix
/// (`BLOCK_ZSTD_REFS`); one context reused for every chunk.
///
/// With `EncoderConfig::fast_match_finder` these frames get a fast
/// finder of their own, with a larger table than the chunks'
/// (match_finder.rs): the prefix holds up to 256 KiB.
pub(crate) struct RefsCompressor {
    ctx: CCtx<'static>,
    level: i32,
    fast_match_finder: bool,
}

impl RefsCompressor {
    pub(crate) fn new(level: i32, fast_match_finder: bool) -> Option<Self> {
        Some(RefsCompressor {
            ctx: CCtx::try_create()?,
            level,
            fast_match_finder,
        })
    }

    /// `data` as one zstd frame with `prefix` as its dictionary, into
    /// `out`; `None` if it does not fit or zstd fails. The window covers
    /// the prefix and the data, so the whole prefix is reachable.
    pub(crate) fn compress(&mut self, data: &[u8], prefix: &[u8], out: &mut [u8]) -> Option<usize> {
        // SAFETY: as in `PrefixCompressor::compress`.
        let ctx: &mut CCtx<'_> = unsafe { &mut *(&mut self.ctx as *mut CCtx<'static>).cast() };
        let span = (prefix.len() + data.len()).max(1 << 10);
        let window_log = (usize::BITS - (span - 1).leading_zeros()).clamp(10, 24);
        let r = (|| {
            ctx.set_parameter(CParameter::CompressionLevel(self.level))
                .ok()?;
            ctx.set_parameter(CParameter::WindowLog(window_log)).ok()?;
            super::match_finder::tune_refs(ctx, self.level, self.fast_match_finder)?;
            ctx.ref_prefix(prefix).ok()?;
            ctx.compress2(out, data).ok()
        })();
        let _ = ctx.reset(ResetDirective::SessionAndParameters);
        r
    }
}

/// Decompresses `REC_PREFIX_ZSTD` payloads and `BLOCK_ZSTD_REFS` chunks;
/// one context reused.
pub(crate) struct PrefixDecompressor {
    ctx: DCtx<'static>,
}

impl PrefixDecompressor {
    pub(crate) fn new() -> Option<Self> {
        Some(PrefixDecompressor {
            ctx: DCtx::try_create()?,
        })
    }

    /// Decodes `z` with `prefix` into `out`; the number of bytes written,
    /// or zstd's error name.
    pub(crate) fn decompress(
        &mut self,
        z: &[u8],
        prefix: &[u8],
        out: &mut [u8],
    ) -> Result<usize, &'static str> {
        // SAFETY: as in `PrefixCompressor::compress`: the reset drops the
        // reference to `prefix` before this returns.
        let ctx: &mut DCtx<'_> = unsafe { &mut *(&mut self.ctx as *mut DCtx<'static>).cast() };
        // Raw content without a dictionary object when zstd allows it:
        // `ref_prefix` goes through one, which zstd takes for cold memory
        // on every call (a new prefix each time) and then decodes with
        // its prefetching sequence decoder and reloads its tables, while
        // the prefix was written just before (decode 4-8 % faster on the
        // recorded traces). Content starting with the dictionary magic
        // would be parsed as a structured dictionary there: it keeps
        // `ref_prefix`, which always means raw content, as the encoder's.
        let structured = prefix.len() >= 8 && prefix[..4] == ZSTD_MAGIC_DICTIONARY.to_le_bytes();
        let r = if structured {
            ctx.ref_prefix(prefix).and_then(|_| ctx.decompress(out, z))
        } else {
            ctx.decompress_using_dict(out, z, prefix)
        }
        .map_err(zstd::zstd_safe::get_error_name);
        let _ = ctx.reset(ResetDirective::SessionAndParameters);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_prefix() {
        // The level's match finder finds the shifted run in under 100 bytes;
        // the fast one, whose small table this repetitive content crowds,
        // in under 256 (a sixteenth of the page).
        for (fast, limit) in [(false, 100), (true, 256)] {
            round_trip(fast, limit);
        }
    }

    fn round_trip(fast: bool, limit: usize) {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 7 / 13) as u8).collect();
        let mut new = old.clone();
        new.copy_within(100..2000, 108);
        new[5] ^= 0xff;
        let mut c = PrefixCompressor::new(3, fast).expect("ctx");
        let mut d = PrefixDecompressor::new().expect("ctx");
        let mut z = vec![0u8; 4096];
        for _ in 0..3 {
            let n = c.compress(&new, &old, &mut z).expect("fits");
            assert!(n < limit, "the prefix should make it small: {n}");
            let mut out = vec![0u8; 4096];
            assert_eq!(d.decompress(&z[..n], &old, &mut out), Ok(4096));
            assert_eq!(out, new);
            // Another prefix: an error or other bytes, never a panic.
            let other = vec![1u8; 4096];
            let mut out = vec![0u8; 4096];
            if let Ok(m) = d.decompress(&z[..n], &other, &mut out) {
                assert!(m != 4096 || out != new);
            }
        }
        // Too small an output: None, and the context still works after it.
        assert_eq!(c.compress(&new, &old, &mut z[..4]), None);
        assert!(c.compress(&new, &old, &mut z).is_some());
    }
}
