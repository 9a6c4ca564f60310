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
//! bits, which depend on the last 64 bytes, gave sort 1 % instead of 11 %. A fixed table maps fingerprints to the
//! frame that last sent them. Each raw page of a chunk looks its
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
/// Table of 2^19 buckets of two frames (4 MiB): a 64 MiB cache holds
/// about 256 Ki fingerprints at 16 per page.
const TABLE_BITS: u32 = 19;
/// A frame needs this many votes from a chunk to be a prefix candidate:
/// one shared 32-byte run is as often chance (a common header) as content.
const MIN_VOTES: u32 = 2;

/// Fingerprint table and the gear hash's byte table.
pub(super) struct FingerprintIndex {
    /// Per bucket, frame + 1 of the newest and of the one before (0 =
    /// empty): content copied again (a read buffer, a sorted array)
    /// would otherwise hide its source behind the copy, which is often
    /// rewritten before the content is wanted again.
    table: Vec<[u32; 2]>,
    gear: [u64; 256],
    /// Scratch: fingerprints of the current page.
    fps: Vec<u64>,
}

impl FingerprintIndex {
    pub fn new() -> Self {
        // Any fixed pseudo-random table: it only decides where anchors fall,
        // on the sender alone.
        let mut gear = [0u64; 256];
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for g in gear.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *g = x;
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
        if page.len() < 2 * FP_LEN {
            return;
        }
        let mask = (1u64 << ANCHOR_BITS) - 1;
        let mut h = 0u64;
        // The first 32 bytes only warm the hash up.
        for &b in &page[..FP_LEN] {
            h = (h << 1).wrapping_add(self.gear[b as usize]);
        }
        let last = page.len() - FP_LEN;
        let mut i = FP_LEN;
        while i <= last {
            h = (h << 1).wrapping_add(self.gear[page[i] as usize]);
            if h & mask == 0 {
                self.fps
                    .push(xxhash_rust::xxh3::xxh3_64(&page[i..i + FP_LEN]));
                // Runs of one byte value would anchor at every position;
                // the hash catches up within 8 bytes after the jump.
                i += FP_LEN;
                continue;
            }
            i += 1;
        }
    }

    fn slot(fp: u64) -> usize {
        (fp >> (64 - TABLE_BITS)) as usize
    }

    /// Samples `page` (the new content of `frame`), adds the frames that
    /// sent the same fingerprints before to `votes` (when `votes` is
    /// given), then records `frame` for them.
    pub fn add_page(&mut self, frame: u64, page: &[u8], votes: Option<&mut U64Map<u32>>) {
        if frame >= u64::from(u32::MAX) {
            return;
        }
        self.sample(page);
        if let Some(votes) = votes {
            for &fp in &self.fps {
                let [a, b] = self.table[Self::slot(fp)];
                for e in [a, b] {
                    if e != 0 && u64::from(e - 1) != frame {
                        *votes.entry(u64::from(e - 1)).or_insert(0) += 1;
                    }
                }
            }
        }
        let me = frame as u32 + 1;
        for &fp in &self.fps {
            let bucket = &mut self.table[Self::slot(fp)];
            if bucket[0] != me {
                *bucket = [me, bucket[0]];
            }
        }
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
    v.sort_unstable_by(|a, b| b.cmp(a));
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
