//! `remus-wan bench protect`: the guest's TCP services and its own
//! memory-dirtying workload, unprotected and protected at several epoch
//! intervals, over an emulated WAN, in one run.
//!
//! Each cell runs in a fresh network namespace: the micro-VM guest behind a
//! tap, and for protected cells `remus-wan standby`, the WAN emulator and
//! `remus-wan protect` (this binary, as subprocesses). The client measures
//! the counter stream's throughput and the echo service's round trip; the
//! protect process's /status gives the compression ratio and link rate.
//! Then the guest's dirtying workload (TCP 9100, see the net guest's
//! `dirty.rs`) runs at each working-set size; its rate is counted on the
//! guest's own clock, so it includes checkpoint pauses and dirty-logging
//! faults but not the output-commit delay of the reply, and the slowdown is
//! taken against the unprotected cell of the same run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::bench_sched::{split_threads, SchedTimes};

const TAP: &str = "rwbench0";
/// Guest memory: room for the largest working set plus the guest's own heap.
const GUEST_MIB: u64 = 128;
/// Working sets of the dirtying workload, KiB.
const WORKING_SETS_KIB: [u64; 3] = [1024, 16 * 1024, 64 * 1024];
/// Guest time of one dirtying measurement, and of the warm-up before it
/// (which also takes the buffer's allocation and first touch out of the
/// measured run).
const DIRTY_MS: u64 = 3000;
const DIRTY_WARMUP_MS: u64 = 300;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Clone)]
struct Cell {
    interval_ms: Option<u64>,
    rtt_ms: u64,
}

#[derive(Debug, Clone, Default)]
struct Row {
    stream_mb_s: f64,
    echo_p50_us: u64,
    echo_p99_us: u64,
    link_mbit_s: Option<f64>,
    ratio: Option<f64>,
    pause_p50_us: Option<u64>,
    /// One per working set, in the order of [`WORKING_SETS_KIB`].
    dirty: Vec<Dirty>,
}

/// One run of the guest's dirtying workload.
#[derive(Debug, Clone, Default)]
struct Dirty {
    /// Pages written per second of guest time.
    iter_per_s: f64,
    /// Share of the run the vCPU was stalled (pauses, host scheduling), %.
    stalled_pct: f64,
    /// Protected cells: checkpoints per second and dirty pages per
    /// checkpoint during the run (from /status before and after).
    epochs_per_s: Option<f64>,
    dirty_pages_per_epoch: Option<f64>,
    /// The vCPU thread's time on a CPU and runnable but waiting for one,
    /// % of the run's wall time (from /proc schedstat).
    vcpu_run_pct: Option<f64>,
    vcpu_wait_pct: Option<f64>,
    /// CPU time of everything else in the VM's process and of the standby
    /// (encoder, sender, receiver, apply), % of one core.
    others_cpu_pct: Option<f64>,
}

/// The processes whose scheduling the dirtying runs record.
#[derive(Debug, Clone, Copy)]
struct Pids {
    /// The process running the VM (`vm run` or `protect`).
    vm: u32,
    standby: Option<u32>,
}

/// (vCPU threads, the VM process's other threads + the standby).
fn sched_sample(p: Pids) -> Option<(SchedTimes, SchedTimes)> {
    let (vcpu, rest) = split_threads(p.vm, "vcpu-")?;
    let standby = match p.standby {
        Some(pid) => {
            // Everything matches the empty prefix.
            split_threads(pid, "")?.0.run_ns
        }
        None => 0,
    };
    Some((
        vcpu,
        SchedTimes {
            run_ns: rest.run_ns + standby,
            wait_ns: rest.wait_ns,
        },
    ))
}

fn connect(addr: &str, limit: Duration) -> Result<TcpStream> {
    let addr: SocketAddr = addr.parse()?;
    let deadline = Instant::now() + limit;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => bail!("guest {addr} never answered: {e}"),
        }
    }
}

fn measure(row: &mut Row) -> Result<()> {
    let mut s = connect("192.0.2.10:9000", Duration::from_secs(60))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; 65536];
    // Warm up, then measure.
    let warm = Instant::now() + Duration::from_millis(500);
    while Instant::now() < warm {
        let _ = s.read(&mut buf);
    }
    let (start, mut bytes) = (Instant::now(), 0u64);
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(n) = s.read(&mut buf) {
            bytes += n as u64;
        }
    }
    row.stream_mb_s = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    drop(s);
    let mut e = connect("192.0.2.10:7", Duration::from_secs(10))?;
    e.set_read_timeout(Some(Duration::from_secs(5)))?;
    e.set_nodelay(true)?;
    let msg = [0x5au8; 64];
    let mut rtts = Vec::new();
    let end = Instant::now() + Duration::from_secs(4);
    while rtts.len() < 200 && Instant::now() < end {
        let t = Instant::now();
        e.write_all(&msg)?;
        let mut got = [0u8; 64];
        e.read_exact(&mut got)?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    let pick = |p: f64| {
        rtts.get(((rtts.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    row.echo_p50_us = pick(0.5);
    row.echo_p99_us = pick(0.99);
    Ok(())
}

/// What the guest reports for one `DIRTY` request.
struct DirtyReply {
    iterations: u64,
    micros: u64,
    /// Time in gaps of over 1 ms between the guest's clock reads.
    stalled_micros: u64,
}

/// One `DIRTY` request.
fn dirty_request(s: &mut TcpStream, kib: u64, millis: u64) -> Result<DirtyReply> {
    // The reply waits for the run and, when protected, for its epoch to commit.
    s.set_read_timeout(Some(
        Duration::from_millis(millis) + Duration::from_secs(30),
    ))?;
    s.write_all(format!("DIRTY {kib} {millis}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b)? == 0 {
            bail!("guest closed the dirtying connection");
        }
        line.push(b[0]);
        if line.len() > 256 {
            bail!("guest reply too long");
        }
    }
    let text = String::from_utf8_lossy(&line);
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["DONE", n, us, st] => Ok(DirtyReply {
            iterations: n.parse()?,
            micros: us.parse()?,
            stalled_micros: st.parse()?,
        }),
        _ => bail!("guest refused DIRTY {kib} {millis}: {}", text.trim()),
    }
}

/// The protect process's figures, if it serves them.
fn protect_status() -> Option<crate::metrics::VmStatus> {
    crate::metrics::fetch_status("127.0.0.1:9477".parse().ok()?)
        .ok()?
        .into_iter()
        .next()
}

/// Runs the dirtying workload at every working set.
fn measure_dirty(row: &mut Row, protected: bool, pids: Pids) -> Result<()> {
    let mut s = connect("192.0.2.10:9100", Duration::from_secs(10))?;
    for kib in WORKING_SETS_KIB {
        dirty_request(&mut s, kib, DIRTY_WARMUP_MS)?;
        let before = protected.then(protect_status).flatten();
        let sched_before = sched_sample(pids);
        let t = Instant::now();
        let reply = dirty_request(&mut s, kib, DIRTY_MS)?;
        let wall = t.elapsed().as_secs_f64();
        let sched_after = sched_sample(pids);
        let after = protected.then(protect_status).flatten();
        let secs = reply.micros.max(1) as f64 / 1e6;
        let mut d = Dirty {
            iter_per_s: reply.iterations as f64 / secs,
            stalled_pct: reply.stalled_micros as f64 / 1e4 / secs,
            ..Dirty::default()
        };
        if let (Some(a), Some(b)) = (before, after) {
            // Cumulative figures: /status gives averages since the start.
            let epochs = b.epochs.saturating_sub(a.epochs);
            let pages = b.dirty_pages_per_epoch * b.epochs as f64
                - a.dirty_pages_per_epoch * a.epochs as f64;
            d.epochs_per_s = Some(epochs as f64 / wall);
            d.dirty_pages_per_epoch = (epochs > 0).then(|| pages / epochs as f64);
        }
        if let (Some(a), Some(b)) = (sched_before, sched_after) {
            let pct = |ns: u64| ns as f64 / 1e7 / wall;
            let vcpu = b.0.since(a.0);
            d.vcpu_run_pct = Some(pct(vcpu.run_ns));
            d.vcpu_wait_pct = Some(pct(vcpu.wait_ns));
            d.others_cpu_pct = Some(pct(b.1.since(a.1).run_ns));
        }
        row.dirty.push(d);
    }
    Ok(())
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Result<Kill> {
    let out = std::fs::File::create(log)?;
    Ok(Kill(
        Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning remus-wan")?,
    ))
}

fn run_cell(bin: &Path, dir: &Path, image: &Path, cell: &Cell) -> Result<Row> {
    let cfg = crate::testbed::LocalDeployment {
        dir: dir.to_owned(),
        guest_image: image.to_owned(),
        epoch_interval_ms: cell.interval_ms.unwrap_or(100),
        memory_mib: GUEST_MIB,
        ports: (17731, 17732),
        dc2_connect_port: Some(17740),
        tap: TAP.into(),
        mac: "52:54:00:12:38:01".into(),
        witness_port: None,
    }
    .write()?;
    let cfg_s = cfg.to_string_lossy().to_string();
    let state = dir.join(format!(
        "state-{}-{}",
        cell.interval_ms.unwrap_or(0),
        cell.rtt_ms
    ));
    let state_s = state.to_string_lossy().to_string();
    let rtt = cell.rtt_ms;
    hypervisor::netns::in_new_netns(move || -> Result<Row> {
        let ip = |a: &[&str]| hypervisor::netns::ip(a).map_err(anyhow::Error::from);
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["addr", "add", "192.0.2.1/24", "dev", TAP])?;
        ip(&["link", "set", "dev", TAP, "up"])?;
        let mut row = Row::default();
        let Some(interval) = cell.interval_ms else {
            let vm_proc = spawn(
                bin,
                &["vm", "run", "--config", &cfg_s, "--vm", "web1", "--quiet"],
                &dir.join("vm.log"),
            )?;
            measure(&mut row)?;
            let pids = Pids {
                vm: vm_proc.0.id(),
                standby: None,
            };
            measure_dirty(&mut row, false, pids)?;
            return Ok(row);
        };
        let rt = tokio::runtime::Runtime::new()?;
        let mut ecfg = wan::emulator::EmulatorConfig::new("127.0.0.1:17732".parse()?).with_link(
            wan::emulator::LinkParams::symmetric(Duration::from_millis(rtt), 0.0, None),
        );
        ecfg.listen = "127.0.0.1:17740".parse()?;
        let _emu = rt.block_on(wan::emulator::Emulator::start(ecfg))?;
        let standby_proc = spawn(
            bin,
            &[
                "standby",
                "--config",
                &cfg_s,
                "--site",
                "dc2",
                "--state-dir",
                &state_s,
            ],
            &dir.join("standby.log"),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let protect_proc = spawn(
            bin,
            &["protect", "web1", "--site", "dc2", "--config", &cfg_s],
            &dir.join("protect.log"),
        )?;
        measure(&mut row)?;
        let status = crate::metrics::fetch_status("127.0.0.1:9477".parse()?)
            .with_context(|| format!("protect status (interval {interval} ms)"))?;
        if let Some(s) = status.first() {
            row.ratio = Some(s.compression_ratio);
            row.link_mbit_s = Some(s.wire_bytes_per_epoch * s.epoch_rate_hz * 8.0 / 1e6);
            row.pause_p50_us = s.pause_p50_us;
        }
        let pids = Pids {
            vm: protect_proc.0.id(),
            standby: Some(standby_proc.0.id()),
        };
        measure_dirty(&mut row, true, pids)?;
        Ok(row)
    })?
}

pub fn run(image: Option<PathBuf>) -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("bench protect runs a micro-VM: /dev/kvm is missing");
    }
    let bin = std::env::current_exe()?;
    let image = match image {
        Some(i) => i,
        None => {
            let dir = std::env::var_os(hypervisor::guest_build::GUEST_DIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target/guest"));
            hypervisor::guest_build::installed_paths(&dir).net
        }
    };
    let image = std::fs::canonicalize(&image).with_context(|| {
        format!(
            "guest image {} missing: run `cargo xtask guest-image` or pass --guest-image",
            image.display()
        )
    })?;
    let tmp = std::env::temp_dir().join(format!("remus-wan-bench-protect-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut cells = vec![Cell {
        interval_ms: None,
        rtt_ms: 0,
    }];
    for rtt in [0, 50] {
        for interval in [25, 50, 100] {
            cells.push(Cell {
                interval_ms: Some(interval),
                rtt_ms: rtt,
            });
        }
    }
    let ws_name = |kib: u64| format!("{} MiB", kib / 1024);
    let mut head = format!(
        "{:<26} {:>12} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "guest", "stream MB/s", "echo p50", "echo p99", "link Mb/s", "ratio", "pause p50"
    );
    for kib in WORKING_SETS_KIB {
        head += &format!(" {:>22}", format!("dirty {}: Mit/s (slow)", ws_name(kib)));
    }
    println!("{head}");
    // The unprotected cell's rates, against which slowdowns are taken.
    let mut baseline: Vec<Option<f64>> = vec![None; WORKING_SETS_KIB.len()];
    let mut details = Vec::new();
    for cell in &cells {
        let name = match cell.interval_ms {
            None => "unprotected".to_string(),
            Some(i) => format!("protected {i} ms, RTT {} ms", cell.rtt_ms),
        };
        match run_cell(&bin, &tmp, &image, cell) {
            Ok(r) => {
                let mut line = format!(
                    "{name:<26} {:>12.1} {:>9}us {:>9}us {:>11} {:>10} {:>10}",
                    r.stream_mb_s,
                    r.echo_p50_us,
                    r.echo_p99_us,
                    r.link_mbit_s.map_or("-".into(), |m| format!("{m:.1}")),
                    r.ratio.map_or("-".into(), |x| format!("{x:.1}")),
                    r.pause_p50_us.map_or("-".into(), |u| format!("{u}us")),
                );
                for (k, base) in baseline.iter_mut().enumerate() {
                    let d = r.dirty.get(k).cloned();
                    let rate = d.as_ref().map(|d| d.iter_per_s);
                    if cell.interval_ms.is_none() {
                        *base = rate;
                    }
                    let slow = match (rate, *base) {
                        (Some(r), Some(b)) if cell.interval_ms.is_some() && b > 0.0 => {
                            format!("({:.0} %)", (1.0 - r / b) * 100.0)
                        }
                        _ => "".into(),
                    };
                    let cellv = rate.map_or("-".into(), |r| format!("{:.2} {slow}", r / 1e6));
                    line += &format!(" {cellv:>22}");
                    if let Some(d) = d {
                        details.push((name.clone(), WORKING_SETS_KIB[k], d));
                    }
                }
                println!("{line}");
            }
            Err(e) => println!("{name:<26} failed: {e:#}"),
        }
    }
    println!();
    println!("dirtying workload during its runs (epochs from protect's /status; vCPU thread and");
    println!("other threads from /proc schedstat, % of wall time; others = the VM process's other");
    println!("threads plus the standby, % of one core):");
    println!(
        "{:<26} {:>8} {:>14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "guest",
        "set",
        "page writes/s",
        "stalled",
        "vCPU ran",
        "vCPU wait",
        "others",
        "epochs/s",
        "pages/epoch"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".into(), |x| format!("{x:.prec$}"));
    for (name, kib, d) in details {
        println!(
            "{name:<26} {:>8} {:>14.0} {:>7.1} % {:>7} % {:>7} % {:>7} % {:>9} {:>11}",
            ws_name(kib),
            d.iter_per_s,
            d.stalled_pct,
            opt(d.vcpu_run_pct, 1),
            opt(d.vcpu_wait_pct, 1),
            opt(d.others_cpu_pct, 1),
            opt(d.epochs_per_s, 1),
            opt(d.dirty_pages_per_epoch, 0),
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
