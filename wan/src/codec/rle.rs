//! Run-length coding of XOR deltas.
//!
//! A delta is a sequence of `(zero_run, literal_len, literal bytes)` with both
//! lengths ULEB128; the literal bytes are `new ^ old`; whatever follows the
//! last literal is zero. Byte granularity (not Remus' 4-byte words) because a
//! typical guest write changes one or two bytes of a counter or pointer.

use super::error::CodecError;
use super::wire::{put_uleb, Reader};

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

struct Runs<'a> {
    new: &'a [u8],
    old: &'a [u8],
    out: &'a mut Vec<u8>,
    emitted: usize,
    cur: Option<(usize, usize)>,
}

impl Runs<'_> {
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
        put_uleb(self.out, (s - self.emitted) as u64);
        put_uleb(self.out, (e - s) as u64);
        self.out.extend(
            self.new[s..e]
                .iter()
                .zip(&self.old[s..e])
                .map(|(a, b)| a ^ b),
        );
        self.emitted = e;
    }
}

/// Appends the run-length-coded `new ^ old` to `out`.
///
/// Returns the encoded length, or `None` (with `out` restored) as soon as the
/// encoding would exceed `limit` bytes: the caller then has a better choice.
/// An empty encoding means the pages are equal.
pub fn encode_xor(new: &[u8], old: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    let n = new.len().min(old.len());
    let start = out.len();
    let mut runs = Runs {
        new,
        old,
        out,
        emitted: 0,
        cur: None,
    };
    let mut off = 0;
    while off < n {
        let end = (off + BLOCK).min(n);
        if new[off..end] != old[off..end] {
            let mut w = off;
            while w + 8 <= end {
                let x = word(new, w) ^ word(old, w);
                if x != 0 {
                    let s = w + (x.trailing_zeros() / 8) as usize;
                    let e = w + 8 - (x.leading_zeros() / 8) as usize;
                    runs.add(s, e);
                }
                w += 8;
            }
            for i in w..end {
                if new[i] != old[i] {
                    runs.add(i, i + 1);
                }
            }
            if runs.out.len() - start > limit {
                runs.out.truncate(start);
                return None;
            }
        }
        off = end;
    }
    if let Some((s, e)) = runs.cur.take() {
        runs.emit(s, e);
    }
    let len = runs.out.len() - start;
    if len > limit {
        runs.out.truncate(start);
        return None;
    }
    Some(len)
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
