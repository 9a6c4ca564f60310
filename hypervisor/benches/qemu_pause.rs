//! Pause of the qemu backend, part by part (stop, device state, finding
//! the changed pages, copy, cont), for guests of 256 MiB, 1 GiB and 4 GiB
//! running the same workload (the guest rewrites a fixed 32 MiB working set
//! with new bytes, `rw.dirty=32`), with kernel write tracking and with the
//! RAM compare in the same run, beside a plain memcmp of the same RAM (the
//! floor of any compare-based approach). Prints figures; asserts nothing
//! about time.
//!
//! cargo bench -p hypervisor --bench qemu_pause   (QEMU and
//! `cargo xtask guest-image --linux` needed; sizes: QEMU_PAUSE_MIB=256,1024;
//! modes: QEMU_PAUSE_MODES=write-protect,compare; working set:
//! QEMU_PAUSE_DIRTY_MIB=32 (0: idle guest); checkpoints per row:
//! QEMU_PAUSE_EPOCHS=30)

use std::time::{Duration, Instant};

use hypervisor::kvm::Seams;
use hypervisor::qemu::{Accel, DirtyTracking, LinuxImage, QemuGuest, QemuSpec, QemuTimings};
use hypervisor::{Checkpoint, ProtectedGuest};

/// Checkpoints per row (QEMU_PAUSE_EPOCHS overrides: a soak run).
fn epochs() -> usize {
    std::env::var("QEMU_PAUSE_EPOCHS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}
const EPOCH_GAP: Duration = Duration::from_millis(100);

fn skip(why: &str) -> ! {
    eprintln!("qemu_pause bench: {why}");
    std::process::exit(
        if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") {
            0
        } else {
            1
        },
    );
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

fn dirty_mib() -> u64 {
    std::env::var("QEMU_PAUSE_DIRTY_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32)
}

fn mode_name(t: DirtyTracking) -> &'static str {
    match t {
        DirtyTracking::WriteProtect => "write-protect",
        DirtyTracking::Compare => "compare",
        DirtyTracking::Colo => "colo",
        DirtyTracking::Auto => "auto",
    }
}

fn run(image: &LinuxImage, mib: u64, mode: DirtyTracking, threads: &[usize]) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => skip(&format!("no temp dir: {e}")),
    };
    let mut spec = QemuSpec::new("bench", image.clone(), dir.path())
        .memory_mib(mib)
        .accel(Accel::Tcg)
        .dirty_tracking(mode);
    if dirty_mib() > 0 {
        spec.cmdline_extra = format!("rw.dirty={}", dirty_mib());
    }
    let mut g = match QemuGuest::start(&spec, Seams::default()) {
        Ok(g) => g,
        Err(e) => skip(&format!("cannot start QEMU: {e}")),
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while !g.console().contains("remus-wan guest ready") {
        if Instant::now() > deadline || !g.is_running() {
            skip("the guest did not boot within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut cp = Checkpoint::default();
    let t = Instant::now();
    if let Err(e) = g.checkpoint(&mut cp, &mut || {}) {
        skip(&format!("first checkpoint: {e}"));
    }
    let first = t.elapsed();
    // The workload starts with the guest; let it reach its working set.
    std::thread::sleep(Duration::from_secs(2));

    // The floor: one plain memcmp of the whole RAM against a copy of it,
    // one thread, in this same run. The guest is paused meanwhile, so the
    // two are equal and memcmp reads every byte (it stops at the first
    // difference).
    if let Err(e) = g.pause() {
        skip(&format!("pause: {e}"));
    }
    let mut copy = Vec::new();
    g.read_ram(&mut copy);
    let memcmp = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: both buffers hold `copy.len()` bytes.
                let r = unsafe {
                    libc::memcmp(g.ram().as_ptr().cast(), copy.as_ptr().cast(), copy.len())
                };
                std::hint::black_box(r);
                t.elapsed()
            })
            .collect(),
    );
    drop(copy);
    if let Err(e) = g.resume() {
        skip(&format!("resume: {e}"));
    }

    for &n in threads {
        g.set_compare_threads(n);
        let mut all: Vec<QemuTimings> = Vec::new();
        let mut pages = Vec::new();
        for _ in 0..epochs() {
            std::thread::sleep(EPOCH_GAP);
            if let Err(e) = g.checkpoint(&mut cp, &mut || {}) {
                skip(&format!("checkpoint: {e}"));
            }
            all.push(g.last_timings());
            pages.push(cp.frames.len());
        }
        let col = |f: fn(&QemuTimings) -> Duration| median(all.iter().map(f).collect());
        pages.sort();
        println!(
            "{mib:>5} MiB {:>13} {n:>2} thr | stop {:>6} | state {:>6} ({:>3} KB) | find {:>6} (scan {:>5}) | copy {:>5} | cont {:>6} | total {:>6} (p90 {:>6}, max {:>6}) | memcmp 1 thr {:>6} | pages {:>5} | first (full) {:>7}",
            mode_name(mode),
            ms(col(|t| t.stop)),
            ms(col(|t| t.state)),
            all[0].state_bytes / 1000,
            ms(col(|t| t.compare)),
            ms(col(|t| t.scan)),
            ms(col(|t| t.copy)),
            ms(col(|t| t.cont)),
            ms(col(|t| t.total)),
            ms(p90(all.iter().map(|t| t.total).collect())),
            ms(all.iter().map(|t| t.total).max().unwrap_or_default()),
            ms(memcmp),
            pages[pages.len() / 2],
            ms(first),
        );
        if mode == DirtyTracking::WriteProtect {
            // The compare threads do not matter without a compare.
            break;
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(e) = hypervisor::qemu::available("qemu-system-x86_64".as_ref()) {
        skip(&e.to_string());
    }
    let image = match LinuxImage::from_env_or_workspace() {
        Ok(i) => i,
        Err(e) => skip(&e.to_string()),
    };
    let sizes: Vec<u64> = std::env::var("QEMU_PAUSE_MIB")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 1024, 4096]);
    let modes: Vec<DirtyTracking> = std::env::var("QEMU_PAUSE_MODES")
        .unwrap_or_else(|_| "write-protect,compare".into())
        .split(',')
        .filter_map(|m| match m.trim() {
            "write-protect" => Some(DirtyTracking::WriteProtect),
            "compare" => Some(DirtyTracking::Compare),
            "colo" => Some(DirtyTracking::Colo),
            _ => None,
        })
        .collect();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads: Vec<usize> = if cores > 1 { vec![1, cores] } else { vec![1] };
    println!(
        "qemu backend pause, median of {} checkpoints {EPOCH_GAP:?} apart, TCG guest rewriting a {} MiB working set (ms)",
        epochs(),
        dirty_mib()
    );
    for mib in sizes {
        for &mode in &modes {
            run(&image, mib, mode, &threads);
        }
    }
}
