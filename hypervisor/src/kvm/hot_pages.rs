//! Hot pages: pages the guest rewrites epoch after epoch stay writable.
//!
//! With plain dirty logging, KVM write-protects every page it reports, so
//! the first guest write to each page in each epoch faults into the
//! hypervisor (about 10 µs each under the nested software KVM of our
//! development machines, against 20 ns for a plain write). A guest whose
//! working set takes longer than an epoch to walk never writes a page twice
//! in one epoch, so every write faults (docs/benchmarks.md, "Protected
//! guest"). With manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`)
//! reading the log leaves the pages writable and the VMM chooses which ones
//! to clear and write-protect; this policy chooses.
//!
//! A page reported dirty again within [`Config::window`] epochs of its
//! previous report, [`Config::promote_after`] times in a row, becomes hot: it
//! is copied as usual but not cleared. Its KVM bit stays set, so it is
//! reported (and copied) at every following checkpoint: no write to it can
//! be missed, whatever the policy decides. A hot page cools down (is
//! cleared, hence write-protected again) once its copied content has not
//! changed for [`Config::cool_after`] checkpoints in a row, so an idle guest
//! goes back to sending nothing; the hot set never grows beyond
//! [`Config::max_pages`], which bounds the extra copying.
//!
//! This is the pure policy: bitmaps in, bitmaps out, no KVM.

use std::collections::HashMap;

/// Turns hot pages off (`off`, `0`, `false`, `no`): every reported page is
/// cleared and write-protected at each read of the log, as without manual
/// protection.
pub const ENV_ENABLE: &str = "REMUS_WAN_HOT_PAGES";
/// Budget of the hot set in pages (default: a quarter of guest memory).
pub const ENV_MAX_PAGES: &str = "REMUS_WAN_HOT_PAGES_MAX";

/// Default: a page is dirtied again within this many epochs ...
const WINDOW: u32 = 8;
/// ... this many times in a row (two: three reports, so a page written
/// once by two nearby epochs is not promoted on that alone; a walk over a
/// working set larger than an epoch revisits every page every few epochs).
const PROMOTE_AFTER: u8 = 2;
/// Default: checkpoints with unchanged content before a hot page cools.
const COOL_AFTER: u8 = 3;
/// Default budget as a fraction of guest memory: each hot page is copied
/// (about 1 µs) and handed to the encoder at every checkpoint, so a quarter
/// of a 128 MiB guest costs a few ms per pause at worst, and only for the
/// [`COOL_AFTER`] checkpoints it takes an idle hot page to cool.
const DEFAULT_BUDGET_DIVISOR: u64 = 4;

/// Tunables of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Keep hot pages writable (needs manual dirty-log protection).
    pub enabled: bool,
    /// Budget of the hot set in pages; `None`: a quarter of guest memory.
    pub max_pages: Option<u64>,
    /// Epochs within which a page must be dirtied again to count.
    pub window: u32,
    /// Consecutive such re-dirtyings that make a page hot.
    pub promote_after: u8,
    /// Checkpoints with unchanged content that cool a hot page.
    pub cool_after: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            max_pages: None,
            window: WINDOW,
            promote_after: PROMOTE_AFTER,
            cool_after: COOL_AFTER,
        }
    }
}

impl Config {
    /// The defaults, overridden by [`ENV_ENABLE`] and [`ENV_MAX_PAGES`]
    /// (a knob for measurements that the engine's configuration does not
    /// carry).
    pub fn from_env() -> Config {
        let mut c = Config::default();
        if let Ok(v) = std::env::var(ENV_ENABLE) {
            if matches!(v.trim(), "off" | "0" | "false" | "no") {
                c.enabled = false;
            }
        }
        if let Ok(v) = std::env::var(ENV_MAX_PAGES) {
            match v.trim().parse() {
                Ok(n) => c.max_pages = Some(n),
                Err(_) => tracing::warn!("{ENV_MAX_PAGES}={v:?} is not a page count; ignored"),
            }
        }
        c
    }

    /// The budget for a guest of `frames` pages.
    pub fn budget(&self, frames: u64) -> usize {
        let n = self
            .max_pages
            .unwrap_or(frames / DEFAULT_BUDGET_DIVISOR)
            .min(frames);
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

/// What the policy knows of one hot page.
#[derive(Debug, Clone, Copy)]
struct Hot {
    /// Hash of the content copied at the last checkpoint (`None` before
    /// the first copy as a hot page).
    hash: Option<u64>,
    /// Checkpoints in a row at which the copy equalled the previous one.
    unchanged: u8,
}

/// Counters, for tests and figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotStats {
    /// Pages hot now.
    pub hot: usize,
    /// Budget of the hot set.
    pub budget: usize,
    /// Promotions so far.
    pub promoted: u64,
    /// Cool-downs so far (unchanged content).
    pub cooled: u64,
    /// Promotions refused because the hot set was full.
    pub refused: u64,
}

/// The policy's state across epochs.
#[derive(Debug)]
pub struct HotPages {
    config: Config,
    budget: usize,
    /// Checkpoints so far (epoch numbers start at 1; 0 = never).
    epoch: u32,
    /// Per page: epoch of its last dirty report.
    last_dirty: Vec<u32>,
    /// Per page: re-dirtyings within the window, in a row.
    streak: Vec<u8>,
    /// One bit per hot page.
    hot_bits: Vec<u64>,
    hot: HashMap<u64, Hot>,
    /// Guest-written pages seen since the last checkpoint (pre-copy
    /// rounds in between read and clear the log too).
    seen: Vec<u64>,
    stats: HotStats,
}

fn bit(bits: &[u64], frame: u64) -> bool {
    bits.get((frame / 64) as usize)
        .is_some_and(|w| w & (1 << (frame % 64)) != 0)
}

/// Calls `f` for every set bit, ascending.
fn for_each_bit(bits: &[u64], mut f: impl FnMut(u64)) {
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let b = word.trailing_zeros();
            word &= word - 1;
            f(w as u64 * 64 + u64::from(b));
        }
    }
}

impl HotPages {
    /// The policy for a guest of `frames` pages.
    pub fn new(config: Config, frames: u64) -> HotPages {
        let n = usize::try_from(frames).unwrap_or(usize::MAX);
        let words = n.div_ceil(64);
        let budget = config.budget(frames);
        HotPages {
            config,
            budget,
            epoch: 0,
            last_dirty: vec![0; n],
            streak: vec![0; n],
            hot_bits: vec![0; words],
            hot: HashMap::new(),
            seen: vec![0; words],
            stats: HotStats {
                budget,
                ..Default::default()
            },
        }
    }

    /// Whether `frame` is hot.
    pub fn is_hot(&self, frame: u64) -> bool {
        bit(&self.hot_bits, frame)
    }

    /// Counters.
    pub fn stats(&self) -> HotStats {
        HotStats {
            hot: self.hot.len(),
            ..self.stats
        }
    }

    /// Everything cold again, history forgotten (the caller clears and
    /// write-protects every page: a resynchronisation starts over).
    pub fn reset(&mut self) {
        self.epoch = 0;
        self.last_dirty.fill(0);
        self.streak.fill(0);
        self.hot_bits.fill(0);
        self.hot.clear();
        self.seen.fill(0);
    }

    fn set_hot(&mut self, frame: u64, on: bool) {
        if let Some(w) = self.hot_bits.get_mut((frame / 64) as usize) {
            if on {
                *w |= 1 << (frame % 64);
            } else {
                *w &= !(1 << (frame % 64));
            }
        }
    }

    /// Hot pages KVM no longer reports were cleared behind the policy's
    /// back (`Vm::take_dirty_log`): they are write-protected, so cold.
    fn drop_unreported(&mut self, guest: &[u64]) {
        let gone: Vec<u64> = self
            .hot
            .keys()
            .copied()
            .filter(|&f| !bit(guest, f))
            .collect();
        for f in gone {
            self.hot.remove(&f);
            self.set_hot(f, false);
        }
    }

    /// `guest & !hot`: the pages to clear and write-protect.
    fn to_clear(&self, guest: &[u64]) -> Vec<u64> {
        guest
            .iter()
            .zip(self.hot_bits.iter().chain(std::iter::repeat(&0)))
            .map(|(g, h)| g & !h)
            .collect()
    }

    /// A read of the log between checkpoints (pre-copy round): nothing is
    /// promoted or cooled; returns the pages to clear.
    pub fn between(&mut self, guest: &[u64]) -> Vec<u64> {
        self.drop_unreported(guest);
        for (s, g) in self.seen.iter_mut().zip(guest) {
            *s |= g;
        }
        self.to_clear(guest)
    }

    /// The read of the log at a checkpoint (`guest`: KVM's bits, the
    /// guest's own writes): cools and promotes pages, returns the pages to
    /// clear and write-protect. Every page of `guest` is copied at this
    /// checkpoint whatever this returns.
    pub fn checkpoint(&mut self, guest: &[u64]) -> Vec<u64> {
        self.epoch = self.epoch.saturating_add(1);
        let epoch = self.epoch;
        self.drop_unreported(guest);
        let cool_after = self.config.cool_after;
        let cooling: Vec<u64> = self
            .hot
            .iter()
            .filter(|(_, h)| h.unchanged >= cool_after)
            .map(|(&f, _)| f)
            .collect();
        for f in cooling {
            self.hot.remove(&f);
            self.set_hot(f, false);
            // Earns its way back like any other page.
            if let Some(s) = self.streak.get_mut(f as usize) {
                *s = 0;
            }
            self.stats.cooled += 1;
        }
        let mut seen = std::mem::take(&mut self.seen);
        for (s, g) in seen.iter_mut().zip(guest) {
            *s |= g;
        }
        let mut promote = Vec::new();
        for_each_bit(&seen, |f| {
            let i = f as usize;
            if i >= self.last_dirty.len() || bit(&self.hot_bits, f) {
                return;
            }
            let last = self.last_dirty[i];
            self.streak[i] = if last != 0 && epoch - last <= self.config.window {
                self.streak[i].saturating_add(1)
            } else {
                0
            };
            self.last_dirty[i] = epoch;
            if self.streak[i] >= self.config.promote_after {
                promote.push(f);
            }
        });
        seen.fill(0);
        self.seen = seen;
        for f in promote {
            // Only a page KVM still reports can be left set; one the VMM
            // wrote (not in `guest`) has no KVM bit to keep.
            if !bit(guest, f) {
                continue;
            }
            if self.hot.len() >= self.budget {
                self.stats.refused += 1;
                continue;
            }
            self.hot.insert(
                f,
                Hot {
                    hash: None,
                    unchanged: 0,
                },
            );
            self.set_hot(f, true);
            self.stats.promoted += 1;
        }
        self.to_clear(guest)
    }

    /// The content of `frame` as copied at the checkpoint just taken
    /// (called for every copied page; only hot ones are looked at).
    pub fn observe(&mut self, frame: u64, content: &[u8]) {
        if !bit(&self.hot_bits, frame) {
            return;
        }
        if let Some(h) = self.hot.get_mut(&frame) {
            let hash = xxhash_rust::xxh3::xxh3_64(content);
            if h.hash == Some(hash) {
                h.unchanged = h.unchanged.saturating_add(1);
            } else {
                h.unchanged = 0;
                h.hash = Some(hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAMES: u64 = 1000;

    fn log(frames: &[u64]) -> Vec<u64> {
        let mut l = vec![0u64; (FRAMES as usize).div_ceil(64)];
        for &f in frames {
            l[(f / 64) as usize] |= 1 << (f % 64);
        }
        l
    }

    fn set(bits: &[u64]) -> Vec<u64> {
        let mut v = Vec::new();
        for_each_bit(bits, |f| v.push(f));
        v
    }

    /// One epoch: `written` is what the guest wrote; KVM reports it and
    /// every hot page (their bits were never cleared). Returns the pages
    /// the policy clears.
    fn epoch(h: &mut HotPages, written: &[u64], content: impl Fn(u64) -> u8) -> Vec<u64> {
        let mut reported: Vec<u64> = written.to_vec();
        reported.extend((0..FRAMES).filter(|&f| h.is_hot(f)));
        reported.sort_unstable();
        reported.dedup();
        let clear = h.checkpoint(&log(&reported));
        for &f in &reported {
            h.observe(f, &[content(f); 64]);
        }
        set(&clear)
    }

    #[test]
    fn a_page_written_every_epoch_becomes_hot_and_stays_so() {
        let mut h = HotPages::new(Config::default(), FRAMES);
        let mut e = 0u8;
        assert_eq!(epoch(&mut h, &[5, 6], |_| e), vec![5, 6]);
        e += 1;
        assert_eq!(epoch(&mut h, &[5, 6], |_| e), vec![5, 6]);
        e += 1;
        // Third report in a row: promoted, not cleared.
        assert_eq!(epoch(&mut h, &[5, 6], |_| e), Vec::<u64>::new());
        for _ in 0..20 {
            e += 1;
            assert!(epoch(&mut h, &[5, 6], |_| e).is_empty());
            assert!(h.is_hot(5) && h.is_hot(6));
        }
        assert_eq!(h.stats().hot, 2);
        assert_eq!(h.stats().cooled, 0);
    }

    #[test]
    fn a_walk_longer_than_an_epoch_is_promoted() {
        // Every page is written every third epoch.
        let mut h = HotPages::new(Config::default(), FRAMES);
        for e in 0..9u64 {
            let pages: Vec<u64> = (0..240).filter(|p| p % 3 == e % 3).collect();
            epoch(&mut h, &pages, |_| e as u8);
        }
        assert_eq!(h.stats().hot, 240);
    }

    #[test]
    fn pages_written_rarely_are_not_promoted() {
        let mut h = HotPages::new(Config::default(), FRAMES);
        for e in 0..40u64 {
            // Page 7 every 10 epochs: outside the window.
            let pages: Vec<u64> = if e % 10 == 0 { vec![7] } else { vec![] };
            assert_eq!(epoch(&mut h, &pages, |_| e as u8), pages);
        }
        assert_eq!(h.stats().hot, 0);
    }

    #[test]
    fn a_hot_page_that_stops_changing_cools_down_and_is_cleared() {
        let mut h = HotPages::new(Config::default(), FRAMES);
        for e in 0..5u8 {
            epoch(&mut h, &[9], |_| e);
        }
        assert!(h.is_hot(9));
        // The guest stops writing: KVM still reports it (bit kept), the
        // content stays the same.
        let mut cleared_at = None;
        for i in 0..10 {
            let clear = epoch(&mut h, &[], |_| 99);
            if clear == vec![9] {
                cleared_at = Some(i);
                break;
            }
            assert!(clear.is_empty());
        }
        // First same-content copy sets the hash, then cool_after equal
        // copies, then the checkpoint that clears it.
        assert_eq!(cleared_at, Some(usize::from(COOL_AFTER) + 1));
        assert!(!h.is_hot(9));
        assert_eq!(h.stats().cooled, 1);
        // Cleared and write-protected: KVM reports nothing any more.
        assert!(epoch(&mut h, &[], |_| 99).is_empty());
    }

    #[test]
    fn a_hot_page_that_keeps_changing_does_not_cool() {
        let mut h = HotPages::new(Config::default(), FRAMES);
        for e in 0..50u8 {
            epoch(&mut h, &[3], |_| e);
        }
        assert!(h.is_hot(3));
        assert_eq!(h.stats().cooled, 0);
    }

    #[test]
    fn the_budget_bounds_the_hot_set() {
        let config = Config {
            max_pages: Some(10),
            ..Config::default()
        };
        let mut h = HotPages::new(config, FRAMES);
        let pages: Vec<u64> = (100..200).collect();
        for e in 0..20u8 {
            let clear = epoch(&mut h, &pages, |_| e);
            assert!(h.stats().hot <= 10);
            // Whatever is not hot is cleared.
            assert_eq!(clear.len(), 100 - h.stats().hot);
        }
        assert_eq!(h.stats().hot, 10);
        assert!(h.stats().refused > 0);
        assert_eq!(h.stats().budget, 10);
        assert_eq!(Config::default().budget(4000), 1000);
    }

    #[test]
    fn hot_pages_cleared_elsewhere_are_dropped() {
        let mut h = HotPages::new(Config::default(), FRAMES);
        for e in 0..4u8 {
            epoch(&mut h, &[1, 2], |_| e);
        }
        assert!(h.is_hot(1) && h.is_hot(2));
        // Someone cleared the whole log: KVM reports only 2 (written).
        let clear = h.checkpoint(&log(&[2]));
        assert!(!h.is_hot(1) && h.is_hot(2));
        assert!(set(&clear).is_empty());
    }

    #[test]
    fn pre_copy_reads_count_towards_the_epoch_and_keep_hot_pages_set() {
        let mut h = HotPages::new(Config::default(), FRAMES);
        for e in 0..3u8 {
            // Written before a pre-copy round, cleared there, not written
            // again before the checkpoint.
            assert_eq!(set(&h.between(&log(&[4]))), vec![4]);
            epoch(&mut h, &[], |_| e);
        }
        assert_eq!(
            h.stats().promoted,
            0,
            "cleared by the round: not promotable"
        );
        for e in 0..3u8 {
            epoch(&mut h, &[8], |_| e);
        }
        assert!(h.is_hot(8));
        assert!(set(&h.between(&log(&[8]))).is_empty());
        h.reset();
        assert!(!h.is_hot(8));
        assert_eq!(h.stats().hot, 0);
    }

    #[test]
    fn the_default_budget_is_a_quarter_of_memory_and_never_more_than_the_guest() {
        assert_eq!(Config::default().budget(100), 25);
        let c = Config {
            max_pages: Some(1_000_000),
            ..Config::default()
        };
        assert_eq!(c.budget(100), 100, "never more than the guest");
    }
}
