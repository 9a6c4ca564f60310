//! The baselines of the codec benchmark: raw pages, zstd per page, and two
//! published checkpoint schemes re-implemented from their descriptions for
//! comparison only (Remus' XOR+RLE, QEMU's XBZRLE; their framing overheads
//! are approximations, noted at each one).
//!
//! Each decodes only what its own encoder wrote in the same run, so a
//! malformed record is a bug of this file: it panics rather than returning
//! an error.

use std::collections::{HashMap, VecDeque};

use super::schemes::Scheme;
use super::{TraceBenchError, PS};

// ---------------------------------------------------------------- raw pages

/// 8-byte frame number + the page.
pub(super) struct Raw {
    pub(super) mem: Vec<u8>,
}

impl Scheme for Raw {
    fn name(&self) -> String {
        "raw".into()
    }
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])], out: &mut Vec<u8>) {
        out.clear();
        for (f, p) in pages {
            out.extend_from_slice(&f.to_le_bytes());
            out.extend_from_slice(p);
        }
    }
    fn decode(&mut self, bytes: &[u8]) -> Result<(), TraceBenchError> {
        for rec in bytes.chunks_exact(PS + 8) {
            let f = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            self.mem[f * PS..(f + 1) * PS].copy_from_slice(&rec[8..]);
        }
        Ok(())
    }
    fn replica(&self) -> &[u8] {
        &self.mem
    }
}

// ----------------------------------------------------------- zstd per page

/// 8-byte frame number, 4-byte length, one zstd frame per page.
pub(super) struct ZstdPage {
    level: i32,
    zc: zstd::bulk::Compressor<'static>,
    dz: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
    mem: Vec<u8>,
}

impl ZstdPage {
    pub(super) fn new(level: i32, initial: &[u8]) -> Result<Self, TraceBenchError> {
        Ok(ZstdPage {
            level,
            zc: zstd::bulk::Compressor::new(level).map_err(TraceBenchError::Zstd)?,
            dz: zstd::bulk::Decompressor::new().map_err(TraceBenchError::Zstd)?,
            scratch: vec![0; zstd::zstd_safe::compress_bound(PS)],
            mem: initial.to_vec(),
        })
    }
}

impl Scheme for ZstdPage {
    fn name(&self) -> String {
        format!("zstd-{}/page", self.level)
    }
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])], out: &mut Vec<u8>) {
        out.clear();
        for (f, p) in pages {
            let n = self
                .zc
                .compress_to_buffer(p, &mut self.scratch)
                .expect("zstd: the scratch holds the compress bound");
            out.extend_from_slice(&f.to_le_bytes());
            out.extend_from_slice(&(n as u32).to_le_bytes());
            out.extend_from_slice(&self.scratch[..n]);
        }
    }
    fn decode(&mut self, bytes: &[u8]) -> Result<(), TraceBenchError> {
        let mut at = 0;
        while at < bytes.len() {
            let f = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8")) as usize;
            let n = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
            let dst = &mut self.mem[f * PS..(f + 1) * PS];
            self.dz
                .decompress_to_buffer(&bytes[at + 12..at + 12 + n], dst)
                .expect("zstd");
            at += 12 + n;
        }
        Ok(())
    }
    fn replica(&self) -> &[u8] {
        &self.mem
    }
}

// ------------------------------------------------------------- Remus (Xen)

/// Xen's Remus checkpoint compression (libxc `xc_compression.c`, described in
/// Rajagopalan's Remus compression work): an LRU cache of 8,192 previously
/// sent pages; on a hit the page is XORed with its cached copy and sent as
/// runs of 4-byte words, each run behind a 1-byte header: skip n unchanged
/// words or copy n new words (n <= 127); on a miss the page goes raw.
/// Framing here: 8-byte frame number + 1-byte marker (delta / full page).
pub(super) struct Remus {
    cap: usize,
    cache: HashMap<u64, (Vec<u8>, u64)>,
    lru: VecDeque<(u64, u64)>, // (frame, stamp); stale stamps skipped
    stamp: u64,
    mem: Vec<u8>,
}

const REMUS_SKIP: u8 = 0x80;
const REMUS_FULL: u8 = 1;
const REMUS_DELTA: u8 = 0;

impl Remus {
    /// Xen's default cache of 8,192 pages.
    pub(super) fn new(mem: Vec<u8>) -> Self {
        Remus {
            cap: 8192,
            cache: HashMap::new(),
            lru: VecDeque::new(),
            stamp: 0,
            mem,
        }
    }

    fn touch(&mut self, f: u64, page: &[u8]) {
        self.stamp += 1;
        if let Some(e) = self.cache.get_mut(&f) {
            e.0.copy_from_slice(page);
            e.1 = self.stamp;
        } else {
            while self.cache.len() >= self.cap {
                let Some((old, st)) = self.lru.pop_front() else {
                    break;
                };
                if self.cache.get(&old).is_some_and(|e| e.1 == st) {
                    self.cache.remove(&old);
                }
            }
            self.cache.insert(f, (page.to_vec(), self.stamp));
        }
        self.lru.push_back((f, self.stamp));
    }
}

fn w(b: &[u8], i: usize) -> &[u8] {
    &b[i * 4..i * 4 + 4]
}

impl Scheme for Remus {
    fn name(&self) -> String {
        "remus-xor-rle".into()
    }
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])], out: &mut Vec<u8>) {
        out.clear();
        for &(f, p) in pages {
            out.extend_from_slice(&f.to_le_bytes());
            match self.cache.get(&f) {
                Some((old, _)) => {
                    out.push(REMUS_DELTA);
                    let words = PS / 4;
                    let mut i = 0;
                    while i < words {
                        let same = w(p, i) == w(old, i);
                        let mut n = 1;
                        while i + n < words && n < 127 && (w(p, i + n) == w(old, i + n)) == same {
                            n += 1;
                        }
                        if same {
                            out.push(REMUS_SKIP | n as u8);
                        } else {
                            out.push(n as u8);
                            out.extend_from_slice(&p[i * 4..(i + n) * 4]);
                        }
                        i += n;
                    }
                }
                None => {
                    out.push(REMUS_FULL);
                    out.extend_from_slice(p);
                }
            }
            self.touch(f, p);
        }
    }
    fn decode(&mut self, bytes: &[u8]) -> Result<(), TraceBenchError> {
        let mut at = 0;
        while at < bytes.len() {
            let f = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8")) as usize;
            let kind = bytes[at + 8];
            at += 9;
            let dst = &mut self.mem[f * PS..(f + 1) * PS];
            if kind == REMUS_FULL {
                dst.copy_from_slice(&bytes[at..at + PS]);
                at += PS;
                continue;
            }
            let mut word = 0;
            while word < PS / 4 {
                let h = bytes[at];
                at += 1;
                let n = (h & 0x7f) as usize;
                if h & REMUS_SKIP == 0 {
                    dst[word * 4..(word + n) * 4].copy_from_slice(&bytes[at..at + n * 4]);
                    at += n * 4;
                }
                word += n;
            }
        }
        Ok(())
    }
    fn replica(&self) -> &[u8] {
        &self.mem
    }
}

// ------------------------------------------------------------ QEMU XBZRLE

/// QEMU's XBZRLE (docs/devel/migration/features, "XBZRLE"): a 64 MiB page
/// cache indexed by page address (direct-mapped); the new page is compared
/// with the cached one and sent as alternating zero-run / non-zero-run
/// lengths in ULEB128, each non-zero run followed by its new bytes. Zero
/// pages are sent as a flag; cache misses and encodings larger than the
/// page go raw; unchanged pages are not sent. Framing as in QEMU's RAM
/// stream: 8-byte address|flags, plus 1-byte encoding flag and 2-byte
/// length for XBZRLE pages.
pub(super) struct Xbzrle {
    slots: Vec<Option<(u64, Vec<u8>)>>,
    mem: Vec<u8>,
}

const XB_ZERO: u8 = 1;
const XB_PAGE: u8 = 2;
const XB_DELTA: u8 = 3;

fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_uleb(b: &[u8], at: &mut usize) -> usize {
    let mut v = 0usize;
    let mut shift = 0;
    loop {
        let x = b[*at];
        *at += 1;
        v |= ((x & 0x7f) as usize) << shift;
        if x & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

impl Xbzrle {
    pub(super) fn new(cache_bytes: usize, mem: Vec<u8>) -> Self {
        Xbzrle {
            slots: vec![None; cache_bytes / PS],
            mem,
        }
    }

    /// Header flag byte stands in for the low bits of QEMU's 8-byte address word.
    fn header(out: &mut Vec<u8>, f: u64, flag: u8) {
        out.extend_from_slice(&((f << 8) | u64::from(flag)).to_le_bytes());
    }
}

impl Scheme for Xbzrle {
    fn name(&self) -> String {
        "xbzrle".into()
    }
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])], out: &mut Vec<u8>) {
        out.clear();
        let n = self.slots.len();
        let mut enc = Vec::with_capacity(PS);
        for &(f, p) in pages {
            let slot = &mut self.slots[f as usize % n];
            if p.iter().all(|&b| b == 0) {
                Xbzrle::header(out, f, XB_ZERO);
                out.push(0);
                *slot = Some((f, p.to_vec()));
                continue;
            }
            let hit = matches!(slot, Some((cf, _)) if *cf == f);
            if hit {
                let old = &slot.as_ref().expect("hit").1;
                enc.clear();
                let mut i = 0;
                let mut overflow = false;
                while i < PS {
                    let z0 = i;
                    while i < PS && p[i] == old[i] {
                        i += 1;
                    }
                    if i == PS {
                        break;
                    }
                    let nz0 = i;
                    while i < PS && p[i] != old[i] {
                        i += 1;
                    }
                    put_uleb(&mut enc, nz0 - z0);
                    put_uleb(&mut enc, i - nz0);
                    enc.extend_from_slice(&p[nz0..i]);
                    if enc.len() > PS {
                        overflow = true;
                        break;
                    }
                }
                if !overflow {
                    if !enc.is_empty() {
                        Xbzrle::header(out, f, XB_DELTA);
                        out.push(1); // ENCODING_FLAG_XBZRLE
                        out.extend_from_slice(&(enc.len() as u16).to_be_bytes());
                        out.extend_from_slice(&enc);
                    }
                    slot.as_mut().expect("hit").1.copy_from_slice(p);
                    continue;
                }
            }
            Xbzrle::header(out, f, XB_PAGE);
            out.extend_from_slice(p);
            *slot = Some((f, p.to_vec()));
        }
    }
    fn decode(&mut self, bytes: &[u8]) -> Result<(), TraceBenchError> {
        let mut at = 0;
        while at < bytes.len() {
            let h = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
            at += 8;
            let f = (h >> 8) as usize;
            let dst = &mut self.mem[f * PS..(f + 1) * PS];
            match h as u8 {
                XB_ZERO => {
                    dst.fill(bytes[at]);
                    at += 1;
                }
                XB_PAGE => {
                    dst.copy_from_slice(&bytes[at..at + PS]);
                    at += PS;
                }
                _ => {
                    let len = u16::from_be_bytes([bytes[at + 1], bytes[at + 2]]) as usize;
                    at += 3;
                    let end = at + len;
                    let mut i = 0;
                    while at < end {
                        i += get_uleb(bytes, &mut at);
                        let n = get_uleb(bytes, &mut at);
                        dst[i..i + n].copy_from_slice(&bytes[at..at + n]);
                        at += n;
                        i += n;
                    }
                }
            }
        }
        Ok(())
    }
    fn replica(&self) -> &[u8] {
        &self.mem
    }
}
