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

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{
    connect_retrying, connect_small_window, vm_status, wait_for_log, wait_until, Counter, Proc,
};

const TAP: &str = "rwe2e0";

fn require_kvm_root() -> bool {
    support::require_kvm_root("protect_e2e")
}

fn deployment(
    tap: &str,
    port: u16,
    mac: &str,
    witness: bool,
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    support::micro_vm_deployment(tap, port, mac, witness)
}

#[test]
fn protected_guest_survives_the_primary_being_killed() {
    if !require_kvm_root() {
        return;
    }
    let (_tmp, dir, cfg_s) = deployment(TAP, 17701, "52:54:00:12:36:01", false);
    let state = dir.join("state");
    let state_s = state.to_str().expect("utf-8").to_owned();
    // The kill moment: a seed from the clock, printed for reproduction.
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
    let kill_after = Duration::from_millis(800 + seed % 1500);

    hypervisor::netns::in_new_netns(|| {
        support::host_tap(TAP);

        let mut standby = support::sites::standby(&cfg_s, &dir, &[]);
        let mut protect = support::sites::protect(Some("web1"), &cfg_s, &dir, &[]);
        let guest: SocketAddr = "192.0.2.10:9000".parse().expect("addr");
        let mut conn = connect_retrying(&guest, Duration::from_secs(60)).unwrap_or_else(|e| {
            panic!(
                "{e}\nprotect log:\n{}",
                std::fs::read_to_string(dir.join("protect.log")).unwrap_or_default()
            )
        });
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut counter = Counter::default();
        // Data flows while protected (released only after commits).
        let got = counter.read_more(&mut conn, 1000, Duration::from_secs(30));
        assert!(got >= 1000, "only {got} counter values while protected");
        // `remus-wan status` reads both processes' figures; /metrics
        // serves them to Prometheus (once each has published a first time).
        wait_until(
            "both processes publish their status",
            Duration::from_secs(30),
            || vm_status("127.0.0.1:9477").is_some() && vm_status("127.0.0.1:9478").is_some(),
            || {
                counter.read_more(&mut conn, u64::MAX, Duration::from_millis(100));
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
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
        let standby_pid = standby.pid().expect("standby running") as i32;
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
        let mut active = Proc::remus(
            "activate",
            &[
                "standby", "--config", &cfg_s, "--site", "dc2", "--state-dir", &state_s,
                "--activate",
            ],
            &dir.join("activate.log"),
        );
        active.expect_log("VM activated", Duration::from_secs(60));
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

/// Failback after a takeover: the old primary's site returns as standby
/// with its old copy of the disk, and only the blocks that differ travel.
#[test]
fn failback_to_the_old_site_sends_only_the_disk_blocks_that_differ() {
    if !require_kvm_root() {
        return;
    }
    with_witness(
        End::TakeoverThenFailback,
        "rwe2ea",
        17841,
        "52:54:00:12:36:0b",
    );
}

/// The backup site loses its replica (process killed, state folder gone)
/// and a new, empty standby starts: the primary resynchronises the running
/// VM to it without stopping the VM, and when the primary is then killed
/// the new standby takes over from that replica with the client's
/// connection intact (a resync that sent only the pages changed since the
/// first sync would leave a replica of mostly zeros).
#[test]
fn a_standby_that_lost_its_replica_is_resynchronised_and_can_take_over() {
    if !require_kvm_root() {
        return;
    }
    with_witness(
        End::StandbyLosesItsState,
        "rwe2e7",
        17781,
        "52:54:00:12:36:08",
    );
}

/// After a takeover the VM runs from dc2's replica folder; dc2 dies and a
/// standby restarts on that folder: it must not offer the folder as a
/// consistent replica (issue 17.3).
#[test]
fn a_standby_restarted_on_the_folder_its_vm_ran_from_offers_no_replica() {
    if !require_kvm_root() {
        return;
    }
    with_witness(
        End::TakeoverThenRestartOnItsFolder,
        "rwe2eb",
        17831,
        "52:54:00:12:36:0c",
    );
}

/// The standby refuses one epoch (ERROR frame, fault point
/// `standby.apply`): the VM keeps running, a resync follows, and the
/// resynchronised replica takes over when the primary is killed.
#[test]
fn an_epoch_the_standby_rejects_costs_a_resync_not_the_vm() {
    if !require_kvm_root() {
        return;
    }
    with_witness(
        End::StandbyRejectsAnEpoch,
        "rwe2ea",
        17821,
        "52:54:00:12:36:0b",
    );
}

/// A switchover whose backup never commits the final epoch (frozen) is
/// aborted at its deadline: the command fails, and the primary resumes the
/// guest and goes on serving the same connection.
#[test]
fn a_switchover_that_cannot_finish_is_aborted_and_the_vm_runs_on() {
    if !require_kvm_root() {
        return;
    }
    with_witness(
        End::SwitchoverToAFrozenBackup,
        "rwe2e8",
        17791,
        "52:54:00:12:36:09",
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
    StandbyLosesItsState,
    SwitchoverToAFrozenBackup,
    StandbyRejectsAnEpoch,
    TakeoverThenRestartOnItsFolder,
    TakeoverThenFailback,
}

/// Waits (reading the client's stream meanwhile) until the standby logging
/// to `standby_log` holds a resynchronised consistent replica, then until
/// protect is `protected` again with `progress` true of its status.
fn resynced_then_protected(
    dir: &Path,
    standby_log: &str,
    conn: &mut TcpStream,
    counter: &mut Counter,
    progress: impl Fn(&remus_wan::metrics::VmStatus) -> bool,
) {
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    wait_until(
        "the standby holds a resynchronised consistent replica",
        Duration::from_secs(120),
        || log(standby_log).contains("resynchronised replica is consistent"),
        || {
            counter.read_more(conn, u64::MAX, Duration::from_millis(20));
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nprotect log:\n{}\nstandby log:\n{}",
            log("protect.log"),
            log(standby_log)
        )
    });
    wait_until(
        "protect is protected again, checkpoints committed",
        Duration::from_secs(60),
        || vm_status("127.0.0.1:9477").is_some_and(|v| v.state == "protected" && progress(&v)),
        || {
            counter.read_more(conn, u64::MAX, Duration::from_millis(20));
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nprotect log:\n{}", log("protect.log")));
}

fn with_witness(end: End, tap: &str, port: u16, mac: &str) {
    let (_tmp, dir, cfg_s) = deployment(tap, port, mac, true);
    let state_s = dir.join("state").to_str().expect("utf-8").to_owned();
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
    let kill_after = Duration::from_millis(500 + seed % 1500);
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    hypervisor::netns::in_new_netns(|| {
        support::host_tap(tap);
        let _witness = support::sites::witness(&cfg_s, &dir);
        // Fault points count from the first checkpoint after pre-copy.
        let nth = 30 + seed % 40;
        let standby_env = match end {
            End::KilledWhileBackupApplies => {
                vec![("REMUS_WAN_FAULT", format!("standby.journaled@{}:sleep=4000", nth + 20))]
            }
            // Counted from the standby's first epoch (pre-copy included).
            End::StandbyRejectsAnEpoch => {
                vec![("REMUS_WAN_FAULT", format!("standby.apply@{}:error", nth + 60))]
            }
            _ => Vec::new(),
        };
        let protect_env = match end {
            End::PrimaryDiesAt(point) => vec![("REMUS_WAN_FAULT", format!("{point}@{nth}"))],
            _ => Vec::new(),
        };
        let mut standby = support::sites::standby(&cfg_s, &dir, &standby_env);
        let mut protect = support::sites::protect(Some("web1"), &cfg_s, &dir, &protect_env);
        let guest: SocketAddr = "192.0.2.10:9000".parse().expect("addr");
        let mut conn = connect_retrying(&guest, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\nprotect log:\n{}", log("protect.log")));
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut counter = Counter::default();
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
            End::KillPrimary
            | End::TakeoverThenRestartOnItsFolder
            | End::TakeoverThenFailback
            | End::Switchover
            | End::SwitchoverThenBack
            | End::StandbyLosesItsState
            | End::SwitchoverToAFrozenBackup => Instant::now() < until,
            End::PrimaryDiesAt(_) => !protect.has_exited() && Instant::now() < fault_limit,
            End::KilledWhileBackupApplies | End::StandbyRejectsAnEpoch => {
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
                    protect.has_exited(),
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
            End::KillPrimary | End::TakeoverThenRestartOnItsFolder | End::TakeoverThenFailback => {
                protect.kill();
                eprintln!("protect SIGKILLed after {kill_after:?} (seed {seed}), client at counter {before}");
            }
            End::SwitchoverToAFrozenBackup => {
                // The backup is frozen (SIGSTOP) when the switchover starts:
                // it never commits the final epoch. The switchover must be
                // aborted at its deadline and dc1 must go on running the VM
                // (before, the guest stayed paused for good).
                let pid = standby.pid().expect("standby running") as i32;
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                let asked = Instant::now();
                let out = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
                    .args(["switchover", "web1", "--to", "dc2", "--config", &cfg_s])
                    .output()
                    .expect("switchover");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    !out.status.success() && text.contains("aborted"),
                    "a switchover to a frozen backup must be aborted: {text}\nprotect log:\n{}",
                    log("protect.log")
                );
                eprintln!("switchover aborted after {:?}: {}", asked.elapsed(), text.trim());
                assert!(!protect.has_exited(), "dc1 keeps the VM");
                let more = counter.read_more(&mut conn, 100_000, Duration::from_secs(60));
                assert!(
                    more >= 100_000,
                    "after the aborted switchover only {more} more values\nprotect log:\n{}",
                    log("protect.log")
                );
                {
                    use std::io::{BufRead, Write};
                    writeln!(kv_w, "GET key0").expect("kv write");
                    let mut line = String::new();
                    kv_lines.read_line(&mut line).expect("kv reply");
                    assert_eq!(line, "VALUE value0\n");
                }
                eprintln!("dc1 kept web1; stream continued to {}", counter.next());
                return;
            }
            End::StandbyRejectsAnEpoch => {
                // The standby refused an epoch (an ERROR frame, as for an
                // epoch that does not decode). The primary must not stop
                // its VM over it (it once did): output waits, a full resync
                // follows, protection resumes, and the resynchronised
                // replica can take over.
                assert!(
                    log("standby.log").contains("fault point reached"),
                    "standby never reached its fault point\n{}",
                    log("standby.log")
                );
                let committed = vm_status("127.0.0.1:9477").map(|v| v.committed_epoch).unwrap_or(0);
                resynced_then_protected(&dir, "standby.log", &mut conn, &mut counter, |v| {
                    v.committed_epoch > committed + 10
                });
                assert!(!protect.has_exited(), "a rejected epoch must not stop the VM");
                assert!(
                    log("protect.log").contains("receiver rejected epoch"),
                    "protect never saw the rejection?\n{}",
                    log("protect.log")
                );
                let before = counter.next();
                protect.kill();
                eprintln!("epoch rejected, resynchronised; protect SIGKILLed, client at counter {before}");
            }
            End::StandbyLosesItsState => {
                // The backup site loses its disk: its process dies, its
                // replica is gone, and a new standby starts empty. The
                // primary must resynchronise the running VM to it (the
                // whole memory again, not only what changed since its last
                // sync) and must not stop the VM over it.
                let resyncs_before = vm_status("127.0.0.1:9477").map(|v| v.epochs).unwrap_or(0);
                standby.kill();
                std::fs::remove_dir_all(&state_s).expect("wipe the standby's state");
                standby = Proc::remus(
                    "standby (new, empty)",
                    &["standby", "--config", &cfg_s, "--site", "dc2", "--state-dir", &state_s],
                    &dir.join("standby2.log"),
                );
                let first = Instant::now();
                resynced_then_protected(&dir, "standby2.log", &mut conn, &mut counter, |v| {
                    v.epochs > resyncs_before + 20
                });
                assert!(!protect.has_exited(), "protect must survive its standby's loss");
                eprintln!("standby wiped and restarted: resynchronised in {:?}", first.elapsed());
                let before = counter.next();
                protect.kill();
                eprintln!("protect SIGKILLed, client at counter {before}");
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
        // Protection the other way: a standby at dc1 (the old primary's
        // site) receives the VM that now runs at dc2. It starts at once,
        // well within the detection timeout, so dc2 never declares its
        // backup lost (the case that once left dc2 releasing output ahead
        // of its replica for good).
        let state1 = dir.join("state-dc1").to_str().expect("utf-8").to_owned();
        let _standby1 = (end == End::SwitchoverThenBack).then(|| {
            Proc::remus(
                "standby at dc1",
                &[
                    "standby", "--config", &cfg_s, "--site", "dc1", "--state-dir", &state1,
                    "--metrics", "127.0.0.1:9479",
                ],
                &dir.join("standby-dc1.log"),
            )
        });
        // The first new value: it can only come from the resumed replica
        // once what was in flight to the client has drained.
        let standby_log = if end == End::StandbyLosesItsState {
            "standby2.log"
        } else {
            "standby.log"
        };
        let before = if matches!(end, End::StandbyLosesItsState | End::StandbyRejectsAnEpoch) {
            counter.next()
        } else {
            before
        };
        let mut first_byte = None;
        let limit = Instant::now() + Duration::from_secs(60);
        while counter.next() < before + 100_000 && Instant::now() < limit {
            let n = counter.read_more(&mut conn, 1, Duration::from_millis(50));
            if n > 0 && first_byte.is_none() && log(standby_log).contains("takeover complete") {
                first_byte = Some(killed.elapsed());
            }
        }
        assert!(
            counter.next() >= before + 100_000,
            "after the kill only {} more counter values\nstandby log:\n{}\nwitness log:\n{}",
            counter.next() - before,
            log(standby_log),
            log("witness.log")
        );
        assert!(
            log(standby_log).contains("takeover complete"),
            "the stream went on but the standby did not take over?\n{}",
            log(standby_log)
        );
        let takeover = log(standby_log)
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
        if end == End::TakeoverThenRestartOnItsFolder {
            // dc2 runs the VM from its replica folder, then dies too. A
            // standby restarted on that folder must not offer it as a
            // committed epoch: the VM has run on (and written) it since.
            standby.kill();
            let _again = Proc::remus(
                "standby (restarted on the folder the VM ran from)",
                &["standby", "--config", &cfg_s, "--site", "dc2", "--state-dir", &state_s],
                &dir.join("standby-again.log"),
            );
            _again.expect_log("replica recovered", Duration::from_secs(30));
            let line = log("standby-again.log")
                .lines()
                .find(|l| l.contains("replica recovered"))
                .map(str::to_owned)
                .unwrap_or_default();
            assert!(
                line.contains("consistent=false"),
                "a replica the VM ran from is offered as consistent: {line}"
            );
            eprintln!("restarted on the folder the VM ran from: {line}");
            return;
        }
        if end == End::TakeoverThenFailback {
            failback_by_checksum(&dir, &cfg_s, &mut kv_w, &mut kv_lines);
            return;
        }
        if end != End::SwitchoverThenBack {
            return;
        }
        // dc2 protects the VM back towards dc1: full sync, then checkpoints.
        // dc2 dies as soon as its first checkpoint is committed at dc1 (the
        // hardest case: any output released ahead of the replica is then a
        // stall beyond the client's window), or, for one seed in four, up
        // to 19 checkpoints later; dc1 takes the VM back, the same TCP
        // connection going on.
        let protected_back = |min: u64| {
            vm_status("127.0.0.1:9478").filter(|v| {
                v.role == "primary" && v.state == "protected" && v.committed_epoch >= min
            })
        };
        wait_until(
            "dc2 protects web1 back towards dc1",
            Duration::from_secs(120),
            || protected_back(1).is_some(),
            || {
                counter.read_more(&mut conn, u64::MAX, Duration::from_millis(20));
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nstandby (dc2) log:\n{}\nstandby (dc1) log:\n{}",
                log("standby.log"),
                log("standby-dc1.log")
            )
        });
        let first = protected_back(1).map(|v| v.committed_epoch).unwrap_or(1);
        let more = if seed.is_multiple_of(4) { 1 + seed % 19 } else { 0 };
        wait_until(
            "dc2 commits more checkpoints at dc1",
            Duration::from_secs(60),
            || protected_back(first + more).is_some(),
            || {
                counter.read_more(&mut conn, u64::MAX, Duration::from_millis(5));
            },
        )
        .unwrap_or_else(|e| panic!("{e}\nstandby (dc2) log:\n{}", log("standby.log")));
        let at = counter.next();
        standby.kill();
        eprintln!(
            "dc2 killed {more} checkpoints after its first at dc1 (seed {seed}); client at {at}"
        );
        assert!(
            wait_for_log(&dir.join("standby-dc1.log"), "takeover complete", Duration::from_secs(60)),
            "dc1 never took the VM back\nstandby (dc1) log:\n{}",
            log("standby-dc1.log")
        );
        let back = counter.read_more(&mut conn, 100_000, Duration::from_secs(60));
        assert!(
            back >= 100_000,
            "after dc2's death only {back} more values\nstandby (dc1) log:\n{}\nstandby (dc2) log:\n{}",
            log("standby-dc1.log"),
            log("standby.log")
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

/// The old primary's site comes back after a takeover: a standby at dc1,
/// holding the VM's old disk (`web1.img`, where the VM ran before it was
/// killed), receives the VM that now runs at dc2. dc2 has written to the
/// disk since (while it had no backup), and dc1's copy holds
/// blocks of its own (its last epochs, never committed): the block hashes
/// of both sides are compared and only the blocks that differ travel (a
/// checksum resync, not the whole disk); at the end dc1's replica disk is
/// the disk dc2 runs from, byte for byte.
fn failback_by_checksum(
    dir: &Path,
    cfg_s: &str,
    kv_w: &mut TcpStream,
    kv_lines: &mut std::io::BufReader<TcpStream>,
) {
    use std::io::{BufRead, Write};
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    // Writes at dc2, while no backup exists: their replies wait for dc1.
    for k in 0..10 {
        writeln!(kv_w, "SET back{k} value{k}").expect("kv write");
    }
    // dc1's copy also holds what its last epochs wrote and never committed
    // (the kill came first): two blocks of it changed while it was down.
    {
        use std::os::unix::fs::FileExt;
        let old = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("web1.img"))
            .expect("dc1's old disk");
        for block in [10u64, 40] {
            old.write_all_at(&[0xA5; 512], block * 65536 + 4096)
                .expect("write dc1's old disk");
        }
    }
    let _standby1 = support::sites::standby_at_dc1(cfg_s, dir);
    kv_lines
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    for k in 0..10 {
        let mut line = String::new();
        kv_lines.read_line(&mut line).expect("kv reply at dc2");
        assert_eq!(line, "OK\n", "SET back{k}");
    }
    wait_until(
        "dc2 protects web1 back towards dc1",
        Duration::from_secs(120),
        || {
            vm_status("127.0.0.1:9478")
                .is_some_and(|v| v.role == "primary" && v.state == "protected")
                && !support::disk_syncs(&log("standby.log")).is_empty()
        },
        || std::thread::sleep(Duration::from_millis(100)),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nstandby (dc2) log:\n{}\nstandby (dc1) log:\n{}",
            log("standby.log"),
            log("standby-dc1.log")
        )
    });
    let syncs = support::disk_syncs(&log("standby.log"));
    let (mode, blocks, bytes) = syncs.last().expect("a disk sync").clone();
    eprintln!("failback disk sync: mode {mode}, {blocks} blocks, {bytes} bytes of a 4 MiB disk");
    assert_eq!(mode, "checksum", "{syncs:?}\n{}", log("standby.log"));
    // The sync repairs the two blocks dc1's copy has of its own and the
    // block or two dc2's guest wrote while it had no backup (of 64 blocks
    // of 64 KiB; dc2 keeps no copy of writes it cannot send, the hashes
    // find them); a block written while the hashes are taken may go twice.
    assert!(
        (2..=5).contains(&blocks) && bytes == blocks * 65536,
        "only the blocks that differ travel, not the disk: {syncs:?}"
    );
    // Every SET acknowledged and the guest idle: both disks the same.
    let ours = dir.join("state/replicas/web1/disk.img");
    let theirs = dir.join("state-dc1/replicas/web1/disk.img");
    wait_until(
        "dc1's replica disk equals the disk dc2 runs from",
        Duration::from_secs(30),
        || support::image_hash(&ours) == support::image_hash(&theirs),
        || std::thread::sleep(Duration::from_millis(200)),
    )
    .unwrap_or_else(|e| panic!("{e}\nstandby (dc1) log:\n{}", log("standby-dc1.log")));
    writeln!(kv_w, "GET back9").expect("kv write");
    let mut line = String::new();
    kv_lines.read_line(&mut line).expect("kv reply");
    assert_eq!(line, "VALUE value9\n");
}

/// Restarts on old state folders: the protect process restarts (a fresh
/// VM, numbering its epochs from 1) while the standby holds a replica at a
/// later epoch; then the standby restarts on its folder. Each time the
/// primary must end up protected again (the session renumbers past the
/// standby's epoch and a full resync follows; before, the renumbering was
/// fatal to protect), and the standby's replica must be consistent. Last,
/// both restart at once.
#[test]
fn protect_and_standby_restart_on_old_state_folders() {
    if !require_kvm_root() {
        return;
    }
    let tap = "rwe2e9";
    let (_tmp, dir, cfg_s) = deployment(tap, 17801, "52:54:00:12:36:0a", false);
    let state_s = dir.join("state").to_str().expect("utf-8").to_owned();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let standby_args = [
        "standby",
        "--config",
        &cfg_s,
        "--site",
        "dc2",
        "--state-dir",
        &state_s,
    ];
    let protect_args = ["protect", "web1", "--site", "dc2", "--config", &cfg_s];
    // Protected, with checkpoints committed past `min`.
    let protected_past = |min: u64, what: &str, logs: &[&str]| {
        wait_until(
            what,
            Duration::from_secs(120),
            || {
                vm_status("127.0.0.1:9477")
                    .is_some_and(|v| v.state == "protected" && v.committed_epoch > min)
            },
            || std::thread::sleep(Duration::from_millis(100)),
        )
        .unwrap_or_else(|e| {
            let all: Vec<String> = logs.iter().map(|l| format!("{l}:\n{}", log(l))).collect();
            panic!("{e}\n{}", all.join("\n"))
        });
        vm_status("127.0.0.1:9477").map_or(0, |v| v.committed_epoch)
    };

    hypervisor::netns::in_new_netns(|| {
        support::host_tap(tap);
        let mut standby = Proc::remus("standby", &standby_args, &dir.join("standby.log"));
        standby.expect_log("standby listening", Duration::from_secs(30));
        let mut protect = Proc::remus("protect", &protect_args, &dir.join("protect.log"));
        let first = protected_past(40, "first protection", &["protect.log", "standby.log"]);
        eprintln!("protected, committed epoch {first}");

        // protect restarts: its epochs start again at 1, the standby is at
        // `first` and beyond.
        protect.kill();
        let mut protect = Proc::remus(
            "protect (restarted)",
            &protect_args,
            &dir.join("protect2.log"),
        );
        let second = protected_past(first, "protect restarted", &["protect2.log", "standby.log"]);
        assert!(!protect.has_exited());
        eprintln!("protect restarted: protected again, committed epoch {second}");

        // The standby restarts on its folder (a consistent replica).
        standby.kill();
        let mut standby = Proc::remus(
            "standby (restarted)",
            &standby_args,
            &dir.join("standby2.log"),
        );
        let third = protected_past(
            second,
            "standby restarted",
            &["protect2.log", "standby2.log"],
        );
        assert!(!protect.has_exited());
        assert!(
            log("standby2.log").contains("replica recovered"),
            "the restarted standby reopens its replica:\n{}",
            log("standby2.log")
        );
        eprintln!("standby restarted: protected again, committed epoch {third}");

        // Both restart at once (a power cut at both sites): a fresh VM
        // numbering from 1 meets a standby reopening its replica at
        // `third` and beyond.
        protect.kill();
        standby.kill();
        let _standby = Proc::remus(
            "standby (both restarted)",
            &standby_args,
            &dir.join("standby3.log"),
        );
        let mut protect = Proc::remus(
            "protect (both restarted)",
            &protect_args,
            &dir.join("protect3.log"),
        );
        let fourth = protected_past(third, "both restarted", &["protect3.log", "standby3.log"]);
        assert!(!protect.has_exited());
        assert!(
            log("standby3.log").contains("replica recovered"),
            "the restarted standby reopens its replica:\n{}",
            log("standby3.log")
        );
        eprintln!("both restarted at once: protected again, committed epoch {fourth}");
    })
    .expect("network namespace");
}
