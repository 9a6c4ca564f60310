//! `remus-wan bench resync`: the disk of a protected micro-VM at a real
//! size (8 GiB, sparse, with data), synchronised whole to a new standby,
//! then resynchronised by block hashes after 1 % of its blocks changed
//! with no usable block map (the failback case): bytes sent and time of
//! each beside the other, and the peak resident memory of protect and
//! standby (VmHWM), which must not grow with the disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::bench_failback::{resolve_image, Party};
use crate::testbed::{disk_syncs as syncs, DiskSync as Sync, LocalDeployment};

const TAP: &str = "rwresync0";
const MAC: &str = "52:54:00:12:3a:11";
const PORTS: (u16, u16) = (17861, 17862);
const BLOCK: u64 = 64 << 10;
const SYNC_LIMIT: Duration = Duration::from_secs(900);

/// What the bench is asked for.
#[derive(Debug)]
pub struct Options {
    /// Disk size in GiB.
    pub disk_gib: u64,
    /// Share of blocks changed before the resync, in percent.
    pub changed_percent: f64,
    pub guest_image: Option<PathBuf>,
}

/// Peak resident memory of a process in KiB (`VmHWM`).
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs the bench; prints its table.
pub fn run(opts: Options) -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("bench resync runs a micro-VM: /dev/kvm is missing");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench resync needs root (it creates a network namespace and a tap)");
    }
    if !(1..=1024).contains(&opts.disk_gib) {
        bail!("--disk-gib must be 1 to 1024");
    }
    if !(opts.changed_percent > 0.0 && opts.changed_percent <= 50.0) {
        bail!("--changed-percent must be above 0 and at most 50");
    }
    let bin = std::env::current_exe()?;
    let image = resolve_image(opts.guest_image.clone())?;
    let dir = std::env::temp_dir().join(format!("remus-wan-bench-resync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = crate::testbed::absolute(&dir);
    let cfg = LocalDeployment {
        dir: dir.clone(),
        guest_image: image,
        epoch_interval_ms: 50,
        memory_mib: 64,
        ports: PORTS,
        dc2_connect_port: None,
        tap: TAP.into(),
        mac: MAC.into(),
        witness_port: None,
    }
    .write()?;
    let disk = dir.join("web1.img");
    let disk_bytes = opts.disk_gib << 30;
    prepare_disk(&disk, disk_bytes)?;
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "bench resync: {} GiB sparse disk (256 MiB of data), {build} build, micro-VM 64 MiB, sites on loopback",
        opts.disk_gib
    );
    let r =
        hypervisor::netns::in_new_netns(|| measure(&opts, &bin, &cfg, &dir, &disk, disk_bytes))?;
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// A sparse disk with 256 MiB of incompressible data spread over it.
fn prepare_disk(disk: &Path, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    f.set_len(len)?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut chunk = vec![0u8; 1 << 20];
    let stride = len / 256;
    for i in 0..256u64 {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        f.write_all_at(&chunk, (i * stride) & !(BLOCK - 1))?;
    }
    Ok(())
}

fn measure(
    opts: &Options,
    bin: &Path,
    cfg: &Path,
    dir: &Path,
    disk: &Path,
    disk_bytes: u64,
) -> Result<()> {
    hypervisor::netns::ip(&["link", "set", "lo", "up"])?;
    crate::testbed::gateway_tap(TAP)?;
    let cfg_s = cfg.to_string_lossy().into_owned();
    let state = dir.join("state");
    let start_pair = |round: &str| -> Result<(Party, Party)> {
        let standby = Party::spawn(
            bin,
            format!("standby ({round})"),
            "dc2",
            &[
                "standby".into(),
                "--config".into(),
                cfg_s.clone(),
                "--site".into(),
                "dc2".into(),
                "--state-dir".into(),
                state.to_string_lossy().into_owned(),
                "--metrics".into(),
                "127.0.0.1:9478".into(),
            ],
            "127.0.0.1:9478".parse()?,
            dir.join(format!("standby-{round}.log")),
            None,
        )?;
        wait(SYNC_LIMIT, "the standby to listen", || {
            standby.log_text().contains("standby listening")
        })?;
        let protect = Party::spawn(
            bin,
            format!("protect ({round})"),
            "dc1",
            &[
                "protect".into(),
                "web1".into(),
                "--site".into(),
                "dc2".into(),
                "--config".into(),
                cfg_s.clone(),
            ],
            "127.0.0.1:9477".parse()?,
            dir.join(format!("protect-{round}.log")),
            None,
        )?;
        Ok((standby, protect))
    };
    let synced = |p: &Party, s: &Party| -> Result<(Sync, u64, u64)> {
        wait(SYNC_LIMIT, "the disk synchronisation", || {
            !syncs(&p.log_text()).is_empty() && p.status().is_some_and(|v| v.state == "protected")
        })
        .with_context(|| {
            let log = p.log_text();
            let lines: Vec<&str> = log.lines().collect();
            format!(
                "protect log ends:\n{}",
                lines[lines.len().saturating_sub(20)..].join("\n")
            )
        })?;
        let sync = syncs(&p.log_text()).pop().unwrap_or_default();
        let hwm = |x: &Party| x.pid().and_then(vm_hwm_kib).unwrap_or(0);
        Ok((sync, hwm(p), hwm(s)))
    };

    // 1. A new standby: the whole disk.
    let (mut standby, mut protect) = start_pair("full")?;
    let (full, full_p, full_s) = synced(&protect, &standby)?;
    protect.kill();
    standby.kill();

    // 2. 1 % of the blocks change while both are down, and the primary's
    // block map is lost (a new primary, as after a takeover): the standby's
    // replica is an old copy; only differing blocks may travel.
    let blocks = disk_bytes / BLOCK;
    let changed = ((blocks as f64) * opts.changed_percent / 100.0).ceil() as u64;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(disk)?;
        let step = (blocks / changed).max(1);
        for i in 0..changed {
            let b = (i * step + 7) % blocks;
            f.write_all_at(&(i + 1).to_le_bytes().repeat(512), b * BLOCK)?;
        }
    }
    let map = PathBuf::from(format!("{}.blockmap", disk.display()));
    let _ = std::fs::remove_file(&map);
    let (mut standby, mut protect) = start_pair("checksum")?;
    let (sum, sum_p, sum_s) = synced(&protect, &standby)?;
    protect.kill();
    standby.kill();

    let pct = |b: u64| 100.0 * b as f64 / disk_bytes as f64;
    println!(
        "| sync | mode | bytes sent | % of disk | blocks sent | time | protect VmHWM | standby VmHWM |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (what, s, p, st) in [
        ("new standby (baseline: full copy)", &full, full_p, full_s),
        (
            &format!(
                "{:.1} % of blocks changed, no block map",
                opts.changed_percent
            )[..],
            &sum,
            sum_p,
            sum_s,
        ),
    ] {
        println!(
            "| {what} | {} | {} | {:.2} % | {} | {:.1} s | {} MiB | {} MiB |",
            s.mode,
            s.sent_bytes,
            pct(s.sent_bytes),
            s.sent_blocks,
            s.took_ms as f64 / 1000.0,
            p / 1024,
            st / 1024
        );
    }
    println!(
        "changed: {changed} blocks of {blocks} ({} bytes, {:.2} % of the disk)",
        changed * BLOCK,
        pct(changed * BLOCK)
    );
    if sum.mode != "checksum" {
        bail!("the resync was {:?}, not a checksum resync", sum.mode);
    }
    Ok(())
}

/// Polls `done` every 100 ms for at most `limit`.
fn wait(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("gave up after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
