//! The move: a client in its own network namespace holds TCP connections
//! to the guest (counter stream, key-value); the primary PROCESS checkpoints
//! the guest repeatedly into a replica directory (memory.img, state.bin,
//! disk.img, committed through a journal, output released only after the
//! commit) and is SIGKILLed; a new process activates the replica in another
//! network namespace, the guest's address is routed there, and the same
//! connections go on: no gap, no duplicate in the counter, no reset, and the
//! key-value writes acknowledged before the kill are on the replica's disk.
//!
//! ```text
//!  ns A (primary site)            ns C (client)              ns B (backup site)
//!  tap 192.0.2.1 ─ vac ══ 198.51.100.0/24 ══ vca   vcb ══ 203.0.113.0/24 ══ vbc ─ tap 192.0.2.1
//!  guest 192.0.2.10                route 192.0.2.10 via A, then via B
//! ```
//!
//! The two VM processes are this test binary re-executed with
//! `REMUS_WAN_MOVE_ROLE` set (`primary` / `replica`), under `ip netns exec`.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypervisor::kvm::devices::block::WriteHook;
use hypervisor::kvm::{self, NetSpec, Seams, Vm, VmSpec, Workload};
use hypervisor::{Checkpoint, ProtectedGuest};

const ROLE: &str = "REMUS_WAN_MOVE_ROLE";
const DIR: &str = "REMUS_WAN_MOVE_DIR";
const IMAGE: &str = "REMUS_WAN_MOVE_IMAGE";
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const TAP: &str = "rwmv0";
const TAP_MAC: &str = "02:00:00:00:05:02";
const DISK_MIB: u64 = 4;

fn spec(image: &Path, disk: &Path) -> VmSpec {
    VmSpec::new("move", image)
        .memory_mib(64)
        .disk(disk)
        .workload(Workload {
            dirty_set_pages: 512,
            dirty_pages_per_ms: 20,
        })
        .network(NetSpec {
            tap: TAP.into(),
            mac: [0x52, 0x54, 0, 0x12, 0x35, 0x02],
            address: GUEST,
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        })
}

// ---------------------------------------------------------------------------
// The replica directory and its journal (what the engine's store does, in
// small): an epoch is written to `journal.tmp`, renamed to `journal` (the
// commit point), applied to the images, removed. A process killed at any
// moment leaves either the previous epoch or a journal to replay.

struct Epoch {
    frames: Vec<u64>,
    pages: Vec<u8>,
    state: Vec<u8>,
    writes: Vec<(u64, Vec<u8>)>,
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get_u64(b: &[u8], pos: &mut usize) -> u64 {
    let v = u64::from_le_bytes(b[*pos..*pos + 8].try_into().unwrap());
    *pos += 8;
    v
}

fn encode(e: &Epoch) -> Vec<u8> {
    let mut out = Vec::with_capacity(e.pages.len() + e.state.len() + 4096);
    put_u64(&mut out, e.frames.len() as u64);
    for &f in &e.frames {
        put_u64(&mut out, f);
    }
    out.extend_from_slice(&e.pages);
    put_u64(&mut out, e.state.len() as u64);
    out.extend_from_slice(&e.state);
    put_u64(&mut out, e.writes.len() as u64);
    for (off, data) in &e.writes {
        put_u64(&mut out, *off);
        put_u64(&mut out, data.len() as u64);
        out.extend_from_slice(data);
    }
    out
}

fn apply(dir: &Path, journal: &[u8]) {
    let mut pos = 0;
    let n = get_u64(journal, &mut pos) as usize;
    let frames: Vec<u64> = (0..n).map(|_| get_u64(journal, &mut pos)).collect();
    let mem = OpenOptions::new()
        .write(true)
        .open(dir.join("memory.img"))
        .unwrap();
    for (i, f) in frames.iter().enumerate() {
        let page = &journal[pos + i * 4096..pos + (i + 1) * 4096];
        mem.write_all_at(page, f * 4096).unwrap();
    }
    pos += n * 4096;
    let len = get_u64(journal, &mut pos) as usize;
    fs::write(dir.join("state.tmp"), &journal[pos..pos + len]).unwrap();
    fs::rename(dir.join("state.tmp"), dir.join("state.bin")).unwrap();
    pos += len;
    let disk = OpenOptions::new()
        .write(true)
        .open(dir.join("disk.img"))
        .unwrap();
    for _ in 0..get_u64(journal, &mut pos) {
        let off = get_u64(journal, &mut pos);
        let len = get_u64(journal, &mut pos) as usize;
        disk.write_all_at(&journal[pos..pos + len], off).unwrap();
        pos += len;
    }
}

fn commit(dir: &Path, e: &Epoch) {
    let bytes = encode(e);
    fs::write(dir.join("journal.tmp"), &bytes).unwrap();
    fs::rename(dir.join("journal.tmp"), dir.join("journal")).unwrap();
    apply(dir, &bytes);
    fs::remove_file(dir.join("journal")).unwrap();
}

fn replay(dir: &Path) {
    if let Ok(bytes) = fs::read(dir.join("journal")) {
        apply(dir, &bytes);
        fs::remove_file(dir.join("journal")).unwrap();
    }
}

/// Disk writes of the open epoch.
#[derive(Clone, Default)]
struct Writes(Arc<Mutex<DiskWrites>>);

type DiskWrites = Vec<(u64, Vec<u8>)>;

impl WriteHook for Writes {
    fn on_write(&mut self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().push((offset, data.to_vec()));
    }
}

// ---------------------------------------------------------------------------
// The two VM processes.

fn child_paths() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os(DIR)?;
    let image = std::env::var_os(IMAGE)?;
    Some((PathBuf::from(dir), PathBuf::from(image)))
}

/// Not a test on its own: the primary VM process (runs until SIGKILLed).
#[test]
fn move_child_primary() {
    if std::env::var(ROLE).as_deref() != Ok("primary") {
        return;
    }
    let (dir, image) = child_paths().expect("child environment");
    let replica = dir.join("replica");
    let outbox = common::Outbox::default();
    let writes = Writes::default();
    let mut vm = Vm::start(
        &spec(&image, &dir.join("primary-disk.img")),
        Seams {
            frame_sink: Some(Box::new(outbox.clone())),
            write_hook: Some(Box::new(writes.clone())),
        },
    )
    .expect("primary VM starts");
    vm.wait_ready(Duration::from_secs(60)).expect("ready");
    let mut tap = vm.tap().expect("tap");
    File::create(replica.join("memory.img"))
        .unwrap()
        .set_len(vm.frame_count() * vm.page_size() as u64)
        .unwrap();
    let mut cp = Checkpoint::default();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut epoch = 0u64;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let (mut frames, mut disk_writes) = (Vec::new(), Vec::new());
        vm.checkpoint(&mut cp, &mut || {
            frames = outbox.seal();
            disk_writes = std::mem::take(&mut *writes.0.lock().unwrap());
        })
        .expect("checkpoint");
        commit(
            &replica,
            &Epoch {
                frames: cp.frames.clone(),
                pages: cp.pages.clone(),
                state: cp.state.clone(),
                writes: disk_writes,
            },
        );
        // Output commit: the epoch is on the replica, its frames may go.
        common::release(&mut tap, frames);
        epoch += 1;
        fs::write(dir.join("progress.tmp"), epoch.to_string()).unwrap();
        fs::rename(dir.join("progress.tmp"), dir.join("progress")).unwrap();
    }
}

/// Not a test on its own: the replica process (activates, runs until told
/// to stop).
#[test]
fn move_child_replica() {
    if std::env::var(ROLE).as_deref() != Ok("replica") {
        return;
    }
    let (dir, image) = child_paths().expect("child environment");
    let replica = dir.join("replica");
    replay(&replica);
    let memory = fs::read(replica.join("memory.img")).expect("memory.img");
    let state = fs::read(replica.join("state.bin")).expect("state.bin");
    let vm = kvm::restore(
        &spec(&image, &replica.join("disk.img")),
        &memory,
        &state,
        Seams::default(),
    )
    .expect("replica activates");
    fs::write(dir.join("activated"), b"1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !dir.join("stop").exists() && Instant::now() < deadline {
        assert!(
            !vm.wait(Duration::from_millis(20)),
            "replica VM ended: {:?}",
            vm.console_lines()
        );
    }
    vm.shutdown().expect("replica stops cleanly");
}

// ---------------------------------------------------------------------------
// The test.

/// Network namespaces named after this process, removed on drop (also
/// when the test fails).
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(roles: &[&str]) -> Namespaces {
        let pid = std::process::id();
        let names: Vec<String> = roles.iter().map(|r| format!("rw5mv-{pid}-{r}")).collect();
        let ns = Namespaces(Vec::new());
        let mut ns = ns;
        for n in names {
            common::ip(&["netns", "add", &n]);
            ns.0.push(n.clone());
            common::ip(&["-n", &n, "link", "set", "lo", "up"]);
        }
        ns
    }
    fn name(&self, i: usize) -> &str {
        &self.0[i]
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = hypervisor::netns::ip(&["netns", "del", n]);
        }
    }
}

fn sh(ns: &str, cmd: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{cmd:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread inside namespace `ns` (sockets it makes live there).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(format!("/var/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns on a valid namespace fd affects this thread only.
            let r =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_child(ns: &str, role: &str, dir: &Path, image: &Path, test: &str) -> ChildGuard {
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(IMAGE, image)
        .spawn()
        .expect("spawn VM process");
    ChildGuard(Some(child))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn progress(dir: &Path) -> u64 {
    fs::read_to_string(dir.join("progress"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Checks a counter byte stream value by value, across reads of any size.
struct CounterCheck {
    next: u64,
    partial: Vec<u8>,
}

impl CounterCheck {
    fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let whole = self.partial.len() / 8 * 8;
        for c in self.partial[..whole].chunks_exact(8) {
            let v = u64::from_be_bytes(c.try_into().unwrap());
            assert_eq!(v, self.next, "counter stream broken: gap or duplicate");
            self.next += 1;
        }
        self.partial.drain(..whole);
    }
}

#[test]
fn the_guest_moves_to_another_process_and_namespace_with_its_connections() {
    if std::env::var(ROLE).is_ok() || !common::require_kvm_root() {
        return;
    }
    let image = common::images().net.clone();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir(dir.join("replica")).unwrap();
    for d in [dir.join("primary-disk.img"), dir.join("replica/disk.img")] {
        File::create(d).unwrap().set_len(DISK_MIB << 20).unwrap();
    }

    let ns = Namespaces::new(&["a", "b", "c"]);
    let (a, b, c) = (ns.name(0), ns.name(1), ns.name(2));
    common::ip(&[
        "-n", c, "link", "add", "vca", "type", "veth", "peer", "name", "vac", "netns", a,
    ]);
    common::ip(&[
        "-n", c, "link", "add", "vcb", "type", "veth", "peer", "name", "vbc", "netns", b,
    ]);
    for (n, dev, addr) in [
        (c, "vca", "198.51.100.1/24"),
        (a, "vac", "198.51.100.2/24"),
        (c, "vcb", "203.0.113.1/24"),
        (b, "vbc", "203.0.113.2/24"),
    ] {
        common::ip(&["-n", n, "addr", "add", addr, "dev", dev]);
        common::ip(&["-n", n, "link", "set", dev, "up"]);
    }
    for n in [a, b, c] {
        sh(n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        sh(n, &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
        sh(n, &["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"]);
    }
    // Both sites offer the guest the same gateway (address and MAC).
    for n in [a, b] {
        in_netns(n, || common::persistent_tap(TAP, "192.0.2.1/24", TAP_MAC));
    }
    common::ip(&[
        "-n",
        b,
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "203.0.113.1",
    ]);
    common::ip(&[
        "-n",
        c,
        "route",
        "add",
        "192.0.2.10/32",
        "via",
        "198.51.100.2",
    ]);

    let mut primary = spawn_child(a, "primary", dir, &image, "move_child_primary");
    wait_for(
        "the primary's first checkpoints",
        Duration::from_secs(90),
        || {
            if let Some(Ok(Some(st))) = primary.0.as_mut().map(Child::try_wait) {
                panic!("primary process exited early: {st}");
            }
            progress(dir) >= 3
        },
    );

    let activated = AtomicBool::new(false);
    let keys = 10;
    let (phase1_tx, phase1_rx) = std::sync::mpsc::channel::<u64>();
    std::thread::scope(|s| {
        let client = s.spawn(|| {
            in_netns(c, || {
                let connect = |port| {
                    let s = TcpStream::connect_timeout(
                        &SocketAddr::from((GUEST, port)),
                        Duration::from_secs(20),
                    )
                    .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                    s
                };
                let mut counter = connect(9000);
                let kv = connect(7000);
                let mut kv_w = kv.try_clone().unwrap();
                let mut kv_r = BufReader::new(kv);
                let mut ask = |line: String| {
                    writeln!(kv_w, "{line}").expect("kv write");
                    let mut reply = String::new();
                    kv_r.read_line(&mut reply)
                        .expect("kv read (connection must survive)");
                    reply.trim_end().to_string()
                };
                let mut check = CounterCheck {
                    next: 0,
                    partial: Vec::new(),
                };
                let mut buf = vec![0u8; 64 * 1024];
                let mut read_some = |check: &mut CounterCheck, n: u64| {
                    let target = check.next + n;
                    while check.next < target {
                        let got = counter
                            .read(&mut buf)
                            .expect("counter read (no reset allowed)");
                        assert!(got > 0, "counter connection closed");
                        check.feed(&buf[..got]);
                    }
                };
                read_some(&mut check, 50_000);
                for i in 0..keys {
                    assert_eq!(ask(format!("SET move{i} v{i}")), "OK");
                }
                read_some(&mut check, 50_000);
                phase1_tx.send(check.next).unwrap();
                // Across the kill and the activation: keep reading.
                let deadline = Instant::now() + Duration::from_secs(120);
                while !activated.load(Ordering::Acquire) {
                    assert!(Instant::now() < deadline, "replica never activated");
                    read_some(&mut check, 1000);
                }
                read_some(&mut check, 200_000);
                let values: Vec<String> = (0..keys).map(|i| ask(format!("GET move{i}"))).collect();
                (check.next, values)
            })
        });

        let before_kill = phase1_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("client phase 1 (connections, acknowledged writes)");
        let epochs = progress(dir);
        let mut p = primary.0.take().unwrap();
        p.kill().expect("SIGKILL the primary");
        p.wait().unwrap();
        eprintln!("primary SIGKILLed after {epochs}+ epochs, client at counter {before_kill}");

        common::ip(&[
            "-n",
            c,
            "route",
            "replace",
            "192.0.2.10/32",
            "via",
            "203.0.113.2",
        ]);
        let mut replica = spawn_child(b, "replica", dir, &image, "move_child_replica");
        wait_for("the replica's activation", Duration::from_secs(60), || {
            if let Some(Ok(Some(st))) = replica.0.as_mut().map(Child::try_wait) {
                panic!("replica process exited early: {st}");
            }
            dir.join("activated").exists()
        });
        activated.store(true, Ordering::Release);

        let (counter_end, values) = client
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        eprintln!("counter continued to {counter_end} without gap or duplicate");
        for (i, v) in values.iter().enumerate() {
            assert_eq!(v, &format!("VALUE v{i}"), "acknowledged write move{i} lost");
        }
        let disk = fs::read(dir.join("replica/disk.img")).unwrap();
        for i in 0..keys {
            let key = format!("move{i}");
            assert!(
                disk.chunks(512)
                    .any(|s| s.starts_with(b"KV01") && s[8..].starts_with(key.as_bytes())),
                "acknowledged write {key} is not on the replica's disk"
            );
        }
        fs::write(dir.join("stop"), b"1").unwrap();
        let mut r = replica.0.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = r.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = r.kill();
                let _ = r.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.is_some_and(|s| s.success()),
            "replica process did not stop cleanly: {status:?}"
        );
    });
}
