//! The received bytes of a stream, by offset: non-overlapping segments,
//! where the first copy of a byte wins and later copies are dropped.

use std::collections::BTreeMap;

use bytes::Bytes;

#[derive(Debug, Default)]
pub struct Segments {
    map: BTreeMap<u64, Bytes>,
    bytes: u64,
}

impl Segments {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Segments held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The segment holding `at`, as (start, bytes).
    fn containing(&self, at: u64) -> Option<(u64, &Bytes)> {
        self.map
            .range(..=at)
            .next_back()
            .filter(|(s, b)| **s + b.len() as u64 > at)
            .map(|(s, b)| (*s, b))
    }

    /// Stores the parts of `data` (at stream `offset`) not held yet and at
    /// or above `floor`; returns the stream ranges that were new.
    pub fn insert(&mut self, offset: u64, data: Bytes, floor: u64) -> Vec<(u64, u64)> {
        let end = offset + data.len() as u64;
        let mut cur = offset.max(floor);
        let mut new = Vec::new();
        while cur < end {
            if let Some((s, b)) = self.containing(cur) {
                cur = s + b.len() as u64;
                continue;
            }
            let next = self
                .map
                .range(cur..)
                .next()
                .map_or(end, |(s, _)| (*s).min(end));
            let piece = data.slice((cur - offset) as usize..(next - offset) as usize);
            self.bytes += piece.len() as u64;
            self.map.insert(cur, piece);
            new.push((cur, next));
            cur = next;
        }
        new
    }

    /// Whether every byte of `[start, end)` is held.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut cur = start;
        while cur < end {
            match self.containing(cur) {
                Some((s, b)) => cur = s + b.len() as u64,
                None => return false,
            }
        }
        true
    }

    /// Copies `[start, start + out.len())` into `out`; false if not all held.
    pub fn copy_to(&self, start: u64, out: &mut [u8]) -> bool {
        let end = start + out.len() as u64;
        let mut cur = start;
        while cur < end {
            let Some((s, b)) = self.containing(cur) else {
                return false;
            };
            let from = (cur - s) as usize;
            let n = (b.len() - from).min((end - cur) as usize);
            let at = (cur - start) as usize;
            out[at..at + n].copy_from_slice(&b[from..from + n]);
            cur += n as u64;
        }
        true
    }

    /// The contiguous bytes from `at` on, as slices of the held segments.
    pub fn contiguous_from(&self, at: u64) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut cur = at;
        while let Some((s, b)) = self.containing(cur) {
            out.push(b.slice((cur - s) as usize..));
            cur = s + b.len() as u64;
        }
        out
    }

    /// Forgets every byte below `floor`.
    pub fn prune_below(&mut self, floor: u64) {
        while let Some(entry) = self.map.first_entry() {
            let s = *entry.key();
            if s >= floor {
                break;
            }
            let b = entry.remove();
            self.bytes -= b.len() as u64;
            let e = s + b.len() as u64;
            if e > floor {
                let rest = b.slice((floor - s) as usize..);
                self.bytes += rest.len() as u64;
                self.map.insert(floor, rest);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_copy_wins_and_overlaps_are_trimmed() {
        let mut s = Segments::default();
        assert_eq!(
            s.insert(10, Bytes::from_static(b"abcde"), 0),
            vec![(10, 15)]
        );
        assert_eq!(
            s.insert(8, Bytes::from_static(b"XXXXXXXXXX"), 0),
            vec![(8, 10), (15, 18)]
        );
        assert_eq!(s.bytes(), 10);
        let mut out = [0u8; 10];
        assert!(s.copy_to(8, &mut out));
        assert_eq!(&out, b"XXabcdeXXX");
        assert!(s.covers(9, 18));
        assert!(!s.covers(7, 9));
        s.prune_below(12);
        assert_eq!(s.bytes(), 6);
        assert!(!s.covers(11, 12));
        let c: Vec<u8> = s.contiguous_from(12).concat();
        assert_eq!(c, b"cdeXXX");
        assert!(s.insert(0, Bytes::from_static(b"zz"), 12).is_empty());
    }
}
