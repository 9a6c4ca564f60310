//! End to end, with the real binary: `remus-wan standby` and
//! `remus-wan protect` replicate a micro-VM (KVM, smoltcp guest) over QUIC
//! while a client streams the guest's counter over TCP; the protect process
//! is SIGKILLed at a random moment; `remus-wan standby --activate` resumes
//! the guest from the replica, and the client's same TCP connection goes on
//! with no gap and no duplicate: every byte it saw had been committed at the
//! backup (output commit).
//!
//! Everything runs in a network namespace the test creates (it vanishes
//! with the test); the guest sits behind a persistent tap (192.0.2.1 on the
//! host side, 192.0.2.10 in the guest) that outlives the killed process.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use remus_wan::testbed::{CounterCheck, LocalDeployment};

const TAP: &str = "rwe2e0";

fn require_kvm_root() -> bool {
    let problem = if !Path::new("/dev/kvm").exists() {
        Some("/dev/kvm is missing")
    } else if unsafe { libc::geteuid() } != 0 {
        Some("not root (network namespaces and taps need it)")
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (REMUS_WAN_ALLOW_SKIP=1): {p}");
            false
        }
        Some(p) => panic!("this test needs KVM and root: {p} (REMUS_WAN_ALLOW_SKIP=1 skips it)"),
    }
}

/// Kills (SIGKILL) and reaps the child on drop, whatever happened.
struct Proc(Option<Child>, &'static str);

impl Proc {
    fn spawn(name: &'static str, args: &[&str], log: &Path) -> Self {
        Self::spawn_env(name, args, log, &[])
    }
    fn spawn_env(name: &'static str, args: &[&str], log: &Path, env: &[(&str, String)]) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn remus-wan");
        Proc(Some(child), name)
    }
    /// Whether the process has ended (by itself).
    fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn term(&mut self) -> Option<i32> {
        let mut c = self.0.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} ignored SIGTERM for 20 s", self.1);
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

fn ip(args: &[&str]) {
    hypervisor::netns::ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// Reads the counter stream, checking every value follows the previous.
struct Counter(CounterCheck);

impl Counter {
    fn next(&self) -> u64 {
        self.0.next
    }

    /// Reads until `want` more values arrived or `limit` passed.
    fn read_more(&mut self, s: &mut TcpStream, want: u64, limit: Duration) -> u64 {
        let start = self.next();
        let deadline = Instant::now() + limit;
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

/// Connects with a 32 KiB receive buffer, so what the client had buffered
/// at the kill is small and known.
fn connect_small_window(addr: &SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_recv_buffer_size(32 * 1024)?;
    sock.connect_timeout(&(*addr).into(), Duration::from_secs(1))?;
    Ok(sock.into())
}

fn wait_for_log(log: &Path, needle: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn protected_guest_survives_the_primary_being_killed() {
    if !require_kvm_root() {
        return;
    }
    let images = hypervisor::guest_build::from_env_or_build(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build"),
    )
    .expect("guest images (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let cfg = LocalDeployment {
        dir: dir.clone(),
        guest_image: images.net.clone(),
        epoch_interval_ms: 50,
        memory_mib: 64,
        ports: (17701, 17702),
        dc2_connect_port: None,
        tap: TAP.into(),
        mac: "52:54:00:12:36:01".into(),
        witness_port: None,
    }
    .write()
    .expect("deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let state = dir.join("state");
    let state_s = state.to_str().expect("utf-8").to_owned();
    // The kill moment: a seed from the clock, printed for reproduction.
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
    let kill_after = Duration::from_millis(800 + seed % 1500);

    hypervisor::netns::in_new_netns(|| {
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&["addr", "add", "192.0.2.1/24", "dev", TAP]);
        ip(&["link", "set", "dev", TAP, "up"]);

        let mut standby = Proc::spawn(
            "standby",
            &["standby", "--config", &cfg_s, "--site", "dc2", "--state-dir", &state_s],
            &dir.join("standby.log"),
        );
        assert!(
            wait_for_log(&dir.join("standby.log"), "standby listening", Duration::from_secs(30)),
            "standby did not start: {}",
            std::fs::read_to_string(dir.join("standby.log")).unwrap_or_default()
        );
        let mut protect = Proc::spawn(
            "protect",
            &["protect", "web1", "--site", "dc2", "--config", &cfg_s],
            &dir.join("protect.log"),
        );
        let guest: SocketAddr = "192.0.2.10:9000".parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = loop {
            match connect_small_window(&guest) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!(
                    "guest never answered on 9000: {e}\nprotect log:\n{}",
                    std::fs::read_to_string(dir.join("protect.log")).unwrap_or_default()
                ),
            }
        };
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut counter = Counter(CounterCheck::default());
        // Data flows while protected (released only after commits).
        let got = counter.read_more(&mut conn, 1000, Duration::from_secs(30));
        assert!(got >= 1000, "only {got} counter values while protected");
        // `remus-wan status` reads both processes' figures; /metrics
        // serves them to Prometheus.
        std::thread::sleep(Duration::from_millis(1200));
        let out = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
            .arg("status")
            .output()
            .expect("status");
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "status failed: {table}{}", String::from_utf8_lossy(&out.stderr));
        assert!(table.contains("primary") && table.contains("standby"), "{table}");
        eprintln!("{table}");
        let metrics = {
            use std::io::Write;
            let mut s = TcpStream::connect("127.0.0.1:9477").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
            let mut m = String::new();
            s.read_to_string(&mut m).expect("metrics");
            m
        };
        assert!(metrics.contains("remus_wan_committed_epoch{vm=\"web1\",role=\"primary\"}"), "{metrics}");
        // Output commit: with the backup frozen nothing is committed, so
        // nothing new may reach the client (beyond what was already on its
        // way when the backup stopped); it flows again when the backup does.
        let standby_pid = standby.0.as_ref().map(|c| c.id() as i32).expect("standby running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(standby_pid, libc::SIGSTOP) };
        counter.read_more(&mut conn, u64::MAX, Duration::from_millis(300));
        let while_frozen = counter.read_more(&mut conn, u64::MAX, Duration::from_millis(1500));
        // SAFETY: as above.
        unsafe { libc::kill(standby_pid, libc::SIGCONT) };
        assert!(
            while_frozen < 20_000,
            "{while_frozen} counter values reached the client while the backup committed nothing"
        );
        let resumed = counter.read_more(&mut conn, 10_000, Duration::from_secs(30));
        assert!(resumed >= 10_000, "output did not resume with the backup ({resumed})");
        eprintln!("backup frozen 1.5 s: {while_frozen} values reached the client; then {resumed}+ again");
        // Key-value writes go to the guest's disk; a SET is acknowledged
        // only once written, and the client sees "OK" only once the epoch
        // holding it is committed at the backup.
        let kv_addr: SocketAddr = "192.0.2.10:7000".parse().expect("addr");
        let kv = connect_small_window(&kv_addr).expect("kv connection");
        kv.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut kv_lines = std::io::BufReader::new(kv.try_clone().expect("clone"));
        let mut kv_w = kv;
        let mut acked = 0u64;
        let until = Instant::now() + kill_after;
        while Instant::now() < until {
            counter.read_more(&mut conn, u64::MAX, Duration::from_millis(20));
            use std::io::{BufRead, Write};
            writeln!(kv_w, "SET key{acked} value{acked}").expect("kv write");
            let mut line = String::new();
            kv_lines.read_line(&mut line).expect("kv reply");
            assert_eq!(line, "OK\n", "SET key{acked}");
            acked += 1;
        }
        let before = counter.next();
        protect.kill();
        eprintln!("protect SIGKILLed after {kill_after:?} (seed {seed}), client at counter {before}");

        // The backup stops receiving and the replica is resumed.
        assert_eq!(standby.term(), Some(0), "standby exits cleanly on SIGTERM");
        let mut active = Proc::spawn(
            "activate",
            &[
                "standby", "--config", &cfg_s, "--site", "dc2", "--state-dir", &state_s,
                "--activate",
            ],
            &dir.join("activate.log"),
        );
        assert!(
            wait_for_log(&dir.join("activate.log"), "VM activated", Duration::from_secs(60)),
            "replica not activated:\n{}",
            std::fs::read_to_string(dir.join("activate.log")).unwrap_or_default()
        );
        // Far more than the client's small receive window could have held
        // at the kill: these values come from the resumed guest.
        let after = counter.read_more(&mut conn, 100_000, Duration::from_secs(60));
        assert!(
            after >= 100_000,
            "after takeover only {after} more counter values (at {})\nactivate log:\n{}\nstandby log:\n{}",
            counter.next(),
            std::fs::read_to_string(dir.join("activate.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("standby.log")).unwrap_or_default()
        );
        eprintln!(
            "same TCP connection continued from {before} to {} with no gap or duplicate",
            counter.next()
        );
        // Every acknowledged write is on the resumed guest's disk, served
        // over the same key-value connection.
        {
            use std::io::{BufRead, Write};
            for k in [0, acked / 2, acked - 1] {
                writeln!(kv_w, "GET key{k}").expect("kv write");
                let mut line = String::new();
                kv_lines.read_line(&mut line).expect("kv reply after takeover");
                assert_eq!(line, format!("VALUE value{k}\n"), "acknowledged SET key{k} lost");
            }
            eprintln!("{acked} acknowledged key-value writes survived the takeover");
        }
        let code = active.term();
        assert_eq!(
            code,
            Some(0),
            "activated VM did not stop cleanly\nactivate log:\n{}\nprotect log:\n{}",
            std::fs::read_to_string(dir.join("activate.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("protect.log")).unwrap_or_default()
        );
    })
    .expect("network namespace");
}

/// With a witness, takeover needs no operator: the protect process is
/// SIGKILLed, the standby notices the silence, the witness grants it the
/// lease, and it resumes the VM in its own process. The client's TCP
/// connection continues with no gap or duplicate and every acknowledged
/// key-value write is there.
#[test]
fn the_standby_takes_over_by_itself_when_a_witness_arbitrates() {
    if !require_kvm_root() {
        return;
    }
    with_witness(End::KillPrimary, "rwe2e1", 17721, "52:54:00:12:36:02");
}

/// `remus-wan switchover`: a final checkpoint, the lease handed over by
/// the witness, the VM resumed at dc2; protect exits 0 and the client's
/// connection goes on with nothing lost.
#[test]
fn switchover_moves_the_vm_with_no_loss() {
    if !require_kvm_root() {
        return;
    }
    with_witness(End::Switchover, "rwe2e2", 17731, "52:54:00:12:36:03");
}

/// After a switchover to dc2, a standby started at dc1 receives the VM
/// from dc2 (protection runs the other way); when dc2 then dies, dc1 takes
/// the VM back by itself and the client's connection still goes on.
#[test]
fn after_a_switchover_protection_runs_back_and_the_vm_can_return() {
    if !require_kvm_root() {
        return;
    }
    with_witness(
        End::SwitchoverThenBack,
        "rwe2e6",
        17771,
        "52:54:00:12:36:07",
    );
}

/// The primary dies at exact moments of the pipeline (fault points, see
/// `remus_wan::faults`): while its guest is paused for a checkpoint, right
/// after handing an epoch to the transport, and while the backup is in the
/// middle of applying an epoch (journaled, not yet committed: the backup
/// is stalled there and the primary is SIGKILLed meanwhile). Each time the
/// standby takes over and the client's connection continues intact.
#[test]
fn the_primary_dies_during_pause_send_and_backup_apply() {
    if !require_kvm_root() {
        return;
    }
    with_witness(
        End::PrimaryDiesAt("protect.paused"),
        "rwe2e3",
        17741,
        "52:54:00:12:36:04",
    );
    with_witness(
        End::PrimaryDiesAt("protect.sent"),
        "rwe2e4",
        17751,
        "52:54:00:12:36:05",
    );
    with_witness(
        End::KilledWhileBackupApplies,
        "rwe2e5",
        17761,
        "52:54:00:12:36:06",
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    KillPrimary,
    Switchover,
    PrimaryDiesAt(&'static str),
    KilledWhileBackupApplies,
    SwitchoverThenBack,
}

fn with_witness(end: End, tap: &str, port: u16, mac: &str) {
    let images = hypervisor::guest_build::from_env_or_build(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build"),
    )
    .expect("guest images (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let cfg = LocalDeployment {
        dir: dir.clone(),
        guest_image: images.net.clone(),
        epoch_interval_ms: 50,
        ports: (port, port + 1),
        dc2_connect_port: None,
        tap: tap.into(),
        mac: mac.into(),
        memory_mib: 64,
        witness_port: Some(port + 2),
    }
    .write()
    .expect("deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let state_s = dir.join("state").to_str().expect("utf-8").to_owned();
    let wstate_s = dir.join("witness").to_str().expect("utf-8").to_owned();
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
    let kill_after = Duration::from_millis(500 + seed % 1500);
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    hypervisor::netns::in_new_netns(|| {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["addr", "add", "192.0.2.1/24", "dev", tap]);
        ip(&["link", "set", "dev", tap, "up"]);
        let _witness = Proc::spawn(
            "witness",
            &["witness", "--config", &cfg_s, "--state-dir", &wstate_s],
            &dir.join("witness.log"),
        );
        // Fault points count from the first checkpoint after pre-copy.
        let nth = 30 + seed % 40;
        let standby_env = match end {
            End::KilledWhileBackupApplies => {
                vec![("REMUS_WAN_FAULT", format!("standby.journaled@{}:sleep=4000", nth + 20))]
            }
            _ => Vec::new(),
        };
        let protect_env = match end {
            End::PrimaryDiesAt(point) => vec![("REMUS_WAN_FAULT", format!("{point}@{nth}"))],
            _ => Vec::new(),
        };
        let mut standby = Proc::spawn_env(
            "standby",
            &["standby", "--config", &cfg_s, "--site", "dc2", "--state-dir", &state_s],
            &dir.join("standby.log"),
            &standby_env,
        );
        assert!(
            wait_for_log(
                &dir.join("standby.log"),
                "standby listening",
                Duration::from_secs(30)
            ),
            "standby did not start: {}",
            log("standby.log")
        );
        let mut protect = Proc::spawn_env(
            "protect",
            &["protect", "web1", "--site", "dc2", "--config", &cfg_s],
            &dir.join("protect.log"),
            &protect_env,
        );
        let guest: SocketAddr = "192.0.2.10:9000".parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = loop {
            match connect_small_window(&guest) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => panic!(
                    "guest never answered on 9000: {e}\nprotect log:\n{}",
                    log("protect.log")
                ),
            }
        };
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut counter = Counter(CounterCheck::default());
        let got = counter.read_more(&mut conn, 1000, Duration::from_secs(30));
        assert!(
            got >= 1000,
            "only {got} counter values while protected\nprotect log:\n{}",
            log("protect.log")
        );
        let kv_addr: SocketAddr = "192.0.2.10:7000".parse().expect("addr");
        let kv = connect_small_window(&kv_addr).expect("kv connection");
        kv.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut kv_lines = std::io::BufReader::new(kv.try_clone().expect("clone"));
        let mut kv_w = kv;
        let mut acked = 0u64;
        let until = Instant::now() + kill_after;
        let fault_limit = Instant::now() + Duration::from_secs(30);
        let go_on = |protect: &mut Proc| match end {
            End::KillPrimary | End::Switchover | End::SwitchoverThenBack => {
                Instant::now() < until
            }
            End::PrimaryDiesAt(_) => !protect.exited() && Instant::now() < fault_limit,
            End::KilledWhileBackupApplies => {
                !log("standby.log").contains("fault point reached") && Instant::now() < fault_limit
            }
        };
        while go_on(&mut protect) || acked == 0 {
            counter.read_more(&mut conn, u64::MAX, Duration::from_millis(20));
            use std::io::{BufRead, Write};
            writeln!(kv_w, "SET key{acked} value{acked}").expect("kv write");
            let mut line = String::new();
            kv_lines.read_line(&mut line).expect("kv reply");
            assert_eq!(line, "OK\n", "SET key{acked}");
            acked += 1;
        }
        let before = counter.next();
        let killed = Instant::now();
        match end {
            End::PrimaryDiesAt(point) => {
                assert!(
                    protect.exited(),
                    "protect never reached fault point {point}@{nth}\n{}",
                    log("protect.log")
                );
                eprintln!("protect died at fault point {point} (#{nth}), client at counter {before}");
            }
            End::KilledWhileBackupApplies => {
                assert!(
                    log("standby.log").contains("fault point reached"),
                    "standby never reached its fault point\n{}",
                    log("standby.log")
                );
                protect.kill();
                eprintln!("protect SIGKILLed while the backup applies an epoch, client at counter {before}");
            }
            End::KillPrimary => {
                protect.kill();
                eprintln!("protect SIGKILLed after {kill_after:?} (seed {seed}), client at counter {before}");
            }
            End::Switchover | End::SwitchoverThenBack => {
                let out = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
                    .args(["switchover", "web1", "--to", "dc2", "--config", &cfg_s])
                    .output()
                    .expect("switchover");
                assert!(
                    out.status.success(),
                    "switchover failed: {}{}\nprotect log:\n{}\nwitness log:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    log("protect.log"),
                    log("witness.log")
                );
                eprintln!("switchover: {}", String::from_utf8_lossy(&out.stdout).trim());
                assert_eq!(protect.term(), Some(0), "protect exits 0 after handing over");
            }
        }
        // The first new value: it can only come from the resumed replica
        // once what was in flight to the client has drained.
        let mut first_byte = None;
        let limit = Instant::now() + Duration::from_secs(60);
        while counter.next() < before + 100_000 && Instant::now() < limit {
            let n = counter.read_more(&mut conn, 1, Duration::from_millis(50));
            if n > 0 && first_byte.is_none() && log("standby.log").contains("takeover complete") {
                first_byte = Some(killed.elapsed());
            }
        }
        assert!(
            counter.next() >= before + 100_000,
            "after the kill only {} more counter values\nstandby log:\n{}\nwitness log:\n{}",
            counter.next() - before,
            log("standby.log"),
            log("witness.log")
        );
        assert!(
            log("standby.log").contains("takeover complete"),
            "the stream went on but the standby did not take over?\n{}",
            log("standby.log")
        );
        let takeover = log("standby.log")
            .lines()
            .find(|l| l.contains("takeover complete"))
            .map(str::to_owned)
            .unwrap_or_default();
        if end == End::KillPrimary {
            eprintln!("kill → first byte from the resumed VM: {first_byte:?}");
        }
        eprintln!("{takeover}");
        {
            use std::io::{BufRead, Write};
            for k in [0, acked / 2, acked - 1] {
                writeln!(kv_w, "GET key{k}").expect("kv write");
                let mut line = String::new();
                kv_lines
                    .read_line(&mut line)
                    .expect("kv reply after takeover");
                assert_eq!(
                    line,
                    format!("VALUE value{k}\n"),
                    "acknowledged SET key{k} lost"
                );
            }
        }
        eprintln!(
            "{acked} acknowledged writes kept; stream continued to {}",
            counter.next()
        );
        if end != End::SwitchoverThenBack {
            return;
        }
        // Protection the other way: a standby at dc1 (the old primary)
        // receives the VM that now runs at dc2; then dc2 dies and dc1
        // takes the VM back, the same TCP connection still going.
        let state1 = dir.join("state-dc1").to_str().expect("utf-8").to_owned();
        let _standby1 = Proc::spawn(
            "standby at dc1",
            &[
                "standby", "--config", &cfg_s, "--site", "dc1", "--state-dir", &state1,
                "--metrics", "127.0.0.1:9479",
            ],
            &dir.join("standby-dc1.log"),
        );
        let synced = Instant::now() + Duration::from_secs(60);
        let protected_back = || {
            remus_wan::metrics::fetch_status("127.0.0.1:9478".parse().expect("addr"))
                .ok()
                .and_then(|v| v.into_iter().next())
                .is_some_and(|v| v.role == "primary" && v.state == "protected" && v.committed_epoch > 5)
        };
        while !protected_back() && Instant::now() < synced {
            counter.read_more(&mut conn, u64::MAX, Duration::from_millis(100));
        }
        assert!(
            protected_back(),
            "dc2 never protected the VM back towards dc1\nstandby (dc2) log:\n{}\nstandby (dc1) log:\n{}",
            log("standby.log"),
            log("standby-dc1.log")
        );
        let at = counter.next();
        eprintln!("dc2 protects web1 back towards dc1; client at {at}");
        standby.kill();
        let back = counter.read_more(&mut conn, 100_000, Duration::from_secs(60));
        assert!(
            back >= 100_000 && log("standby-dc1.log").contains("takeover complete"),
            "after dc2's death only {back} more values\nstandby (dc1) log:\n{}",
            log("standby-dc1.log")
        );
        {
            use std::io::{BufRead, Write};
            writeln!(kv_w, "GET key0").expect("kv write");
            let mut line = String::new();
            kv_lines.read_line(&mut line).expect("kv reply after the move back");
            assert_eq!(line, "VALUE value0\n", "acknowledged SET key0 lost on the way back");
        }
        eprintln!("dc2 killed: dc1 took web1 back; stream continued to {}", counter.next());
    })
    .expect("network namespace");
}
