//! The sender's cache of page contents it last sent, the base of XOR deltas
//! and the source of cross-frame duplicate references.
//!
//! Invariant (what makes deltas and references safe): if frame `f` has an
//! entry, its content is exactly what the sender put on the wire for `f` in
//! the latest epoch of the current chain that carried `f`. Entries sent in an
//! epoch that is later declared lost are dropped ([`PageCache::remove_sent_since`]),
//! never kept, because the replica holds older content we no longer have.
//!
//! Replacement is CLOCK with a small saturating counter per entry: a page
//! that is dirtied again gains credit, the clock hand spends it. Pages written
//! once by a streaming pass are evicted before pages the guest keeps
//! rewriting, which is where deltas pay.

use super::fasthash::{map_with_capacity, U64Map};

const HOT_MAX: u8 = 3;
/// Page data lives in segments of this many pages: growing the cache never
/// moves what is already cached (a single Vec would copy tens of MiB on each
/// doubling, in the middle of an epoch).
const SEGMENT_PAGES: usize = 256;

#[derive(Clone, Copy)]
struct Slot {
    frame: u64,
    hash: u64,
    epoch: u64,
    hot: u8,
    live: bool,
    /// `REC_PREFIX_ZSTD` attempts on this frame that did not pay, in a row
    /// (saturating), and how many more candidates to skip because of them.
    prefix_misses: u8,
    prefix_skip: u8,
    /// Neighbours in the list of live slots with the same hash (newest
    /// first, head in `by_hash`); [`NIL`] at the ends.
    prev_same: u32,
    next_same: u32,
}

/// No slot.
const NIL: u32 = u32::MAX;

/// Content cache with a fixed memory budget for page data.
pub struct PageCache {
    page_size: usize,
    capacity: usize,
    segments: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    by_frame: U64Map<u32>,
    /// Newest live slot of each hash; the others with that hash follow it
    /// through `next_same`, so that rewriting or evicting one copy of a
    /// content leaves the other copies findable.
    by_hash: U64Map<u32>,
    free: Vec<u32>,
    hand: usize,
}

/// Misses in a row that the prefix back-off counts (see
/// [`PageCache::prefix_outcome`]): 4, at most 15 candidates skipped. On the
/// real-guest traces (docs/benchmarks.md) 4 instead of 2 made 31 % fewer
/// attempts on db for 1 % more bytes, and 3-17 % fewer on the others for
/// bytes within 0.3 %: a frame that missed twice mostly misses again.
const PREFIX_MAX_MISSES: u8 = 4;

impl PageCache {
    /// `budget_bytes / page_size` pages are kept (page data only; the
    /// per-entry bookkeeping adds about 80 bytes).
    pub fn new(page_size: usize, budget_bytes: usize) -> Self {
        let capacity = (budget_bytes / page_size.max(1)).min(u32::MAX as usize);
        PageCache {
            page_size,
            capacity,
            segments: Vec::new(),
            slots: Vec::new(),
            by_frame: map_with_capacity(0),
            by_hash: map_with_capacity(0),
            free: Vec::new(),
            hand: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.by_frame.len()
    }

    fn content(&self, slot: u32) -> &[u8] {
        let (seg, at) = self.locate(slot);
        &self.segments[seg][at..at + self.page_size]
    }

    fn locate(&self, slot: u32) -> (usize, usize) {
        let s = slot as usize;
        (s / SEGMENT_PAGES, (s % SEGMENT_PAGES) * self.page_size)
    }

    /// Last-sent content of `frame`, if cached.
    pub fn get(&self, frame: u64) -> Option<&[u8]> {
        self.by_frame.get(&frame).map(|&s| self.content(s))
    }

    /// The epoch in which the cached content of `frame` was sent.
    pub fn sent_epoch(&self, frame: u64) -> Option<u64> {
        self.by_frame
            .get(&frame)
            .map(|&s| self.slots[s as usize].epoch)
    }

    /// Whether the encoder should try `REC_PREFIX_ZSTD` on `frame` this
    /// time: not while it is backing off after attempts that did not pay.
    pub fn prefix_worth_trying(&self, frame: u64) -> bool {
        self.by_frame
            .get(&frame)
            .is_some_and(|&s| self.slots[s as usize].prefix_skip == 0)
    }

    /// Outcome of a prefix candidate of `frame`: `None` when it was skipped
    /// ([`PageCache::prefix_worth_trying`] said no), else whether it paid.
    /// After n misses in a row the next 2^n - 1 candidates (at most 15,
    /// [`PREFIX_MAX_MISSES`]) are skipped: fresh content that its old
    /// version does not help with (a streaming rewrite) stops costing a
    /// zstd call per page.
    pub fn prefix_outcome(&mut self, frame: u64, paid: Option<bool>) {
        let Some(&s) = self.by_frame.get(&frame) else {
            return;
        };
        let sl = &mut self.slots[s as usize];
        match paid {
            None => sl.prefix_skip = sl.prefix_skip.saturating_sub(1),
            Some(true) => sl.prefix_misses = 0,
            Some(false) => {
                sl.prefix_misses = (sl.prefix_misses + 1).min(PREFIX_MAX_MISSES);
                sl.prefix_skip = (1u8 << sl.prefix_misses) - 1;
            }
        }
    }

    /// A frame whose cached content has xxh3-64 `hash`, with that content.
    /// Hashes collide: the caller must compare bytes before trusting it.
    pub fn find_by_hash(&self, hash: u64) -> Option<(u64, &[u8])> {
        let &s = self.by_hash.get(&hash)?;
        let slot = &self.slots[s as usize];
        (slot.live && slot.hash == hash).then(|| (slot.frame, self.content(s)))
    }

    /// Puts live slot `s` at the head of its hash's list.
    fn link(&mut self, s: u32) {
        let hash = self.slots[s as usize].hash;
        let head = self.by_hash.insert(hash, s).unwrap_or(NIL);
        if head != NIL {
            self.slots[head as usize].prev_same = s;
        }
        let sl = &mut self.slots[s as usize];
        sl.prev_same = NIL;
        sl.next_same = head;
    }

    /// Takes live slot `s` out of its hash's list.
    fn unlink(&mut self, s: u32) {
        let Slot {
            hash,
            prev_same: p,
            next_same: n,
            ..
        } = self.slots[s as usize];
        if p != NIL {
            self.slots[p as usize].next_same = n;
        } else if n != NIL {
            self.by_hash.insert(hash, n);
        } else {
            self.by_hash.remove(&hash);
        }
        if n != NIL {
            self.slots[n as usize].prev_same = p;
        }
        let sl = &mut self.slots[s as usize];
        sl.prev_same = NIL;
        sl.next_same = NIL;
    }

    /// Records that `content` (hashing to `hash`) was sent for `frame` in `epoch`.
    pub fn store(&mut self, frame: u64, content: &[u8], hash: u64, epoch: u64) {
        if content.len() != self.page_size || self.capacity == 0 {
            self.remove(frame);
            return;
        }
        let slot = match self.by_frame.get(&frame) {
            Some(&s) => {
                self.unlink(s);
                let sl = &mut self.slots[s as usize];
                sl.hot = (sl.hot + 1).min(HOT_MAX);
                s
            }
            None => {
                // New entries start without credit: a page must be dirtied
                // again to earn protection from the clock hand, so a long
                // streaming pass mostly recycles its own slots.
                let s = self.allocate();
                let sl = &mut self.slots[s as usize];
                sl.hot = 0;
                sl.prefix_misses = 0;
                sl.prefix_skip = 0;
                self.by_frame.insert(frame, s);
                s
            }
        };
        let sl = &mut self.slots[slot as usize];
        sl.frame = frame;
        sl.hash = hash;
        sl.epoch = epoch;
        sl.live = true;
        self.link(slot);
        let (seg, at) = self.locate(slot);
        let data = &mut self.segments[seg];
        if data.len() == at {
            // A slot just added by `allocate`.
            data.extend_from_slice(content);
        } else {
            data[at..at + self.page_size].copy_from_slice(content);
        }
    }

    fn allocate(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            return s;
        }
        if self.slots.len() < self.capacity {
            let s = self.slots.len() as u32;
            self.slots.push(Slot {
                frame: 0,
                hash: 0,
                epoch: 0,
                hot: 0,
                live: false,
                prefix_misses: 0,
                prefix_skip: 0,
                prev_same: NIL,
                next_same: NIL,
            });
            let (seg, at) = self.locate(s);
            if seg == self.segments.len() {
                let pages = SEGMENT_PAGES.min(self.capacity - s as usize);
                self.segments
                    .push(Vec::with_capacity(pages * self.page_size));
            }
            // The page's bytes are appended by `store`, which this returns to:
            // filling them with zeros first would only be overwritten.
            debug_assert_eq!(self.segments[seg].len(), at);
            return s;
        }
        // Every live slot has hot <= HOT_MAX, so this ends within
        // (HOT_MAX + 1) turns of the clock.
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let sl = &mut self.slots[s];
            if sl.hot == 0 || !sl.live {
                self.evict(s as u32);
                return s as u32;
            }
            sl.hot -= 1;
        }
    }

    fn evict(&mut self, s: u32) {
        let sl = self.slots[s as usize];
        if sl.live {
            if self.by_frame.get(&sl.frame) == Some(&s) {
                self.by_frame.remove(&sl.frame);
            }
            self.unlink(s);
        }
        self.slots[s as usize].live = false;
    }

    /// Forgets `frame`: it will be sent whole next time.
    pub fn remove(&mut self, frame: u64) {
        if let Some(&s) = self.by_frame.get(&frame) {
            self.evict(s);
            self.free.push(s);
        }
    }

    /// Drops every entry whose content was sent in `epoch` or later.
    pub fn remove_sent_since(&mut self, epoch: u64) {
        for s in 0..self.slots.len() {
            let sl = self.slots[s];
            if sl.live && sl.epoch >= epoch {
                self.evict(s as u32);
                self.free.push(s as u32);
            }
        }
    }

    pub fn clear(&mut self) {
        self.by_frame.clear();
        self.by_hash.clear();
        self.free.clear();
        self.slots.clear();
        self.segments.clear();
        self.hand = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; 64]
    }

    #[test]
    fn store_get_and_hash_lookup() {
        let mut c = PageCache::new(64, 64 * 4);
        c.store(5, &page(1), 11, 1);
        assert_eq!(c.get(5), Some(&page(1)[..]));
        assert_eq!(c.find_by_hash(11).map(|(f, _)| f), Some(5));
        c.store(5, &page(2), 22, 2);
        assert_eq!(c.find_by_hash(11), None);
        assert_eq!(c.sent_epoch(5), Some(2));
    }

    #[test]
    fn hot_pages_survive_a_scan() {
        let mut c = PageCache::new(64, 64 * 4);
        for e in 0..4 {
            c.store(1, &page(e as u8), 100 + e, e);
        }
        // A scan of twice the cache size: LRU would have evicted frame 1.
        for f in 10..18u64 {
            c.store(f, &page(f as u8), 1000 + f, 10);
        }
        assert!(c.get(1).is_some(), "the rewritten page should stay");
        assert!(c.len() <= 4);
    }

    #[test]
    fn invalidation_drops_later_epochs_only() {
        let mut c = PageCache::new(64, 64 * 8);
        c.store(1, &page(1), 1, 3);
        c.store(2, &page(2), 2, 4);
        c.store(3, &page(3), 3, 5);
        c.remove_sent_since(4);
        assert!(c.get(1).is_some());
        assert!(c.get(2).is_none() && c.get(3).is_none());
        assert!(c.find_by_hash(2).is_none());
        c.store(4, &page(4), 4, 6);
        c.store(5, &page(5), 5, 6);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn every_copy_of_a_content_stays_findable() {
        let mut c = PageCache::new(64, 64 * 8);
        for f in 1..=3 {
            c.store(f, &page(7), 77, 1);
        }
        assert_eq!(c.find_by_hash(77).map(|(f, _)| f), Some(3), "newest first");
        // The newest copy rewritten, then the oldest: the middle one remains.
        c.store(3, &page(8), 88, 2);
        assert_eq!(c.find_by_hash(77).map(|(f, _)| f), Some(2));
        c.store(1, &page(9), 99, 3);
        assert_eq!(c.find_by_hash(77).map(|(f, _)| f), Some(2));
        c.remove(2);
        assert_eq!(c.find_by_hash(77), None);
        assert_eq!(c.find_by_hash(88).map(|(f, _)| f), Some(3));
        // Eviction by the clock hand keeps the lists consistent too.
        for f in 10..40u64 {
            c.store(f, &page(5), 55, 4);
            assert!(c.find_by_hash(55).is_some());
        }
        let live = c.len();
        let mut n = 0;
        let mut s = c.by_hash.get(&55).copied().unwrap_or(NIL);
        while s != NIL {
            assert!(c.slots[s as usize].live);
            n += 1;
            s = c.slots[s as usize].next_same;
        }
        assert!(n <= live && n >= 1);
    }

    #[test]
    fn prefix_back_off_doubles_and_resets() {
        let mut c = PageCache::new(64, 64 * 4);
        c.store(1, &page(1), 1, 1);
        assert!(c.prefix_worth_trying(1));
        assert!(!c.prefix_worth_trying(2), "not cached");
        c.prefix_outcome(1, Some(false));
        assert!(!c.prefix_worth_trying(1));
        c.prefix_outcome(1, None);
        assert!(c.prefix_worth_trying(1));
        // 3, 7, 15, then 15 skipped candidates after each further miss.
        for skipped in [3, 7, 15, 15] {
            c.prefix_outcome(1, Some(false));
            for _ in 0..skipped {
                assert!(!c.prefix_worth_trying(1));
                c.prefix_outcome(1, None);
            }
            assert!(c.prefix_worth_trying(1));
        }
        c.prefix_outcome(1, Some(true));
        c.prefix_outcome(1, Some(false));
        c.prefix_outcome(1, None);
        assert!(c.prefix_worth_trying(1), "a hit resets the back-off");
        // A frame cached anew starts without back-off.
        c.prefix_outcome(1, Some(false));
        c.remove(1);
        c.store(1, &page(2), 2, 2);
        assert!(c.prefix_worth_trying(1));
    }

    #[test]
    fn zero_budget_caches_nothing() {
        let mut c = PageCache::new(64, 10);
        c.store(1, &page(1), 1, 1);
        assert!(c.get(1).is_none());
    }
}
