//! Records a dirty-page trace of the qemu backend's Linux guest running a
//! real workload, for the codec benchmark (`CODEC_TRACE_DIR=DIR cargo bench
//! -p wan --bench codec`).
//!
//! ```text
//! cargo run --release -p hypervisor --example record_trace -- \
//!     --workload gzip --out /tmp/trace-gzip [--epochs 100] [--interval-ms 100]
//!     [--memory-mib 128] [--tracking auto|write-protect|compare] [--image DIR]
//! ```
//!
//! The guest (`cargo xtask guest-image --linux`, or `--image DIR`) boots
//! under TCG with `rw.work=WORKLOAD` on its command line (gzip, sort, db,
//! copy: see xtask/src/linux_guest.rs); once its console says the workload
//! is ready, the recorder takes one checkpoint (epoch 0: every non-zero page,
//! the image protection starts from), then one checkpoint every
//! `--interval-ms` of guest run time: exactly the pages the engine would
//! hand the codec (pages written since the last checkpoint, per the
//! backend's dirty tracking, that differ from what was last sent), with their
//! contents. Each epoch goes to `DIR/epoch-NNNNNN.rwtrace` (format:
//! `wan::codec::recorded`), written on a second thread while the guest runs
//! on. The files are large (tens of MB per workload): keep them out of the
//! repository.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hypervisor::kvm::Seams;
use hypervisor::qemu::{Accel, DirtyTracking, LinuxImage, QemuGuest, QemuSpec};
use hypervisor::{Checkpoint, ProtectedGuest};
use wan::codec::recorded::{write_epoch, TraceEpoch, TraceMeta};

struct Args {
    workload: String,
    out: PathBuf,
    epochs: u32,
    interval: Duration,
    memory_mib: u64,
    tracking: DirtyTracking,
    image: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: record_trace --workload gzip|sort|db|copy --out DIR [--epochs N] \
         [--interval-ms MS] [--memory-mib MIB] [--tracking auto|write-protect|compare] \
         [--image DIR]"
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let mut a = Args {
        workload: String::new(),
        out: PathBuf::new(),
        epochs: 100,
        interval: Duration::from_millis(100),
        memory_mib: 128,
        tracking: DirtyTracking::Auto,
        image: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(v) = it.next() else { usage() };
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--workload" => a.workload = v,
            "--out" => a.out = v.into(),
            "--epochs" => a.epochs = num(&v) as u32,
            "--interval-ms" => a.interval = Duration::from_millis(num(&v)),
            "--memory-mib" => a.memory_mib = num(&v),
            "--image" => a.image = Some(v.into()),
            "--tracking" => {
                a.tracking = match v.as_str() {
                    "auto" => DirtyTracking::Auto,
                    "write-protect" => DirtyTracking::WriteProtect,
                    "compare" => DirtyTracking::Compare,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    if a.workload.is_empty() || a.out.as_os_str().is_empty() {
        usage()
    }
    a
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse();
    let image = match &args.image {
        Some(d) => LinuxImage::in_dir(d)?,
        None => LinuxImage::from_env_or_workspace()?,
    };
    std::fs::create_dir_all(&args.out)?;
    let run = tempfile::tempdir()?;
    let mut spec = QemuSpec::new("trace", image, run.path())
        .memory_mib(args.memory_mib)
        .accel(Accel::Tcg)
        .dirty_tracking(args.tracking);
    spec.cmdline_extra = format!("rw.work={}", args.workload);
    let mut g = QemuGuest::start(&spec, Seams::default())?;
    eprintln!(
        "record_trace: guest of {} MiB booting (TCG, dirty tracking {:?}), workload {}",
        args.memory_mib,
        g.dirty_tracking(),
        args.workload
    );
    let ready = format!("workload {} ready", args.workload);
    let deadline = Instant::now() + Duration::from_secs(600);
    while !g.console().contains(&ready) {
        if Instant::now() > deadline || !g.is_running() {
            let c = g.console();
            let tail = &c[c.len().saturating_sub(2000)..];
            return Err(format!("the workload did not start; console ends with:\n{tail}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(line) = g.console().lines().find(|l| l.contains(&ready)) {
        eprintln!("record_trace: guest says {:?}", line.trim());
    }

    let meta = TraceMeta {
        workload: args.workload.clone(),
        page_size: g.page_size(),
        frame_count: g.frame_count(),
    };
    // Files are compressed and written on this thread while the guest runs.
    let (tx, rx) = mpsc::sync_channel::<(u32, TraceEpoch)>(4);
    let out = args.out.clone();
    let writer_meta = meta.clone();
    let writer = std::thread::spawn(move || -> Result<u64, String> {
        let mut bytes = 0;
        for (i, e) in rx {
            let path = write_epoch(&out, &writer_meta, i, &e).map_err(|e| e.to_string())?;
            bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        }
        Ok(bytes)
    });

    let mut cp = Checkpoint::default();
    let mut resumed = Instant::now();
    let mut pages_total = 0usize;
    for i in 0..=args.epochs {
        if i > 0 {
            let wake = resumed + args.interval;
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
        let ran = resumed.elapsed();
        g.checkpoint(&mut cp, &mut || {})?;
        resumed = Instant::now();
        let epoch = TraceEpoch {
            interval_us: if i == 0 { 0 } else { ran.as_micros() as u32 },
            frames: cp.frames.clone(),
            pages: cp.pages.clone(),
        };
        if i > 0 {
            pages_total += epoch.frames.len();
        }
        if i == 0 || i % 10 == 0 {
            eprintln!(
                "record_trace: epoch {i}: {} pages ({} KiB)",
                epoch.frames.len(),
                epoch.pages.len() >> 10
            );
        }
        if tx.send((i, epoch)).is_err() {
            break;
        }
    }
    drop(tx);
    let bytes = writer
        .join()
        .map_err(|_| "the writer thread panicked")?
        .map_err(|e| format!("writing the trace: {e}"))?;
    eprintln!(
        "record_trace: {} epochs after the initial image, {:.0} pages/epoch on average, \
         {:.1} MiB of files in {}",
        args.epochs,
        pages_total as f64 / args.epochs.max(1) as f64,
        bytes as f64 / (1 << 20) as f64,
        args.out.display()
    );
    Ok(())
}
