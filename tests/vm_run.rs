//! `remus-wan vm run`: the real binary runs the network guest from a
//! configuration file inside a network namespace made by the test; a host
//! client stores a key; SIGTERM stops it cleanly; the key is on the disk.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn require_kvm_root() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let why = match (hypervisor::kvm::available(), root) {
        (Ok(()), true) => return true,
        (Err(e), _) => e.to_string(),
        (_, false) => "needs root (tap devices, network namespaces)".into(),
    };
    if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED (REMUS_WAN_ALLOW_SKIP=1): {why}");
        false
    } else {
        panic!("this test needs KVM and root: {why} (set REMUS_WAN_ALLOW_SKIP=1 to skip)");
    }
}

fn config(dir: &Path, image: &Path) -> PathBuf {
    let p = dir.join("vm.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[[sites]]
name = "a"
listen = "127.0.0.1:7700"
[sites.tls]
ca = "ca.pem"
cert = "a.pem"
key = "a.key"

[[sites]]
name = "b"
listen = "127.0.0.1:7701"
[sites.tls]
ca = "ca.pem"
cert = "b.pem"
key = "b.key"

[[vms]]
name = "t1"
primary = "a"
backup = "b"
guest_image = "{}"
memory_mib = 64
disk = "t1.img"

[vms.network]
tap = "rwrun0"
mac = "52:54:00:12:34:56"
address = "198.51.100.80/24"
"#,
            image.display()
        ),
    )
    .unwrap();
    p
}

/// Kills the child if the test fails before it is reaped.
struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn vm_run_serves_and_stops_on_sigterm() {
    if !require_kvm_root() {
        return;
    }
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guests");
    let images = hypervisor::guest_build::from_env_or_build(&target).expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("t1.img"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let cfg = config(dir.path(), &images.net);
    let log = dir.path().join("console.log");
    hypervisor::netns::in_new_netns(|| {
        let child = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
            .args(["vm", "run", "--quiet", "--vm", "t1", "--config"])
            .arg(&cfg)
            .arg("--console-log")
            .arg(&log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn remus-wan");
        let mut child = Reap(child);
        // Wait (bounded) for the tap, then give the host its side.
        let deadline = Instant::now() + Duration::from_secs(30);
        while hypervisor::netns::ip(&["addr", "add", "198.51.100.1/24", "dev", "rwrun0"]).is_err() {
            assert!(Instant::now() < deadline, "tap rwrun0 never appeared");
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "remus-wan exited early"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let addr = SocketAddr::from(([198, 51, 100, 80], 7000));
        let s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "guest never answered: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        writeln!(w, "SET city lisbon").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        assert_eq!(reply, "OK\n");
        let pid = child.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "remus-wan ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "exit status {status}");
    })
    .expect("network namespace");
    let disk = std::fs::read(dir.path().join("t1.img")).unwrap();
    assert!(
        disk.windows(10).any(|w| w == b"citylisbon"),
        "the acknowledged SET is not on the disk image"
    );
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(console.contains("up: echo 7"), "{console}");
}

#[test]
fn vm_run_explains_a_missing_guest_image() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Path::new("/nonexistent/netguest.elf"));
    let out = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
        .args(["vm", "run", "--vm", "t1", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("cargo xtask guest-image"), "{err}");
}
