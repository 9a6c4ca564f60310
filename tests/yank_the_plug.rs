//! "Yank the plug", end to end, with the real binary and real daemons: five
//! network namespaces (a client, a router, the sites dc1 and dc2, the
//! witness), BIRD 2 on the router with BGP sessions to dc1 and dc2 exporting
//! into the router's kernel table, `remus-wan protect` at dc1 replicating a
//! micro-VM (KVM, smoltcp guest) to `remus-wan standby` at dc2 over a WAN
//! emulator (20 ms RTT), `remus-wan witness` at the third site. The client
//! reaches the guest (192.0.2.10) only through the router, via whichever
//! site announced 192.0.2.10/32.
//!
//! ```text
//!   client 203.0.113.2 ── .1 router ──.1  198.51.100.0/30  .2── dc1 ─ tap 192.0.2.1 ─ guest 192.0.2.10
//!                         (BIRD)  ──.5  198.51.100.4/30  .6── dc2 ─ tap 192.0.2.1 ─ (replica)
//!                                 ──.9  198.51.100.8/30 .10── witness
//! ```
//!
//! dc1 dials dc2's `connect` address, the WAN emulator's listening socket
//! at dc2's edge (198.51.100.6:7720), which relays to the standby
//! (127.0.0.1:7702) with 10 ms each way. The emulator relays from a socket
//! bound on its upstream's address, so it has to live where that address
//! is local: it runs on a thread that entered dc2's namespace, which is
//! still the only path between dc1 and dc2, and cutting it cuts exactly the
//! dc1↔dc2 link (witness traffic and BGP do not cross it).
//!
//! Scenarios (one at a time; each builds its own topology, torn down by
//! drop guards even when it fails):
//! 1. dc1 is killed (SIGKILL, links cut): dc2 promotes, BIRD's route moves
//!    to dc2, the client's same TCP connection goes on with no gap or
//!    duplicate, acknowledged key-value writes are there; the failover
//!    figures are printed.
//! 2. dc1↔dc2 cut only: no takeover, dc1 keeps serving (protection lost).
//! 3. dc1 cut from everything but alive: dc1 fences, dc2 takes over, the
//!    client's stream shows no second active site.
//! 4. the witness killed: nothing changes while dc1 and dc2 see each other.
//! 5. after 3., dc1's link comes back: the stale primary neither announces
//!    nor serves; the route and the client stay with dc2.
//! 6. scenario 1 with a real Linux guest in QEMU (`backend = "qemu"`, issue 9)
//!    instead of the micro-VM: its request/response counter (port 7000,
//!    "next" → the next value) answers the client's same TCP connection
//!    with the very next value once dc2 took over.
//! 7. scenario 1 with etcd as the arbiter (`[witness] backend = "etcd"`,
//!    issue 15): the witness site's namespace runs a three-member etcd
//!    cluster (198.51.100.10, ports 2379/2479/2579) instead of `remus-wan
//!    witness`, with etcd's whole-second lease timers; first one member
//!    (the leader) is killed while protected and nothing changes, then dc1
//!    is yanked and dc2 takes the lease from etcd.
//!
//! Needs root, /dev/kvm, `ip`, `bird` and `birdc` (Debian `bird2`); the
//! etcd scenario also `etcd` and `etcdctl` (Debian etcd-server and
//! etcd-client, `cargo xtask deps`); the Linux scenario needs QEMU
//! (Debian `qemu-system-x86`) and the Linux guest image (`cargo xtask
//! guest-image --linux`) instead of /dev/kvm (QEMU falls back to TCG). Fails with a clear message without them unless
//! REMUS_WAN_ALLOW_SKIP=1.

#[path = "support/etcd.rs"]
mod etcd_cluster;
mod support;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use hypervisor::qemu::LinuxImage;
use remus_wan::testbed::CounterCheck;
use support::wan::{Wan, WanSpec};
use support::{ip, ip_in, output, tail, verdict, which, Proc, HARD_LIMIT};

// ---------------------------------------------------------------- constants

/// Failover timers of the deployment (the config's [failover]) with the
/// built-in witness; etcd's are [`ETCD_TIMERS`].
const HEARTBEAT_MS: u64 = 100;
const DETECTION_MS: u64 = 1000;
const LEASE_MS: u64 = 800;
const RENEW_MS: u64 = 200;
const CLOCK_MARGIN_MS: u64 = 50;
const EPOCH_MS: u64 = 50;
const WAN_RTT: Duration = Duration::from_millis(20);

const GUEST: &str = "192.0.2.10";
const PREFIX: &str = "192.0.2.10/32";
const TAP: &str = "rwytap0";
/// Both sites' taps carry the same gateway address and the same MAC, so the
/// resumed guest's neighbour entry for its gateway stays right after the move.
const TAP_MAC: &str = "02:72:77:00:00:01";
const GUEST_MAC: &str = "52:54:00:12:36:21";

const ROUTER_CLIENT: &str = "203.0.113.1";
const CLIENT: &str = "203.0.113.2";
const ROUTER_DC1: &str = "198.51.100.1";
const DC1: &str = "198.51.100.2";
const ROUTER_DC2: &str = "198.51.100.5";
const DC2: &str = "198.51.100.6";
const ROUTER_WITNESS: &str = "198.51.100.9";
const WITNESS: &str = "198.51.100.10";

const DC1_PORT: u16 = 7701;
const DC2_PORT: u16 = 7702;
const EMULATOR_PORT: u16 = 7720;
const WITNESS_PORT: u16 = 7710;

const ROUTER_AS: u32 = 64500;
const SITE_AS: u32 = 64512;

/// Counter values far beyond what the client's 32 KiB window (4096 values)
/// and anything in flight could hold: they were produced after the event.
const WELL_BEYOND_WINDOW: u64 = 50_000;

/// Half the detection timeout: a silence this long after a kill or cut
/// ends with the first bytes from the new site (see `first_after_silence`).
const NEW_SITE_SILENCE: Duration = Duration::from_millis(DETECTION_MS / 2);

/// The failover timers a scenario's configuration says.
#[derive(Debug, Clone, Copy)]
struct Timers {
    heartbeat_ms: u64,
    detection_ms: u64,
    lease_ms: u64,
    renew_ms: u64,
}

const WITNESS_TIMERS: Timers = Timers {
    heartbeat_ms: HEARTBEAT_MS,
    detection_ms: DETECTION_MS,
    lease_ms: LEASE_MS,
    renew_ms: RENEW_MS,
};

/// etcd's lease TTLs are whole seconds, 2 s at least (as in
/// tests/etcd_e2e.rs and configs/etcd-witness.toml).
const ETCD_TIMERS: Timers = Timers {
    heartbeat_ms: 200,
    detection_ms: 3000,
    lease_ms: 2000,
    renew_ms: 500,
};

/// Who arbitrates the lease in a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArbiterKind {
    /// `remus-wan witness` at the witness site.
    Witness,
    /// A three-member etcd cluster at the witness site.
    Etcd,
}

impl ArbiterKind {
    fn timers(self) -> Timers {
        match self {
            ArbiterKind::Witness => WITNESS_TIMERS,
            ArbiterKind::Etcd => ETCD_TIMERS,
        }
    }
}

/// The running arbiter of a scenario; its processes are killed on drop.
enum Arbiter {
    Witness(Proc),
    Etcd(EtcdCluster),
}

// ---------------------------------------------------------------- preflight

/// What every scenario needs: root, `ip`, `bird`, `birdc`.
fn missing_common() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces, taps)".to_string());
    }
    for b in ["ip", "bird", "birdc"] {
        if which(b).is_none() {
            missing.push(format!("binary `{b}`"));
        }
    }
    missing
}

/// True when the test can run (the micro-VM scenarios); panics with what
/// is missing otherwise, unless REMUS_WAN_ALLOW_SKIP=1 (then prints a
/// skip notice).
fn preflight(test: &str) -> bool {
    let mut missing = missing_common();
    if !Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm".to_string());
    }
    verdict(
        test,
        &missing,
        "Debian packages bird2 and iproute2, e.g. via `cargo xtask test`; run as root on a host with KVM",
    )
}

/// The Linux guest's image when the QEMU scenario can run: what every
/// scenario needs, plus QEMU and the image (not /dev/kvm: QEMU runs the
/// guest under TCG without it). Panics or skips as [`preflight`] does.
fn preflight_linux(test: &str) -> Option<LinuxImage> {
    let mut missing = missing_common();
    if let Err(e) = hypervisor::qemu::available(Path::new("qemu-system-x86_64")) {
        missing.push(format!("QEMU ({e})"));
    }
    let image = LinuxImage::from_env_or_workspace()
        .map_err(|e| missing.push(format!("the Linux guest image ({e})")))
        .ok();
    let ok = verdict(
        test,
        &missing,
        "Debian packages bird2, iproute2 and qemu-system-x86 and the Linux guest image, \
         e.g. via `cargo xtask test`; run as root",
    );
    if ok {
        image
    } else {
        None
    }
}

/// The scenarios share the machine's two cores with KVM guests and
/// timing-sensitive failure detection: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------- commands

/// Runs `f` on a thread inside namespace `ns` (sockets it makes stay there).
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    wan::emulator::netns::in_netns(ns, f).unwrap_or_else(|e| panic!("entering netns {ns}: {e}"))
}

// ---------------------------------------------------------------- topology

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The five namespaces and their links; deleted (with every veth and tap
/// inside) on drop.
struct Net {
    client: String,
    router: String,
    dc1: String,
    dc2: String,
    witness: String,
}

/// Interface names live inside the namespaces, so they need not be unique.
const R_CLIENT: &str = "r-client";
const R_DC1: &str = "r-dc1";
const R_DC2: &str = "r-dc2";
const R_WITNESS: &str = "r-witness";
const UPLINK: &str = "uplink";

impl Net {
    fn create() -> Net {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let net = Net {
            client: format!("rwy{tag}-client"),
            router: format!("rwy{tag}-router"),
            dc1: format!("rwy{tag}-dc1"),
            dc2: format!("rwy{tag}-dc2"),
            witness: format!("rwy{tag}-witness"),
        };
        // The guard exists before the first namespace: a failure half-way
        // still deletes what was made.
        for ns in net.all() {
            ip(&["netns", "add", ns]);
            ip_in(ns, &["link", "set", "lo", "up"]);
        }
        let links = [
            (&net.client, R_CLIENT, ROUTER_CLIENT, CLIENT, 24),
            (&net.dc1, R_DC1, ROUTER_DC1, DC1, 30),
            (&net.dc2, R_DC2, ROUTER_DC2, DC2, 30),
            (&net.witness, R_WITNESS, ROUTER_WITNESS, WITNESS, 30),
        ];
        for (ns, rif, raddr, addr, len) in links {
            ip(&[
                "link",
                "add",
                rif,
                "netns",
                &net.router,
                "type",
                "veth",
                "peer",
                "name",
                UPLINK,
                "netns",
                ns,
            ]);
            ip_in(
                &net.router,
                &["addr", "add", &format!("{raddr}/{len}"), "dev", rif],
            );
            ip_in(&net.router, &["link", "set", rif, "up"]);
            ip_in(
                ns,
                &["addr", "add", &format!("{addr}/{len}"), "dev", UPLINK],
            );
            ip_in(ns, &["link", "set", UPLINK, "up"]);
            ip_in(ns, &["route", "add", "default", "via", raddr]);
        }
        for ns in [&net.router, &net.dc1, &net.dc2] {
            in_ns(ns, || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
                .unwrap_or_else(|e| panic!("ip_forward in {ns}: {e}"));
        }
        // Each site's persistent tap: same gateway address, same MAC.
        for ns in [&net.dc1, &net.dc2] {
            ip_in(ns, &["tuntap", "add", "dev", TAP, "mode", "tap"]);
            ip_in(ns, &["link", "set", "dev", TAP, "address", TAP_MAC]);
            ip_in(ns, &["addr", "add", "192.0.2.1/24", "dev", TAP]);
            ip_in(ns, &["link", "set", "dev", TAP, "up"]);
        }
        net
    }

    fn all(&self) -> [&String; 5] {
        [
            &self.client,
            &self.router,
            &self.dc1,
            &self.dc2,
            &self.witness,
        ]
    }

    /// Takes dc1's link down on both ends: dc1 reaches nobody, nobody reaches dc1.
    fn isolate_dc1(&self) {
        ip_in(&self.router, &["link", "set", R_DC1, "down"]);
        ip_in(&self.dc1, &["link", "set", UPLINK, "down"]);
    }

    /// SIGKILLs, by PID, every process living in namespace `ns` (all of
    /// them started by this test inside its own namespace); returns how many.
    fn kill_all_in(&self, ns: &str) -> usize {
        use std::os::unix::fs::MetadataExt;
        let Ok(target) = std::fs::metadata(format!("/var/run/netns/{ns}")) else {
            return 0;
        };
        let want = format!("net:[{}]", target.ino());
        let mut killed = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            let in_ns = std::fs::read_link(entry.path().join("ns/net"))
                .is_ok_and(|l| l.to_string_lossy() == want);
            if in_ns && pid != std::process::id() as libc::pid_t {
                // SAFETY: kill(2) by PID on a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
        killed
    }

    fn kernel_route(&self) -> String {
        output(Command::new("ip").args(["-n", &self.router, "route", "show", PREFIX]))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------- BIRD

/// BIRD 2 in the router namespace: passive BGP sessions to dc1 and dc2,
/// their routes exported to the router's kernel table.
struct Bird {
    /// Killed by PID on drop.
    _daemon: Proc,
    sock: PathBuf,
    dir: PathBuf,
}

impl Bird {
    fn start(net: &Net, dir: &Path) -> Bird {
        let conf = dir.join("bird.conf");
        let session = |name: &str, local: &str, neighbor: &str| {
            format!(
                "protocol bgp {name} {{\n  local {local} as {ROUTER_AS};\n  neighbor {neighbor} as {SITE_AS};\n  \
                 passive on;\n  hold time 6;\n  keepalive time 2;\n  connect retry time 1;\n  \
                 error wait time 1, 3;\n  ipv4 {{ import all; export none; }};\n}}\n"
            )
        };
        let text = format!(
            "log \"{log}\" all;\nrouter id {ROUTER_DC1};\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{\n  scan time 1;\n  ipv4 {{ import none; export all; }};\n}}\n{dc1}{dc2}",
            log = dir.join("bird.log").display(),
            dc1 = session("dc1", ROUTER_DC1, DC1),
            dc2 = session("dc2", ROUTER_DC2, DC2),
        );
        std::fs::write(&conf, text).expect("bird.conf");
        let sock = dir.join("bird.ctl");
        let conf_s = conf.display().to_string();
        let sock_s = sock.display().to_string();
        let mut proc = Proc::spawn_in(
            &net.router,
            "bird",
            &which("bird").expect("bird"),
            &["-f", "-c", &conf_s, "-s", &sock_s],
            &dir.join("bird.stdout"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(st) = proc.exited() {
                panic!("bird exited ({st}):\n{}", proc.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "bird made no control socket in 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Bird {
            _daemon: proc,
            sock,
            dir: dir.to_owned(),
        }
    }

    fn birdc(&self, args: &[&str]) -> String {
        output(
            Command::new(which("birdc").expect("birdc"))
                .arg("-s")
                .arg(&self.sock)
                .args(args),
        )
    }

    fn route(&self) -> String {
        self.birdc(&["show", "route", "for", PREFIX, "all"])
    }

    /// The site whose link address is the next hop of BIRD's best route.
    fn route_site(&self) -> Option<&'static str> {
        route_site(&self.route())
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- birdc show route for {PREFIX} all ---\n{}\n--- birdc show protocols all ---\n{}\n--- bird.log (tail) ---\n{}",
            self.route(),
            self.birdc(&["show", "protocols", "all"]),
            tail(&std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default(), 40),
        )
    }

    /// Polls until the best route points at `site`; the time it took.
    fn wait_route(&self, site: &str, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let deadline = start + limit.min(HARD_LIMIT);
        loop {
            if self.route_site() == Some(site) {
                return Ok(start.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "BIRD's route for {PREFIX} does not point at {site} after {limit:?}\n{}",
                    self.diagnostics()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Which site the first (best) route's `via` names in `birdc show route` output.
fn route_site(birdc: &str) -> Option<&'static str> {
    let via = birdc
        .lines()
        .find_map(|l| l.trim().strip_prefix("via "))?
        .split_whitespace()
        .next()?;
    match via {
        DC1 => Some("dc1"),
        DC2 => Some("dc2"),
        _ => None,
    }
}

// ---------------------------------------------------------------- WAN emulator

// ---------------------------------------------------------------- client

/// Connects from the client namespace with a 32 KiB receive buffer, so
/// what the client had buffered at any event is small and known.
fn connect_from(ns: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    in_ns(ns, || {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_recv_buffer_size(32 * 1024)?;
        sock.connect_timeout(&addr.into(), Duration::from_secs(1))?;
        Ok(sock.into())
    })
}

#[derive(Default)]
struct StreamState {
    check: CounterCheck,
    error: Option<String>,
    /// Set by [`Stream::mark`]: the instant of an event (a kill, a cut).
    mark: Option<Instant>,
    /// The instants of reads since the mark.
    reads: Vec<Instant>,
}

/// The counter connection, read by its own thread, checking every value
/// follows the previous one (no gap, no duplicate, no reset).
struct Stream {
    state: Arc<Mutex<StreamState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(mut conn: TcpStream) -> Stream {
        conn.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let state = Arc::new(Mutex::new(StreamState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let deadline = Instant::now() + HARD_LIMIT;
            while !sp.load(Ordering::SeqCst) && Instant::now() < deadline {
                let r = conn.read(&mut buf);
                let now = Instant::now();
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(0) => {
                        s.error = Some("counter connection closed by the guest".into());
                        return;
                    }
                    Ok(n) => {
                        if let Err(e) = s.check.feed(&buf[..n]) {
                            s.error = Some(e);
                            return;
                        }
                        if s.mark.is_some() && s.reads.len() < 4_000_000 {
                            s.reads.push(now);
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        s.error =
                            Some(format!("counter connection failed (no reset allowed): {e}"));
                        return;
                    }
                }
            }
        });
        Stream {
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next(&self) -> u64 {
        self.lock().check.next
    }

    fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// Waits until `want` more values arrived (true) or `limit` passed or
    /// the stream broke (false).
    fn wait_more(&self, want: u64, limit: Duration) -> bool {
        let target = self.next().saturating_add(want);
        let deadline = Instant::now() + limit.min(HARD_LIMIT);
        while Instant::now() < deadline {
            let s = self.lock();
            if s.error.is_some() {
                return false;
            }
            if s.check.next >= target {
                return true;
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Marks an event: reads from now on are timed against it.
    fn mark(&self, at: Instant) {
        let mut s = self.lock();
        s.mark = Some(at);
        s.reads.clear();
    }

    /// The longest silence since the mark (counting from the mark itself).
    fn longest_silence(&self) -> Option<Duration> {
        let s = self.lock();
        let mut prev = s.mark?;
        let mut best = None;
        for &t in &s.reads {
            let gap = t.saturating_duration_since(prev);
            if best.is_none_or(|g| gap > g) {
                best = Some(gap);
            }
            prev = t;
        }
        best
    }

    /// From the mark, the first read that follows a silence of at least
    /// `silence`. After a kill, what the old site had sent reaches the
    /// client within milliseconds (a veth away); the new site cannot answer
    /// before the detection timeout: with `silence` in between, this read
    /// brings the first bytes served by the new site.
    fn first_after_silence(&self, silence: Duration) -> Option<Duration> {
        let s = self.lock();
        let mark = s.mark?;
        let mut prev = mark;
        for &t in &s.reads {
            if t.saturating_duration_since(prev) >= silence {
                return Some(t.saturating_duration_since(mark));
            }
            prev = t;
        }
        None
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The key-value connection (port 7000): `SET k v` → `OK`, `GET k` → `VALUE v`.
struct Kv {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Kv {
    fn connect(ns: &str) -> Kv {
        let addr: SocketAddr = format!("{GUEST}:7000").parse().expect("addr");
        let w = connect_from(ns, addr).expect("key-value connection");
        w.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let r = BufReader::new(w.try_clone().expect("clone"));
        Kv { w, r }
    }

    fn call(&mut self, line: &str) -> String {
        writeln!(self.w, "{line}").unwrap_or_else(|e| panic!("key-value `{line}`: {e}"));
        let mut reply = String::new();
        self.r
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("key-value reply to `{line}`: {e}"));
        reply
    }
}

/// The Linux guest's counter connection (port 7000): one `next` line in,
/// the next value out. Every answer must be the previous one + 1 (no
/// gap, no duplicate, no reset).
struct Ask {
    w: TcpStream,
    r: BufReader<TcpStream>,
    /// The last value answered.
    last: Option<u64>,
    answers: u64,
}

impl Ask {
    /// Connects from namespace `ns`, retrying until `limit` (the guest
    /// boots under TCG), and asks a first value.
    fn connect(ns: &str, limit: Duration) -> Result<Ask, String> {
        let addr: SocketAddr = format!("{GUEST}:7000").parse().expect("addr");
        let deadline = Instant::now() + limit.min(HARD_LIMIT);
        let w = loop {
            match connect_from(ns, addr) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "the Linux guest never answered on {addr} within {limit:?}: {e}"
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        // Beyond any takeover: a missing answer fails, it does not hang.
        w.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| format!("read timeout: {e}"))?;
        let r = BufReader::new(w.try_clone().map_err(|e| format!("clone: {e}"))?);
        let mut ask = Ask {
            w,
            r,
            last: None,
            answers: 0,
        };
        ask.next()?;
        Ok(ask)
    }

    /// Asks for the next value; Err if the connection failed or the value
    /// does not follow the last one.
    fn next(&mut self) -> Result<u64, String> {
        self.w
            .write_all(b"next\n")
            .map_err(|e| format!("sending `next` (no reset allowed): {e}"))?;
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => return Err("counter connection closed by the guest".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("no answer to `next` (no reset allowed): {e}")),
        }
        let v: u64 = line
            .trim()
            .parse()
            .map_err(|e| format!("counter answer {line:?}: {e}"))?;
        if let Some(last) = self.last {
            if v != last + 1 {
                return Err(format!("the counter went from {last} to {v}"));
            }
        }
        self.last = Some(v);
        self.answers += 1;
        Ok(v)
    }
}

// ---------------------------------------------------------------- deployment

/// The protected guest of a scenario.
#[derive(Debug, Clone)]
enum Guest {
    /// The KVM micro-VM (smoltcp): a streaming counter on port 9000, a
    /// key-value service on 7000 backed by its replicated disk.
    MicroVm,
    /// A Linux guest in QEMU (`backend = "qemu"`, busybox userland, no
    /// disk): a request/response counter on port 7000.
    Linux(LinuxImage),
}

impl Guest {
    /// The replication epoch: a Linux guest under TCG dirties more per
    /// epoch than the micro-VM, so it takes longer epochs (as in
    /// tests/qemu_e2e.rs).
    fn epoch_ms(&self) -> u64 {
        match self {
            Guest::MicroVm => EPOCH_MS,
            Guest::Linux(_) => 200,
        }
    }

    /// How long the protected VM may take to boot, sync and be announced.
    fn start_limit(&self) -> Duration {
        match self {
            Guest::MicroVm => Duration::from_secs(90),
            // Boots under TCG in ~10-20 s on an idle machine; generous.
            Guest::Linux(_) => Duration::from_secs(180),
        }
    }
}

/// One scenario's world. Fields drop in order: the client first, then the
/// remus-wan processes, BIRD, the emulator, the namespaces, the files.
struct World {
    /// The micro-VM's counter stream (port 9000).
    stream: Option<Stream>,
    /// The Linux guest's counter connection (port 7000).
    ask: Option<Ask>,
    protect: Proc,
    standby: Proc,
    arbiter: Arbiter,
    /// The failover timers of the configuration.
    timers: Timers,
    bird: Bird,
    wan: Wan,
    net: Net,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The `[[vms]]` lines that depend on the guest kind.
fn vm_lines(dir: &Path, guest: &Guest, micro_vm_image: Option<&Path>) -> String {
    match guest {
        Guest::MicroVm => format!(
            "guest_image = \"{image}\"\nmemory_mib = 64\ndisk = \"{disk}\"\n",
            image = micro_vm_image.expect("micro-VM image").display(),
            disk = dir.join("web1.img").display(),
        ),
        // No disk: the qemu backend replicates memory, CPU and devices. A
        // real-sized 1 GiB guest (kernel write tracking: the pause follows
        // the pages written).
        Guest::Linux(image) => format!(
            "backend = \"qemu\"\nkernel = \"{}\"\ninitramfs = \"{}\"\nmemory_mib = 1024\n",
            image.kernel.display(),
            image.initrd.display()
        ),
    }
}

/// The `[witness]` table: the built-in witness at the witness site, or
/// etcd at `endpoints`.
fn witness_lines(dir: &Path, etcd_endpoints: Option<&[String]>) -> String {
    match etcd_endpoints {
        None => {
            let pki = dir.join("pki");
            format!(
                "[witness]\nname = \"witness\"\nlisten = \"{WITNESS}:{WITNESS_PORT}\"\n[witness.tls]\n\
                 ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                pki.join("ca.pem").display(),
                pki.join("witness.pem").display(),
                pki.join("witness.key").display()
            )
        }
        Some(endpoints) => {
            let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
            format!(
                "[witness]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/remus-wan-yank\"\n",
                list.join(", ")
            )
        }
    }
}

fn config_text(dir: &Path, guest: &Guest, vm: &str, timers: Timers, witness: &str) -> String {
    let pki = dir.join("pki");
    let tls = |name: &str| {
        format!(
            "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.join("ca.pem").display(),
            pki.join(format!("{name}.pem")).display(),
            pki.join(format!("{name}.key")).display()
        )
    };
    let speaker = |site: &str, addr: &str, router: &str| {
        format!(
            "[[netops.bgp.speakers]]\nsite = \"{site}\"\nlocal_as = {SITE_AS}\nrouter_id = \"{addr}\"\n\
             [[netops.bgp.speakers.peers]]\naddress = \"{router}\"\nremote_as = {ROUTER_AS}\n\
             mode = \"active\"\nnext_hop_v4 = \"{addr}\"\n\n"
        )
    };
    format!(
        "[replication]\nepoch_interval_ms = {epoch}\nmax_epochs_in_flight = 4\n\n\
         [failover]\nheartbeat_ms = {heartbeat}\ndetection_timeout_ms = {detection}\n\
         lease_ms = {lease}\nrenew_ms = {renew}\nclock_margin_ms = {CLOCK_MARGIN_MS}\n\n\
         [[sites]]\nname = \"dc1\"\nlisten = \"{DC1}:{DC1_PORT}\"\n[sites.tls]\n{dc1_tls}\n\
         [[sites]]\nname = \"dc2\"\nlisten = \"0.0.0.0:{DC2_PORT}\"\nconnect = \"{DC2}:{EMULATOR_PORT}\"\n\
         [sites.tls]\n{dc2_tls}\n\
         {witness}\n\
         [[vms]]\nname = \"web1\"\nprimary = \"dc1\"\nbackup = \"dc2\"\n\
         {vm}service_prefixes = [\"{PREFIX}\"]\n\
         [vms.network]\ntap = \"{TAP}\"\nmac = \"{GUEST_MAC}\"\naddress = \"{GUEST}/24\"\ngateway = \"192.0.2.1\"\n\n\
         [netops.bgp]\nhold_time_s = 6\nconnect_retry_s = 1\nstandby = \"none\"\n\n{s1}{s2}",
        epoch = guest.epoch_ms(),
        heartbeat = timers.heartbeat_ms,
        detection = timers.detection_ms,
        lease = timers.lease_ms,
        renew = timers.renew_ms,
        dc1_tls = tls("dc1"),
        dc2_tls = tls("dc2"),
        s1 = speaker("dc1", DC1, ROUTER_DC1),
        s2 = speaker("dc2", DC2, ROUTER_DC2),
    )
}

impl World {
    /// Topology, daemons (the lease arbitrated by `arbiter` at the witness
    /// site), the protected VM, and the client's counter (the micro-VM's
    /// stream, or the Linux guest's request/response connection) working
    /// through the route dc1 announced.
    fn start(test: &str, guest: &Guest, arbiter: ArbiterKind) -> World {
        let micro_vm_image = match guest {
            Guest::MicroVm => Some(
                hypervisor::guest_build::from_env_or_build(
                    &Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build"),
                )
                .expect("guest images (cargo xtask guest-image)")
                .net,
            ),
            Guest::Linux(_) => None,
        };
        let tmp = tempfile::Builder::new()
            .prefix("yank-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_owned();
        support::pki(&dir.join("pki"), &["dc1", "dc2", "witness"]);
        if let Guest::MicroVm = guest {
            File::create(dir.join("web1.img"))
                .and_then(|f| f.set_len(4 << 20))
                .expect("disk image");
        }
        let cfg = dir.join("deployment.toml");
        let cfg_s = cfg.display().to_string();
        let s = |p: &str| dir.join(p).display().to_string();

        let net = Net::create();
        eprintln!(
            "[{test}] namespaces {:?}, files in {}",
            net.all(),
            dir.display()
        );
        let bird = Bird::start(&net, &dir);
        let wan = Wan::start(WanSpec {
            netns: Some(net.dc2.clone()),
            listen: format!("{DC2}:{EMULATOR_PORT}").parse().expect("addr"),
            upstream: SocketAddr::from(([127, 0, 0, 1], DC2_PORT)),
            rtt: WAN_RTT,
        });
        // etcd first: the configuration names its endpoints.
        let cluster = (arbiter == ArbiterKind::Etcd)
            .then(|| EtcdCluster::start_in(&dir.join("etcd"), &net.witness, WITNESS));
        let endpoints = cluster.as_ref().map(EtcdCluster::endpoints);
        let vm = vm_lines(&dir, guest, micro_vm_image.as_deref());
        let witness = witness_lines(&dir, endpoints.as_deref());
        let timers = arbiter.timers();
        std::fs::write(&cfg, config_text(&dir, guest, &vm, timers, &witness)).expect("config");
        let arbiter = match cluster {
            Some(cluster) => {
                eprintln!(
                    "[{test}] etcd cluster in {} at {:?}",
                    net.witness,
                    cluster.endpoints()
                );
                Arbiter::Etcd(cluster)
            }
            None => {
                let mut witness = Proc::remus_in(
                    &net.witness,
                    "witness",
                    &[
                        "witness",
                        "--config",
                        &cfg_s,
                        "--state-dir",
                        &s("witness-state"),
                    ],
                    &dir.join("witness.log"),
                );
                witness
                    .wait_log("witness listening", Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("{e}\n{}", witness.log_text()));
                Arbiter::Witness(witness)
            }
        };
        let mut standby = Proc::remus_in(
            &net.dc2,
            "standby",
            &[
                "standby",
                "--config",
                &cfg_s,
                "--site",
                "dc2",
                "--state-dir",
                &s("dc2-state"),
                "--metrics",
                "127.0.0.1:9478",
            ],
            &dir.join("standby.log"),
        );
        standby
            .wait_log("standby listening", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", standby.log_text()));
        let protect = Proc::remus_in(
            &net.dc1,
            "protect",
            &[
                "protect",
                "web1",
                "--site",
                "dc2",
                "--config",
                &cfg_s,
                "--metrics",
                "127.0.0.1:9477",
                "--console-log",
                &s("console-dc1.log"),
            ],
            &dir.join("protect.log"),
        );
        let mut w = World {
            stream: None,
            ask: None,
            protect,
            standby,
            arbiter,
            timers,
            bird,
            wan,
            net,
            dir,
            _tmp: tmp,
        };
        // dc1 holds the lease and announces the prefix: the only way in.
        if let Err(e) = w.bird.wait_route("dc1", guest.start_limit()) {
            panic!("dc1 never announced {PREFIX}: {e}\n{}", w.logs());
        }
        if let Guest::Linux(_) = guest {
            let started = Instant::now();
            match Ask::connect(&w.net.client, guest.start_limit()) {
                Ok(a) => w.ask = Some(a),
                Err(e) => panic!("{e}\n{}", w.logs()),
            }
            for _ in 0..10 {
                w.ask("while protected");
            }
            eprintln!(
                "[{test}] protected: route via dc1, the Linux guest's counter answered (at {}; port 7000 answered {} ms after the route)",
                w.ask.as_ref().and_then(|a| a.last).unwrap_or_default(),
                started.elapsed().as_millis()
            );
            return w;
        }
        let addr: SocketAddr = format!("{GUEST}:9000").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(60);
        let conn = loop {
            match connect_from(&w.net.client, addr) {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    panic!("the client never reached {addr}: {e}\n{}", w.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        w.stream = Some(Stream::start(conn));
        if !w.stream().wait_more(5_000, Duration::from_secs(60)) {
            panic!(
                "the counter does not flow while protected (at {}; {:?})\n{}",
                w.stream().next(),
                w.stream().error(),
                w.logs()
            );
        }
        eprintln!(
            "[{test}] protected: route via dc1, counter streaming ({} values so far)",
            w.stream().next()
        );
        w
    }

    fn stream(&self) -> &Stream {
        self.stream.as_ref().expect("stream started")
    }

    /// The built-in witness's process.
    fn witness(&mut self) -> &mut Proc {
        match &mut self.arbiter {
            Arbiter::Witness(p) => p,
            Arbiter::Etcd(_) => panic!("this scenario's arbiter is etcd, not the witness"),
        }
    }

    /// Asks the Linux guest's counter for its next value or fails with the
    /// logs.
    fn ask(&mut self, when: &str) -> u64 {
        let r = self.ask.as_mut().expect("counter connection").next();
        r.unwrap_or_else(|e| panic!("{when}: {e}\n{}", self.logs()))
    }

    /// Everything one needs to see why a scenario failed.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut procs = vec![&self.protect, &self.standby];
        if let Arbiter::Witness(w) = &self.arbiter {
            procs.push(w);
        }
        for p in procs {
            out.push_str(&format!(
                "--- {} log ({}) ---\n{}\n",
                p.name,
                p.log_path().display(),
                tail(&p.log_text(), 60)
            ));
        }
        if let Arbiter::Etcd(c) = &self.arbiter {
            out.push_str(&format!("--- etcd members ---\n{}\n", c.logs()));
        }
        out.push_str(&self.bird.diagnostics());
        out.push_str(&format!(
            "\n--- router kernel route ---\n{}",
            self.net.kernel_route()
        ));
        // The micro-VM's console (QEMU keeps its own under the system's
        // temporary folder).
        if let Ok(console) = std::fs::read_to_string(self.dir.join("console-dc1.log")) {
            out.push_str(&format!(
                "\n--- dc1 guest console ---\n{}\n",
                tail(&console, 20)
            ));
        }
        out
    }

    /// Fails with the logs when the client's stream broke.
    fn assert_stream_intact(&self, when: &str) {
        if let Some(e) = self.stream().error() {
            panic!("{when}: {e}\n{}", self.logs());
        }
    }

    /// Waits for `want` more counter values or fails with the logs.
    fn expect_flow(&self, want: u64, limit: Duration, when: &str) {
        let from = self.stream().next();
        if !self.stream().wait_more(want, limit) {
            panic!(
                "{when}: the counter went from {from} to only {} within {limit:?} ({})\n{}",
                self.stream().next(),
                self.stream()
                    .error()
                    .unwrap_or_else(|| "no stream error".into()),
                self.logs()
            );
        }
    }

    /// Checks for `window` that dc2 does not take over and dc1 keeps the
    /// route, the counter still flowing; returns how many values arrived.
    fn hold_steady(&mut self, window: Duration, what: &str) -> u64 {
        let from = self.stream().next();
        let deadline = Instant::now() + window;
        while Instant::now() < deadline {
            if self.standby.log_text().contains("takeover complete") {
                panic!("{what}: dc2 took over\n{}", self.logs());
            }
            if let Some(st) = self.standby.exited() {
                panic!("{what}: the standby exited ({st})\n{}", self.logs());
            }
            self.assert_stream_intact(what);
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.bird.route_site() != Some("dc1") {
            panic!(
                "{what}: BIRD's route no longer points at dc1\n{}",
                self.logs()
            );
        }
        self.stream().next() - from
    }
}

/// A log line saying the site fenced itself (not that it un-fenced).
fn is_fence_line(line: &str) -> bool {
    line.contains("fenced") && !line.contains("unfenced")
}

/// The text without terminal colour sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses `key=value` fields of the standby's `takeover complete` line
/// (text logs; JSON `"key":value` too).
fn takeover_breakdown(log: &str) -> Option<Vec<(&'static str, String)>> {
    let line = strip_ansi(log.lines().find(|l| l.contains("takeover complete"))?);
    let fields = [
        "detection_ms",
        "arbitration_ms",
        "activation_ms",
        "announce_ms",
    ];
    Some(
        fields
            .iter()
            .map(|&k| {
                let v = line
                    .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
                    .find_map(|w| {
                        w.strip_prefix(k)
                            .and_then(|r| r.strip_prefix('=').or_else(|| r.strip_prefix("\":")))
                    })
                    .map(|v| {
                        let v = v.trim_matches('"');
                        // Durations come as fractional milliseconds.
                        v.parse::<f64>()
                            .map(|f| format!("{f:.1}"))
                            .unwrap_or_else(|_| v.to_string())
                    })
                    .unwrap_or_else(|| "?".into());
                (k, v)
            })
            .collect(),
    )
}

/// A duration as whole milliseconds, for the printed figures.
fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{} ms", d.as_millis()))
        .unwrap_or_else(|| "n/a".into())
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    t ^ std::process::id() as u64
}

// ---------------------------------------------------------------- scenarios

/// dc1 dies abruptly: every dc1 process SIGKILLed, its links cut.
#[test]
fn yank_the_plug_on_dc1_moves_the_vm_to_dc2_with_its_connections() {
    if !preflight("yank_the_plug") {
        return;
    }
    kill_dc1("kill dc1", &Guest::MicroVm, ArbiterKind::Witness);
}

/// The same with etcd as the arbiter (issue 15): a three-member cluster at
/// the witness site; one member killed first changes nothing, then dc2
/// takes the lease from etcd once dc1 is gone.
#[cfg(feature = "etcd")]
#[test]
fn yank_the_plug_on_dc1_with_etcd_as_the_arbiter() {
    if !(preflight("yank_the_plug_etcd") && etcd_cluster::require_etcd("yank_the_plug_etcd")) {
        return;
    }
    kill_dc1("kill dc1, etcd", &Guest::MicroVm, ArbiterKind::Etcd);
}

/// The same with a real Linux guest in QEMU (issue 9): its counter answers
/// the client's same connection with the next value from dc2.
#[test]
fn yank_the_plug_on_dc1_moves_the_linux_guest_to_dc2_with_its_connection() {
    let Some(image) = preflight_linux("yank_the_plug_linux") else {
        return;
    };
    kill_dc1(
        "kill dc1, Linux guest",
        &Guest::Linux(image),
        ArbiterKind::Witness,
    );
}

/// The client's connections before the kill, as the guest kind has them.
enum Before {
    /// The micro-VM: key-value writes acknowledged, the stream's position.
    MicroVm { kv: Kv, acked: u64, at: u64 },
    /// The Linux guest: the last counter value answered.
    Linux { last: u64 },
}

/// Scenario 1 with either guest and either arbiter: kill dc1 at a random
/// moment, check dc2 takes over, the route moves and the client's
/// connection continues; prints the figures. With etcd, one member (the
/// leader) is killed first, and nothing may change.
fn kill_dc1(tag: &str, guest: &Guest, arbiter: ArbiterKind) {
    let _serial = lock();
    let mut w = World::start(tag, guest, arbiter);
    if arbiter == ArbiterKind::Etcd {
        lose_an_etcd_member(tag, &mut w);
    }
    // The client works until a random moment.
    let seed = seed();
    let kill_after = Duration::from_millis(800 + seed % 1500);
    let until = Instant::now() + kill_after;
    let before = match guest {
        Guest::MicroVm => {
            // Acknowledged writes.
            let mut kv = Kv::connect(&w.net.client);
            let mut acked = 0u64;
            while Instant::now() < until {
                let reply = kv.call(&format!("SET key{acked} value{acked}"));
                assert_eq!(reply, "OK\n", "SET key{acked}");
                acked += 1;
            }
            w.assert_stream_intact("before the kill");
            Before::MicroVm {
                kv,
                acked,
                at: w.stream().next(),
            }
        }
        Guest::Linux(_) => {
            // Consecutive answers (each one released after its checkpoint
            // was committed at dc2).
            let mut last = w.ask("while protected");
            while Instant::now() < until {
                last = w.ask("while protected");
            }
            Before::Linux { last }
        }
    };

    let kill = Instant::now();
    if w.stream.is_some() {
        w.stream().mark(kill);
    }
    let killed = w.net.kill_all_in(&w.net.dc1.clone());
    w.protect.kill();
    w.net.isolate_dc1();
    let what = match &before {
        Before::MicroVm { acked, at, .. } => {
            format!("{acked} writes acknowledged, client at counter {at}")
        }
        Before::Linux { last } => format!("the client's last answer was {last}"),
    };
    eprintln!(
        "[{tag}] dc1 killed after {kill_after:?} (seed {seed}; {killed} processes SIGKILLed, links down): {what}"
    );
    // The Linux guest's client asks right away, on its own thread: the
    // request goes out while dc1 is dead; only the guest resumed at dc2
    // can answer it.
    let asker = w.ask.take().map(|mut ask| {
        std::thread::spawn(move || {
            let r = ask.next();
            (r, kill.elapsed(), ask)
        })
    });

    // dc2 promotes by itself and moves the prefix.
    let route_time = match w.bird.wait_route("dc2", Duration::from_secs(60)) {
        Ok(_) => kill.elapsed(),
        Err(e) => panic!("{e}\n{}", w.logs()),
    };
    if let Err(e) = w
        .standby
        .wait_log("takeover complete", Duration::from_secs(30))
    {
        panic!("{e}\n{}", w.logs());
    }
    let first_answer = match (before, asker) {
        (Before::MicroVm { mut kv, acked, at }, _) => {
            // Far more than the client's window could have held at the
            // kill: these values come from the guest resumed at dc2, on the
            // same connection.
            w.expect_flow(
                WELL_BEYOND_WINDOW,
                Duration::from_secs(60),
                "after the takeover",
            );
            w.assert_stream_intact("after the takeover");
            eprintln!(
                "[{tag}] same TCP connection continued from {at} to {} with no gap or duplicate",
                w.stream().next()
            );
            // Every acknowledged write is on the resumed guest's disk, over
            // the same key-value connection.
            for k in [0, acked / 2, acked.saturating_sub(1)] {
                let reply = kv.call(&format!("GET key{k}"));
                assert_eq!(
                    reply,
                    format!("VALUE value{k}\n"),
                    "acknowledged SET key{k} lost\n{}",
                    w.logs()
                );
            }
            eprintln!("[{tag}] {acked} acknowledged key-value writes survived the takeover");
            None
        }
        (Before::Linux { last }, Some(asker)) => {
            let (r, after, ask) = asker.join().expect("asking thread");
            w.ask = Some(ask);
            let v =
                r.unwrap_or_else(|e| panic!("the first request after the kill: {e}\n{}", w.logs()));
            assert_eq!(v, last + 1, "after the takeover\n{}", w.logs());
            let mut next = v;
            for _ in 0..20 {
                next = w.ask("after the takeover");
            }
            let answers = w.ask.as_ref().map_or(0, |a| a.answers);
            eprintln!(
                "[{tag}] same TCP connection ({answers} answers): last answer {last} from dc1, then {v}..={next} from dc2, consecutive"
            );
            Some(after)
        }
        (Before::Linux { .. }, None) => unreachable!("the Linux guest has a counter connection"),
    };

    eprintln!("[{tag}] figures (printed, never asserted):");
    match first_answer {
        Some(after) => {
            eprintln!(
                "  kill -> first answer from dc2      {:>8}",
                ms(Some(after))
            );
        }
        None => {
            let silence = Duration::from_millis(w.timers.detection_ms / 2);
            let first_byte = ms(w.stream().first_after_silence(silence));
            let outage = ms(w.stream().longest_silence());
            eprintln!("  kill -> first byte served by dc2   {first_byte:>8}");
            eprintln!("  longest silence seen by the client {outage:>8}");
        }
    }
    eprintln!(
        "  kill -> BIRD route via dc2         {:>8}",
        ms(Some(route_time))
    );
    match takeover_breakdown(&w.standby.log_text()) {
        Some(fields) => {
            for (k, v) in fields {
                eprintln!("  standby {k:<16} {v:>8} ms");
            }
        }
        None => eprintln!("  (no `takeover complete` line to break down)"),
    }
    eprintln!("  router kernel route: {}", w.net.kernel_route().trim());
    if arbiter == ArbiterKind::Etcd {
        let log = w.standby.log_text();
        assert!(
            log.contains("etcd lease taken"),
            "dc2 took over without taking the lease from etcd?\n{}",
            w.logs()
        );
        eprintln!("[{tag}] dc2 took the lease from etcd (2 of 3 members live)");
    }
}

/// etcd's leader is SIGKILLed while dc1 is protected: the other two elect
/// a new one, and nothing changes for the client (no takeover, no fencing,
/// the route stays with dc1, the stream goes on) over two lease periods.
fn lose_an_etcd_member(tag: &str, w: &mut World) {
    let Arbiter::Etcd(cluster) = &mut w.arbiter else {
        unreachable!("an etcd scenario");
    };
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let kill = Instant::now();
    if let Some(stream) = &w.stream {
        stream.mark(kill);
    }
    cluster.kill(&leader);
    let elected = cluster
        .wait_leader(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("after killing {leader}: {e}\n{}", cluster.logs()));
    let elected_after = kill.elapsed();
    let window = Duration::from_millis(2 * w.timers.lease_ms);
    let during = w.hold_steady(window, "with one etcd member down");
    assert!(
        !w.protect.log_text().lines().any(is_fence_line),
        "dc1 fenced with one etcd member down\n{}",
        w.logs()
    );
    w.expect_flow(
        WELL_BEYOND_WINDOW,
        Duration::from_secs(60),
        "with one etcd member down",
    );
    eprintln!(
        "[{tag}] etcd leader {leader} SIGKILLed: {elected} elected after {}, no takeover, no fencing, \
         {during} values in the next {window:?}, longest stall {}",
        ms(Some(elected_after)),
        ms(w.stream().longest_silence())
    );
}

/// Only the dc1↔dc2 link is cut: both still see the witness, which keeps
/// the lease with dc1; dc1 runs on unprotected.
#[test]
fn cutting_dc1_from_dc2_only_changes_nothing_for_the_client() {
    if !preflight("cut_dc1_dc2") {
        return;
    }
    let _serial = lock();
    let mut w = World::start("cut dc1-dc2", &Guest::MicroVm, ArbiterKind::Witness);
    let cut = Instant::now();
    w.stream().mark(cut);
    w.wan.handle.cut();
    eprintln!("[cut dc1-dc2] WAN cut at counter {}", w.stream().next());
    let window = Duration::from_millis(3 * DETECTION_MS);
    let during = w.hold_steady(window, "with dc1 and dc2 cut apart");
    if let Err(e) = w
        .protect
        .wait_log("protection lost", Duration::from_secs(10))
    {
        panic!("{e}\n{}", w.logs());
    }
    // dc1 keeps serving: values produced well after the cut arrive.
    w.expect_flow(
        WELL_BEYOND_WINDOW,
        Duration::from_secs(60),
        "dc1 unprotected",
    );
    let after = w.hold_steady(Duration::from_millis(500), "dc1 unprotected");
    assert!(
        !w.protect.log_text().lines().any(is_fence_line),
        "dc1 fenced although it still reaches the witness\n{}",
        w.logs()
    );
    let stall = ms(w.stream().longest_silence());
    eprintln!(
        "[cut dc1-dc2] no takeover in {window:?}; {during} values during it, more after ({after} in the last 0.5 s); longest stall {stall}; dc1 logged `protection lost`"
    );
}

/// dc1 is cut from everything but stays alive: it must fence itself, dc2
/// takes over, and the client never sees two sites answering.
#[test]
fn isolated_dc1_fences_itself_and_dc2_takes_over() {
    if !preflight("isolate_dc1") {
        return;
    }
    let _serial = lock();
    let mut w = World::start("isolate dc1", &Guest::MicroVm, ArbiterKind::Witness);
    let before = w.stream().next();
    let cut = Instant::now();
    w.stream().mark(cut);
    ip_in(&w.net.router, &["link", "set", R_DC1, "down"]);
    eprintln!("[isolate dc1] dc1's link cut at the router, client at counter {before}");
    if let Err(e) = w
        .protect
        .wait_line("fenced", is_fence_line, Duration::from_secs(30))
    {
        panic!("{e}\n{}", w.logs());
    }
    let fenced_at = cut.elapsed();
    let route_time = match w.bird.wait_route("dc2", Duration::from_secs(60)) {
        Ok(_) => cut.elapsed(),
        Err(e) => panic!("{e}\n{}", w.logs()),
    };
    if let Err(e) = w
        .standby
        .wait_log("takeover complete", Duration::from_secs(30))
    {
        panic!("{e}\n{}", w.logs());
    }
    // Two active sites would show up as a broken counter stream.
    w.expect_flow(
        WELL_BEYOND_WINDOW,
        Duration::from_secs(60),
        "after dc2 took over from the isolated dc1",
    );
    w.assert_stream_intact("after the takeover");
    let first_byte = ms(w.stream().first_after_silence(NEW_SITE_SILENCE));
    let dc1_state = w
        .protect
        .exited()
        .map(|st| format!("exited ({st})"))
        .unwrap_or_else(|| "still running, fenced".into());
    eprintln!(
        "[isolate dc1] dc1 fenced after {} ({dc1_state}); route via dc2 after {}; first byte from dc2 after {first_byte}; counter {before} -> {} with no gap or duplicate",
        ms(Some(fenced_at)),
        ms(Some(route_time)),
        w.stream().next()
    );
    if let Some(fields) = takeover_breakdown(&w.standby.log_text()) {
        let text: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!(
            "[isolate dc1] standby takeover breakdown: {}",
            text.join(" ")
        );
    }
}

/// After dc2 took over from an isolated dc1, dc1's link comes back: the
/// stale primary (older fencing token) may neither release output nor
/// announce the prefix again; the client keeps being served by dc2.
#[test]
fn a_healed_stale_primary_neither_announces_nor_serves() {
    if !preflight("stale_primary_returns") {
        return;
    }
    let _serial = lock();
    let mut w = World::start("stale dc1 returns", &Guest::MicroVm, ArbiterKind::Witness);
    ip_in(&w.net.router, &["link", "set", R_DC1, "down"]);
    if let Err(e) = w
        .protect
        .wait_line("fenced", is_fence_line, Duration::from_secs(30))
    {
        panic!("{e}\n{}", w.logs());
    }
    if let Err(e) = w.bird.wait_route("dc2", Duration::from_secs(60)) {
        panic!("{e}\n{}", w.logs());
    }
    if let Err(e) = w
        .standby
        .wait_log("takeover complete", Duration::from_secs(30))
    {
        panic!("{e}\n{}", w.logs());
    }
    w.expect_flow(
        WELL_BEYOND_WINDOW,
        Duration::from_secs(60),
        "after dc2 took over",
    );
    let before = w.stream().next();
    ip_in(&w.net.router, &["link", "set", R_DC1, "up"]);
    eprintln!("[stale dc1 returns] dc1's link back up, client at counter {before}");
    // Long enough for dc1 to reach the witness and dc2 again, and for a BGP
    // session to come up (connect retry 1 s, hold 6 s).
    let deadline =
        Instant::now() + Duration::from_millis(3 * DETECTION_MS) + Duration::from_secs(8);
    while Instant::now() < deadline {
        w.assert_stream_intact("with the stale dc1 back on the network");
        if w.bird.route_site() != Some("dc2") {
            panic!("the stale dc1 took the route back from dc2\n{}", w.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    w.expect_flow(
        WELL_BEYOND_WINDOW,
        Duration::from_secs(60),
        "with the stale dc1 back on the network",
    );
    let dc1_state = w
        .protect
        .exited()
        .map(|st| format!("exited ({st})"))
        .unwrap_or_else(|| "still running".into());
    eprintln!(
        "[stale dc1 returns] route stayed with dc2, counter {before} -> {} with no gap or duplicate; dc1 {dc1_state}",
        w.stream().next()
    );
}

/// The witness dies; dc1 and dc2 still see each other: nothing changes.
#[test]
fn losing_the_witness_changes_nothing_while_both_sites_see_each_other() {
    if !preflight("kill_witness") {
        return;
    }
    let _serial = lock();
    let mut w = World::start("kill witness", &Guest::MicroVm, ArbiterKind::Witness);
    let kill = Instant::now();
    w.stream().mark(kill);
    w.witness().kill();
    eprintln!(
        "[kill witness] witness SIGKILLed at counter {}",
        w.stream().next()
    );
    let window = Duration::from_millis(3 * DETECTION_MS);
    let during = w.hold_steady(window, "without the witness");
    w.expect_flow(
        WELL_BEYOND_WINDOW,
        Duration::from_secs(60),
        "without the witness",
    );
    assert!(
        !w.protect.log_text().lines().any(is_fence_line),
        "dc1 fenced although it still reaches dc2\n{}",
        w.logs()
    );
    assert!(
        w.protect.exited().is_none(),
        "protect exited without the witness\n{}",
        w.logs()
    );
    let stall = ms(w.stream().longest_silence());
    eprintln!(
        "[kill witness] no takeover, no fencing in {window:?}; {during} values during it; longest stall {stall}"
    );
}

#[test]
fn route_site_reads_birdc_output() {
    let out = "BIRD 2.0.12 ready.\nTable master4:\n192.0.2.10/32        unicast [dc2 10:00:00.000] * (100) [AS64512i]\n\tvia 198.51.100.6 on r-dc2\n";
    assert_eq!(route_site(out), Some("dc2"));
    assert_eq!(route_site("Network not found"), None);
    let log = "2026-01-01T00:00:00Z  INFO takeover complete vm=web1 detection_ms=1004 arbitration_ms=3 activation_ms=41 announce_ms=12";
    let b = takeover_breakdown(log).expect("line");
    assert_eq!(b[0], ("detection_ms", "1004.0".to_string()));
    assert_eq!(b[3], ("announce_ms", "12.0".to_string()));
    let coloured = "\u{1b}[32m INFO\u{1b}[0m takeover complete \u{1b}[3mdetection_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m998 \u{1b}[3mannounce_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m7.2999";
    let b = takeover_breakdown(coloured).expect("line");
    assert_eq!(b[0], ("detection_ms", "998.0".to_string()));
    assert_eq!(b[1], ("arbitration_ms", "?".to_string()));
    assert_eq!(b[3], ("announce_ms", "7.3".to_string()));
}
