//! Content-defined anchor positions of a page, for its sub-page
//! fingerprints (xref.rs).
//!
//! A position `i` is an anchor when the low [`ANCHOR_BITS`] bits of a gear
//! rolling hash over the bytes up to `i` are zero. Each step shifts the
//! hash left by one and adds the byte's table value, so those bits depend
//! on the last 8 bytes only: `h8(i) = sum over j in 0..8 of
//! (gear[page[i - j]] << j)`, modulo 256. That makes the positions
//! independent of where a stretch of the page starts, which both versions
//! below use: the portable one hashes four stretches side by side
//! (independent chains instead of one serial one), the AVX-512 one 64
//! positions at a time. Both give exactly the same anchors, so the bytes
//! an encoder sends do not depend on the machine's instruction set.

/// Anchors where the rolling hash's low 8 bits are zero: one per 256
/// bytes on average (16 per 4 KiB page). Measured on the recorded traces:
/// one per 64 bytes made sort 11 % larger (the fingerprint table crowds),
/// gzip equal.
pub(super) const ANCHOR_BITS: u32 = 8;
/// Stretches of a page whose anchors are capped separately.
pub(super) const LANES: usize = 4;
/// Anchors kept per stretch: 16 expected in a whole 4 KiB page, more only
/// in degenerate content (a run of one byte value anchors everywhere or
/// nowhere), where the first ones are as good as any. Positions are
/// `u16`: pages are at most 64 KiB.
pub(super) const MAX_LANE_HITS: usize = 64;

/// The gear table and scratch for [`Anchors::find`].
pub(super) struct Anchors {
    gear: [u32; 256],
    /// The table's low bytes, which are all the anchor test reads.
    #[cfg(target_arch = "x86_64")]
    gear8: [u8; 256],
    /// AVX-512: per page byte its table value, after 8 zero bytes.
    #[cfg(target_arch = "x86_64")]
    values: Vec<u8>,
    /// AVX-512: one bit per position, set where the hash is zero.
    #[cfg(target_arch = "x86_64")]
    zero_bits: Vec<u64>,
}

impl Anchors {
    pub fn new() -> Self {
        // Any fixed pseudo-random table: it only decides where anchors fall,
        // on the sender alone.
        let mut gear = [0u32; 256];
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for g in gear.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *g = x as u32;
        }
        Anchors {
            gear,
            #[cfg(target_arch = "x86_64")]
            gear8: gear.map(|g| g as u8),
            #[cfg(target_arch = "x86_64")]
            values: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            zero_bits: Vec::new(),
        }
    }

    /// The anchors of `page` among positions `first..end`, in order, at
    /// most [`MAX_LANE_HITS`] in each of [`LANES`] equal stretches (the
    /// last one also takes the remainder), into `out`.
    pub fn find(&mut self, page: &[u8], first: usize, end: usize, out: &mut Vec<u16>) {
        out.clear();
        if end < first + LANES || first < 8 || end > page.len() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if page.len().is_multiple_of(64) && avx512_available() {
            // SAFETY: the CPU has the features (checked just above).
            unsafe { self.find_avx512(page, first, end, out) };
            return;
        }
        self.find_portable(page, first, end, out);
    }

    /// Four stretches hashed side by side, each warmed up on the 8 bytes
    /// before it.
    pub(super) fn find_portable(&self, page: &[u8], first: usize, end: usize, out: &mut Vec<u16>) {
        out.clear();
        let mask = (1u32 << ANCHOR_BITS) - 1;
        let len = (end - first) / LANES;
        let mut h = [0u32; LANES];
        let mut hits = [[0u16; MAX_LANE_HITS]; LANES];
        let mut nhits = [0usize; LANES];
        let start = |l: usize| first + l * len;
        for (l, hl) in h.iter_mut().enumerate() {
            for &b in &page[start(l) - 8..start(l)] {
                *hl = (*hl << 1).wrapping_add(self.gear[b as usize]);
            }
        }
        let g = &self.gear;
        let lane = |l: usize| &page[start(l)..start(l) + len];
        let (s0, s1, s2, s3) = (lane(0), lane(1), lane(2), lane(3));
        for (j, (((&b0, &b1), &b2), &b3)) in s0.iter().zip(s1).zip(s2).zip(s3).enumerate() {
            h[0] = (h[0] << 1).wrapping_add(g[b0 as usize]);
            h[1] = (h[1] << 1).wrapping_add(g[b1 as usize]);
            h[2] = (h[2] << 1).wrapping_add(g[b2 as usize]);
            h[3] = (h[3] << 1).wrapping_add(g[b3 as usize]);
            // Rare (one position in 64 of the four): the branch is cheap.
            if (h[0] & mask) * (h[1] & mask) * (h[2] & mask) * (h[3] & mask) == 0 {
                for l in 0..LANES {
                    if h[l] & mask == 0 && nhits[l] < MAX_LANE_HITS {
                        hits[l][nhits[l]] = (start(l) + j) as u16;
                        nhits[l] += 1;
                    }
                }
            }
        }
        // The last lane's remainder.
        let l = LANES - 1;
        for (i, &b) in page.iter().enumerate().take(end).skip(start(LANES)) {
            h[l] = (h[l] << 1).wrapping_add(g[b as usize]);
            if h[l] & mask == 0 && nhits[l] < MAX_LANE_HITS {
                hits[l][nhits[l]] = i as u16;
                nhits[l] += 1;
            }
        }
        for l in 0..LANES {
            out.extend_from_slice(&hits[l][..nhits[l]]);
        }
    }

    /// 64 positions per step: the table values of the whole page by byte
    /// permutes (a 256-entry table is two 128-entry ones), then the hash
    /// of every position from the values 0..7 bytes back.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI; `page.len()` must be a
    /// multiple of 64.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn find_avx512(&mut self, page: &[u8], first: usize, end: usize, out: &mut Vec<u16>) {
        use std::arch::x86_64::*;
        const PAD: usize = 8;
        let n = page.len();
        self.values.clear();
        self.values.resize(PAD + n, 0);
        let t = self.gear8.as_ptr();
        // SAFETY (all loads and stores below): `page` and `values[PAD..]`
        // are `n` bytes, `n` a multiple of 64; `values` has PAD bytes
        // before them, and the hash reads at most PAD - 1 bytes back.
        let (t0, t1, t2, t3) = (
            _mm512_loadu_si512(t.cast()),
            _mm512_loadu_si512(t.add(64).cast()),
            _mm512_loadu_si512(t.add(128).cast()),
            _mm512_loadu_si512(t.add(192).cast()),
        );
        let v = self.values.as_mut_ptr().add(PAD);
        for at in (0..n).step_by(64) {
            let idx = _mm512_loadu_si512(page.as_ptr().add(at).cast());
            let low = _mm512_permutex2var_epi8(t0, idx, t1);
            let high = _mm512_permutex2var_epi8(t2, idx, t3);
            let value = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), low, high);
            _mm512_storeu_si512(v.add(at).cast(), value);
        }
        self.zero_bits.clear();
        self.zero_bits.resize(n / 64, 0);
        let zero = _mm512_setzero_si512();
        for (word, at) in (0..n).step_by(64).enumerate() {
            // Horner over the values 7..0 bytes back: h = 2 h + value.
            let mut h = _mm512_loadu_si512(v.add(at).sub(7).cast());
            for j in (0..7).rev() {
                let value = _mm512_loadu_si512(v.add(at).sub(j).cast());
                h = _mm512_add_epi8(_mm512_add_epi8(h, h), value);
            }
            self.zero_bits[word] = _mm512_cmpeq_epi8_mask(h, zero);
        }
        // The same stretches and caps as the portable version.
        let len = (end - first) / LANES;
        for l in 0..LANES {
            let from = first + l * len;
            let to = if l == LANES - 1 { end } else { from + len };
            let mut kept = 0;
            let mut word = from / 64;
            let mut bits = self.zero_bits[word] & (!0u64 << (from % 64));
            'lane: loop {
                while bits != 0 {
                    let i = word * 64 + bits.trailing_zeros() as usize;
                    if i >= to || kept == MAX_LANE_HITS {
                        break 'lane;
                    }
                    out.push(i as u16);
                    kept += 1;
                    bits &= bits - 1;
                }
                word += 1;
                if word * 64 >= to {
                    break;
                }
                bits = self.zero_bits[word];
            }
        }
    }
}

/// Whether this CPU runs [`Anchors::find_avx512`] (checked once by std).
#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vbmi")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::synthetic::{fill_struct, fill_text, Rng};
    use proptest::prelude::*;

    fn both(page: &[u8], first: usize, end: usize) -> (Vec<u16>, Vec<u16>) {
        let mut a = Anchors::new();
        let (mut fast, mut portable) = (Vec::new(), Vec::new());
        a.find(page, first, end, &mut fast);
        a.find_portable(page, first, end, &mut portable);
        (fast, portable)
    }

    /// On this machine `find` may take the AVX-512 path: it must give the
    /// portable version's anchors, caps included.
    #[test]
    fn every_path_finds_the_same_anchors() {
        let mut rng = Rng::new(21);
        let mut found = 0;
        for ps in [512usize, 4096, 65536] {
            let mut page = vec![0u8; ps];
            for round in 0..20 {
                match round % 4 {
                    0 => fill_text(&mut rng, &mut page),
                    1 => fill_struct(&mut rng, &mut page),
                    2 => rng.fill(&mut page),
                    _ => page.fill(round as u8), // degenerate: caps apply
                }
                let (first, end) = (32, ps - 32 + 1);
                let (fast, portable) = both(&page, first, end);
                assert_eq!(fast, portable, "page size {ps}, round {round}");
                if round % 4 != 3 {
                    found += fast.len();
                }
            }
        }
        // About one per 256 bytes: not a vacuous comparison.
        assert!(found > 1000, "{found} anchors");
    }

    proptest! {
        #[test]
        fn same_anchors_on_any_bytes(
            bytes in prop::collection::vec(any::<u8>(), 64..=64),
            reps in 8usize..64,
            noise in prop::collection::vec((0usize..4096, any::<u8>()), 0..64),
        ) {
            // Repetitive content with noise: many anchors, caps reached.
            let mut page: Vec<u8> = bytes.iter().copied().cycle().take(reps * 64).collect();
            for (at, b) in noise {
                let i = at % page.len();
                page[i] = b;
            }
            let (first, end) = (32, page.len() - 32 + 1);
            let (fast, portable) = both(&page, first, end);
            prop_assert_eq!(fast, portable);
        }
    }
}
