//! The codec benchmark's tables, shared by `cargo bench -p wan --bench
//! codec` and `remus-wan bench codec`: bytes per epoch and encode/decode
//! speed of our codec beside raw pages, zstd per page, Remus' (Xen)
//! XOR+RLE scheme and QEMU's XBZRLE, over a [`Workload`]: one of the
//! synthetic dirtying patterns ([`crate::codec::synthetic`]) or a trace
//! recorded from a real guest ([`crate::codec::recorded`]).
//!
//! Every scheme first takes the workload's warm-up epochs, unmeasured (for
//! a recorded trace the first is the whole image, as at the start of
//! protection: it fills the caches within their budgets); the rest are
//! measured, and each replica is checked against the guest's final image.
//!
//! Per-core speeds are the benchmark thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), not wall time: the machines this runs on
//! are shared, and on-CPU time is what "MB/s on one core" means. The
//! "total" encode speed is wall time with the encoder's helper threads, so
//! it measures the neighbours too.

mod baselines;
mod schemes;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cpu_time::Stopwatch;
use super::recorded::{self, TraceEpoch, TraceError};
use super::synthetic::{Trace, TraceConfig, TraceKind};
use super::{CodecError, Decoder, DecoderConfig, Encoder, EncoderConfig, VecMemory};
use baselines::{Raw, Remus, Xbzrle, ZstdPage};
use schemes::{Ours, Scheme};

/// Page size of every workload (the baselines are written for it).
pub const PS: usize = 4096;
/// Synthetic workloads: a 128 MiB guest...
pub const SYNTHETIC_FRAMES: u64 = 32768;
/// ... 8 MiB of dirty pages per epoch ...
pub const SYNTHETIC_DIRTY: usize = 2048;
/// ... 3 warm-up epochs, then 12 measured.
pub const SYNTHETIC_WARMUP: usize = 3;
pub const SYNTHETIC_MEASURED: usize = 12;
/// Recorded traces: epochs taken unmeasured after the initial image.
pub const RECORDED_WARMUP: usize = 3;
/// The encoder's default cache budget, the one the ratio target is set at.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Why a benchmark could not run, or found a scheme wrong.
#[derive(Debug, thiserror::Error)]
pub enum TraceBenchError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no trace folders (none holds epoch-000000.rwtrace)")]
    NoTraces(PathBuf),
    #[error("{dir}: page size {found}, the benchmark runs on {PS}-byte pages")]
    PageSize { dir: PathBuf, found: usize },
    #[error("{scheme}: the replica differs from the guest after {workload}")]
    Diverged { scheme: String, workload: String },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
}

/// Dirty pages epoch by epoch, with the guest memory they start from and
/// end at.
pub struct Workload {
    pub name: String,
    /// The synthetic pattern it is, if it is one.
    pub synthetic: Option<TraceKind>,
    pub frames: u64,
    /// Guest memory before the first epoch (and the replica's).
    pub initial: Vec<u8>,
    pub epochs: Vec<TraceEpoch>,
    /// Guest memory after the last epoch.
    pub final_image: Vec<u8>,
    /// Epochs each scheme takes before the measured ones.
    pub warmup: usize,
}

impl Workload {
    /// One of the synthetic patterns at the benchmark's size (seed 42).
    pub fn synthetic(kind: TraceKind) -> Self {
        let mut t = Trace::new(
            kind,
            TraceConfig {
                frames: SYNTHETIC_FRAMES,
                page_size: PS,
                dirty_pages: SYNTHETIC_DIRTY,
                seed: 42,
            },
        );
        let initial = t.memory().to_vec();
        let epochs = (0..SYNTHETIC_WARMUP + SYNTHETIC_MEASURED)
            .map(|_| {
                let frames = t.step();
                let mut pages = Vec::with_capacity(frames.len() * PS);
                for &f in &frames {
                    pages.extend_from_slice(t.page(f));
                }
                TraceEpoch {
                    interval_us: 0,
                    frames,
                    pages,
                }
            })
            .collect();
        Workload {
            name: kind.name().into(),
            synthetic: Some(kind),
            frames: SYNTHETIC_FRAMES,
            initial,
            epochs,
            final_image: t.memory().to_vec(),
            warmup: SYNTHETIC_WARMUP,
        }
    }

    /// A trace recorded from a real guest: the replica starts from zeros,
    /// and epoch 0 (the whole image) is the first of `1 + warmup`
    /// unmeasured epochs.
    pub fn recorded(dir: &Path, warmup: usize) -> Result<Self, TraceBenchError> {
        let t = recorded::read_trace(dir)?;
        if t.meta.page_size != PS {
            return Err(TraceBenchError::PageSize {
                dir: dir.to_owned(),
                found: t.meta.page_size,
            });
        }
        let final_image = t.image_after(t.epochs.len());
        let name = match dir.file_name().map(|n| n.to_string_lossy().into_owned()) {
            Some(n) if n != t.meta.workload => format!("{} ({n})", t.meta.workload),
            _ => t.meta.workload.clone(),
        };
        Ok(Workload {
            name,
            synthetic: None,
            frames: t.meta.frame_count,
            initial: vec![0; t.meta.frame_count as usize * PS],
            epochs: t.epochs,
            final_image,
            warmup: 1 + warmup,
        })
    }

    pub fn measured(&self) -> &[TraceEpoch] {
        &self.epochs[self.warmup.min(self.epochs.len())..]
    }

    /// Measured epochs, at least 1 (a divisor).
    pub fn measured_epochs(&self) -> usize {
        self.measured().len().max(1)
    }

    /// Bytes of dirty pages handed in over the measured epochs.
    pub fn measured_page_bytes(&self) -> usize {
        self.measured().iter().map(TraceEpoch::page_bytes).sum()
    }

    fn is_measured(&self, index: usize) -> bool {
        index >= self.warmup
    }
}

/// Trace folders under `root`: `root` itself if it holds epoch files, else
/// its subfolders that do, sorted.
pub fn trace_dirs(root: &Path) -> Result<Vec<PathBuf>, TraceBenchError> {
    let first = recorded::epoch_file_name(0);
    if root.join(&first).exists() {
        return Ok(vec![root.to_owned()]);
    }
    let mut dirs: Vec<_> = std::fs::read_dir(root)
        .map_err(|source| TraceBenchError::Io {
            path: root.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(&first).exists())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(TraceBenchError::NoTraces(root.to_owned()));
    }
    Ok(dirs)
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

/// One scheme over one workload: bytes per measured epoch and one core's
/// encode and decode speed.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub bytes_per_epoch: f64,
    pub encode_mbps: f64,
    pub decode_mbps: f64,
}

/// Our encoder with `cfg` on one thread (the table's speeds are one core's).
fn ours(label: &str, cfg: EncoderConfig, w: &Workload) -> Result<Box<dyn Scheme>, TraceBenchError> {
    Ok(Box::new(Ours::new(
        label,
        EncoderConfig { threads: 1, ..cfg },
        &w.initial,
    )?))
}

fn ours_cache(
    label: &str,
    cache_bytes: usize,
    w: &Workload,
) -> Result<Box<dyn Scheme>, TraceBenchError> {
    ours(
        label,
        EncoderConfig {
            cache_budget_bytes: cache_bytes,
            ..EncoderConfig::default()
        },
        w,
    )
}

/// Every scheme of the full table, in its order.
fn all_schemes(w: &Workload, ours_only: bool) -> Result<Vec<Box<dyn Scheme>>, TraceBenchError> {
    let mut all: Vec<Box<dyn Scheme>> = vec![Box::new(Raw {
        mem: w.initial.clone(),
    })];
    if !ours_only {
        all.push(Box::new(ZstdPage::new(1, &w.initial)?));
        all.push(Box::new(ZstdPage::new(3, &w.initial)?));
        all.push(Box::new(Remus::new(w.initial.clone())));
        all.push(Box::new(Xbzrle::new(64 << 20, w.initial.clone())));
    }
    let d = EncoderConfig::default;
    all.push(ours_cache("ours (32 MiB cache)", 32 << 20, w)?);
    all.push(ours_cache("ours (64 MiB cache)", 64 << 20, w)?);
    // The match finder of zstd's level (the default before
    // `EncoderConfig::fast_match_finder`): before and after in one run.
    all.push(ours(
        "ours level's finder (64 MiB)",
        EncoderConfig {
            fast_match_finder: false,
            ..d()
        },
        w,
    )?);
    all.push(ours(
        "ours per-page (64 MiB)",
        EncoderConfig {
            per_page_zstd: true,
            ..d()
        },
        w,
    )?);
    all.push(ours(
        "ours no prefix (64 MiB)",
        EncoderConfig {
            prefix_zstd: false,
            ..d()
        },
        w,
    )?);
    // Chunks without other pages as zstd prefix (wire version 3's
    // `BLOCK_ZSTD_REFS`, the default since issue 16): before and after.
    all.push(ours(
        "ours no chunk refs (64 MiB)",
        EncoderConfig {
            chunk_refs: 0,
            ..d()
        },
        w,
    )?);
    all.push(ours(
        "ours 1 MiB chunks (64 MiB)",
        EncoderConfig {
            chunk_bytes: 1 << 20,
            ..d()
        },
        w,
    )?);
    all.push(ours(
        "ours zstd -1 (64 MiB)",
        EncoderConfig {
            zstd_level: -1,
            ..d()
        },
        w,
    )?);
    if w.synthetic.is_none() {
        all.push(ours_cache(
            "ours (cache = guest)",
            w.frames as usize * PS,
            w,
        )?);
    }
    Ok(all)
}

/// One pass of `s` over the workload; checks the replica at the end.
fn run(w: &Workload, s: &mut dyn Scheme) -> Result<Row, TraceBenchError> {
    let (mut wire, mut enc_t, mut dec_t) = (0usize, Duration::ZERO, Duration::ZERO);
    let mut out = Vec::new();
    for (i, e) in w.epochs.iter().enumerate() {
        let pages = e.page_slices(PS);
        let t = Stopwatch::start();
        s.encode(i as u64 + 1, &pages, &mut out);
        let te = t.elapsed();
        let t = Stopwatch::start();
        s.decode(&out)?;
        let td = t.elapsed();
        if w.is_measured(i) {
            wire += out.len();
            enc_t += te;
            dec_t += td;
        }
    }
    if s.replica() != &w.final_image[..] {
        return Err(TraceBenchError::Diverged {
            scheme: s.name(),
            workload: w.name.clone(),
        });
    }
    let page_bytes = w.measured_page_bytes();
    Ok(Row {
        name: s.name(),
        bytes_per_epoch: wire as f64 / w.measured_epochs() as f64,
        encode_mbps: mbps(page_bytes, enc_t),
        decode_mbps: mbps(page_bytes, dec_t),
    })
}

/// The full table: one pass of every scheme (`ours_only`: ours and raw
/// only), each on one thread.
pub fn table(w: &Workload, ours_only: bool) -> Result<Vec<Row>, TraceBenchError> {
    all_schemes(w, ours_only)?
        .into_iter()
        .map(|mut s| run(w, s.as_mut()))
        .collect()
}

/// Ours when the cache holds every page the workload writes: the whole
/// initial image is sent first into a cache as large as the guest.
/// Separates the cost of the delta path from the cost of compressing cold
/// pages.
pub fn all_cached(w: &Workload) -> Result<Row, TraceBenchError> {
    let mut s = Ours::new(
        "ours, all pages cached",
        EncoderConfig {
            cache_budget_bytes: w.frames as usize * PS,
            threads: 1,
            ..EncoderConfig::default()
        },
        &w.initial,
    )?;
    let all: Vec<(u64, &[u8])> = w
        .initial
        .chunks_exact(PS)
        .enumerate()
        .map(|(f, p)| (f as u64, p))
        .collect();
    let mut out = Vec::new();
    s.encode(0, &all, &mut out);
    s.decode(&out)?;
    run(w, &mut s)
}

/// Speeds of ours with a number of threads, MB/s of dirty pages over the
/// measured epochs.
#[derive(Debug, Clone, Copy)]
pub struct ThreadedSpeed {
    /// Encode, wall time.
    pub encode_wall: f64,
    /// Encode, per CPU-second of the whole process.
    pub encode_per_cpu: f64,
    /// Decode and apply, wall time, the decoder on as many threads.
    pub decode_wall: f64,
}

/// Encode and decode speed of ours over the measured epochs with `threads`
/// threads each, the median (by encode wall time) of `passes` passes. Each
/// pass's replica is checked against the guest's image.
pub fn threaded_encode(
    w: &Workload,
    cfg: &EncoderConfig,
    threads: usize,
    passes: usize,
) -> Result<ThreadedSpeed, TraceBenchError> {
    let page_bytes = w.measured_page_bytes();
    let mut runs = Vec::new();
    for _ in 0..passes.max(1) {
        let mut enc = Encoder::new(EncoderConfig {
            threads,
            ..cfg.clone()
        })?;
        let mut dec = Decoder::new(DecoderConfig {
            threads,
            ..DecoderConfig::default()
        })?;
        let mut replica = VecMemory::from_bytes(w.initial.clone(), PS);
        let mut out = Vec::new();
        let (mut wall, mut cpu, mut dec_wall) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for (i, e) in w.epochs.iter().enumerate() {
            let pages = e.page_slices(PS);
            let (t, c) = (Instant::now(), super::cpu_time::process_cpu_time());
            enc.encode_into(i as u64 + 1, &pages, &[], &[], &mut out)?;
            let (tw, tc) = (t.elapsed(), super::cpu_time::process_cpu_time());
            if w.is_measured(i) {
                wall += tw;
                cpu += match (c, tc) {
                    (Some(a), Some(b)) => b.saturating_sub(a),
                    _ => tw,
                };
            }
            enc.acknowledge(i as u64 + 1);
            let t = Instant::now();
            dec.decode(&out, &replica)?.apply(&mut replica)?;
            if w.is_measured(i) {
                dec_wall += t.elapsed();
            }
        }
        if replica.as_bytes() != &w.final_image[..] {
            return Err(TraceBenchError::Diverged {
                scheme: format!("ours ({threads} threads)"),
                workload: w.name.clone(),
            });
        }
        runs.push(ThreadedSpeed {
            encode_wall: mbps(page_bytes, wall),
            encode_per_cpu: mbps(page_bytes, cpu),
            decode_wall: mbps(page_bytes, dec_wall),
        });
    }
    runs.sort_by(|a, b| a.encode_wall.total_cmp(&b.encode_wall));
    Ok(runs[runs.len() / 2])
}

/// Threads of the "total" figures: every core the process may use, at
/// least 2 (so that a 1-CPU machine still shows what a second thread costs).
pub fn total_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .max(2)
}

/// The full table as text, under a line describing the workload.
pub fn format_table(w: &Workload, rows: &[Row]) -> String {
    let mut s = String::new();
    let raw = rows.first().map_or(1.0, |r| r.bytes_per_epoch);
    let dirty = w.measured_page_bytes() / PS / w.measured_epochs();
    let _ = writeln!(
        s,
        "\n{} trace: {} dirty pages/epoch ({:.2} MiB), guest {} MiB, {} measured epochs after {} warm-up{}",
        w.name,
        dirty,
        (dirty * PS) as f64 / (1 << 20) as f64,
        (w.frames as usize * PS) >> 20,
        w.measured_epochs(),
        w.warmup,
        if w.synthetic.is_none() {
            " (the first: the whole image)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "  {:<29} {:>12} {:>8} {:>10} {:>10}",
        "scheme", "bytes/epoch", "ratio", "enc MB/s", "dec MB/s"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "  {:<29} {:>12.0} {:>7.2}x {:>10.0} {:>10.0}",
            r.name,
            r.bytes_per_epoch,
            raw / r.bytes_per_epoch.max(1.0),
            r.encode_mbps,
            r.decode_mbps
        );
    }
    let find = |n: &str| rows.iter().find(|r| r.name == n);
    for name in ["ours (64 MiB cache)", "ours (cache = guest)"] {
        if let (Some(z), Some(o)) = (find("zstd-1/page"), find(name)) {
            let _ = writeln!(
                s,
                "  {name}: {:.2}x fewer bytes than zstd-1/page",
                z.bytes_per_epoch / o.bytes_per_epoch.max(1.0)
            );
        }
    }
    s
}

/// What `remus-wan bench codec` runs per workload.
#[derive(Debug, Clone)]
pub struct SummaryOptions {
    /// Our encoder's cache budget.
    pub cache_bytes: usize,
    /// Threads of the "total" encode figure.
    pub threads: usize,
    /// Passes of the "total" figure (the median is kept).
    pub passes: usize,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        SummaryOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            threads: total_threads(),
            passes: 3,
        }
    }
}

/// Ours beside per-page zstd-1 on one workload.
#[derive(Debug, Clone)]
pub struct Summary {
    pub workload: String,
    /// Dirty bytes per measured epoch.
    pub dirty_bytes_per_epoch: f64,
    pub zstd1: Row,
    /// Ours on one thread: bytes, encode per core, decode per core.
    pub ours: Row,
    /// Ours with `threads` threads, wall time.
    pub ours_total_mbps: f64,
    /// Ours with one thread, wall time, passes as for the total: what the
    /// total compares with on a shared machine, where wall time includes
    /// waiting for a core.
    pub ours_one_thread_wall_mbps: f64,
    /// The same, per CPU-second of the whole process.
    pub ours_total_per_cpu_mbps: f64,
    /// Decode and apply with `threads` decoder threads, wall time.
    pub ours_decode_total_mbps: f64,
    /// The same with one decoder thread, passes as for the total.
    pub ours_decode_one_thread_wall_mbps: f64,
    pub threads: usize,
}

impl Summary {
    /// How many times fewer bytes than per-page zstd-1.
    pub fn ratio(&self) -> f64 {
        self.zstd1.bytes_per_epoch / self.ours.bytes_per_epoch.max(1.0)
    }
}

/// Per-page zstd-1 and ours (one thread, then `opts.threads`) over `w`.
pub fn summary(w: &Workload, opts: &SummaryOptions) -> Result<Summary, TraceBenchError> {
    let zstd1 = run(w, &mut ZstdPage::new(1, &w.initial)?)?;
    let cfg = EncoderConfig {
        cache_budget_bytes: opts.cache_bytes,
        ..EncoderConfig::default()
    };
    let ours = run(w, ours("ours", cfg.clone(), w)?.as_mut())?;
    let one = threaded_encode(w, &cfg, 1, opts.passes)?;
    let total = threaded_encode(w, &cfg, opts.threads, opts.passes)?;
    Ok(Summary {
        workload: w.name.clone(),
        dirty_bytes_per_epoch: w.measured_page_bytes() as f64 / w.measured_epochs() as f64,
        zstd1,
        ours,
        ours_total_mbps: total.encode_wall,
        ours_one_thread_wall_mbps: one.encode_wall,
        ours_total_per_cpu_mbps: total.encode_per_cpu,
        ours_decode_total_mbps: total.decode_wall,
        ours_decode_one_thread_wall_mbps: one.decode_wall,
        threads: opts.threads,
    })
}

/// The summary rows as a table; `cache_bytes` names the budget in the header.
pub fn format_summary(rows: &[Summary], cache_bytes: usize) -> String {
    let mut s = String::new();
    let threads = rows.first().map_or(total_threads(), |r| r.threads);
    let head = [
        ("workload", ""),
        ("dirty", "KiB/ep"),
        ("zstd-1/page", "B/epoch"),
        ("ours", "B/epoch"),
        ("ratio", ""),
        ("zstd-1", "enc/core"),
        ("ours", "enc/core"),
        ("ours", "1thr wall"),
        ("ours", &format!("{threads}thr wall")),
        ("ours", "per CPU-s"),
        ("zstd-1", "dec/core"),
        ("ours", "dec/core"),
        ("ours dec", "1thr wall"),
        ("ours dec", &format!("{threads}thr wall")),
    ];
    for line in 0..2 {
        let cell = |i: usize| if line == 0 { head[i].0 } else { head[i].1 };
        let _ = write!(
            s,
            "{:<18} {:>9} {:>12} {:>12} {:>7}",
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            cell(4)
        );
        for i in 5..head.len() {
            let _ = write!(s, " {:>10}", cell(i));
        }
        s.push('\n');
    }
    for r in rows {
        let _ = write!(
            s,
            "{:<18} {:>9.0} {:>12.0} {:>12.0} {:>6.2}x",
            r.workload,
            r.dirty_bytes_per_epoch / 1024.0,
            r.zstd1.bytes_per_epoch,
            r.ours.bytes_per_epoch,
            r.ratio(),
        );
        for v in [
            r.zstd1.encode_mbps,
            r.ours.encode_mbps,
            r.ours_one_thread_wall_mbps,
            r.ours_total_mbps,
            r.ours_total_per_cpu_mbps,
            r.zstd1.decode_mbps,
            r.ours.decode_mbps,
            r.ours_decode_one_thread_wall_mbps,
            r.ours_decode_total_mbps,
        ] {
            let _ = write!(s, " {v:>10.0}");
        }
        s.push('\n');
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        s,
        "ours: cache {} MiB; speeds MB/s of dirty pages; per core = one thread's CPU time; \
         1thr/{threads}thr wall = wall time with 1/{threads} encoder threads (median); \
         dec 1thr/{threads}thr wall = decode and apply with 1/{threads} decoder threads; \
         {} CPUs, load average {}",
        cache_bytes >> 20,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    s
}
