//! End to end, real processes over real QUIC: the disk of a protected
//! micro-VM (KVM, the key-value guest that logs every SET to its disk) is
//! resynchronised by difference. The standby is killed and stays away
//! until the primary's resume window is gone (a resync is due); the guest
//! keeps writing meanwhile and during the resync; the restarted standby
//! reports its consistent replica of the same lineage, and the resync
//! sends only the blocks written since its epoch (the protect log's
//! `disk synchronised` figures), not the whole disk; at the end the replica
//! disk is byte-identical to the primary's (every SET acknowledged, so
//! committed, and no write after it). Then protect is killed and
//! restarted on the same disk: its block map survives, and that sync is
//! incremental too. Last, a new standby with no replica gets the whole
//! disk while the guest writes to it, and ends with an identical image.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use remus_wan::testbed::LocalDeployment;
use support::{disk_syncs as syncs, image_hash, vm_status, wait_for_log, wait_until, Proc};

const DISK_BYTES: u64 = 64 << 20;
const BLOCK: u64 = 64 << 10;

/// Sends `n` SETs without waiting, then reads the `n` replies (each one
/// released only once its epoch is committed at the backup).
fn pipelined_sets(
    w: &mut std::net::TcpStream,
    r: &mut BufReader<std::net::TcpStream>,
    from: u64,
    n: u64,
) {
    for k in from..from + n {
        writeln!(w, "SET key{k} value-{k}-{}", "x".repeat(200)).expect("kv write");
    }
    for k in from..from + n {
        let mut line = String::new();
        r.read_line(&mut line).expect("kv reply");
        assert_eq!(line, "OK\n", "SET key{k}");
    }
}

#[test]
fn a_standby_restart_and_a_protect_restart_resync_only_written_blocks() {
    if !support::require_kvm_root("disk_resync_e2e") {
        return;
    }
    let images = hypervisor::guest_build::from_env_or_build(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build"),
    )
    .expect("guest images (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let tap = "rwdr0";
    let cfg = LocalDeployment {
        dir: tmp.path().to_owned(),
        guest_image: images.net.clone(),
        epoch_interval_ms: 50,
        memory_mib: 64,
        ports: (17901, 17902),
        dc2_connect_port: None,
        tap: tap.into(),
        mac: "52:54:00:12:37:01".into(),
        witness_port: None,
    }
    .write()
    .expect("deployment");
    let dir = tmp.path().to_owned();
    // A larger disk than the deployment's, with data in its first 8 MiB,
    // so that a full copy and a difference are far apart.
    let disk = dir.join("web1.img");
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("disk image");
        f.set_len(DISK_BYTES).expect("grow disk");
        use std::os::unix::fs::FileExt;
        let junk: Vec<u8> = (0..(8u32 << 20)).map(|i| (i * 7 + 3) as u8).collect();
        f.write_all_at(&junk, 16 << 20).expect("data");
    }
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let state_s = dir.join("state").to_str().expect("utf-8").to_owned();
    let replica_disk = dir.join("state/replicas/web1/disk.img");
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
    let protected_with = |n: usize, what: &str, plog: &str, slog: &str| {
        wait_until(
            what,
            Duration::from_secs(120),
            || {
                syncs(&log(plog)).len() >= n
                    && vm_status("127.0.0.1:9477").is_some_and(|v| v.state == "protected")
            },
            || std::thread::sleep(Duration::from_millis(100)),
        )
        .unwrap_or_else(|e| panic!("{e}\n{plog}:\n{}\n{slog}:\n{}", log(plog), log(slog)));
    };

    hypervisor::netns::in_new_netns(|| {
        support::host_tap(tap);
        let mut standby = Proc::remus("standby", &standby_args, &dir.join("standby.log"));
        standby.expect_log("standby listening", Duration::from_secs(30));
        let mut protect = Proc::remus("protect", &protect_args, &dir.join("protect.log"));
        protected_with(1, "first protection", "protect.log", "standby.log");
        let first = syncs(&log("protect.log"));
        eprintln!("initial sync: {first:?}");
        assert_eq!(first[0].0, "full", "a first sync sends the whole disk");
        assert_eq!(first[0].2, DISK_BYTES, "the whole disk went");

        let kv_addr: SocketAddr = "192.0.2.10:7000".parse().expect("addr");
        let kv =
            support::connect_retrying(&kv_addr, Duration::from_secs(60)).expect("kv connection");
        kv.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let mut kv_r = BufReader::new(kv.try_clone().expect("clone"));
        let mut kv_w = kv;
        pipelined_sets(&mut kv_w, &mut kv_r, 0, 20);

        // The standby dies; the guest writes while it is away (its replies
        // wait for a commit); it comes back once protect has given up its
        // resume window.
        let epochs_then = vm_status("127.0.0.1:9477").map_or(0, |v| v.epochs);
        standby.kill();
        for k in 0..20u64 {
            writeln!(kv_w, "SET away{k} value-{k}-{}", "y".repeat(300)).expect("kv write");
        }
        // More checkpoints than the resume window holds (256).
        wait_until(
            "protect checkpoints past its resume window",
            Duration::from_secs(90),
            || vm_status("127.0.0.1:9477").is_some_and(|v| v.epochs > epochs_then + 300),
            || std::thread::sleep(Duration::from_millis(200)),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log("protect.log")));
        let mut standby = Proc::remus(
            "standby (restarted)",
            &standby_args,
            &dir.join("standby2.log"),
        );
        // More writes during the resync itself.
        for k in 0..20u64 {
            writeln!(kv_w, "SET during{k} value-{k}-{}", "z".repeat(300)).expect("kv write");
        }
        protected_with(
            2,
            "resync after the standby restart",
            "protect.log",
            "standby2.log",
        );
        for _ in 0..40 {
            let mut line = String::new();
            kv_r.read_line(&mut line).expect("kv reply");
            assert_eq!(line, "OK\n");
        }
        let all = syncs(&log("protect.log"));
        let resync = all.last().expect("a resync").clone();
        eprintln!("resync after the standby restart: {resync:?}");
        assert_eq!(resync.0, "incremental", "{all:?}\n{}", log("protect.log"));
        assert!(
            resync.1 <= 8 && resync.2 <= 8 * BLOCK,
            "only the few blocks the guest wrote travel, not the disk: {resync:?}"
        );
        // Every SET acknowledged: committed at the backup, and the guest
        // writes nothing more. The replica disk is the primary's.
        wait_until(
            "the resynchronised replica is live",
            Duration::from_secs(60),
            || log("standby2.log").contains("it is now the replica"),
            || std::thread::sleep(Duration::from_millis(100)),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log("standby2.log")));
        pipelined_sets(&mut kv_w, &mut kv_r, 100, 5);
        assert_eq!(
            image_hash(&disk),
            image_hash(&replica_disk),
            "replica disk differs from the primary's"
        );

        // protect restarts on the same disk: the block map survived, the
        // standby's replica is of its lineage: incremental again.
        protect.kill();
        drop(kv_w);
        let mut protect = Proc::remus(
            "protect (restarted)",
            &protect_args,
            &dir.join("protect2.log"),
        );
        protected_with(1, "protect restarted", "protect2.log", "standby2.log");
        let again = syncs(&log("protect2.log"));
        eprintln!("sync after the protect restart: {again:?}");
        assert_eq!(again[0].0, "incremental", "{}", log("protect2.log"));
        assert!(again[0].1 <= 8, "{again:?}");
        let kv = support::connect_retrying(&kv_addr, Duration::from_secs(60)).expect("kv again");
        kv.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut kv_r = BufReader::new(kv.try_clone().expect("clone"));
        let mut kv_w = kv;
        pipelined_sets(&mut kv_w, &mut kv_r, 200, 5);
        wait_until(
            "replica identical after the protect restart",
            Duration::from_secs(30),
            || image_hash(&disk) == image_hash(&replica_disk),
            || std::thread::sleep(Duration::from_millis(200)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!protect.has_exited());

        // A new standby host (no replica at all): the whole disk is copied
        // while the VM runs and writes to it. The standby holds its first
        // epoch until the test releases it, so the guest's writes are sent
        // while the copy is in flight; they travel in later epochs and the
        // replica ends equal.
        standby.kill();
        std::fs::remove_dir_all(dir.join("state")).expect("wipe the standby's state");
        let release = dir.join("release-standby3");
        let _standby = Proc::remus_env(
            "standby (new host)",
            &standby_args,
            &[(
                "REMUS_WAN_FAULT",
                format!("standby.apply@1:hold={}", release.display()),
            )],
            &dir.join("standby3.log"),
        );
        assert!(
            wait_for_log(
                &dir.join("standby3.log"),
                "fault point reached: stalling",
                Duration::from_secs(60)
            ),
            "the new standby never got its first epoch:\n{}\n{}",
            log("standby3.log"),
            log("protect2.log")
        );
        assert_eq!(
            syncs(&log("protect2.log")).len(),
            1,
            "the copy to the new standby must still be in flight"
        );
        for k in 0..20u64 {
            writeln!(kv_w, "SET fresh{k} value-{k}-{}", "w".repeat(300)).expect("kv write");
        }
        std::fs::write(&release, b"").expect("release the standby");
        protected_with(
            2,
            "full copy to a new standby",
            "protect2.log",
            "standby3.log",
        );
        for _ in 0..20 {
            let mut line = String::new();
            kv_r.read_line(&mut line).expect("kv reply");
            assert_eq!(line, "OK\n");
        }
        let copy = syncs(&log("protect2.log"));
        eprintln!("sync to a new standby: {copy:?}");
        assert_eq!(copy[1].0, "full", "{copy:?}");
        assert_eq!(copy[1].2, DISK_BYTES, "the whole disk went");
        wait_until(
            "replica identical after a full copy under writes",
            Duration::from_secs(30),
            || image_hash(&disk) == image_hash(&replica_disk),
            || std::thread::sleep(Duration::from_millis(200)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    })
    .expect("network namespace");
}
