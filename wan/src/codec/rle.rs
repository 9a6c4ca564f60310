//! Run-length coding of XOR deltas.
//!
//! A delta is a sequence of `(zero_run, literal_len, literal bytes)` with both
//! lengths ULEB128; the literal bytes are `new ^ old`; whatever follows the
//! last literal is zero. Byte granularity (not Remus' 4-byte words) because a
//! typical guest write changes one or two bytes of a counter or pointer.

use super::error::CodecError;
use super::wire::{put_uleb, uleb_len, Reader};

/// Zero gaps up to this many bytes are folded into the surrounding literal:
/// a new run costs at least two header bytes, so shorter gaps are cheaper inline.
const MERGE_GAP: usize = 2;
/// Pages are compared in blocks of this size before looking at words, so the
/// common "nothing changed here" case runs at memcmp speed.
const BLOCK: usize = 64;

#[inline]
fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The runs of a delta as they are found, in page order: merged, then
/// counted, and written when there is somewhere to write them.
struct Runs<'a> {
    new: &'a [u8],
    old: &'a [u8],
    out: Option<&'a mut Vec<u8>>,
    /// Encoded length of the runs emitted so far.
    len: usize,
    emitted: usize,
    cur: Option<(usize, usize)>,
}

impl<'a> Runs<'a> {
    fn new(new: &'a [u8], old: &'a [u8], out: Option<&'a mut Vec<u8>>) -> Self {
        Runs {
            new,
            old,
            out,
            len: 0,
            emitted: 0,
            cur: None,
        }
    }

    #[inline]
    fn add(&mut self, s: usize, e: usize) {
        match self.cur {
            Some((cs, ce)) if s <= ce + MERGE_GAP => self.cur = Some((cs, e)),
            Some((cs, ce)) => {
                self.emit(cs, ce);
                self.cur = Some((s, e));
            }
            None => self.cur = Some((s, e)),
        }
    }

    fn emit(&mut self, s: usize, e: usize) {
        let (gap, lit) = ((s - self.emitted) as u64, (e - s) as u64);
        self.len += uleb_len(gap) + uleb_len(lit) + (e - s);
        if let Some(out) = self.out.as_deref_mut() {
            put_uleb(out, gap);
            put_uleb(out, lit);
            out.extend(
                self.new[s..e]
                    .iter()
                    .zip(&self.old[s..e])
                    .map(|(a, b)| a ^ b),
            );
        }
        self.emitted = e;
    }

    /// Finds every run; `false` as soon as the encoding exceeds `limit`
    /// (checked after each block that differs). `simd`: the whole blocks
    /// with AVX-512 where the CPU has it (the same runs either way).
    fn scan(&mut self, limit: usize, simd: bool) -> bool {
        let (new, old) = (self.new, self.old);
        let n = new.len().min(old.len());
        #[allow(unused_mut)]
        let mut off = 0;
        #[cfg(target_arch = "x86_64")]
        if simd && avx512_available() {
            // SAFETY: the CPU has the features (checked just above).
            match unsafe { full_blocks_avx512(self, n, limit) } {
                Some(done) => off = done,
                None => return false,
            }
        }
        while off < n {
            let end = (off + BLOCK).min(n);
            if new[off..end] != old[off..end] {
                let mut w = off;
                while w + 8 <= end {
                    let x = word(new, w) ^ word(old, w);
                    if x != 0 {
                        let s = w + (x.trailing_zeros() / 8) as usize;
                        let e = w + 8 - (x.leading_zeros() / 8) as usize;
                        self.add(s, e);
                    }
                    w += 8;
                }
                for i in w..end {
                    if new[i] != old[i] {
                        self.add(i, i + 1);
                    }
                }
                if self.len > limit {
                    return false;
                }
            }
            off = end;
        }
        if let Some((s, e)) = self.cur.take() {
            self.emit(s, e);
        }
        self.len <= limit
    }
}

/// Appends the run-length-coded `new ^ old` to `out`.
///
/// Returns the encoded length, or `None` (with `out` restored) as soon as the
/// encoding would exceed `limit` bytes: the caller then has a better choice.
/// An empty encoding means the pages are equal.
pub fn encode_xor(new: &[u8], old: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    encode_xor_with(new, old, out, limit, true)
}

fn encode_xor_with(
    new: &[u8],
    old: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
    simd: bool,
) -> Option<usize> {
    let start = out.len();
    let mut runs = Runs::new(new, old, Some(out));
    if runs.scan(limit, simd) {
        return Some(runs.len);
    }
    if let Some(out) = runs.out {
        out.truncate(start);
    }
    None
}

/// A delta measured by [`measure_xor`], for [`write_xor`]: where the CPU
/// measures it from bitmaps (AVX-512), the bitmap of the bytes in runs,
/// so that writing it walks the runs without comparing the pages again.
#[derive(Default)]
pub struct DeltaScan {
    /// Word `k + 1` (words 0 and last are empty, for the neighbours of the
    /// page's first and last block): with [`Scan::Bitmap`], bit `i` is
    /// set when byte `64 k + i` is in a run; with [`Scan::Blocks`], when
    /// it differs.
    map: Vec<u64>,
    scan: Scan,
}

/// What a [`DeltaScan`] holds of the last measured delta.
#[derive(Default, Clone, Copy, PartialEq)]
enum Scan {
    /// Nothing: the pages are compared again to write it.
    #[default]
    Words,
    /// The bytes in runs.
    Bitmap,
    /// The differing bytes, of a few blocks: their runs are cheaper to
    /// walk one by one than the whole page's bitmap is to build.
    Blocks,
}

/// What [`encode_xor`] would return, without writing the delta: deciding
/// whether a page goes as a delta at all needs only its length, and many
/// pages with a long delta go raw. [`write_xor`] writes it.
pub fn measure_xor(new: &[u8], old: &[u8], limit: usize, scan: &mut DeltaScan) -> Option<usize> {
    measure_xor_with(new, old, limit, scan, true)
}

/// Appends the delta last measured into `scan` (same `new` and `old`) to
/// `out`: what [`encode_xor`] appends.
pub fn write_xor(scan: &DeltaScan, new: &[u8], old: &[u8], out: &mut Vec<u8>) {
    match scan.scan {
        Scan::Words => {
            encode_xor(new, old, out, usize::MAX);
        }
        #[cfg(target_arch = "x86_64")]
        Scan::Blocks => {
            block_runs(&scan.map, new, old, Some(out));
        }
        #[cfg(not(target_arch = "x86_64"))]
        Scan::Blocks => unreachable!("only measured with AVX-512"),
        Scan::Bitmap => {
            // The bitmap's runs are already merged: each is emitted as is.
            let bits = &scan.map[1..scan.map.len() - 1];
            let mut runs = Runs::new(new, old, Some(out));
            let mut pos = 0;
            while let Some(s) = next_bit(bits, pos, false) {
                let e = next_bit(bits, s, true).unwrap_or(64 * bits.len());
                runs.emit(s, e);
                pos = e;
            }
        }
    }
}

/// The runs of the differing blocks in `map` (as [`Scan::Blocks`] holds
/// them), counted, and written to `out` if given: the word loop's runs.
#[cfg(target_arch = "x86_64")]
fn block_runs(map: &[u64], new: &[u8], old: &[u8], out: Option<&mut Vec<u8>>) -> usize {
    let mut runs = Runs::new(new, old, out);
    for (k, &diff) in map[1..map.len() - 1].iter().enumerate() {
        if diff != 0 {
            add_spans(&mut runs, k * BLOCK, diff);
        }
    }
    if let Some((s, e)) = runs.cur.take() {
        runs.emit(s, e);
    }
    runs.len
}

/// Adds the runs of a block at `off` whose differing bytes are `diff`.
#[cfg(target_arch = "x86_64")]
#[inline]
fn add_spans(runs: &mut Runs<'_>, off: usize, diff: u64) {
    let mut f = word_spans(diff);
    while f != 0 {
        let s = f.trailing_zeros() as usize;
        let len = (!(f >> s)).trailing_zeros() as usize;
        runs.add(off + s, off + s + len);
        f &= (!0u64).checked_shl((s + len) as u32).unwrap_or(0);
    }
}

/// The first bit at or after `from` that is set (`clear`: not set).
fn next_bit(bits: &[u64], from: usize, clear: bool) -> Option<usize> {
    let flip = if clear { u64::MAX } else { 0 };
    let mut w = from / 64;
    let mut x = (bits.get(w)? ^ flip) & (u64::MAX << (from % 64));
    loop {
        if x != 0 {
            return Some(64 * w + x.trailing_zeros() as usize);
        }
        w += 1;
        x = bits.get(w)? ^ flip;
    }
}

fn measure_xor_with(
    new: &[u8],
    old: &[u8],
    limit: usize,
    scan: &mut DeltaScan,
    simd: bool,
) -> Option<usize> {
    scan.scan = Scan::Words;
    #[cfg(target_arch = "x86_64")]
    if simd && avx512_available() {
        let n = new.len().min(old.len());
        if n.is_multiple_of(BLOCK) && n <= MAP_BYTES {
            scan.map.resize(n / BLOCK + 2, 0);
            let (new, old) = (&new[..n], &old[..n]);
            // SAFETY: the CPU has the features (checked just above).
            let len = match unsafe { delta_len_avx512(new, old, &mut scan.map) } {
                Some(len) => {
                    scan.scan = Scan::Bitmap;
                    len
                }
                None => {
                    scan.scan = Scan::Blocks;
                    block_runs(&scan.map, new, old, None)
                }
            };
            return (len <= limit).then_some(len);
        }
    }
    let mut runs = Runs::new(new, old, None);
    runs.scan(limit, simd).then_some(runs.len)
}

/// The whole [`BLOCK`]s of the first `n` bytes, 64 bytes per compare:
/// the same runs, in the same order, as the word loop of [`encode_xor`]
/// (a word's run spans its first to its last differing byte), so the
/// bytes do not depend on the machine. Returns where the word loop goes
/// on, or `None` once the encoding exceeds `limit`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn full_blocks_avx512(runs: &mut Runs<'_>, n: usize, limit: usize) -> Option<usize> {
    const _: () = assert!(BLOCK == 64);
    let (new, old) = (runs.new, runs.old);
    let mut off = 0;
    while off + BLOCK <= n {
        // SAFETY: `off + 64 <= n`, within both slices; the caller's
        // features are this function's.
        let diff = unsafe { block_diff(new, old, off) };
        if diff != 0 {
            add_spans(runs, off, diff);
            if runs.len > limit {
                return None;
            }
        }
        off += BLOCK;
    }
    Some(off)
}

/// The mask of the bytes that differ between `new` and `old` in the 64
/// bytes at `off`.
///
/// # Safety
/// `off + 64` is within both slices, and the CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn block_diff(new: &[u8], old: &[u8], off: usize) -> u64 {
    use std::arch::x86_64::{_mm512_cmpneq_epi8_mask, _mm512_loadu_si512};
    debug_assert!(off + 64 <= new.len().min(old.len()));
    // SAFETY: as the caller promises.
    unsafe {
        _mm512_cmpneq_epi8_mask(
            _mm512_loadu_si512(new.as_ptr().add(off).cast()),
            _mm512_loadu_si512(old.as_ptr().add(off).cast()),
        )
    }
}

/// For a mask of differing bytes (bit i: byte i), each 8-bit lane filled
/// from its lowest to its highest set bit: the bytes the word loop puts in
/// a run.
#[cfg(target_arch = "x86_64")]
#[inline]
fn word_spans(m: u64) -> u64 {
    const LANE_LO: [u64; 3] = [
        0xFEFE_FEFE_FEFE_FEFE,
        0xFCFC_FCFC_FCFC_FCFC,
        0xF0F0_F0F0_F0F0_F0F0,
    ];
    const LANE_HI: [u64; 3] = [
        0x7F7F_7F7F_7F7F_7F7F,
        0x3F3F_3F3F_3F3F_3F3F,
        0x0F0F_0F0F_0F0F_0F0F,
    ];
    let (mut up, mut down) = (m, m);
    for (i, sh) in [1, 2, 4].into_iter().enumerate() {
        up |= (up << sh) & LANE_LO[i];
        down |= (down >> sh) & LANE_HI[i];
    }
    up & down
}

/// Up to this many differing blocks, a delta is measured run by run
/// ([`Scan::Blocks`]): pages with a few words written (sparse writes: one
/// core 3-4 % slower with every page's bitmap built).
#[cfg(target_arch = "x86_64")]
const SPARSE_BLOCKS: usize = 8;

/// Longest input [`delta_len_avx512`] measures: every length and gap then
/// fits a 2-byte ULEB128.
#[cfg(target_arch = "x86_64")]
const MAP_BYTES: usize = 8192;

/// The encoded length of the delta of `new` (a whole number of blocks, at
/// most [`MAP_BYTES`]) against `old`, or `None` when at most
/// [`SPARSE_BLOCKS`] blocks differ (their masks are then in `map`), from bitmaps of the bytes in runs
/// rather than run by run: pages rewritten throughout have hundreds of
/// short runs. Bit `i` of the map is byte `i`. The runs are the word spans
/// (as in the word loop) with gaps of up to [`MERGE_GAP`] bytes filled;
/// each costs its literal bytes, plus one byte for its gap and one for its
/// length, plus one more for each of those that is 128 or more.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,popcnt")]
unsafe fn delta_len_avx512(new: &[u8], old: &[u8], map: &mut [u64]) -> Option<usize> {
    const _: () = assert!(BLOCK == 64 && MERGE_GAP == 2);
    let words = new.len() / BLOCK;
    // First every block's compare, into the map (word k + 1): nothing else
    // in the loop, so many loads are in flight at once.
    let mut differing = 0;
    for k in 0..words {
        // SAFETY: `(k + 1) * 64 <= new.len() == old.len()`; the caller's
        // features are this function's.
        let diff = unsafe { block_diff(new, old, k * BLOCK) };
        map[k + 1] = diff;
        differing += usize::from(diff != 0);
    }
    map[0] = 0;
    map[words + 1] = 0;
    if differing <= SPARSE_BLOCKS {
        // The differing bytes are in the map: walked run by run instead.
        return None;
    }
    // Then, in place, the word spans with gaps of one or two bytes filled:
    // byte i joins when a run byte is at most two before it and one at
    // most two after it, with at most two bytes between them.
    let (mut literal, mut runs) = (0usize, 0usize);
    let (mut p, mut c) = (0u64, word_spans(map[1]));
    for k in 1..=words {
        let nx = word_spans(map[k + 1]);
        if p | c | nx == 0 {
            // Nothing changed here or next to it (most blocks of pages
            // with a few words written).
            map[k] = 0;
            (p, c) = (c, nx);
            continue;
        }
        let (l1, l2) = (c << 1 | p >> 63, c << 2 | p >> 62);
        let (r1, r2) = (c >> 1 | nx << 63, c >> 2 | nx << 62);
        let m = c | (l1 & r1) | (l2 & r1) | (l1 & r2);
        let starts = m & !(m << 1 | map[k - 1] >> 63);
        map[k] = m;
        literal += m.count_ones() as usize;
        runs += starts.count_ones() as usize;
        (p, c) = (c, nx);
    }
    if runs == 0 {
        return Some(0);
    }
    // Runs and gaps of 128 bytes or more cover a whole word: look only
    // around whole words of ones or zeros.
    let mut long = 0;
    let mut k = 1;
    while k <= words {
        let w = map[k];
        if w != 0 && w != u64::MAX {
            k += 1;
            continue;
        }
        let mut j = k;
        while j < words && map[j + 1] == w {
            j += 1;
        }
        let whole = 64 * (j - k + 1);
        let (before, after) = (map[k - 1], map[j + 1]);
        if w == u64::MAX {
            let len = whole + before.leading_ones() as usize + after.trailing_ones() as usize;
            long += usize::from(len >= 128);
        } else if j < words {
            // A gap: zeros followed by a run (the zeros after the last run
            // are not coded). The first gap counts from the page start.
            let ahead = if k == 1 {
                0
            } else {
                before.leading_zeros() as usize
            };
            let len = whole + ahead + after.trailing_zeros() as usize;
            long += usize::from(len >= 128);
        }
        k = j + 1;
    }
    Some(literal + 2 * runs + long)
}

/// Whether this CPU runs [`full_blocks_avx512`] (checked once by std).
#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
}

/// Checks that `runs` is a well-formed delta for a page of `page_size` bytes.
pub fn check_runs(runs: &[u8], page_size: usize) -> Result<(), CodecError> {
    walk_runs(runs, page_size, |_, _| {})
}

/// XORs the literals of an encoded delta into `dst` (which holds the base
/// page). Fails, possibly after changing `dst`, if the runs are malformed:
/// callers apply only runs that [`check_runs`] accepted, or scratch pages.
pub fn apply_xor(runs: &[u8], dst: &mut [u8]) -> Result<(), CodecError> {
    let len = dst.len();
    walk_runs(runs, len, |at, lit| {
        for (d, l) in dst[at..at + lit.len()].iter_mut().zip(lit) {
            *d ^= l;
        }
    })
}

/// Calls `f(offset, literal)` for every literal, after checking it fits.
fn walk_runs(
    runs: &[u8],
    page_size: usize,
    mut f: impl FnMut(usize, &[u8]),
) -> Result<(), CodecError> {
    let mut r = Reader::new(runs, "delta runs");
    let mut pos = 0usize;
    while !r.is_empty() {
        let zero = r.uleb()?;
        let len = r.uleb()?;
        if len == 0 {
            return Err(CodecError::corrupt("empty literal in delta"));
        }
        let start = (pos as u64)
            .checked_add(zero)
            .filter(|&s| s <= page_size as u64)
            .ok_or_else(|| CodecError::corrupt("delta run beyond page end"))?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= page_size as u64)
            .ok_or_else(|| CodecError::corrupt("delta run beyond page end"))?;
        let lit = r.bytes(len as usize)?;
        f(start as usize, lit);
        pos = end as usize;
    }
    Ok(())
}

/// `dst = a ^ b`, for the XOR-then-zstd candidate.
pub fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = x ^ y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(new: &[u8], old: &[u8]) -> usize {
        let mut enc = Vec::new();
        let n = encode_xor(new, old, &mut enc, usize::MAX).expect("no limit");
        let mut dst = old.to_vec();
        apply_xor(&enc, &mut dst).expect("valid runs");
        assert_eq!(dst, new);
        n
    }

    #[test]
    fn equal_pages_encode_to_nothing() {
        let p = vec![7u8; 4096];
        assert_eq!(round_trip(&p, &p), 0);
    }

    #[test]
    fn single_byte_change_is_three_bytes() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        new[1000] = 1;
        // zero run 1000 (2 bytes) + len 1 + 1 literal byte
        assert_eq!(round_trip(&new, &old), 4);
    }

    #[test]
    fn odd_lengths_and_edges() {
        let old: Vec<u8> = (0..1001u32).map(|i| i as u8).collect();
        let mut new = old.clone();
        new[0] ^= 1;
        new[1000] ^= 0x80;
        new[63] ^= 3;
        new[64] ^= 3;
        round_trip(&new, &old);
    }

    #[test]
    fn limit_restores_output() {
        let old = vec![0u8; 4096];
        let new = vec![1u8; 4096];
        let mut enc = vec![9u8];
        assert_eq!(encode_xor(&new, &old, &mut enc, 100), None);
        assert_eq!(enc, vec![9u8]);
    }

    /// Pages with changes of every shape: single bytes, short and long
    /// runs, gaps of 1-3 bytes (the merge limit), whole blocks, and
    /// lengths that are not a multiple of 64.
    fn changed(len: usize, seed: u64, edits: &[(u16, u8, u8)]) -> (Vec<u8>, Vec<u8>) {
        let old: Vec<u8> = (0..len)
            .map(|i| (i as u64).wrapping_mul(seed | 1).wrapping_shr(7) as u8)
            .collect();
        let mut new = old.clone();
        for &(at, run, gap) in edits {
            let mut i = at as usize % len.max(1);
            for _ in 0..run {
                if i >= len {
                    break;
                }
                new[i] = new[i].wrapping_add(1 + gap % 7);
                i += 1 + usize::from(gap % 4);
            }
        }
        (new, old)
    }

    proptest::proptest! {
        /// The AVX-512 blocks give the same runs as the word loop, and
        /// measuring gives the length (or the refusal) that writing does.
        #[test]
        fn simd_blocks_and_measuring_agree_with_the_word_loop(
            len in proptest::prop_oneof![0usize..300, proptest::strategy::Just(4096usize)],
            seed in proptest::prelude::any::<u64>(),
            edits in proptest::collection::vec(
                (proptest::prelude::any::<u16>(), 0u8..200, proptest::prelude::any::<u8>()), 0..40),
            limit in proptest::prop_oneof![
                proptest::strategy::Just(usize::MAX), 0usize..64, 64usize..5000],
        ) {
            let (new, old) = changed(len, seed, &edits);
            let (mut words, mut blocks) = (vec![5u8], vec![5u8]);
            let a = encode_xor_with(&new, &old, &mut words, limit, false);
            let b = encode_xor_with(&new, &old, &mut blocks, limit, true);
            proptest::prop_assert_eq!(a, b);
            proptest::prop_assert_eq!(&words, &blocks);
            let mut scan = DeltaScan::default();
            for simd in [false, true] {
                let m = measure_xor_with(&new, &old, limit, &mut scan, simd);
                proptest::prop_assert_eq!(m, a);
                if m.is_some() {
                    // Written from the measurement: what encode_xor writes.
                    let mut written = vec![5u8];
                    write_xor(&scan, &new, &old, &mut written);
                    proptest::prop_assert_eq!(&written, &words);
                }
            }
            match a {
                Some(n) => {
                    proptest::prop_assert_eq!(words.len(), n + 1);
                    let mut dst = old.clone();
                    apply_xor(&words[1..], &mut dst).expect("valid runs");
                    proptest::prop_assert_eq!(dst, new);
                }
                None => proptest::prop_assert_eq!(words, vec![5u8]),
            }
        }
    }

    /// Runs and gaps around 128 bytes, where their length takes a second
    /// ULEB128 byte, at every alignment to the 64-byte blocks.
    #[test]
    fn measured_lengths_at_the_two_byte_boundary() {
        let old = vec![0u8; 1024];
        for (len, at, busy) in
            (120..=136).flat_map(|l| (0..=70).flat_map(move |a| [(l, a, false), (l, a, true)]))
        {
            {
                // One run of `len` bytes at `at`, then a gap of `len` and one
                // byte; `busy`: one byte changed in each of the last eight
                // blocks too, so that more than `SPARSE_BLOCKS` blocks differ
                // and the length comes from the bitmap.
                let mut new = old.clone();
                new[at..at + len].fill(1);
                new[at + 2 * len] = 1;
                if busy {
                    for b in 8..16 {
                        new[64 * b + 17] = 1;
                    }
                }
                for simd in [false, true] {
                    let mut out = Vec::new();
                    let want = encode_xor_with(&new, &old, &mut out, usize::MAX, false);
                    assert_eq!(want, Some(out.len()));
                    let mut scan = DeltaScan::default();
                    let got = measure_xor_with(&new, &old, usize::MAX, &mut scan, simd);
                    assert_eq!(got, want, "len {len} at {at} simd {simd}");
                    let mut written = Vec::new();
                    write_xor(&scan, &new, &old, &mut written);
                    assert!(written == out, "len {len} at {at} simd {simd}");
                }
            }
        }
    }

    /// The lane fill itself: each byte of the mask spans its lowest to its
    /// highest set bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn word_spans_fill_each_lane_between_its_ends() {
        assert_eq!(word_spans(0), 0);
        assert_eq!(word_spans(0b1000_0001), 0xFF);
        assert_eq!(word_spans(0b0010_0100 << 8), 0b0011_1100 << 8);
        assert_eq!(word_spans(1 << 63 | 1), 1 << 63 | 1);
        assert_eq!(word_spans(0x0100_0000_0000_0080), 0x0100_0000_0000_0080);
        for m in [0x1234_5678_9ABC_DEF0u64, u64::MAX, 0x8001_0000_0100_8000] {
            let f = word_spans(m);
            for lane in 0..8 {
                let b = (m >> (8 * lane)) as u8;
                let want = if b == 0 {
                    0
                } else {
                    let (lo, hi) = (b.trailing_zeros(), 7 - b.leading_zeros());
                    ((0xFFu16 << lo) as u8) & (0xFFu8 >> (7 - hi))
                };
                assert_eq!((f >> (8 * lane)) as u8, want, "mask {m:#x} lane {lane}");
            }
        }
    }

    #[test]
    fn runs_past_the_page_are_rejected() {
        let mut dst = vec![0u8; 16];
        assert!(apply_xor(&[10, 7, 1, 1, 1, 1, 1, 1, 1], &mut dst).is_err());
        assert!(apply_xor(&[17, 1, 1], &mut dst).is_err());
        assert!(apply_xor(&[0, 0], &mut dst).is_err());
        assert!(apply_xor(&[0, 4, 1], &mut dst).is_err());
        assert_eq!(dst, vec![0u8; 16]);
    }
}
