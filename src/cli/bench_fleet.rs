//! `remus-wan bench fleet`: one site daemon protecting 1, 4, 8, 16 ...
//! micro-VMs, beside the same VMs unprotected, in one run.
//!
//! Every cell runs in a network namespace of its own: N persistent taps on
//! one bridge (192.0.2.1/24, VM i at 192.0.2.(10 + i)), and either N
//! `remus-wan vm run` processes (the baseline) or one `remus-wan protect
//! --site dc2` daemon running all N VMs towards one `remus-wan standby
//! --site dc2` daemon through the WAN emulator, a witness arbitrating.
//!
//! The workload is the same in every cell: one client per VM reads the
//! guest's counter stream (TCP 9000) at a fixed offered rate
//! (`--client-kib-s`), so a cell whose VMs cannot keep up shows it as a
//! lower delivered rate. Over a measuring window of `--seconds` the bench
//! takes, per VM: the delivered rate, the checkpoints per second and the
//! wire bytes per checkpoint (from the protect daemon's /status before and
//! after the window), the pause p50/p99 (the daemon's last 1024 pauses);
//! and the CPU time of the daemons (/proc/PID/stat, vCPU threads apart from
//! /proc schedstat) divided by N, the bytes the WAN emulator relayed and
//! how busy the whole machine was (/proc/stat).
//!
//! Then the protect daemon is SIGKILLed: for each VM, the time from the
//! kill to the first counter value only the VM resumed at dc2 can have
//! sent (the client reads at full speed from the kill on, and a value at
//! least one receive buffer beyond what the client had read when the old
//! daemon was reaped cannot be old output; see `bench failback`).
//!
//! Every child process is SIGKILLed by PID and reaped when its guard
//! drops, whatever happened; the namespace, bridge and taps vanish with
//! them. Every wait has an upper bound.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::bench_client::ClientThread;

use crate::cli::bench_sched::split_threads;
use crate::metrics::VmStatus;
use crate::testbed::{fleet_address, fleet_tap, LocalDeployment};

const TAP_PREFIX: &str = "rwbf";
const BRIDGE: &str = "rwbfbr";
const MAC: &str = "52:54:00:12:41:00";
/// UDP ports of dc1, dc2, the emulator in front of dc2 and the witness
/// (loopback of the cell's own namespace).
const PORTS: (u16, u16) = (17971, 17972);
const EMU_PORT: u16 = 17973;
const WITNESS_PORT: u16 = 17974;
const PROTECT_STATUS: &str = "127.0.0.1:9477";
const STANDBY_STATUS: &str = "127.0.0.1:9478";
const GUEST_MIB: u64 = 32;
/// Between "every VM protected and streaming" and the measuring window.
const WARMUP: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

// Upper bounds of the waits.
const START_LIMIT: Duration = Duration::from_secs(30);
const CONNECT_LIMIT: Duration = Duration::from_secs(120);
const PROTECTED_LIMIT: Duration = Duration::from_secs(180);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(60);

/// What `bench fleet` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// VMs per daemon, one protected cell (and its baseline) each.
    pub counts: Vec<usize>,
    /// Length of each measuring window.
    pub seconds: u64,
    pub epoch_ms: u64,
    /// RTT of the emulated WAN between the sites.
    pub rtt_ms: u64,
    /// Offered load: what each client reads per second, KiB.
    pub client_kib_s: u64,
    pub guest_image: Option<PathBuf>,
    /// Configurations and logs, kept (replicas and disks are removed at
    /// the end). Default: a temp folder removed when every cell passed.
    pub work_dir: Option<PathBuf>,
}

// ---------------------------------------------------------------- processes

/// A child process, SIGKILLed by PID and reaped on drop.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, name: String, args: &[&str], log: PathBuf) -> Result<Proc> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating log {}", log.display()))?;
        let run_dir = log.parent().unwrap_or(Path::new(".")).join("run");
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env("REMUS_WAN_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .env(crate::metrics::RUN_DIR_ENV, run_dir)
            .env_remove("REMUS_WAN_FAULT")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Proc {
            name,
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL (by PID) and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing `needle`.
    fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(s) = self.exited() {
                bail!(
                    "{} exited ({s}) before logging {needle:?}:\n{}",
                    self.name,
                    tail(&self.log_text(), 20)
                );
            }
            if Instant::now() > deadline {
                bail!("{} did not log {needle:?} within {limit:?}", self.name);
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------- clients

struct ClientState {
    /// The next counter value expected.
    next: u64,
    partial: Vec<u8>,
    bytes: u64,
    /// Values out of sequence (gaps or duplicates).
    anomalies: u64,
    /// Bytes per second the client reads at most; `None`: all it can.
    rate: Option<f64>,
    /// (threshold, first value at or beyond it).
    watch: Option<(u64, Option<Instant>)>,
    fatal: Option<String>,
}

impl ClientState {
    fn on_bytes(&mut self, bytes: &[u8], now: Instant) {
        self.bytes += bytes.len() as u64;
        self.partial.extend_from_slice(bytes);
        let whole = self.partial.len() / 8 * 8;
        for c in self.partial[..whole].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = u64::from_be_bytes(b);
            if v != self.next {
                self.anomalies += 1;
            }
            self.next = v.saturating_add(1);
            if let Some((threshold, hit @ None)) = &mut self.watch {
                if v >= *threshold {
                    *hit = Some(now);
                }
            }
        }
        self.partial.drain(..whole);
    }
}

/// One TCP connection to a guest's counter service, read by a thread of
/// its own.
type Client = ClientThread<ClientState>;

impl ClientThread<ClientState> {
    fn connect_paced(addr: SocketAddr, rate: f64, limit: Duration) -> Result<Client> {
        let state = ClientState {
            next: 0,
            partial: Vec::new(),
            bytes: 0,
            anomalies: 0,
            rate: Some(rate),
            watch: None,
            fatal: None,
        };
        Client::connect(
            "fleet-client",
            addr,
            limit,
            Duration::from_millis(100),
            state,
            read_loop,
        )
    }

    fn bytes(&self) -> u64 {
        self.with(|s| s.bytes)
    }

    /// Called once the old daemon is reaped: reads at full speed and
    /// watches for a value at least a receive buffer beyond what was read.
    fn arm(&self) {
        let extra = self.rcvbuf / 8;
        self.with(|s| {
            s.rate = None;
            s.watch = Some((s.next + extra, None));
        });
    }

    fn hit(&self) -> Option<Instant> {
        self.with(|s| s.watch.and_then(|w| w.1))
    }
}

fn read_loop(mut sock: TcpStream, state: &Mutex<ClientState>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 8192];
    // Pacing: (start, bytes at start) of the current paced stretch.
    let mut pace: Option<(Instant, u64)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (rate, bytes) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            (s.rate, s.bytes)
        };
        if let Some(rate) = rate {
            let now = Instant::now();
            let (t0, b0) = *pace.get_or_insert((now, bytes));
            let allowed = b0 as f64 + now.duration_since(t0).as_secs_f64() * rate;
            // Whatever was not read during a stall is not owed afterwards
            // beyond 100 ms worth.
            if allowed > bytes as f64 + rate * 0.1 {
                pace = Some((now, bytes.saturating_sub((rate * 0.1) as u64)));
            } else if bytes as f64 >= allowed {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        } else {
            pace = None;
        }
        let r = sock.read(&mut buf);
        let now = Instant::now();
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(0) => {
                s.fatal = Some("the guest closed the counter connection".into());
                return;
            }
            Ok(n) => s.on_bytes(&buf[..n], now),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                s.fatal = Some(format!("the counter connection failed: {e}"));
                return;
            }
        }
    }
}

// ---------------------------------------------------------------- samples

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) may hold spaces: count fields after its ')'.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (tck > 0).then(|| (utime + stime) as f64 / tck as f64)
}

/// (busy, total) jiffies of the whole machine.
fn host_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

struct Sample {
    at: Instant,
    client_bytes: Vec<u64>,
    /// CPU seconds of every process of the cell.
    cpu: f64,
    /// vCPU threads' time on a CPU, seconds.
    vcpu: f64,
    host: Option<(u64, u64)>,
    status: Vec<VmStatus>,
    emulator_bytes: Option<u64>,
}

fn sample(
    clients: &[Client],
    pids: &[u32],
    vcpu_pids: &[u32],
    protected: bool,
    emulator: Option<&wan::emulator::EmulatorHandle>,
) -> Result<Sample> {
    let mut cpu = 0.0;
    for &p in pids {
        cpu += cpu_seconds(p).with_context(|| format!("/proc/{p}/stat"))?;
    }
    let vcpu = vcpu_pids
        .iter()
        .filter_map(|&p| split_threads(p, "vcpu-"))
        .map(|(v, _)| v.run_ns as f64 / 1e9)
        .sum();
    let status = if protected {
        crate::metrics::fetch_status(PROTECT_STATUS.parse()?).context("protect daemon's status")?
    } else {
        Vec::new()
    };
    Ok(Sample {
        at: Instant::now(),
        client_bytes: clients.iter().map(Client::bytes).collect(),
        cpu,
        vcpu,
        host: host_jiffies(),
        status,
        emulator_bytes: emulator.map(|e| {
            let s = e.stats();
            s.forward.bytes + s.backward.bytes
        }),
    })
}

// ---------------------------------------------------------------- one cell

#[derive(Debug, Clone, Default)]
struct Row {
    vms: usize,
    protected: bool,
    /// Delivered to each client, KiB/s: mean and lowest.
    client_kib_s: (f64, f64),
    /// Checkpoints per second per VM: mean and lowest.
    epochs_per_s: Option<(f64, f64)>,
    /// Median over the VMs of their pause p50; highest of their p99.
    pause_p50_us: Option<u64>,
    pause_p99_us: Option<u64>,
    wire_kib_per_epoch: Option<f64>,
    /// Relayed by the WAN emulator (both ways), and the daemon's own count
    /// of checkpoint wire bytes, Mbit/s.
    link_mbit_s: Option<f64>,
    wire_mbit_s: Option<f64>,
    /// CPU per VM, % of one core: everything, and the vCPU threads.
    cpu_pct: f64,
    vcpu_pct: f64,
    /// The cell's processes together, % of all the machine's CPUs.
    cell_pct: f64,
    host_busy_pct: Option<f64>,
    /// Kill -> first value of the resumed VM, per VM (None: not seen).
    takeover: Vec<Option<Duration>>,
    /// From the standby's `takeover complete` lines, ms per VM.
    phases: Phases,
    anomalies: u64,
}

/// The standby daemon's own account of each VM's takeover, ms.
#[derive(Debug, Clone, Default)]
struct Phases {
    detection: Vec<f64>,
    arbitration: Vec<f64>,
    activation: Vec<f64>,
}

impl Phases {
    fn from_log(text: &str) -> Phases {
        let field = |line: &str, name: &str| -> Option<f64> {
            let at = line.find(&format!(" {name}="))? + name.len() + 2;
            let rest = &line[at..];
            rest[..rest.find(' ').unwrap_or(rest.len())].parse().ok()
        };
        let mut p = Phases::default();
        for l in text.lines().filter(|l| l.contains("takeover complete")) {
            let (Some(d), Some(ar), Some(ac)) = (
                field(l, "detection_ms"),
                field(l, "arbitration_ms"),
                field(l, "activation_ms"),
            ) else {
                continue;
            };
            p.detection.push(d);
            p.arbitration.push(ar);
            p.activation.push(ac);
        }
        p
    }
}

struct Cell<'a> {
    bin: &'a Path,
    image: &'a Path,
    dir: PathBuf,
    vms: usize,
    protected: bool,
    opts: &'a Options,
}

fn bridge_and_taps(vms: usize) -> Result<()> {
    let ip = |a: &[&str]| hypervisor::netns::ip(a).map_err(anyhow::Error::from);
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["addr", "add", "192.0.2.1/24", "dev", BRIDGE])?;
    ip(&["link", "set", "dev", BRIDGE, "up"])?;
    for i in 1..=vms {
        let tap = fleet_tap(TAP_PREFIX, i);
        ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        ip(&["link", "set", "dev", &tap, "master", BRIDGE])?;
        ip(&["link", "set", "dev", &tap, "up"])?;
    }
    Ok(())
}

fn connect_all(vms: usize, rate: f64) -> Result<Vec<Client>> {
    let deadline = Instant::now() + CONNECT_LIMIT;
    (1..=vms)
        .map(|i| {
            let addr = SocketAddr::new(fleet_address(i).into(), 9000);
            let left = deadline.saturating_duration_since(Instant::now());
            Client::connect_paced(addr, rate, left.max(Duration::from_secs(1)))
                .with_context(|| format!("vm{i}"))
        })
        .collect()
}

impl Cell<'_> {
    fn run(&self) -> Result<Row> {
        std::fs::create_dir_all(&self.dir)?;
        let cfg = LocalDeployment {
            dir: self.dir.clone(),
            guest_image: self.image.to_owned(),
            epoch_interval_ms: self.opts.epoch_ms,
            memory_mib: GUEST_MIB,
            ports: PORTS,
            dc2_connect_port: Some(EMU_PORT),
            tap: TAP_PREFIX.into(),
            mac: MAC.into(),
            witness_port: Some(WITNESS_PORT),
        }
        .write_fleet(self.vms)?;
        let cfg = cfg.to_string_lossy().into_owned();
        hypervisor::netns::in_new_netns(|| -> Result<Row> {
            bridge_and_taps(self.vms)?;
            if self.protected {
                self.protected_cell(&cfg)
            } else {
                self.baseline_cell(&cfg)
            }
        })?
    }

    fn rate(&self) -> f64 {
        self.opts.client_kib_s as f64 * 1024.0
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.opts.seconds)
    }

    /// Waits until every client has received something.
    fn wait_streaming(&self, clients: &[Client], procs: &mut [&mut Proc]) -> Result<()> {
        let deadline = Instant::now() + CONNECT_LIMIT;
        while clients.iter().any(|c| c.bytes() == 0) {
            for p in procs.iter_mut() {
                if let Some(s) = p.exited() {
                    bail!("{} exited ({s}):\n{}", p.name, tail(&p.log_text(), 20));
                }
            }
            if Instant::now() > deadline {
                bail!("not every client received data within {CONNECT_LIMIT:?}");
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    fn baseline_cell(&self, cfg: &str) -> Result<Row> {
        let mut procs = Vec::new();
        for i in 1..=self.vms {
            let vm = format!("vm{i}");
            procs.push(Proc::spawn(
                self.bin,
                format!("vm run {vm}"),
                &["vm", "run", "--config", cfg, "--vm", &vm, "--quiet"],
                self.dir.join(format!("{vm}.log")),
            )?);
        }
        let clients = connect_all(self.vms, self.rate())?;
        self.wait_streaming(&clients, &mut procs.iter_mut().collect::<Vec<_>>())?;
        std::thread::sleep(WARMUP);
        let pids: Vec<u32> = procs.iter().filter_map(Proc::pid).collect();
        let a = sample(&clients, &pids, &pids, false, None)?;
        std::thread::sleep(self.window());
        let b = sample(&clients, &pids, &pids, false, None)?;
        let mut row = self.figures(&a, &b);
        row.anomalies = clients.iter().map(|c| c.with(|s| s.anomalies)).sum();
        Ok(row)
    }

    fn protected_cell(&self, cfg: &str) -> Result<Row> {
        let dir = &self.dir;
        let rt = tokio::runtime::Runtime::new()?;
        let mut ecfg =
            wan::emulator::EmulatorConfig::new(SocketAddr::from(([127, 0, 0, 1], PORTS.1)))
                .with_link(wan::emulator::LinkParams::symmetric(
                    Duration::from_millis(self.opts.rtt_ms),
                    0.0,
                    None,
                ));
        ecfg.listen = SocketAddr::from(([127, 0, 0, 1], EMU_PORT));
        // The protect daemon replicates over one endpoint, but each VM's
        // failover link to dc2 has a UDP socket of its own: N + 1 clients
        // of the emulator (whose default room is 16).
        ecfg.max_clients = 2 * self.vms + 16;
        let emulator = rt
            .block_on(wan::emulator::Emulator::start(ecfg))
            .context("WAN emulator")?;
        let emu = emulator.handle();
        let wstate = dir.join("witness-state").to_string_lossy().into_owned();
        let state = dir.join("standby-state").to_string_lossy().into_owned();
        let _witness = Proc::spawn(
            self.bin,
            "witness".into(),
            &["witness", "--config", cfg, "--state-dir", &wstate],
            dir.join("witness.log"),
        )?;
        let mut standby = Proc::spawn(
            self.bin,
            "standby daemon".into(),
            &[
                "standby",
                "--config",
                cfg,
                "--site",
                "dc2",
                "--state-dir",
                &state,
            ],
            dir.join("standby.log"),
        )?;
        standby.wait_log("standby listening", START_LIMIT)?;
        let mut protect = Proc::spawn(
            self.bin,
            "protect daemon".into(),
            &["protect", "--site", "dc2", "--config", cfg],
            dir.join("protect.log"),
        )?;
        let clients = connect_all(self.vms, self.rate())?;
        // Every VM protected with a checkpoint committed at dc2.
        let deadline = Instant::now() + PROTECTED_LIMIT;
        loop {
            let st = crate::metrics::fetch_status(PROTECT_STATUS.parse()?).unwrap_or_default();
            let ready = st
                .iter()
                .filter(|v| v.state == "protected" && v.committed_epoch > 0)
                .count();
            let replicas =
                crate::metrics::fetch_status(STANDBY_STATUS.parse()?).map_or(0, |r| r.len());
            if ready == self.vms && replicas == self.vms {
                break;
            }
            if let Some(s) = protect.exited() {
                bail!(
                    "protect daemon exited ({s}):\n{}",
                    tail(&protect.log_text(), 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "only {ready} of {} VMs protected within {PROTECTED_LIMIT:?}",
                    self.vms
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.wait_streaming(&clients, &mut [&mut protect, &mut standby])?;
        std::thread::sleep(WARMUP);
        let pids: Vec<u32> = [protect.pid(), standby.pid()]
            .into_iter()
            .flatten()
            .collect();
        let vcpu_pids: Vec<u32> = protect.pid().into_iter().collect();
        let a = sample(&clients, &pids, &vcpu_pids, true, Some(&emu))?;
        std::thread::sleep(self.window());
        let b = sample(&clients, &pids, &vcpu_pids, true, Some(&emu))?;
        let mut row = self.figures(&a, &b);

        // Takeover: kill the protect daemon, then watch every client.
        let killed = Instant::now();
        protect.kill();
        for c in &clients {
            c.arm();
        }
        let deadline = killed + TAKEOVER_LIMIT;
        while Instant::now() < deadline
            && clients
                .iter()
                .any(|c| c.hit().is_none() && c.with(|s| s.fatal.is_none()))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        row.takeover = clients
            .iter()
            .map(|c| c.hit().map(|t| t.saturating_duration_since(killed)))
            .collect();
        row.anomalies = clients.iter().map(|c| c.with(|s| s.anomalies)).sum();
        // The standby's log lines of the takeovers (written as each VM
        // resumed; a short bounded wait for the last ones).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            row.phases = Phases::from_log(&standby.log_text());
            if row.phases.detection.len() >= self.vms || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        if row.takeover.iter().any(Option::is_none) {
            let fatal: Vec<String> = clients
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    c.with(|s| s.fatal.clone())
                        .map(|f| format!("vm{}: {f}", i + 1))
                })
                .collect();
            eprintln!(
                "  {} of {} VMs not resumed within {TAKEOVER_LIMIT:?} {fatal:?}; standby log:\n{}",
                row.takeover.iter().filter(|t| t.is_none()).count(),
                self.vms,
                tail(&standby.log_text(), 20)
            );
        }
        drop(clients);
        drop(standby);
        emu.stop();
        Ok(row)
    }

    /// The figures of a measuring window between samples `a` and `b`.
    fn figures(&self, a: &Sample, b: &Sample) -> Row {
        let n = self.vms as f64;
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let rates: Vec<f64> = a
            .client_bytes
            .iter()
            .zip(&b.client_bytes)
            .map(|(x, y)| y.saturating_sub(*x) as f64 / 1024.0 / secs)
            .collect();
        let mut row = Row {
            vms: self.vms,
            protected: self.protected,
            client_kib_s: (mean(&rates), lowest(&rates)),
            cpu_pct: (b.cpu - a.cpu) / secs / n * 100.0,
            vcpu_pct: (b.vcpu - a.vcpu) / secs / n * 100.0,
            cell_pct: (b.cpu - a.cpu) / secs / cpus() * 100.0,
            host_busy_pct: match (a.host, b.host) {
                (Some((ab, at)), Some((bb, bt))) if bt > at => {
                    Some((bb - ab) as f64 / (bt - at) as f64 * 100.0)
                }
                _ => None,
            },
            ..Row::default()
        };
        if self.protected {
            let mut epochs = Vec::new();
            let mut wire = 0.0;
            let mut p50 = Vec::new();
            let mut p99 = Vec::new();
            let mut n_epochs = 0u64;
            for after in &b.status {
                let Some(before) = a.status.iter().find(|v| v.vm == after.vm) else {
                    continue;
                };
                let e = after.epochs.saturating_sub(before.epochs);
                epochs.push(e as f64 / secs);
                n_epochs += e;
                // /status gives averages since the start.
                wire += after.wire_bytes_per_epoch * after.epochs as f64
                    - before.wire_bytes_per_epoch * before.epochs as f64;
                p50.extend(after.pause_p50_us);
                p99.extend(after.pause_p99_us);
            }
            p50.sort_unstable();
            row.epochs_per_s = (!epochs.is_empty()).then(|| (mean(&epochs), lowest(&epochs)));
            row.pause_p50_us = p50.get(p50.len() / 2).copied();
            row.pause_p99_us = p99.iter().copied().max();
            row.wire_kib_per_epoch = (n_epochs > 0).then(|| wire / n_epochs as f64 / 1024.0);
            row.wire_mbit_s = Some(wire * 8.0 / secs / 1e6);
            row.link_mbit_s = match (a.emulator_bytes, b.emulator_bytes) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 * 8.0 / secs / 1e6),
                _ => None,
            };
        }
        row
    }
}

fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn lowest(v: &[f64]) -> f64 {
    v.iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(f64::MAX)
}

// ---------------------------------------------------------------- report

fn header() -> String {
    "| VMs | setup | delivered KiB/s per VM (lowest) | epochs/s per VM (lowest) | pause p50 | pause p99 \
     | wire KiB/epoch | link Mbit/s | CPU per VM (vCPU) | cell CPU of machine (machine busy) \
     | kill → first byte p50 / max |\n\
     |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        .to_string()
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn us(u: Option<u64>) -> String {
    match u {
        Some(u) if u >= 10_000 => format!("{:.1} ms", u as f64 / 1000.0),
        Some(u) => format!("{u} µs"),
        None => "-".into(),
    }
}

fn line(r: &Row) -> String {
    let dash = || "-".to_string();
    let takeover = if r.protected {
        let mut seen: Vec<Duration> = r.takeover.iter().flatten().copied().collect();
        seen.sort_unstable();
        let missing = r.takeover.len() - seen.len();
        match (seen.get(seen.len() / 2), seen.last()) {
            (Some(p50), Some(max)) if missing == 0 => format!("{} / {}", ms(*p50), ms(*max)),
            (Some(p50), Some(max)) => {
                format!("{} / {} ({missing} not resumed)", ms(*p50), ms(*max))
            }
            _ => "none resumed".into(),
        }
    } else {
        dash()
    };
    let mut s = format!(
        "| {} | {} | {:.0} ({:.0}) | {} | {} | {} | {} | {} | {:.1} % ({:.1} %) | {:.0} % ({}) | {} |",
        r.vms,
        if r.protected {
            "one protect + one standby daemon"
        } else {
            "unprotected, `vm run` per VM"
        },
        r.client_kib_s.0,
        r.client_kib_s.1,
        r.epochs_per_s
            .map_or_else(dash, |(m, l)| format!("{m:.1} ({l:.1})")),
        us(r.pause_p50_us),
        us(r.pause_p99_us),
        r.wire_kib_per_epoch.map_or_else(dash, |w| format!("{w:.1}")),
        r.link_mbit_s.map_or_else(dash, |m| format!("{m:.1}")),
        r.cpu_pct,
        r.vcpu_pct,
        r.cell_pct,
        r.host_busy_pct.map_or_else(dash, |b| format!("{b:.0} %")),
        takeover,
    );
    if r.anomalies > 0 {
        s += &format!(" **{} counter values out of sequence**", r.anomalies);
    }
    s
}

fn guest_image(opt: Option<PathBuf>) -> Result<PathBuf> {
    let image = match opt {
        Some(i) => i,
        None => {
            let dir = std::env::var_os(hypervisor::guest_build::GUEST_DIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target/guest"));
            hypervisor::guest_build::installed_paths(&dir).net
        }
    };
    std::fs::canonicalize(&image).with_context(|| {
        format!(
            "guest image {} missing: run `cargo xtask guest-image` or pass --guest-image",
            image.display()
        )
    })
}

/// Runs every cell and prints the table; false when a cell failed.
pub fn run(opts: Options) -> Result<bool> {
    if !Path::new("/dev/kvm").exists() {
        bail!("bench fleet runs micro-VMs: /dev/kvm is missing");
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench fleet needs root (network namespaces, taps)");
    }
    if opts.counts.is_empty() || opts.counts.iter().any(|&n| n == 0 || n > 200) {
        bail!("--vms takes counts from 1 to 200");
    }
    let bin = std::env::current_exe()?;
    let image = guest_image(opts.guest_image.clone())?;
    let (dir, temporary) = match &opts.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("remus-wan-bench-fleet-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir)?;
    // A copy of the guest, so that a rebuild meanwhile changes nothing.
    let guest = dir.join("netguest.elf");
    std::fs::copy(&image, &guest).with_context(|| format!("copying {}", image.display()))?;
    println!(
        "bench fleet: {} ms epochs, WAN RTT {} ms, {} MiB guests, each client reads {} KiB/s, \
         {} s windows, {} CPUs; work folder {}",
        opts.epoch_ms,
        opts.rtt_ms,
        GUEST_MIB,
        opts.client_kib_s,
        opts.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.display()
    );
    let mut rows = Vec::new();
    let mut failed = 0;
    for &vms in &opts.counts {
        for protected in [false, true] {
            let name = format!(
                "{vms}-{}",
                if protected {
                    "protected"
                } else {
                    "unprotected"
                }
            );
            let started = Instant::now();
            let cell = Cell {
                bin: &bin,
                image: &guest,
                dir: dir.join(&name),
                vms,
                protected,
                opts: &opts,
            };
            match cell.run() {
                Ok(r) => {
                    eprintln!("{name}: done in {:.0?}", started.elapsed());
                    if protected {
                        let each: Vec<String> = r
                            .takeover
                            .iter()
                            .map(|t| t.map_or("-".into(), ms))
                            .collect();
                        eprintln!("  kill → first byte per VM: {}", each.join(", "));
                    }
                    eprintln!("  {}", line(&r));
                    rows.push(Ok(r));
                }
                Err(e) => {
                    eprintln!("{name}: failed after {:.0?}: {e:#}", started.elapsed());
                    failed += 1;
                    rows.push(Err(format!("| {vms} | {name} | failed: {e} |")));
                }
            }
        }
    }
    println!("{}", header());
    for r in &rows {
        match r {
            Ok(r) => println!("{}", line(r)),
            Err(e) => println!("{}", e.lines().next().unwrap_or_default()),
        }
    }
    println!();
    println!("Takeovers as the standby daemon logged them (`takeover complete`), ms, p50 / max over the VMs:");
    println!();
    println!("| VMs | logged | detection | arbitration | activation |\n|---:|---:|---:|---:|---:|");
    for r in rows.iter().flatten().filter(|r| r.protected) {
        let pm = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            match (v.get(v.len() / 2), v.last()) {
                (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                _ => "-".into(),
            }
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            r.vms,
            r.phases.detection.len(),
            pm(&r.phases.detection),
            pm(&r.phases.arbitration),
            pm(&r.phases.activation)
        );
    }
    if temporary && failed == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        // Keep the logs and configurations, not the replicas and disks
        // (gigabytes with many VMs).
        for cell in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let cell = cell.path();
            for state in ["standby-state", "witness-state"] {
                let _ = std::fs::remove_dir_all(cell.join(state));
            }
            for f in std::fs::read_dir(&cell).into_iter().flatten().flatten() {
                let f = f.path();
                if f.extension().is_some_and(|e| e == "img" || e == "blockmap") {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
        eprintln!("logs kept in {}", dir.display());
    }
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_counts_values_out_of_sequence_and_fires_its_watch() {
        let mut s = ClientState {
            next: 0,
            partial: Vec::new(),
            bytes: 0,
            anomalies: 0,
            rate: None,
            watch: Some((3, None)),
            fatal: None,
        };
        let bytes: Vec<u8> = [0u64, 1, 2, 2, 3]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let now = Instant::now();
        s.on_bytes(&bytes[..5], now);
        s.on_bytes(&bytes[5..], now);
        assert_eq!(s.anomalies, 1, "the second 2 is a duplicate");
        assert_eq!(s.next, 4);
        assert_eq!(s.watch, Some((3, Some(now))));
        assert_eq!(s.bytes, 40);
    }

    #[test]
    fn takeover_phases_are_read_from_the_standby_log() {
        let log = "2026 INFO remus_wan::engine::standby: takeover complete: the VM runs here vm=vm4 token=1 epoch=Some(271) detection_ms=1006.5 arbitration_ms=8.8 activation_ms=95.1 x=1\nother\n";
        let p = Phases::from_log(log);
        assert_eq!(p.detection, [1006.5]);
        assert_eq!(p.arbitration, [8.8]);
        assert_eq!(p.activation, [95.1]);
    }

    #[test]
    fn a_process_cpu_time_is_read_from_proc() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(host_jiffies().is_some_and(|(busy, total)| busy <= total));
    }
}
