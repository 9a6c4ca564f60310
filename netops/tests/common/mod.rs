//! Shared helpers of the daemon tests: preflight checks, network namespaces
//! joined by a veth link, daemons killed by PID on drop, running async code
//! inside a namespace, bounded waits.
#![allow(dead_code)]

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Checks that we are root (network namespaces) and that the binaries
/// exist. Panics with a clear message when not, unless
/// `REMUS_WAN_ALLOW_SKIP=1` (then prints a skip notice and returns false).
pub fn preflight(test: &str, binaries: &[&str]) -> bool {
    preflight_with(test, binaries, true)
}

/// [`preflight`] for tests that need no network namespace.
pub fn preflight_no_root(test: &str, binaries: &[&str]) -> bool {
    preflight_with(test, binaries, false)
}

fn preflight_with(test: &str, binaries: &[&str], needs_root: bool) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid cannot fail.
    if needs_root && unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces)".to_string());
    }
    for b in binaries {
        if which(b).is_none() {
            missing.push(format!("binary `{b}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: needs {} (install Debian packages bird2 gobgpd knot knot-dnsutils iproute2, \
         e.g. with `cargo xtask test`, and run as root)",
        missing.join(", ")
    );
    if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP {msg}");
        return false;
    }
    panic!("{msg}; set REMUS_WAN_ALLOW_SKIP=1 to skip instead");
}

pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

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

/// Output (stdout + stderr) of a command, whatever its exit status.
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

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for interface and namespace names (pid + counter).
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{}{}", std::process::id(), n)
}

/// Two network namespaces, `local` (our code) and `peer` (the daemon),
/// joined by a veth link: local 192.0.2.1/24 + 2001:db8::1/64, peer
/// 192.0.2.2/24 + 2001:db8::2/64. Deleted on drop.
pub struct Topology {
    pub local: String,
    pub peer: String,
    pub local_if: String,
    pub peer_if: String,
}

pub const LOCAL_V4: &str = "192.0.2.1";
pub const PEER_V4: &str = "192.0.2.2";
pub const LOCAL_V6: &str = "2001:db8::1";
pub const PEER_V6: &str = "2001:db8::2";

impl Topology {
    pub fn new() -> Self {
        let tag = unique_tag();
        let (va, vb) = (format!("rwa{tag}"), format!("rwb{tag}"));
        let t = Topology {
            local: format!("rwl{tag}"),
            peer: format!("rwp{tag}"),
            local_if: va.clone(),
            peer_if: vb.clone(),
        };
        assert!(va.len() <= 15, "interface name too long: {va}");
        run(Command::new("ip").args(["netns", "add", &t.local]));
        run(Command::new("ip").args(["netns", "add", &t.peer]));
        run(Command::new("ip").args([
            "link", "add", &va, "netns", &t.local, "type", "veth", "peer", "name", &vb, "netns",
            &t.peer,
        ]));
        for (ns, dev, v4, v6) in [
            (&t.local, &va, LOCAL_V4, LOCAL_V6),
            (&t.peer, &vb, PEER_V4, PEER_V6),
        ] {
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
            run(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]));
            run(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]));
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
        }
        t
    }

    /// Adds one more address (`a.b.c.d/24`) on the peer side of the link.
    pub fn add_peer_address(&self, cidr: &str) {
        run(Command::new("ip").args(["-n", &self.peer, "addr", "add", cidr, "dev", &self.peer_if]));
    }

    /// Adds one more address (`a.b.c.d/24`) on our side of the link.
    pub fn add_local_address(&self, cidr: &str) {
        run(Command::new("ip").args([
            "-n",
            &self.local,
            "addr",
            "add",
            cidr,
            "dev",
            &self.local_if,
        ]));
    }

    /// A command run inside the peer namespace.
    pub fn peer_cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.peer, program]);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.local, &self.peer] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A daemon child process, killed by PID on drop.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let f = std::fs::File::create(log).expect("daemon log file");
        let f2 = f.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Daemon {
            name: name.into(),
            child: Some(child),
            log: log.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails the test with the daemon's log if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "{} exited with {st}; log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL by PID and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's PID.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `f` on a fresh thread inside network namespace `ns`, on a
/// current-thread tokio runtime (all its sockets live in `ns`).
pub fn run_in_netns<F, Fut, T>(ns: &str, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    let h = std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f())
    });
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Polls `check` every `interval` up to `attempts` times; returns the last
/// value that satisfied it or panics with `what` and the last observation.
pub async fn wait_until<F, Fut>(
    what: &str,
    attempts: u32,
    interval: Duration,
    mut check: F,
) -> String
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (bool, String)>,
{
    let mut last = String::new();
    for _ in 0..attempts {
        let (ok, obs) = check().await;
        if ok {
            return obs;
        }
        last = obs;
        tokio::time::sleep(interval).await;
    }
    panic!("timed out waiting for {what}; last observation:\n{last}");
}

/// Output of a command run from async code without blocking the runtime.
pub async fn output_async(cmd: Command) -> String {
    let mut cmd = tokio::process::Command::from(cmd);
    match cmd.stdin(Stdio::null()).output().await {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        }
        Err(e) => format!("cannot run command: {e}"),
    }
}
