//! Receiver side: the in-order stream rebuilt from out-of-order stream
//! chunks, mirrors and Reed-Solomon recovery.
//!
//! Everything received is kept by stream offset ([`Segments`]); the
//! contiguous prefix is handed out ([`Reassembly::poll_output`]). A window
//! that a REPAIR announces is tracked shard by shard: as soon as its
//! complete data shards plus its recovery shards number its data shards,
//! the missing ones are rebuilt and inserted like any received bytes.
//! Bytes of a window still pending are kept even once delivered, because
//! decoding needs them. quinn retransmits what was lost anyway; those
//! copies (and all other duplicates) are dropped.
//!
//! Memory is bounded: bytes beyond `max_ahead` of the delivered prefix are
//! a protocol error (quinn's flow control keeps an honest peer far below),
//! and pending windows / their repair bytes are capped (repairs over the
//! cap are dropped: they only speed things up).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::segments::Segments;
use super::wire::{Datagram, WindowShape};
use super::FecError;

/// Bounds of what the receiver holds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Furthest stream offset accepted beyond the delivered prefix.
    pub max_ahead: u64,
    /// Most windows tracked at once.
    pub max_windows: usize,
    /// Most recovery-shard bytes held at once.
    pub max_repair_bytes: usize,
    /// Delivered bytes kept for windows not announced yet. A window's
    /// first bytes can arrive (and be delivered) before its repairs, which
    /// the sender computes once the window is written; at least the
    /// sender's window cap, so every window's start is still held.
    pub retain: u64,
}

impl Limits {
    /// Bounds for a stream whose receive window is `stream_window` bytes:
    /// an honest peer never sends beyond the window of what we read.
    pub fn for_stream_window(stream_window: u64) -> Self {
        Self {
            max_ahead: stream_window.saturating_mul(4).max(16 << 20),
            max_windows: 64,
            max_repair_bytes: 32 << 20,
            retain: 4 << 20,
        }
    }
}

/// What the receiver did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    /// Stream bytes delivered in order.
    pub delivered: u64,
    /// Data shards rebuilt from recovery shards, and windows decoded.
    pub recovered_shards: u64,
    pub decoded_windows: u64,
    /// Mirror bytes that arrived before the stream's copy.
    pub mirrored_bytes: u64,
    /// Bytes received more than once (quinn's retransmissions of what FEC
    /// had already rebuilt, mirrors of what had arrived).
    pub duplicate_bytes: u64,
    /// Repairs dropped: about bytes already delivered or no longer kept,
    /// or over the memory caps.
    pub late_repairs: u64,
    pub dropped_repairs: u64,
}

#[derive(Debug)]
struct Window {
    shape: WindowShape,
    complete: Vec<bool>,
    n_complete: usize,
    repairs: BTreeMap<u16, Bytes>,
}

#[derive(Debug)]
pub struct Reassembly {
    limits: Limits,
    /// Stream offset up to which bytes were handed out.
    delivered: u64,
    /// Bytes below this are forgotten: `retain` below `delivered`, or the
    /// start of the lowest pending window.
    floor: u64,
    segs: Segments,
    windows: BTreeMap<u64, Window>,
    repair_bytes: usize,
    out: VecDeque<Bytes>,
    stats: ReassemblyStats,
}

impl Reassembly {
    pub fn new(limits: Limits) -> Self {
        Self::starting_at(limits, 0)
    }

    /// A reassembly of a stream whose first `offset` bytes were already
    /// read in order by someone else (the site daemon reads a stream's
    /// first frame to route it): delivery starts there, and repairs of
    /// windows that begin before it are late.
    pub fn starting_at(limits: Limits, offset: u64) -> Self {
        Self {
            limits,
            delivered: offset,
            floor: offset,
            segs: Segments::default(),
            windows: BTreeMap::new(),
            repair_bytes: 0,
            out: VecDeque::new(),
            stats: ReassemblyStats::default(),
        }
    }

    pub fn stats(&self) -> ReassemblyStats {
        self.stats
    }

    /// Stream offset up to which bytes were handed out.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Bytes held (delivered ones kept for decoding included).
    pub fn buffered(&self) -> u64 {
        self.segs.bytes()
    }

    /// Windows tracked.
    pub fn pending_windows(&self) -> usize {
        self.windows.len()
    }

    /// Next in-order bytes of the stream.
    pub fn poll_output(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// A chunk read (out of order) from the stream.
    pub fn on_stream_chunk(&mut self, offset: u64, data: Bytes) -> Result<(), FecError> {
        self.check_ahead(offset.saturating_add(data.len() as u64))?;
        let len = data.len() as u64;
        let new = self.insert(offset, data);
        self.stats.duplicate_bytes += len - new;
        self.progress()
    }

    /// A datagram from the peer.
    pub fn on_datagram(&mut self, d: Bytes) -> Result<(), FecError> {
        match Datagram::decode(d)? {
            Datagram::Mirror { offset, bytes } => {
                self.check_ahead(offset + bytes.len() as u64)?;
                let len = bytes.len() as u64;
                let new = self.insert(offset, bytes);
                self.stats.mirrored_bytes += new;
                self.stats.duplicate_bytes += len - new;
                self.progress()
            }
            Datagram::Repair {
                shape,
                index,
                shard,
            } => self.on_repair(shape, index, shard),
            // The shell's business (it gates our encoder).
            Datagram::Hello => Ok(()),
        }
    }

    fn check_ahead(&self, end: u64) -> Result<(), FecError> {
        if end > self.delivered.saturating_add(self.limits.max_ahead) {
            return Err(FecError::TooFarAhead {
                end,
                delivered: self.delivered,
                limit: self.limits.max_ahead,
            });
        }
        Ok(())
    }

    /// Stores new bytes, marks the shards they complete; returns how many
    /// bytes were new.
    fn insert(&mut self, offset: u64, data: Bytes) -> u64 {
        let new = self.segs.insert(offset, data, self.floor);
        let mut n = 0;
        for &(a, b) in &new {
            n += b - a;
            self.mark(a, b);
        }
        n
    }

    /// Re-checks the shards of pending windows that `[a, b)` touches.
    fn mark(&mut self, a: u64, b: u64) {
        let segs = &self.segs;
        for (_, w) in self.windows.range_mut(..b).rev() {
            let sh = w.shape;
            if sh.end() <= a {
                break;
            }
            let size = u64::from(sh.shard_size);
            let first = (a.max(sh.start) - sh.start) / size;
            let last = (b.min(sh.end()) - 1 - sh.start) / size;
            for i in first as usize..=last as usize {
                if !w.complete[i] {
                    let (s, e) = sh.shard_range(i);
                    if segs.covers(s, e) {
                        w.complete[i] = true;
                        w.n_complete += 1;
                    }
                }
            }
        }
    }

    fn on_repair(&mut self, shape: WindowShape, index: u16, shard: Bytes) -> Result<(), FecError> {
        self.check_ahead(shape.end())?;
        if shape.end() <= self.delivered || shape.start < self.floor {
            self.stats.late_repairs += 1;
            return Ok(());
        }
        if let Some(w) = self.windows.get_mut(&shape.start) {
            if w.shape != shape {
                return Err(FecError::ConflictingWindow { start: shape.start });
            }
            if w.repairs.contains_key(&index) {
                return Ok(());
            }
            if self.repair_bytes + shard.len() > self.limits.max_repair_bytes {
                self.stats.dropped_repairs += 1;
                return Ok(());
            }
            self.repair_bytes += shard.len();
            w.repairs.insert(index, shard);
        } else {
            let overlaps_before = self
                .windows
                .range(..shape.start)
                .next_back()
                .is_some_and(|(_, w)| w.shape.end() > shape.start);
            let overlaps_after = self
                .windows
                .range(shape.start..)
                .next()
                .is_some_and(|(s, _)| *s < shape.end());
            if overlaps_before || overlaps_after {
                return Err(FecError::ConflictingWindow { start: shape.start });
            }
            if self.windows.len() >= self.limits.max_windows
                || self.repair_bytes + shard.len() > self.limits.max_repair_bytes
            {
                self.stats.dropped_repairs += 1;
                return Ok(());
            }
            let k = usize::from(shape.shard_count);
            let mut complete = vec![false; k];
            let mut n_complete = 0;
            for (i, c) in complete.iter_mut().enumerate() {
                let (s, e) = shape.shard_range(i);
                if e <= self.delivered || self.segs.covers(s.max(self.delivered), e) {
                    *c = true;
                    n_complete += 1;
                }
            }
            if n_complete == k {
                self.stats.late_repairs += 1;
                return Ok(());
            }
            self.repair_bytes += shard.len();
            self.windows.insert(
                shape.start,
                Window {
                    shape,
                    complete,
                    n_complete,
                    repairs: BTreeMap::from([(index, shard)]),
                },
            );
        }
        self.progress()
    }

    /// Decodes what can be, hands out the contiguous prefix, forgets what
    /// is no longer needed.
    fn progress(&mut self) -> Result<(), FecError> {
        loop {
            let ready: Vec<u64> = self
                .windows
                .iter()
                .filter(|(_, w)| {
                    w.n_complete == w.complete.len()
                        || w.n_complete + w.repairs.len() >= w.complete.len()
                })
                .map(|(s, _)| *s)
                .collect();
            if ready.is_empty() {
                break;
            }
            for start in ready {
                if let Some(w) = self.windows.remove(&start) {
                    self.repair_bytes -= w.repairs.values().map(Bytes::len).sum::<usize>();
                    if w.n_complete < w.complete.len() {
                        self.decode(w)?;
                    }
                }
            }
        }
        for b in self.segs.contiguous_from(self.delivered) {
            self.delivered += b.len() as u64;
            self.stats.delivered += b.len() as u64;
            self.out.push_back(b);
        }
        // Windows wholly delivered are complete: drop them.
        while let Some(e) = self.windows.first_entry() {
            if e.get().shape.end() > self.delivered {
                break;
            }
            let w = e.remove();
            self.repair_bytes -= w.repairs.values().map(Bytes::len).sum::<usize>();
        }
        let keep_from = self.delivered.saturating_sub(self.limits.retain);
        let floor = self
            .windows
            .keys()
            .next()
            .map_or(keep_from, |s| (*s).min(keep_from));
        if floor > self.floor {
            self.floor = floor;
            self.segs.prune_below(floor);
        }
        Ok(())
    }

    /// Rebuilds the missing data shards of `w` and stores them.
    fn decode(&mut self, w: Window) -> Result<(), FecError> {
        let sh = w.shape;
        let size = usize::from(sh.shard_size);
        let mut originals = Vec::with_capacity(w.n_complete);
        for (i, _) in w.complete.iter().enumerate().filter(|(_, c)| **c) {
            let (s, e) = sh.shard_range(i);
            let mut buf = vec![0u8; size];
            if !self.segs.copy_to(s, &mut buf[..(e - s) as usize]) {
                // Marked complete but no longer held: cannot happen while
                // the floor keeps the window's bytes; decode without it.
                continue;
            }
            originals.push((i, buf));
        }
        let restored = reed_solomon_simd::decode(
            sh.shard_count.into(),
            sh.recovery_count.into(),
            originals,
            w.repairs.iter().map(|(i, b)| (usize::from(*i), b)),
        );
        let restored = match restored {
            Ok(r) => r,
            Err(reed_solomon_simd::Error::NotEnoughShards { .. }) => return Ok(()),
            Err(e) => {
                return Err(FecError::Decode {
                    start: sh.start,
                    message: e.to_string(),
                })
            }
        };
        self.stats.decoded_windows += 1;
        for (i, data) in restored {
            let (s, e) = sh.shard_range(i);
            let piece = Bytes::from(data).slice(..(e - s) as usize);
            self.stats.recovered_shards += 1;
            self.segs.insert(s, piece, self.floor);
        }
        Ok(())
    }
}

/// Fuzz entry point (wan/fuzz `decode_fec_datagram`): records of
/// `0, offset u32, len u16, bytes` (a stream chunk) or `1, len u16, bytes`
/// (a datagram) fed to a receiver with small limits. Each is refused with
/// a typed error or taken, never a panic, and memory stays bounded.
pub fn fuzz_feed(data: &[u8]) {
    let limits = Limits {
        max_ahead: 1 << 20,
        max_windows: 8,
        max_repair_bytes: 1 << 16,
        retain: 1 << 16,
    };
    let mut r = Reassembly::new(limits);
    let mut handed_out = 0u64;
    let mut rest = data;
    while let Some((&tag, tail)) = rest.split_first() {
        let header = if tag & 1 == 0 { 6 } else { 2 };
        let Some(h) = tail.get(..header) else {
            return;
        };
        let len = usize::from(u16::from_be_bytes([h[header - 2], h[header - 1]]));
        let body = &tail[header..];
        let bytes = Bytes::copy_from_slice(&body[..len.min(body.len())]);
        rest = &body[bytes.len()..];
        let taken = if tag & 1 == 0 {
            let offset = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            r.on_stream_chunk(u64::from(offset), bytes)
        } else {
            r.on_datagram(bytes)
        };
        if taken.is_err() {
            return;
        }
        while let Some(b) = r.poll_output() {
            handed_out += b.len() as u64;
        }
        assert_eq!(handed_out, r.delivered());
        assert!(r.buffered() <= limits.max_ahead + limits.retain + (1 << 16));
        assert!(r.repair_bytes <= limits.max_repair_bytes);
        assert!(r.pending_windows() <= limits.max_windows);
    }
}

#[cfg(test)]
mod tests;
