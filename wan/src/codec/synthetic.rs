//! Deterministic synthetic guest memory and dirty-page traces, shared by the
//! codec benchmark, the demo and the tests.
//!
//! The initial image mixes what a running guest's memory holds: zero pages,
//! kernel-like structures (small integers, pointers sharing their high bits),
//! text, and incompressible data (compressed files, crypto). Each trace then
//! dirties pages in one characteristic way per epoch.

use std::collections::BTreeSet;

/// The four dirtying patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceKind {
    /// A few words changed per page (counters, pointers, list links), with
    /// a hot set that is dirtied again and again.
    SparseWrite,
    /// Whole pages rewritten in sequence with fresh compressible data
    /// (page cache filling, a log or buffer being written).
    Streaming,
    /// Whole pages rewritten with incompressible data.
    Random,
    /// Pages freed and zeroed, plus freshly allocated pages with little data.
    ZeroHeavy,
}

impl TraceKind {
    pub const ALL: [TraceKind; 4] = [
        TraceKind::SparseWrite,
        TraceKind::Streaming,
        TraceKind::Random,
        TraceKind::ZeroHeavy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TraceKind::SparseWrite => "sparse-write",
            TraceKind::Streaming => "streaming",
            TraceKind::Random => "random",
            TraceKind::ZeroHeavy => "zero-heavy",
        }
    }
}

/// Size of the guest and of each epoch.
#[derive(Debug, Clone, Copy)]
pub struct TraceConfig {
    pub frames: u64,
    pub page_size: usize,
    /// Pages dirtied per epoch.
    pub dirty_pages: usize,
    pub seed: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            frames: 16384,
            page_size: 4096,
            dirty_pages: 1024,
            seed: 1,
        }
    }
}

/// SplitMix64: tiny, fast, and good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = self.next_u64().to_le_bytes();
        let rem = chunks.into_remainder();
        let n = rem.len();
        rem.copy_from_slice(&tail[..n]);
    }
}

const WORDS: [&str; 48] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "that",
    "with",
    "on",
    "as",
    "are",
    "this",
    "by",
    "be",
    "from",
    "or",
    "at",
    "an",
    "not",
    "connection",
    "request",
    "server",
    "client",
    "error",
    "value",
    "return",
    "function",
    "memory",
    "page",
    "kernel",
    "process",
    "thread",
    "buffer",
    "queue",
    "socket",
    "timeout",
    "GET",
    "POST",
    "HTTP/1.1",
    "200",
    "404",
    "user",
    "session",
    "cache",
    "index",
    "data",
    "\n",
];

/// Fills `page` with text made of a small vocabulary (compresses 3-4x).
pub fn fill_text(rng: &mut Rng, page: &mut [u8]) {
    let mut i = 0;
    while i < page.len() {
        let r = rng.next_u64();
        let w = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
        for &b in w.iter().chain(b" ") {
            if i < page.len() {
                page[i] = b;
                i += 1;
            }
        }
        if r >> 60 == 0 {
            // A number now and then, as in logs and headers.
            for d in (r >> 8).to_string().bytes().take(6) {
                if i < page.len() {
                    page[i] = d;
                    i += 1;
                }
            }
        }
    }
}

/// Fills `page` with structure-like words: small counters, flags, and
/// pointers into one region, some fields left zero.
pub fn fill_struct(rng: &mut Rng, page: &mut [u8]) {
    let region = 0xffff_8880_0000_0000u64 | ((rng.next_u64() & 0xff) << 24);
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        let r = rng.next_u64();
        let v = match (i % 8, r % 4) {
            (0, _) => region | ((r >> 8) & 0xff_fff8),
            (1, _) => (r >> 32) & 0xffff,
            (_, 0) => 0,
            (_, 1) => region | ((r >> 8) & 0xff_fff8),
            (_, 2) => (r >> 40) & 0xff,
            _ => i as u64,
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// A guest image and a trace that dirties it epoch by epoch.
#[derive(Debug, Clone)]
pub struct Trace {
    kind: TraceKind,
    cfg: TraceConfig,
    mem: Vec<u8>,
    rng: Rng,
    cursor: u64,
}

impl Trace {
    pub fn new(kind: TraceKind, cfg: TraceConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let ps = cfg.page_size;
        let mut mem = vec![0u8; cfg.frames as usize * ps];
        for page in mem.chunks_exact_mut(ps) {
            match rng.below(20) {
                0..=4 => {}
                5..=11 => fill_struct(&mut rng, page),
                12..=16 => fill_text(&mut rng, page),
                _ => rng.fill(page),
            }
        }
        let cursor = rng.below(cfg.frames);
        Trace {
            kind,
            cfg,
            mem,
            rng,
            cursor,
        }
    }

    pub fn kind(&self) -> TraceKind {
        self.kind
    }

    pub fn config(&self) -> &TraceConfig {
        &self.cfg
    }

    /// The whole current guest image.
    pub fn memory(&self) -> &[u8] {
        &self.mem
    }

    pub fn page(&self, frame: u64) -> &[u8] {
        let ps = self.cfg.page_size;
        &self.mem[frame as usize * ps..(frame as usize + 1) * ps]
    }

    fn page_mut(&mut self, frame: u64) -> &mut [u8] {
        let ps = self.cfg.page_size;
        &mut self.mem[frame as usize * ps..(frame as usize + 1) * ps]
    }

    /// `(frame, content)` of the given frames, as an encoder takes them.
    pub fn pages<'a>(&'a self, frames: &[u64]) -> Vec<(u64, &'a [u8])> {
        frames.iter().map(|&f| (f, self.page(f))).collect()
    }

    /// Every frame of the image, for an initial full epoch.
    pub fn all_frames(&self) -> Vec<u64> {
        (0..self.cfg.frames).collect()
    }

    /// Runs the guest for one epoch: changes memory and returns the dirty
    /// frames in ascending order, as a dirty log would.
    pub fn step(&mut self) -> Vec<u64> {
        let frames = self.cfg.frames;
        let n = self.cfg.dirty_pages.min(frames as usize);
        let mut dirty = BTreeSet::new();
        match self.kind {
            TraceKind::SparseWrite => {
                // 80% of writes go to a hot eighth of memory.
                let hot = (frames / 8).max(1);
                while dirty.len() < n {
                    let f = if self.rng.below(10) < 8 {
                        self.rng.below(hot) * 8 % frames
                    } else {
                        self.rng.below(frames)
                    };
                    dirty.insert(f);
                }
                for &f in &dirty {
                    self.sparse_write(f);
                }
            }
            TraceKind::Streaming => {
                for _ in 0..n {
                    let f = self.cursor;
                    self.cursor = (self.cursor + 1) % frames;
                    dirty.insert(f);
                    let mut rng = self.rng.clone();
                    if rng.below(2) == 0 {
                        fill_text(&mut rng, self.page_mut(f));
                    } else {
                        fill_struct(&mut rng, self.page_mut(f));
                    }
                    self.rng = rng;
                }
            }
            TraceKind::Random => {
                while dirty.len() < n {
                    dirty.insert(self.rng.below(frames));
                }
                for &f in &dirty {
                    let mut rng = self.rng.clone();
                    rng.fill(self.page_mut(f));
                    self.rng = rng;
                }
            }
            TraceKind::ZeroHeavy => {
                while dirty.len() < n {
                    dirty.insert(self.rng.below(frames));
                }
                for &f in &dirty {
                    let alloc = self.rng.below(10) < 3;
                    self.page_mut(f).fill(0);
                    if alloc {
                        // A fresh allocation: a header and a few fields.
                        let words = 1 + self.rng.below(6) as usize;
                        for _ in 0..words {
                            let w = self.rng.below((self.cfg.page_size / 8) as u64 / 4) as usize;
                            let v = self.rng.next_u64() >> (self.rng.below(4) * 16);
                            self.page_mut(f)[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
            }
        }
        dirty.into_iter().collect()
    }

    fn sparse_write(&mut self, frame: u64) {
        let ps = self.cfg.page_size;
        let writes = 1 + self.rng.below(4) as usize;
        for _ in 0..writes {
            let w = self.rng.below((ps / 8) as u64) as usize * 8;
            let kind = self.rng.below(3);
            let r = self.rng.next_u64();
            let page = self.page_mut(frame);
            let mut cur = [0u8; 8];
            cur.copy_from_slice(&page[w..w + 8]);
            let old = u64::from_le_bytes(cur);
            let new = match kind {
                0 => old.wrapping_add(1 + (r & 0xf)),             // counter
                1 => (old & !0xff_fff8) | ((r >> 8) & 0xff_fff8), // pointer moved
                _ => old ^ (r & 0xff),                            // flag byte
            };
            page[w..w + 8].copy_from_slice(&new.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_deterministic_and_dirty_what_they_say() {
        let cfg = TraceConfig {
            frames: 128,
            dirty_pages: 16,
            ..TraceConfig::default()
        };
        for kind in TraceKind::ALL {
            let mut a = Trace::new(kind, cfg);
            let mut b = Trace::new(kind, cfg);
            let before = a.memory().to_vec();
            let da = a.step();
            assert_eq!(da, b.step());
            assert_eq!(a.memory(), b.memory());
            assert_eq!(da.len(), 16);
            for f in 0..cfg.frames {
                if !da.contains(&f) {
                    let ps = cfg.page_size;
                    let r = f as usize * ps..(f as usize + 1) * ps;
                    assert_eq!(a.memory()[r.clone()], before[r], "{kind:?} frame {f}");
                }
            }
        }
    }
}
