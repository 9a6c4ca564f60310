//! Cross-page references for chunks (`BLOCK_ZSTD_REFS`, wire version 3):
//! which cached pages to hand the chunk's zstd as a prefix.
//!
//! Fresh pages (sent raw) often hold content that already exists in the
//! guest at another alignment: `sort` writes lines of the input file into
//! new buffers, `gzip -d` writes text the page cache holds. A page-aligned
//! duplicate test or XOR delta never sees it, and a chunk's zstd window
//! only sees the chunk. The encoder therefore samples sub-page
//! fingerprints: content-defined anchors (a gear rolling hash over the
//! page, anchors where its low 8 bits are zero, about one per 256 bytes:
//! the same content gives the same anchors whatever its offset), and an
//! xxh3 of the 32 bytes after each. The low bits of a gear hash depend on
//! the last 8 bytes only, so an anchor inside a text line does not move
//! when the line's neighbours change (sorted lines): anchors on the top
//! bits, which depend on the last 64 bytes, gave sort 1 % instead of 11 %.
//! A fixed table maps fingerprints to the frames that last sent them. Each raw page of a chunk looks its
//! fingerprints up (votes for frames) before adding its own; the chunk's
//! most-voted cached frames, sent in earlier epochs (so the replica holds
//! exactly those bytes as committed content), become its zstd prefix.
//!
//! The table is never cleaned: a stale entry only proposes a frame whose
//! content has changed, which costs some prefix room, never correctness
//! (the decoder uses whatever the listed frames hold).

use super::fasthash::U64Map;

/// Anchors where the rolling hash's low 8 bits are zero: one per 256
/// bytes on average (16 per 4 KiB page). Measured on the recorded traces:
/// one per 64 bytes made sort 11 % larger (the table crowds), gzip equal.
const ANCHOR_BITS: u32 = 8;
/// Bytes hashed after an anchor: long enough that text lines (30–100
/// bytes in `sort`'s rows) match only where they really repeat.
const FP_LEN: usize = 32;
/// Table of 2^18 buckets of two entries (4 MiB): a 64 MiB cache holds
/// about 256 Ki fingerprints at 16 per page.
const TABLE_BITS: u32 = 18;
/// Stretches of a page hashed side by side (see `sample`).
const LANES: usize = 4;
/// Anchors kept per stretch: 16 expected in a whole 4 KiB page, more only
/// in degenerate content (a run of one byte value anchors everywhere or
/// nowhere), where the first ones are as good as any. Positions are
/// `u16`: pages are at most 64 KiB.
const MAX_LANE_HITS: usize = 64;
/// A frame needs this many votes from a chunk to be a prefix candidate:
/// one shared 32-byte run is as often chance (a common header) as content.
const MIN_VOTES: u32 = 2;

/// Fingerprint table and the gear hash's byte table.
pub(super) struct FingerprintIndex {
    /// Per bucket, the newest entry and the one before (0 = empty): content
    /// copied again (a read buffer, a sorted array) would otherwise hide
    /// its source behind the copy, which is often rewritten before the
    /// content is wanted again. An entry is the fingerprint's low 32 bits
    /// (the bucket is chosen by its top bits) above frame + 1: a lookup
    /// votes only for the same fingerprint. Without the tag, every bucket
    /// collision voted: on pages found nowhere else (random data) a chunk
    /// then drew dozens of chance frames with two votes, and zstd ran over
    /// 256 KiB of useless prefix (synthetic random trace: encode 1,517 ->
    /// 553 MB/s per core).
    table: Vec<[u64; 2]>,
    gear: [u32; 256],
    /// Scratch: fingerprints of the current page.
    fps: Vec<u64>,
}

impl FingerprintIndex {
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
        FingerprintIndex {
            table: vec![[0; 2]; 1 << TABLE_BITS],
            gear,
            fps: Vec::with_capacity(64),
        }
    }

    /// Forgets every fingerprint (the cache was emptied).
    pub fn clear(&mut self) {
        self.table.fill([0; 2]);
    }

    /// The fingerprints of `page` into `self.fps`.
    fn sample(&mut self, page: &[u8]) {
        self.fps.clear();
        if page.len() < 2 * FP_LEN + LANES {
            return;
        }
        // Anchors are positions i in FP_LEN..=len-FP_LEN whose hash over
        // the bytes up to i has its low 8 bits zero. Those bits depend on
        // the last 8 bytes only (each step shifts the older bytes' share
        // left), so the page splits into LANES stretches hashed side by
        // side, each warmed up on the 8 bytes before it: independent
        // chains instead of one serial one (the single chain was 7 % of
        // the encoder's samples on sort), same anchors.
        let mask = (1u32 << ANCHOR_BITS) - 1;
        let first = FP_LEN;
        let end = page.len() - FP_LEN + 1;
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
        // In page order, fingerprints that do not overlap: a run of one
        // byte value would otherwise anchor at every position.
        let mut next = 0usize;
        for l in 0..LANES {
            for &i in &hits[l][..nhits[l]] {
                let i = usize::from(i);
                if i >= next {
                    self.fps
                        .push(xxhash_rust::xxh3::xxh3_64(&page[i..i + FP_LEN]));
                    next = i + FP_LEN;
                }
            }
        }
    }

    fn slot(fp: u64) -> usize {
        (fp >> (64 - TABLE_BITS)) as usize
    }

    /// Samples `page` (the new content of `frame`), adds the frames that
    /// sent the same fingerprints before to `votes` (when `votes` is
    /// given), then records `frame` for them. Returns whether any
    /// fingerprint was found.
    pub fn add_page(&mut self, frame: u64, page: &[u8], votes: Option<&mut U64Map<u32>>) -> bool {
        if frame >= u64::from(u32::MAX) {
            return false;
        }
        self.sample(page);
        let mut found = false;
        if let Some(votes) = votes {
            for &fp in &self.fps {
                let [a, b] = self.table[Self::slot(fp)];
                for e in [a, b] {
                    let f = (e & 0xffff_ffff).wrapping_sub(1);
                    if e != 0 && e >> 32 == fp & 0xffff_ffff && f != frame {
                        *votes.entry(f).or_insert(0) += 1;
                        found = true;
                    }
                }
            }
        }
        for &fp in &self.fps {
            let me = (fp << 32) | (frame + 1);
            let bucket = &mut self.table[Self::slot(fp)];
            if bucket[0] != me {
                *bucket = [me, bucket[0]];
            }
        }
        found
    }
}

/// The chunk's prefix frames from its `votes`: at most `max` frames with at
/// least [`MIN_VOTES`] for which `usable` holds, most-voted last (closest to
/// the chunk: shorter offsets), ties by frame number so that the choice is
/// the same on every run.
pub(super) fn choose(
    votes: &U64Map<u32>,
    max: usize,
    mut usable: impl FnMut(u64) -> bool,
) -> Vec<u64> {
    let mut v: Vec<(u32, u64)> = votes
        .iter()
        .filter(|&(_, &n)| n >= MIN_VOTES)
        .map(|(&f, &n)| (n, f))
        .collect();
    v.sort_unstable_by_key(|&x| std::cmp::Reverse(x));
    let mut out: Vec<u64> = v
        .into_iter()
        .map(|(_, f)| f)
        .filter(|&f| usable(f))
        .take(max)
        .collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::fasthash::map_with_capacity;

    fn text(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x % 26) as u8
            })
            .collect()
    }

    #[test]
    fn shifted_content_votes_for_its_source() {
        let mut idx = FingerprintIndex::new();
        let src = text(1, 4096);
        idx.add_page(7, &src, None);
        // The same text 1000 bytes further on, after other text.
        let mut moved = text(2, 1000);
        moved.extend_from_slice(&src[..3096]);
        let mut votes = map_with_capacity(4);
        idx.add_page(9, &moved, Some(&mut votes));
        assert!(
            votes.get(&7).copied().unwrap_or(0) >= MIN_VOTES,
            "{votes:?}"
        );
        assert_eq!(choose(&votes, 4, |_| true), vec![7]);
        assert!(choose(&votes, 4, |f| f != 7).is_empty());
    }

    #[test]
    fn unrelated_content_and_zeros_vote_for_nothing() {
        let mut idx = FingerprintIndex::new();
        idx.add_page(1, &text(3, 4096), None);
        idx.add_page(2, &[0u8; 4096], None);
        let mut votes = map_with_capacity(4);
        idx.add_page(3, &text(4, 4096), Some(&mut votes));
        idx.add_page(4, &[0u8; 4096], Some(&mut votes));
        assert!(choose(&votes, 4, |_| true).is_empty(), "{votes:?}");
    }

    #[test]
    fn most_voted_last_ties_by_frame() {
        let mut votes = map_with_capacity(4);
        votes.insert(5, 3);
        votes.insert(2, 9);
        votes.insert(8, 3);
        votes.insert(1, 1);
        assert_eq!(choose(&votes, 8, |_| true), vec![5, 8, 2]);
        assert_eq!(choose(&votes, 2, |_| true), vec![8, 2]);
    }
}
