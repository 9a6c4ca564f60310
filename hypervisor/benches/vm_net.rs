//! Micro-VM figures, each beside a baseline measured in the same run:
//! guest start-to-ready time; echo round-trip latency and counter-stream
//! throughput over the tap, against the same services run as a host
//! process on loopback.
//!
//! `cargo bench -p hypervisor --bench vm_net` (root and /dev/kvm needed).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hypervisor::kvm::{NetSpec, Vm, VmSpec};

const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ROUND_TRIPS: usize = 2000;
const STREAM_BYTES: usize = 64 << 20;
const STREAM_MAX: Duration = Duration::from_secs(10);

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Echo round trips of 64 bytes: (median, p99) in microseconds.
fn echo_rtt(addr: SocketAddr) -> (f64, f64) {
    let mut s = connect(addr);
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert_eq!(back, msg);
    rtts.sort_by(|a, b| a.total_cmp(b));
    (rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100])
}

/// Counter stream: MB/s, after checking every value.
fn stream(addr: SocketAddr) -> f64 {
    let mut s = connect(addr);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let t = Instant::now();
    while total < STREAM_BYTES && t.elapsed() < STREAM_MAX {
        s.read_exact(&mut buf).unwrap();
        for (i, c) in buf.chunks_exact(8).enumerate() {
            let want = ((total / 8) + i) as u64;
            assert_eq!(
                u64::from_be_bytes(c.try_into().unwrap()),
                want,
                "stream broken"
            );
        }
        total += buf.len();
    }
    total as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// The same echo and counter services as the guest, as host threads.
fn host_services() -> (SocketAddr, SocketAddr) {
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let counter = TcpListener::bind("127.0.0.1:0").unwrap();
    let (ea, ca) = (echo.local_addr().unwrap(), counter.local_addr().unwrap());
    std::thread::spawn(move || {
        for c in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        for c in counter.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut next = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    for ch in buf.chunks_exact_mut(8) {
                        ch.copy_from_slice(&next.to_be_bytes());
                        next += 1;
                    }
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (ea, ca)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(e) = hypervisor::kvm::available() {
        eprintln!("vm_net bench needs /dev/kvm and root: {e}");
        std::process::exit(
            if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") {
                0
            } else {
                1
            },
        );
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-build");
    let images = hypervisor::guest_build::from_env_or_build(&target).expect("guest images");
    hypervisor::netns::in_new_netns(|| {
        // Start-to-ready, and the same for the trivial guest.
        let counter = VmSpec::new("counter", &images.counter).memory_mib(32).guest_arg(3);
        let mut trivial = Vec::new();
        for _ in 0..5 {
            let vm = Vm::start(&counter, Default::default()).unwrap();
            trivial.push(vm.wait_ready(Duration::from_secs(30)).unwrap());
            vm.shutdown().unwrap();
        }
        let spec = |worker: bool| {
            VmSpec::new("net", &images.net)
                .memory_mib(64)
                .tx_worker(worker)
                .network(NetSpec {
                    tap: "rwbench0".into(),
                    mac: [0x52, 0x54, 0, 0, 0, 1],
                    address: GUEST,
                    prefix_len: 24,
                    gateway: None,
                })
        };
        let mut net_ready = Vec::new();
        for _ in 0..5 {
            let v = Vm::start(&spec(true), Default::default()).unwrap();
            net_ready.push(v.wait_ready(Duration::from_secs(30)).unwrap());
            v.shutdown().unwrap();
        }
        let med = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let mut guest = Vec::new();
        for worker in [false, true] {
            let vm = Vm::start(&spec(worker), Default::default()).unwrap();
            vm.wait_ready(Duration::from_secs(30)).unwrap();
            hypervisor::netns::ip(&["addr", "add", "192.0.2.1/24", "dev", "rwbench0"]).unwrap();
            let (rtt_med, rtt_p99) = echo_rtt(SocketAddr::from((GUEST, 7)));
            let before = vm.exit_counts();
            let mbs = stream(SocketAddr::from((GUEST, 9000)));
            let after = vm.exit_counts();
            let frames = vm.net_stats().unwrap().tx_frames;
            vm.shutdown().unwrap();
            guest.push((rtt_med, rtt_p99, mbs, after.mmio - before.mmio, frames));
        }
        let (echo, counter) = host_services();
        let (h_med, h_p99) = echo_rtt(echo);
        let h_mbs = stream(counter);

        println!(
            "micro-VM figures (median of 5 starts; {ROUND_TRIPS} echo round trips of 64 B; counter stream up to {} MiB or {STREAM_MAX:?})",
            STREAM_BYTES >> 20
        );
        println!("transmit served in the vCPU thread (one exit per frame) or by the polling worker (default)");
        println!(
            "{:<34} {:>16} {:>16} {:>16}",
            "", "VM, tx in vCPU", "VM, tx worker", "host loopback"
        );
        println!(
            "{:<34} {:>16.2?} {:>16} {:>16}",
            "start-to-ready, counter guest",
            med(&mut trivial),
            "",
            "-"
        );
        println!(
            "{:<34} {:>16} {:>16.2?} {:>16}",
            "start-to-ready, network guest",
            "",
            med(&mut net_ready),
            "-"
        );
        let (a, b) = (guest[0], guest[1]);
        println!(
            "{:<34} {:>13.1} us {:>13.1} us {:>13.1} us",
            "echo round trip, median", a.0, b.0, h_med
        );
        println!(
            "{:<34} {:>13.1} us {:>13.1} us {:>13.1} us",
            "echo round trip, p99", a.1, b.1, h_p99
        );
        println!(
            "{:<34} {:>11.1} MB/s {:>11.1} MB/s {:>11.1} MB/s",
            "counter stream throughput", a.2, b.2, h_mbs
        );
        println!(
            "{:<34} {:>16} {:>16} {:>16}",
            "MMIO exits during the stream", a.3, b.3, "-"
        );
    })
    .expect("network namespace");
}
