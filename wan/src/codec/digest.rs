//! Page digests computed ahead of the page pass by helper threads.
//!
//! With helpers, the page pass is the longer part of an epoch: the
//! calling thread runs it alone, in page order. The first thing it does
//! with a page depends on nothing but the page's bytes: its xxh3 and
//! whether it is zero. That is also the first touch of a page the guest
//! wrote long ago, paid at memory speed (7-9 GB/s here, against 25 for a
//! page in cache). A helper computes those for the pages ahead of the
//! pass, in batches, before it looks for chunks to compress; the pass
//! takes a batch's digests when they are ready and computes its pages
//! itself when they are not. Pure functions of the input, so the bytes
//! on the wire are the same whoever computed them.
//!
//! Only these two: the sub-page fingerprints (xref.rs) are a pure function
//! of the page too, but computed ahead they are computed for every page,
//! where the pass needs them for raw pages only; the recorded traces with
//! two threads were 3-11 % slower with them than without.
//!
//! Claiming never blocks: a batch goes to the first helper that claims it,
//! never one the pass has reached (the pass announces each batch it
//! enters, and helpers claim only batches after it). A batch the pass
//! reaches while a helper still works on it is computed twice; the pass
//! does not wait.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

use super::cpu_time::Stopwatch;
use super::encoder::is_zero;

/// Pages per batch: a few µs of work, long against a claim (one atomic
/// operation), short against an epoch.
const BATCH_PAGES: usize = 16;

/// What the page pass needs to know of a page before it looks at the cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct PageDigest {
    pub(super) hash: u64,
    pub(super) zero: bool,
}

impl PageDigest {
    pub(super) fn of(page: &[u8]) -> Self {
        PageDigest {
            hash: xxh3_64(page),
            zero: is_zero(page),
        }
    }
}

/// One batch's digests, computed by a helper.
struct Batch {
    pages: Vec<PageDigest>,
    /// The helper's CPU time for the batch: what the pass saved by using it.
    cpu: Duration,
}

/// The digests of one epoch's pages, shared by the page pass and the helpers.
pub(super) struct Digests<'p> {
    pages: &'p [(u64, &'p [u8])],
    batches: Vec<OnceLock<Batch>>,
    /// First batch no helper has claimed yet.
    next: AtomicUsize,
    /// Batch the page pass is in.
    pass_at: AtomicUsize,
    /// Helper CPU time of the batches the pass used (written by the pass only).
    used_nanos: AtomicU64,
}

impl<'p> Digests<'p> {
    pub(super) fn new(pages: &'p [(u64, &'p [u8])]) -> Self {
        let n = pages.len().div_ceil(BATCH_PAGES);
        Digests {
            pages,
            batches: (0..n).map(|_| OnceLock::new()).collect(),
            next: AtomicUsize::new(0),
            pass_at: AtomicUsize::new(0),
            used_nanos: AtomicU64::new(0),
        }
    }

    /// A helper's turn: computes the next unclaimed batch ahead of the
    /// pass; `false` when there is none.
    pub(super) fn help(&self) -> bool {
        let Some(b) = self.claim() else {
            return false;
        };
        let watch = Stopwatch::start();
        let range = b * BATCH_PAGES..((b + 1) * BATCH_PAGES).min(self.pages.len());
        let pages = range
            .map(|i| {
                // The next page is asked for while this one is hashed: a
                // helper's batches are cold memory and nothing else, so
                // without this each page waits for memory alone (sort
                // with two threads: 990 -> 1,013 MB/s).
                if let Some(&(_, next)) = self.pages.get(i + 1) {
                    super::prefetch::page(next);
                }
                PageDigest::of(self.pages[i].1)
            })
            .collect();
        let cpu = watch.elapsed();
        // Set once: the only claimant.
        let _ = self.batches[b].set(Batch { pages, cpu });
        true
    }

    fn claim(&self) -> Option<usize> {
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            // Never the batch the pass is in: it computes that one itself.
            let b = next.max(self.pass_at.load(Ordering::Relaxed) + 1);
            if b >= self.batches.len() {
                return None;
            }
            match self
                .next
                .compare_exchange_weak(next, b + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(b),
                Err(now) => next = now,
            }
        }
    }

    /// The digest of page `index`, if a helper has computed it. The pass
    /// calls this for every page, in order.
    pub(super) fn get(&self, index: usize) -> Option<PageDigest> {
        let (b, i) = (index / BATCH_PAGES, index % BATCH_PAGES);
        if i == 0 {
            self.pass_at.store(b, Ordering::Relaxed);
        }
        let batch = self.batches.get(b)?.get()?;
        if i == 0 {
            self.used_nanos
                .fetch_add(batch.cpu.as_nanos() as u64, Ordering::Relaxed);
        }
        batch.pages.get(i).copied()
    }

    /// Helper CPU time of the digests the pass used.
    pub(super) fn used_helper_time(&self) -> Duration {
        Duration::from_nanos(self.used_nanos.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize) -> Vec<(u64, Vec<u8>)> {
        (0..n as u64)
            .map(|f| {
                let page = if f % 5 == 0 {
                    vec![0u8; 4096]
                } else {
                    (0..4096u64)
                        .map(|i| (i.wrapping_mul(f + 3) >> 3) as u8)
                        .collect()
                };
                (f, page)
            })
            .collect()
    }

    #[test]
    fn digests_are_the_pages_own_and_the_pass_batch_is_never_claimed() {
        let owned = pages(3 * BATCH_PAGES + 5);
        let input: Vec<(u64, &[u8])> = owned.iter().map(|(f, p)| (*f, &p[..])).collect();
        let d = Digests::new(&input);
        // The pass is in batch 0: helpers take 1, 2, 3, then nothing.
        assert!(d.get(0).is_none());
        let mut helped = 0;
        while d.help() {
            helped += 1;
        }
        assert_eq!(helped, 3);
        assert!(d.get(1).is_none(), "batch 0 is the pass's own");
        for (i, &(_, data)) in input.iter().enumerate().skip(BATCH_PAGES) {
            let g = d.get(i).expect("computed by the helper");
            assert_eq!(g, PageDigest::of(data));
            assert_eq!(g.zero, i % 5 == 0);
        }
    }

    #[test]
    fn helpers_skip_batches_the_pass_has_passed() {
        let owned = pages(4 * BATCH_PAGES);
        let input: Vec<(u64, &[u8])> = owned.iter().map(|(f, p)| (*f, &p[..])).collect();
        let d = Digests::new(&input);
        // The pass enters batch 2 before any helper ran.
        assert!(d.get(2 * BATCH_PAGES).is_none());
        assert!(d.help());
        assert!(!d.help(), "only batch 3 is ahead of the pass");
        assert!(d.get(3 * BATCH_PAGES).is_some());
    }
}
