//! `cargo xtask demo`: two sites on this machine, a WAN between them, a
//! guest serving TCP, protection with live figures, then the primary is
//! killed and the replica takes over with the client's connection intact.
//!
//! ```text
//!   network namespace of the demo (created here, gone at the end)
//!   client ── tap 192.0.2.1 ── guest 192.0.2.10 (micro-VM, smoltcp)
//!   dc1: remus-wan protect ── WAN emulator (20 ms RTT) ── dc2: remus-wan standby
//! ```

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use remus_wan::testbed::{CounterCheck, LocalDeployment};

const TAP: &str = "rwdemo0";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log)?;
    let child = cmd
        .stdout(out.try_clone()?)
        .stderr(out)
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc(child))
}

fn wait_for(log: &Path, needle: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The progress lines of the protect log not shown yet.
fn new_lines(log: &Path, seen: &mut usize, needle: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> = text.lines().skip(*seen).map(strip_ansi).collect();
    *seen += lines.len();
    lines.into_iter().filter(|l| l.contains(needle)).collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// Reads for `d`; returns values received. Fails on a gap, duplicate or reset.
fn read_for(c: &mut CounterCheck, s: &mut TcpStream, d: Duration) -> Result<u64> {
    let start = c.next;
    let end = Instant::now() + d;
    let mut buf = vec![0u8; 8192];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => bail!("the guest closed the connection"),
            Ok(n) => c.feed(&buf[..n]).map_err(anyhow::Error::msg)?,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => bail!("connection failed: {e}"),
        }
    }
    Ok(c.next - start)
}

pub fn run_two_sites(root: &Path, guest_dir: &Path) -> Result<()> {
    if unsafe { libc_geteuid() } != 0 {
        bail!("the two-site demo creates a network namespace and a tap: run it as root");
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("the two-site demo runs a micro-VM: /dev/kvm is missing");
    }
    crate::deps::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "remus-wan",
                "-p",
                "wan",
                "--example",
                "wan_emulator",
                "--bin",
                "remus-wan",
            ]),
    )?;
    let bin = root.join("target/release/remus-wan");
    let emu = root.join("target/release/examples/wan_emulator");
    let dir = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // dc1 reaches dc2 through the WAN emulator on port 17720.
    let cfg = LocalDeployment {
        dir: dir.clone(),
        guest_image: guest_dir.join("netguest.elf"),
        epoch_interval_ms: 50,
        memory_mib: 64,
        ports: (17711, 17712),
        dc2_connect_port: Some(17720),
        tap: TAP.into(),
        mac: "52:54:00:12:37:01".into(),
        witness_port: Some(17713),
    }
    .write()?;
    println!("== remus-wan demo: VM web1 protected from dc1 to dc2 over a 20 ms RTT WAN, a witness arbitrating ==");
    println!("   configuration: {}", cfg.display());

    hypervisor::netns::in_new_netns(|| -> Result<()> {
        let ip = |a: &[&str]| hypervisor::netns::ip(a).map_err(anyhow::Error::from);
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["addr", "add", "192.0.2.1/24", "dev", TAP])?;
        ip(&["link", "set", "dev", TAP, "up"])?;
        let cfg_s = cfg.to_string_lossy().to_string();
        let state = dir.join("state").to_string_lossy().to_string();
        let standby_log = dir.join("standby.log");
        let protect_log = dir.join("protect.log");
        let witness_state = dir.join("witness").to_string_lossy().to_string();
        let _witness = spawn(
            "witness",
            Command::new(&bin)
                .args(["witness", "--config", &cfg_s, "--state-dir", &witness_state])
                .env("RUST_LOG", "info"),
            &dir.join("witness.log"),
        )?;
        let _standby = spawn(
            "standby",
            Command::new(&bin)
                .args([
                    "standby",
                    "--config",
                    &cfg_s,
                    "--site",
                    "dc2",
                    "--state-dir",
                    &state,
                ])
                .env("RUST_LOG", "info"),
            &standby_log,
        )?;
        let _emu = spawn(
            "wan emulator",
            Command::new(&emu).args([
                "--listen",
                "127.0.0.1:17720",
                "--upstream",
                "127.0.0.1:17712",
                "--rtt-ms",
                "20",
                "--jitter-ms",
                "1",
                "--max-secs",
                "300",
            ]),
            &dir.join("emulator.log"),
        )?;
        if !wait_for(&standby_log, "standby listening", Duration::from_secs(30)) {
            bail!("standby did not start; see {}", standby_log.display());
        }
        println!(
            "-- witness: granting web1's lease; dc2: standby listening; WAN emulator: 20 ms RTT"
        );
        let mut protect = spawn(
            "protect",
            Command::new(&bin)
                .args([
                    "protect",
                    "web1",
                    "--site",
                    "dc2",
                    "--config",
                    &cfg_s,
                    "--report-every",
                    "1",
                ])
                .env("RUST_LOG", "info"),
            &protect_log,
        )?;
        println!(
            "-- dc1: remus-wan protect web1 --site dc2 (pre-copy, then checkpoints every 50 ms)"
        );
        let addr: SocketAddr = "192.0.2.10:9000".parse()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => bail!("guest never answered: {e}; see {}", protect_log.display()),
            }
        };
        conn.set_read_timeout(Some(Duration::from_millis(100)))?;
        println!("-- client: connected to the guest's counter service 192.0.2.10:9000");
        let mut counter = CounterCheck::default();
        let mut seen = 0;
        for _ in 0..6 {
            let n = read_for(&mut counter, &mut conn, Duration::from_secs(1))?;
            println!("   client: {n:>8} counter values/s (protected: each released after dc2 committed its epoch)");
            for l in new_lines(&protect_log, &mut seen, "protecting") {
                if let Some(i) = l.find("epochs=") {
                    println!("   dc1:    {}", &l[i..]);
                }
            }
        }
        let at = counter.next;
        println!("-- pulling the plug on dc1: SIGKILL to remus-wan protect (client at value {at})");
        let killed = Instant::now();
        let _ = protect.0.kill();
        let _ = protect.0.wait();
        println!(
            "-- dc2 notices the silence, asks the witness for the lease, resumes the VM by itself"
        );
        // The first byte after a silence: what dc1 had in flight arrives
        // within milliseconds, dc2 cannot answer before its detection
        // timeout.
        let mut first = None;
        let (mut silent, limit) = (Duration::ZERO, Instant::now() + Duration::from_secs(30));
        while first.is_none() && Instant::now() < limit {
            let t = Instant::now();
            let n = read_for(&mut counter, &mut conn, Duration::from_millis(20))?;
            if n == 0 {
                silent += t.elapsed();
            } else if silent >= Duration::from_millis(500) {
                first = Some(killed.elapsed());
            } else {
                silent = Duration::ZERO;
            }
        }
        if !wait_for(&standby_log, "takeover complete", Duration::from_secs(30)) {
            bail!("dc2 did not take over; see {}", standby_log.display());
        }
        let line = std::fs::read_to_string(&standby_log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("takeover complete"))
            .map(str::to_owned)
            .unwrap_or_default();
        for field in ["detection_ms", "arbitration_ms", "activation_ms"] {
            if let Some(v) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{field}=")))
            {
                let ms: f64 = v.parse().unwrap_or(f64::NAN);
                println!("   dc2: {:<15} {ms:>7.1} ms", field.trim_end_matches("_ms"));
            }
        }
        for _ in 0..4 {
            let n = read_for(&mut counter, &mut conn, Duration::from_secs(1))?;
            println!("   client: {n:>8} counter values/s (served by dc2, same TCP connection)");
        }
        println!(
            "== takeover done: the client's connection went on from {at} to {} with no gap, duplicate or reset",
            counter.next
        );
        if let Some(t) = first {
            println!(
                "   kill to first byte served by dc2: {t:.2?} (the detection timeout is 1 s here)"
            );
        }
        println!("   logs: {}", dir.display());
        Ok(())
    })??;
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
