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
//! xxh3 of the 32 bytes after each (anchors.rs). The low bits of a gear hash depend on
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

use super::anchors::{Anchors, LANES};
use super::fasthash::U64Map;

/// Bytes hashed after an anchor: long enough that text lines (30–100
/// bytes in `sort`'s rows) match only where they really repeat.
const FP_LEN: usize = 32;
/// Table of 2^18 buckets of two entries (4 MiB): a 64 MiB cache holds
/// about 256 Ki fingerprints at 16 per page.
const TABLE_BITS: u32 = 18;
/// A frame needs this many votes from a chunk to be a prefix candidate:
/// one shared 32-byte run is as often chance (a common header) as content.
const MIN_VOTES: u32 = 2;

/// Fingerprint table and the anchor finder.
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
    anchors: Anchors,
    /// Scratch: anchors and fingerprints of the current page.
    hits: Vec<u16>,
    fps: Vec<u64>,
}

impl FingerprintIndex {
    pub fn new() -> Self {
        FingerprintIndex {
            table: vec![[0; 2]; 1 << TABLE_BITS],
            anchors: Anchors::new(),
            hits: Vec::with_capacity(64),
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
        // Anchors are positions i in FP_LEN..=len-FP_LEN (anchors.rs).
        self.anchors
            .find(page, FP_LEN, page.len() - FP_LEN + 1, &mut self.hits);
        // In page order, fingerprints that do not overlap: a run of one
        // byte value would otherwise anchor at every position.
        let mut next = 0usize;
        for &i in &self.hits {
            let i = usize::from(i);
            if i >= next {
                self.fps
                    .push(xxhash_rust::xxh3::xxh3_64(&page[i..i + FP_LEN]));
                next = i + FP_LEN;
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
