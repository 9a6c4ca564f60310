//! The set of frames written and not yet looked at: one bit per frame.
//!
//! Scans add ranges; a checkpoint takes frames out in ascending order, up
//! to a limit (a bounded pre-copy round leaves the rest for the next). A
//! bitmap keeps repeated writes to one page to one entry, and its walk
//! skips 64 clean frames per word (64 GiB of RAM is 256 Ki words).

use std::ops::Range;

/// Frames marked written.
#[derive(Debug, Clone, Default)]
pub struct Written {
    words: Vec<u64>,
    frames: u64,
    count: u64,
}

impl Written {
    /// An empty set over `frames` frames.
    pub fn new(frames: u64) -> Written {
        Written {
            words: vec![0; frames.div_ceil(64) as usize],
            frames,
            count: 0,
        }
    }

    /// How many frames are marked.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether none is marked.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Marks `range` (clipped to the set's frames).
    pub fn mark(&mut self, range: Range<u64>) {
        let end = range.end.min(self.frames);
        let mut f = range.start;
        while f < end {
            let (w, b) = ((f / 64) as usize, f % 64);
            let n = (64 - b).min(end - f);
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            let word = &mut self.words[w];
            self.count += u64::from((bits & !*word).count_ones());
            *word |= bits;
            f += n;
        }
    }

    /// Forgets every mark.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }

    /// Takes marked frames out in ascending order while `keep` returns
    /// true for them; the frame `keep` refuses stays marked and ends the
    /// walk (so a caller can stop at a limit without losing it).
    pub fn drain_while(&mut self, mut keep: impl FnMut(u64) -> bool) {
        for w in 0..self.words.len() {
            while self.words[w] != 0 {
                let b = self.words[w].trailing_zeros() as u64;
                let frame = w as u64 * 64 + b;
                if !keep(frame) {
                    return;
                }
                self.words[w] &= !(1u64 << b);
                self.count -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn ranges_across_words_and_limits() {
        let mut w = Written::new(200);
        w.mark(60..130);
        w.mark(64..70);
        w.mark(190..400);
        assert_eq!(w.len(), 70 + 10);
        let mut got = Vec::new();
        w.drain_while(|f| {
            got.push(f);
            got.len() <= 5
        });
        assert_eq!(got, [60, 61, 62, 63, 64, 65]);
        assert_eq!(w.len(), 75, "the refused frame stays marked");
        let mut rest = Vec::new();
        w.drain_while(|f| {
            rest.push(f);
            true
        });
        assert_eq!(rest.first(), Some(&65));
        assert_eq!(rest.last(), Some(&199));
        assert!(w.is_empty());
    }

    proptest! {
        #[test]
        fn behaves_as_a_set(
            marks in proptest::collection::vec((0u64..300, 0u64..80), 0..30),
            limit in 0usize..400,
        ) {
            let mut w = Written::new(300);
            let mut model = BTreeSet::new();
            for (s, n) in marks {
                w.mark(s..s + n);
                model.extend((s..(s + n).min(300)).collect::<Vec<_>>());
            }
            prop_assert_eq!(w.len(), model.len() as u64);
            let mut taken = Vec::new();
            w.drain_while(|f| { if taken.len() < limit { taken.push(f); true } else { false } });
            let expect: Vec<u64> = model.iter().copied().take(limit).collect();
            prop_assert_eq!(&taken, &expect);
            prop_assert_eq!(w.len(), (model.len() - expect.len()) as u64);
        }
    }
}
