//! The network guest over a tap, from a host client through the real Linux
//! TCP stack, inside a network namespace made by the test: echo, counter
//! stream, key-value on disk across a restart, the dirtying service.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use hypervisor::kvm::{Exit, NetSpec, Vm, VmSpec};

const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const TAP: &str = "rwtap0";

fn start(disk: &Path) -> Vm {
    let spec = VmSpec::new("net", &common::images().net)
        .memory_mib(64)
        .disk(disk)
        .network(NetSpec {
            tap: TAP.into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            address: GUEST,
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        });
    let vm = Vm::start(&spec, Default::default()).expect("start the network guest");
    // The tap exists now (the VMM created it up); give the host its side.
    let _ = std::process::Command::new("ip")
        .args(["addr", "add", "192.0.2.1/24", "dev", TAP])
        .output();
    let ready = vm.wait_ready(Duration::from_secs(60));
    eprintln!("ready: {ready:?}; console: {:?}", vm.console_lines());
    if let Err(e) = ready {
        panic!("{e}; console: {:?}", vm.console_lines());
    }
    vm
}

fn connect(port: u16) -> TcpStream {
    let s = common::connect_guest(SocketAddr::from((GUEST, port)));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn echo_round_trip() {
    let mut s = connect(7);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut got = vec![0u8; data.len()];
    std::thread::scope(|sc| {
        let mut w = s.try_clone().unwrap();
        let data = &data;
        sc.spawn(move || w.write_all(data).expect("echo write"));
        s.read_exact(&mut got).expect("echo read");
    });
    assert!(got == data, "echo returned different bytes");
}

fn counter_stream() {
    let mut s = connect(9000);
    let mut buf = vec![0u8; 2 << 20];
    s.read_exact(&mut buf).expect("counter read");
    for (i, c) in buf.chunks_exact(8).enumerate() {
        let v = u64::from_be_bytes(c.try_into().unwrap());
        assert_eq!(v, i as u64, "counter stream broken at value {i}");
    }
}

fn kv(lines: &[&str]) -> Vec<String> {
    let s = connect(7000);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    lines
        .iter()
        .map(|l| {
            writeln!(w, "{l}").expect("kv write");
            let mut reply = String::new();
            r.read_line(&mut reply).expect("kv read");
            reply.trim_end().to_string()
        })
        .collect()
}

#[test]
fn echo_counter_and_kv_over_tap_survive_a_restart() {
    if !common::require_kvm_root() {
        return;
    }
    let images = common::images();
    assert!(images.net.is_file());
    let dir = tempfile::tempdir().unwrap();
    let disk = common::disk_image(dir.path(), 4);
    common::in_new_netns(|| {
        let vm = start(&disk);
        echo_round_trip();
        counter_stream();
        assert_eq!(
            kv(&[
                "SET alpha one",
                "SET beta two words",
                "GET alpha",
                "GET nothing"
            ]),
            ["OK", "OK", "VALUE one", "NONE"]
        );
        let stats = vm.net_stats().unwrap();
        assert!(stats.tx_frames > 0 && stats.rx_frames > 0, "{stats:?}");
        assert_eq!(vm.shutdown().expect("clean stop"), Exit::Stopped);
    });
    let image = std::fs::read(&disk).unwrap();
    assert!(
        image.windows(4).filter(|w| w == b"KV01").count() >= 2,
        "key-value records not on the disk image"
    );
    common::in_new_netns(|| {
        let vm = start(&disk);
        assert_eq!(
            kv(&["GET alpha", "GET beta", "COUNT"]),
            ["VALUE one", "VALUE two words", "COUNT 2"]
        );
        vm.shutdown().expect("clean stop");
    });
}

#[test]
fn the_dirtying_workload_covers_its_working_set() {
    if !common::require_kvm_root() {
        return;
    }
    let spec = VmSpec::new("dirty", &common::images().net)
        .memory_mib(64)
        .workload(hypervisor::kvm::Workload {
            dirty_set_pages: 2048,
            dirty_pages_per_ms: 200,
        })
        .network(NetSpec {
            tap: TAP.into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
            address: GUEST,
            prefix_len: 24,
            gateway: None,
        });
    common::in_new_netns(|| {
        let vm = Vm::start(&spec, Default::default()).expect("start");
        vm.wait_ready(Duration::from_secs(60)).expect("ready");
        vm.take_dirty_log().unwrap();
        // Bounded wait until one round of the dirty log sees the whole set.
        let mut best = 0;
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(100));
            let n = hypervisor::kvm::memory::count_dirty(&vm.take_dirty_log().unwrap());
            best = best.max(n);
            if n >= 2048 {
                break;
            }
        }
        assert!(best >= 2048, "at most {best} dirty pages per round");
        vm.shutdown().expect("stop");
    });
}

/// The guest's dirtying service (TCP 9100, used by `remus-wan bench
/// protect`): bad requests get an error line, a request writes across its
/// working set for its duration on the guest's clock and reports the page
/// writes, and the other services keep answering while it runs.
#[test]
fn dirty_requests_cover_their_working_set_while_echo_keeps_answering() {
    if !common::require_kvm_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = common::disk_image(dir.path(), 4);
    common::in_new_netns(|| {
        let vm = start(&disk);
        let s = connect(9100);
        // Longer than the longest request below.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut ask = |req: &str| {
            writeln!(w, "{req}").expect("dirty write");
            let mut line = String::new();
            r.read_line(&mut line).expect("dirty reply");
            line.trim().to_string()
        };
        for bad in [
            "DIRTY 0 10",
            "DIRTY 1024 0",
            "DIRTY x 10",
            "PING",
            "DIRTY 999999999 10",
            "DIRTY 18446744073709551615 10",
        ] {
            let reply = ask(bad);
            assert!(reply.starts_with("ERR "), "{bad:?} -> {reply:?}");
        }
        // The first request allocates the buffer (and dirties it).
        assert!(ask("DIRTY 1024 100").starts_with("DONE "));
        vm.take_dirty_log().unwrap();
        // 10 s of guest time: the margin for the echo below (milliseconds
        // on an idle machine) to finish while the job still runs.
        let mut w2 = s.try_clone().unwrap();
        writeln!(w2, "DIRTY 1024 10000").unwrap();
        echo_round_trip();
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let early = (&s).read(&mut b);
        assert!(
            matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the job should still be running after the echo: {early:?}"
        );
        s.set_nonblocking(false).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).expect("dirty reply");
        let words: Vec<u64> = line
            .trim()
            .strip_prefix("DONE ")
            .unwrap_or_else(|| panic!("{line:?}"))
            .split(' ')
            .map(|w| w.parse().expect("number"))
            .collect();
        let [writes, micros, stalled] = words[..] else {
            panic!("{line:?}")
        };
        assert!(writes >= 256, "not one pass over 256 pages: {writes}");
        assert!(micros >= 10_000_000, "ran {micros} us of 10 s");
        assert!(stalled <= micros);
        let dirty = hypervisor::kvm::memory::count_dirty(&vm.take_dirty_log().unwrap());
        assert!(dirty >= 256, "{dirty} pages dirtied by a 1 MiB working set");
        vm.shutdown().expect("clean stop");
    });
}

/// Holds the guest's frames instead of sending them, as the replication
/// engine does until an epoch commits.
#[derive(Clone, Default)]
struct Held(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl hypervisor::kvm::devices::net::FrameSink for Held {
    fn send(&mut self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

#[test]
fn transmitted_frames_go_through_the_engine_seam() {
    if !common::require_kvm_root() {
        return;
    }
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x58];
    let spec = VmSpec::new("seam", &common::images().net)
        .memory_mib(64)
        .network(NetSpec {
            tap: TAP.into(),
            mac,
            address: GUEST,
            prefix_len: 24,
            gateway: None,
        });
    let held = Held::default();
    common::in_new_netns(|| {
        let seams = hypervisor::kvm::Seams {
            frame_sink: Some(Box::new(held.clone())),
            write_hook: None,
        };
        let vm = Vm::start(&spec, seams).expect("start");
        common::ip(&["addr", "add", "192.0.2.1/24", "dev", TAP]);
        vm.wait_ready(Duration::from_secs(60)).expect("ready");
        // The host asks for the guest's MAC; the reply is held, so the
        // connection attempt cannot succeed.
        let addr = SocketAddr::from((GUEST, 7));
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        assert!(r.is_err(), "nothing the guest sends may reach the host");
        vm.shutdown().expect("stop");
    });
    let frames = held.0.lock().unwrap();
    assert!(
        frames
            .iter()
            .any(|f| f.len() >= 14 && f[6..12] == mac && f[12..14] == [0x08, 0x06]),
        "no ARP reply from the guest among {} held frames",
        frames.len()
    );
}
