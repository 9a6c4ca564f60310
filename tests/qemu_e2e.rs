//! The engine with the QEMU backend: `remus-wan protect` runs a real Linux
//! guest (Debian's kernel, busybox userland) in QEMU and protects it
//! towards `remus-wan standby`, a witness arbitrating. A client asks the
//! guest's counter service (one line in, the next value out) over TCP;
//! the protect process (and its QEMU) is SIGKILLed; the standby takes over
//! by itself, resuming the guest in a second QEMU from the last committed
//! checkpoint, and the client's same connection gets the very next value:
//! every answer it saw had been committed at the backup. The guest's disk
//! is served by remus-wan over NBD: every write the guest acknowledged
//! (synced before its "OK") is on the resumed guest's disk.
//!
//! The guest has 1 GiB of RAM and is protected with kernel write tracking
//! (the pause follows the pages written, not RAM).
//!
//! Needs root (network namespace, tap), QEMU and the Linux guest image
//! (`cargo xtask guest-image --linux`; `cargo xtask test` builds it).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use remus_wan::testbed::LocalDeployment;

const TAP: &str = "rwqe2e0";

fn prerequisites() -> Option<hypervisor::qemu::LinuxImage> {
    let mut missing = support::missing_root_kvm(false);
    if let Err(e) = hypervisor::qemu::available(Path::new("qemu-system-x86_64")) {
        missing.push(format!("QEMU ({e})"));
    }
    let image = hypervisor::qemu::LinuxImage::from_env_or_workspace()
        .map_err(|e| missing.push(format!("the Linux guest image ({e})")))
        .ok();
    let ok = support::verdict(
        "qemu_e2e",
        &missing,
        "Debian package qemu-system-x86 and `cargo xtask guest-image --linux`, \
         e.g. via `cargo xtask test`; run as root",
    );
    if ok {
        image
    } else {
        None
    }
}

fn ask(w: &mut TcpStream, r: &mut BufReader<TcpStream>) -> u64 {
    w.write_all(b"next\n").expect("send request");
    let mut line = String::new();
    r.read_line(&mut line).expect("counter reply");
    line.trim()
        .parse()
        .unwrap_or_else(|e| panic!("counter reply {line:?}: {e}"))
}

#[test]
fn a_linux_guest_in_qemu_survives_its_primary_being_killed() {
    let Some(image) = prerequisites() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let cfg = LocalDeployment {
        dir: dir.clone(),
        guest_image: image.kernel.clone(),
        epoch_interval_ms: 200,
        ports: (17801, 17802),
        dc2_connect_port: None,
        tap: TAP.into(),
        mac: "52:54:00:12:38:71".into(),
        // A real-sized guest: with kernel write tracking the checkpoint
        // pause follows the pages written, not the 1 GiB of RAM.
        memory_mib: 1024,
        witness_port: Some(17803),
    }
    .write()
    .expect("deployment");
    // The same deployment, with the VM in QEMU; its 4 MiB disk is served
    // to the guest by remus-wan over NBD.
    let text = std::fs::read_to_string(&cfg).expect("config");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("guest_image = ") {
                format!(
                    "backend = \"qemu\"\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
                    image.kernel.display(),
                    image.initrd.display()
                )
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&cfg, text).expect("config");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    hypervisor::netns::in_new_netns(|| {
        support::host_tap(TAP);
        let (_witness, _standby) = support::sites::witness_and_standby(&cfg_s, &dir);
        // A control token folder of this test's own: tests running at the
        // same time in other namespaces use the same control port.
        let run_dir = dir.join("run").to_str().expect("utf-8").to_owned();
        let mut protect = support::sites::protect(
            Some("web1"),
            &cfg_s,
            &dir,
            &[("REMUS_WAN_RUN_DIR", run_dir.clone())],
        );
        // The guest boots under TCG (tens of seconds on a loaded machine).
        let guest: SocketAddr = "192.0.2.10:7000".parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(180);
        let conn = loop {
            match TcpStream::connect_timeout(&guest, Duration::from_secs(1)) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                Err(e) => panic!(
                    "the Linux guest never answered on 7000: {e}\nprotect log:\n{}",
                    log("protect.log")
                ),
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut r = BufReader::new(conn.try_clone().expect("clone"));
        let mut w = conn;
        let first = ask(&mut w, &mut r);
        let mut last = first;
        for _ in 0..10 {
            let v = ask(&mut w, &mut r);
            assert_eq!(v, last + 1, "counter skipped while protected");
            last = v;
        }
        eprintln!("protected Linux guest answered {first}..={last}");
        assert!(
            log("protect.log").contains("dirty_tracking=WriteProtect"),
            "the guest is not protected by kernel write tracking:\n{}",
            log("protect.log")
        );
        // Disk writes: each "OK" leaves the guest only once the epoch
        // holding the write (and its sync) is committed at dc2.
        let kv = TcpStream::connect_timeout(
            &"192.0.2.10:7001".parse().expect("addr"),
            Duration::from_secs(5),
        )
        .expect("disk service");
        kv.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut kv_r = BufReader::new(kv.try_clone().expect("clone"));
        let mut kv_w = kv;
        let keys = [3u64, 17, 42, 100, 1000];
        for k in keys {
            kv_w.write_all(format!("SET {k} value{k}\n").as_bytes())
                .expect("set");
            let mut line = String::new();
            kv_r.read_line(&mut line).expect("set reply");
            assert_eq!(line, "OK\n", "SET {k}");
        }
        // The proof that kernel write tracking lost no page: the replica
        // compared with the running guest at commit points, page by page
        // (1 GiB of RAM plus the frame reserve) and block by block.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_remus-wan"))
            .args(["verify", "web1", "--timeout", "300", "--run-dir", &run_dir])
            .output()
            .expect("remus-wan verify");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && text.contains("the replica is identical to the primary"),
            "verify: {:?}\n{text}{}\nprotect log:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            log("protect.log")
        );
        let frames = hypervisor::qemu::frame_count(1024);
        assert!(
            text.contains(&format!(
                "{frames} memory pages and 1024 disk blocks compared"
            )),
            "{text}"
        );
        protect.kill();
        let killed = Instant::now();
        // The next value comes from the guest resumed at dc2, on the same
        // connection: nothing it answered before was lost.
        let v = ask(&mut w, &mut r);
        let after = killed.elapsed();
        assert_eq!(
            v,
            last + 1,
            "after the takeover the counter went from {last} to {v}\nstandby log:\n{}",
            log("standby.log")
        );
        assert!(
            log("standby.log").contains("takeover complete"),
            "answered without a takeover?\n{}",
            log("standby.log")
        );
        let mut last = v;
        for _ in 0..10 {
            let v = ask(&mut w, &mut r);
            assert_eq!(v, last + 1, "counter skipped after the takeover");
            last = v;
        }
        // Every acknowledged write is on the resumed guest's disk, read
        // back through it on the same connection, and in the replica's
        // disk image that dc2 serves it from.
        let disk = std::fs::read(dir.join("state/replicas/web1/disk.img")).expect("replica disk");
        for k in keys {
            kv_w.write_all(format!("GET {k}\n").as_bytes())
                .expect("get");
            let mut line = String::new();
            kv_r.read_line(&mut line)
                .expect("get reply after the takeover");
            assert_eq!(
                line,
                format!("VALUE value{k}\n"),
                "acknowledged SET {k} lost"
            );
            let at = (k * 512) as usize;
            let want = format!("value{k}\n");
            assert_eq!(
                disk.get(at..at + want.len()),
                Some(want.as_bytes()),
                "block {k} of the replica's disk"
            );
        }
        let line = log("standby.log")
            .lines()
            .find(|l| l.contains("takeover complete"))
            .map(str::to_owned)
            .unwrap_or_default();
        eprintln!("kill → next answer from the resumed QEMU guest: {after:?}\n{line}");
    })
    .expect("network namespace");
}
