//! Checkpoint codec benchmark: bytes per epoch and encode/decode speed of our
//! codec against raw pages, zstd per page, Remus' (Xen) XOR+RLE scheme and
//! QEMU's XBZRLE, on four synthetic dirtying patterns.
//!
//! `cargo bench -p wan --bench codec` prints the side-by-side table for each
//! trace (one timed pass per scheme), and criterion measures our encode and
//! decode throughput on the sparse-write trace, where the targets are.
//!
//! The two baselines are re-implemented here from their public descriptions,
//! for comparison only; their framing overheads are approximations, noted
//! at each one.
//!
//! Speeds are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`),
//! not wall time: the machines this runs on are shared. Every table row of
//! ours runs the encoder on one thread (`threads: 1`). The "encode threads"
//! lines after each table compare one thread (per core) with the encoder's
//! default thread count (total), by wall time and by the process's CPU
//! time, beside plain zstd-3 per page from the same run.
//!
//! Environment: `CODEC_TRACE=<name>` runs one trace, `CODEC_TABLE_ONLY=1`
//! skips criterion, `CODEC_OURS_ONLY=1` leaves out the baselines (but raw).
//!
//! `CODEC_TRACE_DIR=DIR` runs the same table (no criterion) over dirty-page
//! traces recorded from the qemu backend's real Linux guest instead of the
//! synthetic ones (`cargo run --release -p hypervisor --example
//! record_trace`; format: `wan::codec::recorded`): DIR is one trace folder
//! or a folder of them. Every scheme first takes the trace's epoch 0 (the
//! whole image, as at the start of protection: it fills the caches within
//! their budgets) and `CODEC_TRACE_WARMUP` (default 3) more epochs,
//! unmeasured; the rest are measured. One more row of ours has a cache as
//! large as the guest. `CODEC_NO_THREADS=1` skips the "encode threads" lines.

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wan::codec::synthetic::{Trace, TraceConfig, TraceKind};
use wan::codec::{Decoder, DecoderConfig, Encoder, EncoderConfig, VecMemory};

/// CPU time of the calling thread. The benchmark machine is shared, so wall
/// time would measure the neighbours; on-CPU time is what "MB/s on one core"
/// means. Falls back to wall time off Linux.
struct Stopwatch(Option<u64>, Instant);

fn thread_cpu_ns() -> Option<u64> {
    wan::codec::cpu_time::thread_cpu_time().map(|d| d.as_nanos() as u64)
}

/// CPU time of the whole process: the encoder's helper threads included.
fn process_cpu_ns() -> Option<u64> {
    wan::codec::cpu_time::process_cpu_time().map(|d| d.as_nanos() as u64)
}

impl Stopwatch {
    fn start() -> Self {
        Stopwatch(thread_cpu_ns(), Instant::now())
    }
    fn elapsed(&self) -> Duration {
        match (self.0, thread_cpu_ns()) {
            (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
            _ => self.1.elapsed(),
        }
    }
}

const PS: usize = 4096;
const FRAMES: u64 = 32768; // 128 MiB guest
const DIRTY: usize = 2048; // 8 MiB of dirty pages per epoch
const WARMUP_EPOCHS: usize = 3;
const MEASURED_EPOCHS: usize = 12;

/// One epoch of a trace.
struct Epoch {
    pages: Vec<(u64, Vec<u8>)>,
}

impl Epoch {
    fn refs(&self) -> Vec<(u64, &[u8])> {
        self.pages.iter().map(|(f, p)| (*f, &p[..])).collect()
    }
}

struct Recorded {
    name: String,
    /// The synthetic trace it is, if it is one.
    kind: Option<TraceKind>,
    frames: u64,
    initial: Vec<u8>,
    epochs: Vec<Epoch>,
    final_image: Vec<u8>,
    /// Epochs each scheme takes before the measured ones.
    warmup: usize,
}

impl Recorded {
    fn measured(&self) -> &[Epoch] {
        &self.epochs[self.warmup.min(self.epochs.len())..]
    }
    fn measured_epochs(&self) -> usize {
        self.measured().len().max(1)
    }
    /// Bytes of dirty pages handed in over the measured epochs.
    fn measured_page_bytes(&self) -> usize {
        self.measured().iter().map(|e| e.pages.len() * PS).sum()
    }
}

/// A trace recorded from a real guest (`CODEC_TRACE_DIR`): the replica
/// starts from zeros and epoch 0 (the whole image) is the first warm-up
/// epoch.
fn load_recorded(dir: &std::path::Path) -> Recorded {
    let t = wan::codec::recorded::read_trace(dir)
        .unwrap_or_else(|e| panic!("reading the trace in {}: {e}", dir.display()));
    assert_eq!(t.meta.page_size, PS, "{}: page size", dir.display());
    let warmup = 1 + std::env::var("CODEC_TRACE_WARMUP")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(WARMUP_EPOCHS);
    let final_image = t.image_after(t.epochs.len());
    let name = format!(
        "{} ({})",
        t.meta.workload,
        dir.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned())
    );
    let epochs = t
        .epochs
        .iter()
        .map(|e| Epoch {
            pages: e
                .page_slices(PS)
                .into_iter()
                .map(|(f, p)| (f, p.to_vec()))
                .collect(),
        })
        .collect();
    Recorded {
        name,
        kind: None,
        frames: t.meta.frame_count,
        initial: vec![0; t.meta.frame_count as usize * PS],
        epochs,
        final_image,
        warmup,
    }
}

/// Trace folders under `CODEC_TRACE_DIR`: the folder itself if it holds
/// epoch files, else its subfolders that do.
fn trace_dirs(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let first = wan::codec::recorded::epoch_file_name(0);
    if root.join(&first).exists() {
        return vec![root.to_owned()];
    }
    let mut dirs: Vec<_> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(&first).exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no traces in {}", root.display());
    dirs
}

fn record(kind: TraceKind) -> Recorded {
    let mut t = Trace::new(
        kind,
        TraceConfig {
            frames: FRAMES,
            page_size: PS,
            dirty_pages: DIRTY,
            seed: 42,
        },
    );
    let initial = t.memory().to_vec();
    let epochs = (0..WARMUP_EPOCHS + MEASURED_EPOCHS)
        .map(|_| {
            let dirty = t.step();
            Epoch {
                pages: dirty.iter().map(|&f| (f, t.page(f).to_vec())).collect(),
            }
        })
        .collect();
    Recorded {
        name: kind.name().into(),
        kind: Some(kind),
        frames: FRAMES,
        initial,
        epochs,
        final_image: t.memory().to_vec(),
        warmup: WARMUP_EPOCHS,
    }
}

/// A page-transfer scheme with a sender and a receiver side.
trait Scheme {
    fn name(&self) -> String;
    fn encode(&mut self, epoch: u64, pages: &[(u64, &[u8])]) -> Vec<u8>;
    fn decode(&mut self, bytes: &[u8]);
    fn replica(&self) -> &[u8];
}

// ---------------------------------------------------------------- raw pages

/// 8-byte frame number + the page.
struct Raw {
    mem: Vec<u8>,
}

impl Scheme for Raw {
    fn name(&self) -> String {
        "raw".into()
    }
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::with_capacity(pages.len() * (PS + 8));
        for (f, p) in pages {
            out.extend_from_slice(&f.to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    }
    fn decode(&mut self, bytes: &[u8]) {
        for rec in bytes.chunks_exact(PS + 8) {
            let f = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            self.mem[f * PS..(f + 1) * PS].copy_from_slice(&rec[8..]);
        }
    }
    fn replica(&self) -> &[u8] {
        &self.mem
    }
}

// ----------------------------------------------------------- zstd per page

/// 8-byte frame number, 4-byte length, one zstd frame per page.
struct ZstdPage {
    level: i32,
    zc: zstd::bulk::Compressor<'static>,
    dz: zstd::bulk::Decompressor<'static>,
    mem: Vec<u8>,
}

impl Scheme for ZstdPage {
    fn name(&self) -> String {
        format!("zstd-{}/page", self.level)
    }
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (f, p) in pages {
            let z = self.zc.compress(p).expect("zstd");
            out.extend_from_slice(&f.to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
        }
        out
    }
    fn decode(&mut self, bytes: &[u8]) {
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
struct Remus {
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
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
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
        out
    }
    fn decode(&mut self, bytes: &[u8]) {
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
struct Xbzrle {
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
    fn new(cache_bytes: usize, mem: Vec<u8>) -> Self {
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
    fn encode(&mut self, _e: u64, pages: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let n = self.slots.len();
        let mut enc = Vec::with_capacity(PS);
        for &(f, p) in pages {
            let slot = &mut self.slots[f as usize % n];
            if p.iter().all(|&b| b == 0) {
                Xbzrle::header(&mut out, f, XB_ZERO);
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
                        Xbzrle::header(&mut out, f, XB_DELTA);
                        out.push(1); // ENCODING_FLAG_XBZRLE
                        out.extend_from_slice(&(enc.len() as u16).to_be_bytes());
                        out.extend_from_slice(&enc);
                    }
                    slot.as_mut().expect("hit").1.copy_from_slice(p);
                    continue;
                }
            }
            Xbzrle::header(&mut out, f, XB_PAGE);
            out.extend_from_slice(p);
            *slot = Some((f, p.to_vec()));
        }
        out
    }
    fn decode(&mut self, bytes: &[u8]) {
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
    }
    fn replica(&self) -> &[u8] {
        &self.mem
    }
}

// --------------------------------------------------------------------- ours

struct Ours {
    label: String,
    out: Vec<u8>,
    enc: Encoder,
    dec: Decoder,
    replica: VecMemory,
}

impl Ours {
    fn new(
        label: &str,
        cache_bytes: usize,
        per_page_zstd: bool,
        level: Option<i32>,
        initial: &[u8],
    ) -> Self {
        Self::with(
            label,
            EncoderConfig {
                cache_budget_bytes: cache_bytes,
                per_page_zstd,
                zstd_level: level.unwrap_or(EncoderConfig::default().zstd_level),
                ..EncoderConfig::default()
            },
            initial,
        )
    }

    fn with(label: &str, cfg: EncoderConfig, initial: &[u8]) -> Self {
        Ours {
            label: label.into(),
            out: Vec::new(),
            enc: Encoder::new(EncoderConfig {
                // The table's speeds are one core's.
                threads: 1,
                ..cfg
            })
            .expect("encoder"),
            dec: Decoder::new(DecoderConfig::default()).expect("decoder"),
            replica: VecMemory::from_bytes(initial.to_vec(), PS),
        }
    }
}

impl Scheme for Ours {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn encode(&mut self, epoch: u64, pages: &[(u64, &[u8])]) -> Vec<u8> {
        // The engine reuses its output buffer; so does the benchmark, but the
        // copy handed to the receiver side is made outside the timed region
        // by the caller (`to_vec` here is part of the encode time: a send
        // buffer copy, as a socket write would do).
        self.enc
            .encode_into(epoch, pages, &[], &[], &mut self.out)
            .expect("encode");
        self.enc.acknowledge(epoch);
        self.out.clone()
    }
    fn decode(&mut self, bytes: &[u8]) {
        let staged = self.dec.decode(bytes, &self.replica).expect("decode");
        staged.apply(&mut self.replica).expect("apply");
    }
    fn replica(&self) -> &[u8] {
        self.replica.as_bytes()
    }
}

fn schemes(initial: &[u8]) -> Vec<Box<dyn Scheme>> {
    let zstd = |level| ZstdPage {
        level,
        zc: zstd::bulk::Compressor::new(level).expect("zstd"),
        dz: zstd::bulk::Decompressor::new().expect("zstd"),
        mem: initial.to_vec(),
    };
    vec![
        Box::new(Raw {
            mem: initial.to_vec(),
        }),
        Box::new(zstd(1)),
        Box::new(zstd(3)),
        Box::new(Remus {
            cap: 8192,
            cache: HashMap::new(),
            lru: VecDeque::new(),
            stamp: 0,
            mem: initial.to_vec(),
        }),
        Box::new(Xbzrle::new(64 << 20, initial.to_vec())),
        Box::new(Ours::new(
            "ours (32 MiB cache)",
            32 << 20,
            false,
            None,
            initial,
        )),
        Box::new(Ours::new(
            "ours (64 MiB cache)",
            64 << 20,
            false,
            None,
            initial,
        )),
        Box::new(Ours::new(
            "ours per-page (64 MiB)",
            64 << 20,
            true,
            None,
            initial,
        )),
        Box::new(Ours::with(
            "ours no prefix (64 MiB)",
            EncoderConfig {
                prefix_zstd: false,
                ..EncoderConfig::default()
            },
            initial,
        )),
        Box::new(Ours::with(
            "ours 1 MiB chunks (64 MiB)",
            EncoderConfig {
                chunk_bytes: 1 << 20,
                ..EncoderConfig::default()
            },
            initial,
        )),
        Box::new(Ours::new(
            "ours zstd -1 (64 MiB)",
            64 << 20,
            false,
            Some(-1),
            initial,
        )),
    ]
}

struct Row {
    name: String,
    bytes_per_epoch: f64,
    encode_mbps: f64,
    decode_mbps: f64,
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// One pass of every scheme over the recorded trace; verifies each replica.
fn table(rec: &Recorded) -> Vec<Row> {
    let mut rows = Vec::new();
    let ours_only = std::env::var_os("CODEC_OURS_ONLY").is_some();
    let mut all = schemes(&rec.initial);
    if rec.kind.is_none() {
        all.push(Box::new(Ours::new(
            "ours (cache = guest)",
            rec.frames as usize * PS,
            false,
            None,
            &rec.initial,
        )));
    }
    for mut s in all {
        if ours_only && !s.name().starts_with("ours") && s.name() != "raw" {
            continue;
        }
        let (mut wire, mut enc_t, mut dec_t) = (0usize, Duration::ZERO, Duration::ZERO);
        for (i, e) in rec.epochs.iter().enumerate() {
            let pages = e.refs();
            let t = Stopwatch::start();
            let bytes = s.encode(i as u64 + 1, &pages);
            let te = t.elapsed();
            let t = Stopwatch::start();
            s.decode(&bytes);
            let td = t.elapsed();
            if i >= rec.warmup {
                wire += bytes.len();
                enc_t += te;
                dec_t += td;
            }
        }
        assert!(
            s.replica() == &rec.final_image[..],
            "{} replica diverged on {}",
            s.name(),
            rec.name
        );
        let page_bytes = rec.measured_page_bytes();
        rows.push(Row {
            name: s.name(),
            bytes_per_epoch: wire as f64 / rec.measured_epochs() as f64,
            encode_mbps: mbps(page_bytes, enc_t),
            decode_mbps: mbps(page_bytes, dec_t),
        });
    }
    rows
}

/// Ours when the cache holds every page the trace writes: the full image is
/// sent first (as at the start of protection) into a cache as large as the
/// guest. Separates the cost of the delta path from the cost of compressing
/// cold pages, which dominates the table's sparse-write figure.
fn all_cached(rec: &Recorded) -> Row {
    let mut enc = Encoder::new(EncoderConfig {
        cache_budget_bytes: FRAMES as usize * PS,
        threads: 1,
        ..EncoderConfig::default()
    })
    .expect("encoder");
    let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
    let mut replica = VecMemory::new(FRAMES, PS);
    let all: Vec<(u64, &[u8])> = rec
        .initial
        .chunks_exact(PS)
        .enumerate()
        .map(|(f, p)| (f as u64, p))
        .collect();
    let mut out = Vec::new();
    enc.encode_into(0, &all, &[], &[], &mut out)
        .expect("encode");
    dec.decode(&out, &replica)
        .expect("decode")
        .apply(&mut replica)
        .expect("apply");
    let (mut wire, mut enc_t, mut dec_t) = (0usize, Duration::ZERO, Duration::ZERO);
    for (i, e) in rec.epochs.iter().enumerate() {
        let t = Stopwatch::start();
        enc.encode_into(i as u64 + 1, &e.refs(), &[], &[], &mut out)
            .expect("encode");
        let te = t.elapsed();
        let t = Stopwatch::start();
        dec.decode(&out, &replica)
            .expect("decode")
            .apply(&mut replica)
            .expect("apply");
        let td = t.elapsed();
        if i >= WARMUP_EPOCHS {
            wire += out.len();
            enc_t += te;
            dec_t += td;
        }
    }
    assert!(replica.as_bytes() == &rec.final_image[..]);
    let page_bytes = MEASURED_EPOCHS * DIRTY * PS;
    Row {
        name: "ours, all pages cached".into(),
        bytes_per_epoch: wire as f64 / MEASURED_EPOCHS as f64,
        encode_mbps: mbps(page_bytes, enc_t),
        decode_mbps: mbps(page_bytes, dec_t),
    }
}

/// Encode speed of ours (defaults, 64 MiB cache) with `threads` threads:
/// (wall MB/s, MB/s per CPU-second of the whole process), the median of
/// `passes` passes over the measured epochs. Each pass's output is decoded
/// (untimed) and checked against the guest's image.
fn threaded_encode(rec: &Recorded, threads: usize, passes: usize) -> (f64, f64) {
    let page_bytes = rec.measured_page_bytes();
    let mut runs = Vec::new();
    for _ in 0..passes {
        let mut enc = Encoder::new(EncoderConfig {
            threads,
            ..EncoderConfig::default()
        })
        .expect("encoder");
        let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
        let mut replica = VecMemory::from_bytes(rec.initial.clone(), PS);
        let mut out = Vec::new();
        let (mut wall, mut cpu) = (Duration::ZERO, Duration::ZERO);
        for (i, e) in rec.epochs.iter().enumerate() {
            let pages = e.refs();
            let (t, c) = (Instant::now(), process_cpu_ns());
            enc.encode_into(i as u64 + 1, &pages, &[], &[], &mut out)
                .expect("encode");
            let (tw, tc) = (t.elapsed(), process_cpu_ns());
            if i >= rec.warmup {
                wall += tw;
                cpu += match (c, tc) {
                    (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
                    _ => tw,
                };
            }
            enc.acknowledge(i as u64 + 1);
            dec.decode(&out, &replica)
                .expect("decode")
                .apply(&mut replica)
                .expect("apply");
        }
        assert!(replica.as_bytes() == &rec.final_image[..]);
        runs.push((mbps(page_bytes, wall), mbps(page_bytes, cpu)));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2]
}

/// Total threads of the multi-threaded figures: the encoder's default, at
/// least 2 (so a 1-CPU machine still shows what a second thread costs).
fn bench_threads() -> usize {
    EncoderConfig::default_threads().max(2)
}

fn print_threads(rec: &Recorded, rows: &[Row]) {
    let n = bench_threads();
    let (w1, c1) = threaded_encode(rec, 1, 3);
    let (wn, cn) = threaded_encode(rec, n, 3);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let zstd3 = rows
        .iter()
        .find(|r| r.name == "zstd-3/page")
        .map_or(String::from("-"), |r| format!("{:.0}", r.encode_mbps));
    println!(
        "  encode threads, ours (64 MiB cache), {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("    1 thread (per core):  {w1:>6.0} MB/s wall, {c1:>6.0} MB/s per CPU-second");
    println!(
        "    {n} threads (total):   {wn:>6.0} MB/s wall, {cn:>6.0} MB/s per CPU-second ({:.2}x wall)",
        wn / w1
    );
    println!("    zstd-3/page (baseline, one core, same run): {zstd3} MB/s");
}

fn print_table(rec: &Recorded, rows: &[Row]) {
    let raw = rows[0].bytes_per_epoch;
    let dirty = rec.measured_page_bytes() / PS / rec.measured_epochs();
    println!(
        "\n{} trace: {} dirty pages/epoch ({:.2} MiB), guest {} MiB, {} measured epochs after {} warm-up{}",
        rec.name,
        dirty,
        (dirty * PS) as f64 / (1 << 20) as f64,
        (rec.frames as usize * PS) >> 20,
        rec.measured_epochs(),
        rec.warmup,
        if rec.kind.is_none() {
            " (the first: the whole image)"
        } else {
            ""
        }
    );
    println!(
        "  {:<22} {:>14} {:>8} {:>12} {:>12}",
        "scheme", "bytes/epoch", "ratio", "enc MB/s", "dec MB/s"
    );
    for r in rows {
        println!(
            "  {:<22} {:>14.0} {:>7.2}x {:>12.0} {:>12.0}",
            r.name,
            r.bytes_per_epoch,
            raw / r.bytes_per_epoch,
            r.encode_mbps,
            r.decode_mbps
        );
    }
}

/// Bytes of per-page zstd-1 over ours at the default cache (64 MiB), from
/// one table.
fn print_against_zstd1(rows: &[Row]) {
    let find = |n: &str| rows.iter().find(|r| r.name == n);
    for name in ["ours (64 MiB cache)", "ours (cache = guest)"] {
        if let (Some(z), Some(o)) = (find("zstd-1/page"), find(name)) {
            println!(
                "  {name}: {:.2}x fewer bytes than zstd-1/page",
                z.bytes_per_epoch / o.bytes_per_epoch
            );
        }
    }
}

fn bench(c: &mut Criterion) {
    if let Some(root) = std::env::var_os("CODEC_TRACE_DIR") {
        for dir in trace_dirs(std::path::Path::new(&root)) {
            let rec = load_recorded(&dir);
            let rows = table(&rec);
            print_table(&rec, &rows);
            print_against_zstd1(&rows);
            if std::env::var_os("CODEC_NO_THREADS").is_none() {
                print_threads(&rec, &rows);
            }
        }
        return;
    }
    // CODEC_TRACE=<name> limits the run to one trace.
    let only = std::env::var("CODEC_TRACE").ok();
    for kind in TraceKind::ALL {
        if only.as_deref().is_some_and(|n| n != kind.name()) {
            continue;
        }
        let rec = record(kind);
        let mut rows = table(&rec);
        if kind == TraceKind::SparseWrite {
            rows.push(all_cached(&rec));
        }
        print_table(&rec, &rows);
        print_threads(&rec, &rows);
        // Criterion (statistics on our encode/decode speed) only where the
        // speed targets are set, to keep the whole run within minutes.
        if std::env::var_os("CODEC_TABLE_ONLY").is_some() || kind != TraceKind::SparseWrite {
            continue;
        }

        let page_bytes = (MEASURED_EPOCHS * DIRTY * PS) as u64;
        let mut g = c.benchmark_group(format!("codec/{}", kind.name()));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Bytes(page_bytes));
        // Each iteration: a fresh encoder warmed up untimed, then the
        // measured epochs timed. "encode": one thread, its CPU time (per
        // core). "encode-N-threads": the default thread count, wall time
        // (total; it measures the neighbours too on a shared machine).
        for threads in [1, bench_threads()] {
            let name = if threads == 1 {
                "encode".to_string()
            } else {
                format!("encode-{threads}-threads")
            };
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut enc = Encoder::new(EncoderConfig {
                            threads,
                            ..EncoderConfig::default()
                        })
                        .expect("encoder");
                        let mut out = Vec::new();
                        for (i, e) in rec.epochs.iter().enumerate() {
                            let pages = e.refs();
                            let (cpu, wall) = (Stopwatch::start(), Instant::now());
                            enc.encode_into(i as u64 + 1, &pages, &[], &[], &mut out)
                                .expect("encode");
                            if i >= WARMUP_EPOCHS {
                                total += if threads == 1 {
                                    cpu.elapsed()
                                } else {
                                    wall.elapsed()
                                };
                            }
                            enc.acknowledge(i as u64 + 1);
                            black_box(&out);
                        }
                    }
                    total
                })
            });
        }
        let mut enc = Encoder::new(EncoderConfig::default()).expect("encoder");
        let wire: Vec<Vec<u8>> = rec
            .epochs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let out = enc
                    .encode(i as u64 + 1, &e.refs(), &[], &[])
                    .expect("encode");
                enc.acknowledge(i as u64 + 1);
                out
            })
            .collect();
        g.bench_function("decode+apply", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut replica = VecMemory::from_bytes(rec.initial.clone(), PS);
                    let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
                    for (i, bytes) in wire.iter().enumerate() {
                        let t = Stopwatch::start();
                        dec.decode(bytes, &replica)
                            .expect("decode")
                            .apply(&mut replica)
                            .expect("apply");
                        if i >= WARMUP_EPOCHS {
                            total += t.elapsed();
                        }
                    }
                    black_box(&replica);
                }
                total
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
