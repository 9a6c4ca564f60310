//! Checkpoint codec benchmark: bytes per epoch and encode/decode speed of our
//! codec against raw pages, zstd per page, Remus' (Xen) XOR+RLE scheme and
//! QEMU's XBZRLE, on four synthetic dirtying patterns. The tables are
//! `wan::codec::trace_bench`'s (also `remus-wan bench codec`, which prints
//! ours beside per-page zstd-1 only).
//!
//! `cargo bench -p wan --bench codec` prints the side-by-side table for each
//! trace (one timed pass per scheme), and criterion measures our encode and
//! decode throughput on the sparse-write trace, where the targets are.
//!
//! Speeds are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`),
//! not wall time: the machines this runs on are shared. Every table row of
//! ours runs the encoder on one thread (`threads: 1`). The "encode threads"
//! lines after each table compare one thread (per core) with every core
//! (total), by wall time and by the process's CPU time, beside plain
//! zstd-3 per page from the same run.
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
//! `CODEC_PROFILE=N` runs only ours (defaults, one thread) N times over each
//! trace, for a profiler.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wan::codec::synthetic::TraceKind;
use wan::codec::trace_bench::{self, Row, Workload, PS, RECORDED_WARMUP};
use wan::codec::{Decoder, DecoderConfig, Encoder, EncoderConfig, VecMemory};

fn thread_cpu() -> Duration {
    wan::codec::cpu_time::thread_cpu_time().unwrap_or_default()
}

fn print_threads(w: &Workload, rows: &[Row]) {
    let n = trace_bench::total_threads();
    let cfg = EncoderConfig::default();
    let one = trace_bench::threaded_encode(w, &cfg, 1, 3).expect("1 thread");
    let all = trace_bench::threaded_encode(w, &cfg, n, 3).expect("n threads");
    let (w1, c1, d1) = (one.encode_wall, one.encode_per_cpu, one.decode_wall);
    let (wn, cn, dn) = (all.encode_wall, all.encode_per_cpu, all.decode_wall);
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
    println!("    1 thread (per core):  {w1:>6.0} MB/s wall, {c1:>6.0} MB/s per CPU-second; decode {d1:>6.0} MB/s wall");
    println!(
        "    {n} threads (total):   {wn:>6.0} MB/s wall, {cn:>6.0} MB/s per CPU-second ({:.2}x wall); decode {dn:>6.0} MB/s wall",
        wn / w1
    );
    println!("    zstd-3/page (baseline, one core, same run): {zstd3} MB/s");
}

fn bench(c: &mut Criterion) {
    let ours_only = std::env::var_os("CODEC_OURS_ONLY").is_some();
    let threads = std::env::var_os("CODEC_NO_THREADS").is_none();
    if let Some(root) = std::env::var_os("CODEC_TRACE_DIR") {
        let warmup = std::env::var("CODEC_TRACE_WARMUP")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(RECORDED_WARMUP);
        for dir in trace_bench::trace_dirs(std::path::Path::new(&root)).expect("traces") {
            let w = Workload::recorded(&dir, warmup).expect("trace");
            if let Some(passes) = std::env::var("CODEC_PROFILE")
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
            {
                // Only ours at its defaults, one thread, `passes` times: for
                // a profiler (`perf record`).
                let r = trace_bench::threaded_encode(&w, &EncoderConfig::default(), 1, passes);
                println!("{}: {:?}", w.name, r.expect("encode"));
                continue;
            }
            let rows = trace_bench::table(&w, ours_only).expect("table");
            print!("{}", trace_bench::format_table(&w, &rows));
            if threads {
                print_threads(&w, &rows);
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
        let w = Workload::synthetic(kind);
        let mut rows = trace_bench::table(&w, ours_only).expect("table");
        if kind == TraceKind::SparseWrite {
            rows.push(trace_bench::all_cached(&w).expect("all cached"));
        }
        print!("{}", trace_bench::format_table(&w, &rows));
        if threads {
            print_threads(&w, &rows);
        }
        // Criterion (statistics on our encode/decode speed) only where the
        // speed targets are set, to keep the whole run within minutes.
        if std::env::var_os("CODEC_TABLE_ONLY").is_some() || kind != TraceKind::SparseWrite {
            continue;
        }

        let page_bytes = w.measured_page_bytes() as u64;
        let mut g = c.benchmark_group(format!("codec/{}", kind.name()));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Bytes(page_bytes));
        // Each iteration: a fresh encoder warmed up untimed, then the
        // measured epochs timed. "encode": one thread, its CPU time (per
        // core). "encode-N-threads": every core, wall time (total; it
        // measures the neighbours too on a shared machine).
        for threads in [1, trace_bench::total_threads()] {
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
                        for (i, e) in w.epochs.iter().enumerate() {
                            let pages = e.page_slices(PS);
                            let (cpu, wall) = (thread_cpu(), Instant::now());
                            enc.encode_into(i as u64 + 1, &pages, &[], &[], &mut out)
                                .expect("encode");
                            if i >= w.warmup {
                                total += if threads == 1 {
                                    thread_cpu().saturating_sub(cpu)
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
        let wire: Vec<Vec<u8>> = w
            .epochs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let out = enc
                    .encode(i as u64 + 1, &e.page_slices(PS), &[], &[])
                    .expect("encode");
                enc.acknowledge(i as u64 + 1);
                out
            })
            .collect();
        g.bench_function("decode+apply", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut replica = VecMemory::from_bytes(w.initial.clone(), PS);
                    let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
                    for (i, bytes) in wire.iter().enumerate() {
                        let t = thread_cpu();
                        dec.decode(bytes, &replica)
                            .expect("decode")
                            .apply(&mut replica)
                            .expect("apply");
                        if i >= w.warmup {
                            total += thread_cpu().saturating_sub(t);
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
