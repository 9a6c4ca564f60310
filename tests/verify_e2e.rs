//! End to end, with the real binary: `remus-wan verify` compares the
//! replica with the running primary (memory and disk, at commit points)
//! after a workload and finds them identical; a replica corrupted on
//! purpose (test fault `REMUS_WAN_TEST_CORRUPT`) shows exactly that
//! difference, `--repair` resends it, and a new run finds none.
//!
//! Each test runs in a network namespace of its own (see protect_e2e.rs).

mod support;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{
    connect_retrying, connect_small_window, vm_status, wait_for_log, wait_until, Counter, Proc,
};

/// Frame flipped in the corruption test: near the top of the 64 MiB guest,
/// which the micro-VM's program never touches (so no epoch rewrites it).
const CORRUPT_FRAME: u64 = 16_000;

fn deployment(tap: &str, port: u16, mac: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
    support::micro_vm_deployment(tap, port, mac, false)
}

/// The control token folder of the test in `dir`: tests running at the
/// same time in other namespaces use the same control port.
fn run_dir(dir: &Path) -> String {
    dir.join("run").to_str().expect("utf-8").to_owned()
}

/// `remus-wan verify args...` for the deployment in `dir`: exit code and
/// stdout (stderr printed).
fn verify(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
        .arg("verify")
        .args(args)
        .args(["--run-dir", &run_dir(dir)])
        .args(["--timeout", "120"])
        .output()
        .expect("remus-wan verify");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "verify {args:?}: {:?}\n{stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// Starts standby and protect, runs a workload (counter stream and
/// key-value writes to the disk), waits until protected. Returns the
/// processes (killed on drop) and the client connections.
fn protected_with_workload(
    dir: &Path,
    cfg_s: &str,
    standby_env: &[(&str, String)],
) -> (Proc, Proc, std::net::TcpStream) {
    let standby = support::sites::standby(cfg_s, dir, standby_env);
    let protect = support::sites::protect(
        Some("web1"),
        cfg_s,
        dir,
        &[("REMUS_WAN_RUN_DIR", run_dir(dir))],
    );
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
    let got = counter.read_more(&mut conn, 2000, Duration::from_secs(30));
    assert!(got >= 2000, "only {got} counter values while protected");
    // Disk writes: each SET is on the primary's disk (and in an epoch)
    // before its OK leaves.
    let kv_addr: SocketAddr = "192.0.2.10:7000".parse().expect("addr");
    let kv = connect_small_window(&kv_addr).expect("kv connection");
    kv.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut lines = std::io::BufReader::new(kv.try_clone().expect("clone"));
    let mut w = kv;
    for i in 0..100 {
        writeln!(w, "SET key{i} value{i}").expect("kv write");
        let mut line = String::new();
        lines.read_line(&mut line).expect("kv reply");
        assert_eq!(line, "OK\n", "SET key{i}");
    }
    wait_until(
        "the primary publishes a protected status",
        Duration::from_secs(60),
        || vm_status("127.0.0.1:9477").is_some_and(|v| v.state == "protected"),
        || {
            counter.read_more(&mut conn, u64::MAX, Duration::from_millis(100));
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (standby, protect, conn)
}

#[test]
fn verify_after_a_workload_finds_the_replica_identical() {
    if !support::require_kvm_root("verify_e2e") {
        return;
    }
    let tap = "rwver0";
    let (_tmp, dir, cfg_s) = deployment(tap, 17801, "52:54:00:12:38:01");
    hypervisor::netns::in_new_netns(|| {
        support::host_tap(tap);
        let (_standby, mut protect, _conn) = protected_with_workload(&dir, &cfg_s, &[]);
        let (code, out) = verify(&dir, &["web1"]);
        assert_eq!(
            code,
            0,
            "verify found differences or failed:\n{out}\n{}",
            protect.log_text()
        );
        assert!(
            out.contains("the replica is identical to the primary"),
            "{out}"
        );
        // 64 MiB of memory and the 4 MiB disk, every unit.
        assert!(
            out.contains("16384 memory pages and 1024 disk blocks compared"),
            "{out}"
        );
        let (code, out) = verify(&dir, &["web1", "--disk-only"]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("0 memory pages and 1024 disk blocks"), "{out}");
        // The figures are in status and metrics.
        let st = vm_status("127.0.0.1:9477").expect("status");
        assert_eq!(st.verify_totals.runs, 2);
        assert_eq!(st.verify_totals.mismatches, 0);
        let metrics = {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect("127.0.0.1:9477").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                .expect("request");
            let mut m = String::new();
            s.read_to_string(&mut m).expect("metrics");
            m
        };
        assert!(
            metrics.contains("remus_wan_verify_mismatches_total{vm=\"web1\",role=\"primary\"} 0"),
            "{metrics}"
        );
        assert!(protect.exited().is_none(), "protect stopped");
    })
    .expect("network namespace");
}

#[test]
fn verify_finds_a_corrupted_page_and_repair_fixes_it() {
    if !support::require_kvm_root("verify_e2e") {
        return;
    }
    let tap = "rwver1";
    let (_tmp, dir, cfg_s) = deployment(tap, 17811, "52:54:00:12:38:02");
    hypervisor::netns::in_new_netns(|| {
        support::host_tap(tap);
        let corrupt = format!("memory:{}@20", CORRUPT_FRAME * 4096 + 100);
        let (standby, _protect, _conn) =
            protected_with_workload(&dir, &cfg_s, &[("REMUS_WAN_TEST_CORRUPT", corrupt)]);
        assert!(
            wait_for_log(
                standby.log_path(),
                "replica corrupted on purpose",
                Duration::from_secs(60)
            ),
            "the test fault did not fire:\n{}",
            standby.log_text()
        );
        let (code, out) = verify(&dir, &["web1", "--memory-only"]);
        assert_eq!(code, 6, "verify should report the difference:\n{out}");
        assert!(out.contains("1 differences"), "{out}");
        assert!(
            out.contains(&format!(
                "memory frame {CORRUPT_FRAME} (guest-physical {:#x})",
                CORRUPT_FRAME * 4096
            )),
            "{out}"
        );
        let (code, out) = verify(&dir, &["web1", "--memory-only", "--repair"]);
        assert_eq!(code, 7, "repair should fix the difference:\n{out}");
        assert!(out.contains("1 differences, 1 repaired"), "{out}");
        let (code, out) = verify(&dir, &["web1"]);
        assert_eq!(code, 0, "after repair the replica is identical:\n{out}");
        let st = vm_status("127.0.0.1:9477").expect("status");
        assert_eq!(
            (st.verify_totals.mismatches, st.verify_totals.repaired),
            (2, 1)
        );
    })
    .expect("network namespace");
}
