//! `remus-wan bench codec`: our checkpoint codec beside per-page zstd-1 on
//! the synthetic dirtying patterns or on traces recorded from a real guest
//! (`cargo run --release -p hypervisor --example record_trace`). The
//! measuring itself is `wan::codec::trace_bench`'s, shared with `cargo
//! bench -p wan --bench codec`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use wan::codec::synthetic::TraceKind;
use wan::codec::trace_bench::{self, SummaryOptions, Workload, RECORDED_WARMUP};

/// What the bench is asked for.
#[derive(Debug)]
pub struct Options {
    /// A trace folder, or a folder of them; `None`: the synthetic workloads.
    pub trace: Option<PathBuf>,
    /// Our encoder's cache budget, MiB.
    pub cache_mib: usize,
    /// Also print the full table (every baseline and variant of ours).
    pub all_schemes: bool,
    /// Epochs after the initial image left unmeasured (recorded traces).
    pub warmup: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            trace: None,
            cache_mib: trace_bench::DEFAULT_CACHE_BYTES >> 20,
            all_schemes: false,
            warmup: RECORDED_WARMUP,
        }
    }
}

/// One workload to load: loaded one at a time (a recorded trace holds its
/// guest's image twice: only one trace is in memory at once).
enum Source {
    Trace(PathBuf),
    Synthetic(TraceKind),
}

impl Source {
    fn load(&self, warmup: usize) -> Result<Workload> {
        match self {
            Source::Trace(dir) => Workload::recorded(dir, warmup)
                .with_context(|| format!("reading the trace in {}", dir.display())),
            Source::Synthetic(kind) => Ok(Workload::synthetic(*kind)),
        }
    }
}

/// The workloads `opts` names.
fn sources(opts: &Options) -> Result<Vec<Source>> {
    Ok(match &opts.trace {
        Some(root) => trace_bench::trace_dirs(root)?
            .into_iter()
            .map(Source::Trace)
            .collect(),
        None => TraceKind::ALL.into_iter().map(Source::Synthetic).collect(),
    })
}

/// Measures every workload and returns the text to print: the summary
/// table (and, with `all_schemes`, each full table before it). `progress`
/// hears each workload's name before it runs.
pub fn measure(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<String> {
    let cache_bytes = opts
        .cache_mib
        .checked_mul(1 << 20)
        .context("--cache-mib is too large")?;
    let sopts = SummaryOptions {
        cache_bytes,
        ..SummaryOptions::default()
    };
    let mut text = String::new();
    let mut rows = Vec::new();
    for source in sources(opts)? {
        let w = source.load(opts.warmup)?;
        progress(&w.name);
        if opts.all_schemes {
            let table = trace_bench::table(&w, false)?;
            text.push_str(&trace_bench::format_table(&w, &table));
            text.push('\n');
        }
        rows.push(trace_bench::summary(&w, &sopts)?);
    }
    text.push_str(&trace_bench::format_summary(&rows, cache_bytes));
    Ok(text)
}

pub fn run(opts: Options) -> Result<()> {
    let text = measure(&opts, &mut |name| eprintln!("bench codec: {name}"))?;
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wan::codec::recorded::{write_epoch, TraceEpoch, TraceMeta};

    /// A tiny guest: 64 pages, an initial image, then epochs that rewrite a
    /// few words of some pages, copy others and zero one.
    fn write_trace(dir: &std::path::Path) {
        let meta = TraceMeta {
            workload: "tiny".into(),
            page_size: 4096,
            frame_count: 64,
        };
        let mut mem = vec![0u8; 64 * 4096];
        for (i, b) in mem.iter_mut().enumerate().take(48 * 4096) {
            *b = (i * 31 / 7 % 251) as u8;
        }
        let epoch = |frames: Vec<u64>, mem: &[u8]| TraceEpoch {
            interval_us: 50_000,
            pages: frames
                .iter()
                .flat_map(|&f| mem[f as usize * 4096..(f as usize + 1) * 4096].to_vec())
                .collect(),
            frames,
        };
        let initial = epoch((0..48).collect(), &mem);
        write_epoch(
            dir,
            &meta,
            0,
            &TraceEpoch {
                interval_us: 0,
                ..initial
            },
        )
        .expect("write");
        for e in 1..8u32 {
            let mut frames = Vec::new();
            for k in 0..6u64 {
                let f = (u64::from(e) * 7 + k * 5) % 64;
                let at = f as usize * 4096 + (e as usize * 40) % 4000;
                mem[at..at + 8].copy_from_slice(&u64::from(e).to_le_bytes());
                frames.push(f);
            }
            // A copy of page 1 and a page zeroed.
            let (src, dst, zero) = (4096..8192, 60 * 4096, (e as usize % 40) * 4096);
            mem.copy_within(src, dst);
            mem[zero..zero + 4096].fill(0);
            frames.extend([60, (e as u64) % 40]);
            frames.sort_unstable();
            frames.dedup();
            write_epoch(dir, &meta, e, &epoch(frames, &mem)).expect("write");
        }
    }

    #[test]
    fn codec_bench_on_a_recorded_trace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trace = dir.path().join("tiny");
        std::fs::create_dir(&trace).expect("mkdir");
        write_trace(&trace);
        let opts = Options {
            trace: Some(dir.path().to_owned()),
            cache_mib: 1,
            all_schemes: true,
            warmup: 1,
        };
        let mut seen = Vec::new();
        // Every scheme's replica is checked against the trace's final image
        // inside: an error here is a decode that did not round-trip.
        let text = measure(&opts, &mut |n| seen.push(n.to_string())).expect("bench");
        assert_eq!(seen, ["tiny"]);
        for row in [
            "raw",
            "zstd-1/page",
            "xbzrle",
            "ours (64 MiB cache)",
            "ours (cache = guest)",
        ] {
            assert!(text.contains(row), "no {row} row in\n{text}");
        }
        // The summary is last, after the full table's "tiny trace: ..." line.
        let summary = text
            .lines()
            .rev()
            .find(|l| l.starts_with("tiny "))
            .unwrap_or_else(|| panic!("no summary row in\n{text}"));
        let ratio: f64 = summary
            .split_whitespace()
            .find_map(|c| c.strip_suffix('x')?.parse().ok())
            .expect("a ratio column");
        assert!(ratio > 0.0, "{summary}");

        // The same workload through the library: ours and zstd-1 round-trip.
        let w = Workload::recorded(&trace, 1).expect("trace");
        let s = trace_bench::summary(
            &w,
            &SummaryOptions {
                cache_bytes: 1 << 20,
                threads: 2,
                passes: 1,
            },
        )
        .expect("summary");
        assert!(s.ratio() > 0.0 && s.ours.bytes_per_epoch > 0.0);
    }
}
