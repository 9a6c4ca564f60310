//! What the root end-to-end tests share: prerequisites that fail loudly
//! (or skip under REMUS_WAN_ALLOW_SKIP=1), child processes killed by PID
//! whatever happens, waits on states (a log line, a status, any predicate)
//! bounded in time, `ip` helpers, and a client of the guest's counter
//! stream that checks every value.
//!
//! Each test binary includes it with `mod support;` and uses a part of it.

#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remus_wan::testbed::CounterCheck;

pub mod sites;
pub mod wan;

/// No wait in these tests runs longer than this, whatever it is given.
pub const HARD_LIMIT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------- prerequisites

pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What is missing of root and (when `kvm`) /dev/kvm.
pub fn missing_root_kvm(kvm: bool) -> Vec<String> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (network namespaces, taps)".to_string());
    }
    if kvm && !Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm".to_string());
    }
    missing
}

/// True when nothing is missing; else panics naming `missing` and `hint`,
/// or prints a skip notice and returns false under REMUS_WAN_ALLOW_SKIP=1
/// (a developer machine; CI never sets it).
pub fn verdict(test: &str, missing: &[String], hint: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {} ({hint})", missing.join(", "));
    if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED (REMUS_WAN_ALLOW_SKIP=1): {msg}");
        return false;
    }
    panic!("{msg}; set REMUS_WAN_ALLOW_SKIP=1 to skip instead");
}

/// Root and KVM, for the micro-VM scenarios.
pub fn require_kvm_root(test: &str) -> bool {
    verdict(
        test,
        &missing_root_kvm(true),
        "run as root on a host with KVM",
    )
}

// ---------------------------------------------------------------- commands

/// Runs a command that must succeed; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stdout + stderr of a command, whatever its exit status.
pub fn output(cmd: &mut Command) -> String {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        }
        Err(e) => format!("cannot run {cmd:?}: {e}"),
    }
}

/// What the current namespace's network looks like (links with counters,
/// addresses, routes, neighbours, TCP sockets), for failure messages.
pub fn net_state() -> String {
    let mut s = String::new();
    for args in [
        &["-s", "link"][..],
        &["addr"][..],
        &["route"][..],
        &["neigh"][..],
    ] {
        s.push_str(&format!("$ ip {}\n", args.join(" ")));
        s.push_str(&output(Command::new("ip").args(args)));
    }
    s.push_str("$ ss -tni\n");
    s.push_str(&output(Command::new("ss").args(["-tni"])));
    s
}

/// `ip args...` in the current namespace.
pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// The host side of a guest's tap in the current namespace: a persistent
/// tap `name` with 192.0.2.1/24, up (the guests of the local deployments
/// sit at 192.0.2.10 behind it; it outlives the VM processes).
pub fn host_tap(name: &str) {
    hypervisor::netns::ip(&["tuntap", "add", "dev", name, "mode", "tap"])
        .unwrap_or_else(|e| panic!("{e}"));
    hypervisor::netns::ip(&["addr", "add", "192.0.2.1/24", "dev", name])
        .unwrap_or_else(|e| panic!("{e}"));
    hypervisor::netns::ip(&["link", "set", "dev", name, "up"]).unwrap_or_else(|e| panic!("{e}"));
}

/// `ip -n NS args...`
pub fn ip_in(ns: &str, args: &[&str]) {
    run(Command::new("ip").args(["-n", ns]).args(args));
}

// ---------------------------------------------------------------- processes

/// A child process, SIGKILLed by PID and reaped on drop, whatever the test
/// did; its stdout and stderr go to a log file.
pub struct Proc {
    pub name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Runs `program args` with `env`, here.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
        log: &Path,
    ) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::start(name, cmd, env, log)
    }

    /// Runs `program args` inside namespace `ns` (`ip netns exec` execs
    /// the program, so the child's PID is the program's).
    pub fn spawn_in(
        ns: &str,
        name: &'static str,
        program: &Path,
        args: &[&str],
        log: &Path,
    ) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        Self::start(name, cmd, &[], log)
    }

    /// `remus-wan args...` here.
    pub fn remus(name: &'static str, args: &[&str], log: &Path) -> Proc {
        Self::remus_env(name, args, &[], log)
    }

    /// `remus-wan args...` here, with extra environment (fault points).
    pub fn remus_env(
        name: &'static str,
        args: &[&str],
        env: &[(&str, String)],
        log: &Path,
    ) -> Proc {
        Self::spawn(name, &remus_bin(), args, env, log)
    }

    /// `remus-wan args...` inside namespace `ns`.
    pub fn remus_in(ns: &str, name: &'static str, args: &[&str], log: &Path) -> Proc {
        Self::spawn_in(ns, name, &remus_bin(), args, log)
    }

    fn start(name: &'static str, mut cmd: Command, env: &[(&str, String)], log: &Path) -> Proc {
        let out = File::create(log).expect("log file");
        let child = cmd
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name,
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the process's log holds `needle` (a line it prints once
    /// it is in the state the test needs), failing the test with the log's
    /// tail after `limit`.
    pub fn expect_log(&self, needle: &str, limit: Duration) {
        assert!(
            wait_for_log(&self.log, needle, limit),
            "{} never logged {needle:?} within {limit:?}; its log ends:\n{}",
            self.name,
            tail(&self.log_text(), 40)
        );
    }

    /// None while running; how it ended once it did.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut() {
            None => Some("killed by the test".into()),
            Some(c) => match c.try_wait() {
                Ok(Some(st)) => Some(st.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown ({e})")),
            },
        }
    }

    pub fn has_exited(&mut self) -> bool {
        self.exited().is_some()
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit code; panics (after SIGKILL) when the
    /// process ignores it for 20 s.
    pub fn term(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} ignored SIGTERM for 20 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a log line containing `needle`; Err(why) on timeout or
    /// exit.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<Duration, String> {
        self.wait_line(needle, |l| l.contains(needle), limit)
    }

    /// Waits for a log line satisfying `pred` (described by `needle`).
    pub fn wait_line(
        &mut self,
        needle: &str,
        pred: impl Fn(&str) -> bool,
        limit: Duration,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        let deadline = start + limit.min(HARD_LIMIT);
        let found = |p: &Proc| p.log_text().lines().any(&pred);
        loop {
            if found(self) {
                return Ok(start.elapsed());
            }
            if let Some(st) = self.exited() {
                // One last look: the line may have been written just before.
                if found(self) {
                    return Ok(start.elapsed());
                }
                return Err(format!(
                    "{} exited ({st}) without logging {needle:?}",
                    self.name
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not log {needle:?} within {limit:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn remus_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_remus-wan"))
}

// ---------------------------------------------------------------- waits

/// Polls `ready` until it holds or `limit` passes (bounded by
/// [`HARD_LIMIT`]); `meanwhile` runs between polls (e.g. keep a client
/// reading). Err names `what` and how long was waited.
pub fn wait_until(
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
    mut meanwhile: impl FnMut(),
) -> Result<Duration, String> {
    let start = Instant::now();
    let deadline = start + limit.min(HARD_LIMIT);
    loop {
        if ready() {
            return Ok(start.elapsed());
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not reached within {limit:?}"));
        }
        meanwhile();
    }
}

/// Waits for a line containing `needle` in a log file.
pub fn wait_for_log(log: &Path, needle: &str, limit: Duration) -> bool {
    let read = || std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle));
    wait_until(needle, limit, read, || {
        std::thread::sleep(Duration::from_millis(50))
    })
    .is_ok()
}

/// The status a remus-wan process publishes for its (first) VM.
pub fn vm_status(metrics: &str) -> Option<remus_wan::metrics::VmStatus> {
    remus_wan::metrics::fetch_status(metrics.parse().ok()?)
        .ok()?
        .into_iter()
        .next()
}

// ---------------------------------------------------------------- guest clients

/// A TCP connection with a small receive buffer (32 KiB), so that what is
/// in flight to the client at a kill stays small and bounded.
pub fn connect_small_window(addr: &SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_recv_buffer_size(32 * 1024)?;
    sock.connect_timeout(&(*addr).into(), Duration::from_secs(1))?;
    Ok(sock.into())
}

/// Connects, retrying (bounded) while the guest does not answer yet.
pub fn connect_retrying(addr: &SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + limit.min(HARD_LIMIT);
    loop {
        match connect_small_window(addr) {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("{addr} never answered within {limit:?}: {e}")),
        }
    }
}

/// Reads the guest's counter stream, checking every value follows the
/// previous one (no gap, no duplicate, no reset).
#[derive(Default)]
pub struct Counter(pub CounterCheck);

impl Counter {
    /// The next value expected.
    pub fn next(&self) -> u64 {
        self.0.next
    }

    /// Reads until `want` more values arrived or `limit` passed; the
    /// number of values read. The stream needs a short read timeout.
    pub fn read_more(&mut self, s: &mut TcpStream, want: u64, limit: Duration) -> u64 {
        let start = self.next();
        let deadline = Instant::now() + limit.min(HARD_LIMIT);
        let mut buf = vec![0u8; 4096];
        while self.next() < start.saturating_add(want) && Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(0) => panic!("counter connection closed by the guest"),
                Ok(n) => self.0.feed(&buf[..n]).unwrap_or_else(|e| panic!("{e}")),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("counter connection failed (no reset allowed): {e}"),
            }
        }
        self.next() - start
    }
}

/// The tail of a text, for failure messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Every `disk synchronised` line of a protect log: (mode, sent_blocks,
/// sent_bytes).
pub fn disk_syncs(log: &str) -> Vec<(String, u64, u64)> {
    remus_wan::testbed::disk_syncs(log)
        .into_iter()
        .map(|s| (s.mode, s.sent_blocks, s.sent_bytes))
        .collect()
}

/// xxh3 of a whole file (0 bytes if it cannot be read).
pub fn image_hash(p: &Path) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&std::fs::read(p).unwrap_or_default())
}

/// A two-site deployment of the micro-VM network guest (64 MiB, 50 ms
/// epochs, a 4 MiB disk) in a new temporary folder: sites on `port` and
/// `port + 1`, a witness on `port + 2` when `witness`. Returns the folder
/// guard (the folder lives as long as it), the folder and the
/// configuration file's path.
pub fn micro_vm_deployment(
    tap: &str,
    port: u16,
    mac: &str,
    witness: bool,
) -> (tempfile::TempDir, PathBuf, String) {
    let images = hypervisor::guest_build::from_env_or_build(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build"),
    )
    .expect("guest images (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = remus_wan::testbed::LocalDeployment {
        dir: tmp.path().to_owned(),
        guest_image: images.net.clone(),
        epoch_interval_ms: 50,
        memory_mib: 64,
        ports: (port, port + 1),
        dc2_connect_port: None,
        tap: tap.into(),
        mac: mac.into(),
        witness_port: witness.then_some(port + 2),
    }
    .write()
    .expect("deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let dir = tmp.path().to_owned();
    (tmp, dir, cfg_s)
}

/// A certificate authority and one certificate per site in `dir` (what
/// `remus-wan certs init` writes), valid two days.
pub fn pki(dir: &Path, sites: &[&str]) {
    for site in sites {
        remus_wan::certs::init_site(&remus_wan::certs::InitOptions {
            site: (*site).into(),
            out: dir.to_owned(),
            ca_dir: None,
            days: 2,
        })
        .unwrap_or_else(|e| panic!("certificates of {site}: {e}"));
    }
}
