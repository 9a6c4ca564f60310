//! A client's TCP connection to the Linux guest's counter service goes on,
//! with no gap or duplicate, when the guest moves to a second QEMU
//! restored from the last committed checkpoint (the primary killed
//! mid-stream).
//!
//! The test plays the engine: remus-wan is the guest's NIC backend, frames
//! from the tap go to the guest at once, frames from the guest are held
//! per epoch and written to the tap only once their checkpoint is applied
//! to the replica image (output commit). Needs root (tap, network
//! namespace) and QEMU.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::qemu::{spec, wait_ready};
use common::Outbox;
use hypervisor::kvm::devices::tap::Tap;
use hypervisor::kvm::Seams;
use hypervisor::qemu::netdev::GuestPort;
use hypervisor::qemu::{QemuGuest, QemuNetSpec, QemuSpec};
use hypervisor::{Checkpoint, ProtectedGuest};

const TAP: &str = "rwq0";
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const MIB: u64 = 128;
const EPOCH_GAP: Duration = Duration::from_millis(50);

/// The last committed checkpoint, as the backup holds it.
struct Replica {
    memory: Vec<u8>,
    state: Vec<u8>,
}

/// Runs epochs until `stop`: checkpoint (the outbox sealed at the pause),
/// apply to the replica (commit), release the epoch's frames to the tap.
/// The frames of an epoch that never committed are never released.
fn run_epochs(
    g: &mut QemuGuest,
    out: &Outbox,
    tap: &Tap,
    replica: &mut Replica,
    stop: &AtomicBool,
) {
    let mut cp = Checkpoint::default();
    let mut tap = tap.clone();
    while !stop.load(Ordering::Relaxed) {
        let mut sealed = Vec::new();
        g.checkpoint(&mut cp, &mut || sealed = out.seal())
            .expect("checkpoint");
        common::apply_pages(&mut replica.memory, &cp, 4096);
        replica.state.clone_from(&cp.state);
        common::release(&mut tap, sealed);
        std::thread::sleep(EPOCH_GAP);
    }
}

/// Tap → guest, at once, to whichever guest `port` names now.
fn forward_rx(tap: Tap, port: Arc<Mutex<Option<GuestPort>>>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(n)) = tap.recv_timeout(&mut buf, Duration::from_millis(50)) {
            if let Some(p) = port.lock().unwrap().as_ref() {
                // The primary may be dead: the client retransmits.
                let _ = p.send(&buf[..n]);
            }
        }
    }
}

fn ask(w: &mut TcpStream, r: &mut BufReader<TcpStream>) -> u64 {
    w.write_all(b"next\n").expect("send request");
    let mut line = String::new();
    r.read_line(&mut line).expect("read counter");
    line.trim()
        .parse()
        .unwrap_or_else(|e| panic!("counter reply {line:?}: {e}"))
}

fn net_spec(dir: &std::path::Path) -> Option<QemuSpec> {
    let image = common::require_qemu()?;
    Some(spec(image, dir, MIB).network(QemuNetSpec {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x77],
        address: Some((GUEST, 24)),
        gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
    }))
}

fn seams(out: &Outbox) -> Seams {
    Seams {
        frame_sink: Some(Box::new(out.clone())),
        write_hook: None,
    }
}

#[test]
fn counter_connection_survives_the_move_to_a_replica() {
    if !common::require_root("tap device, network namespace") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(spec) = net_spec(dir.path()) else {
        return;
    };
    common::in_new_netns(|| {
        common::persistent_tap(TAP, "192.0.2.1/24", "02:00:00:00:09:01");
        let tap = Tap::open(TAP).expect("open tap");
        let out = Outbox::default();
        let mut g = QemuGuest::start(&spec, seams(&out)).expect("start QEMU");
        let port = Arc::new(Mutex::new(Some(g.net().expect("NIC").guest_port())));
        let stop_rx = Arc::new(AtomicBool::new(false));
        let rx = {
            let (tap, port, stop) = (tap.clone(), port.clone(), stop_rx.clone());
            std::thread::spawn(move || forward_rx(tap, port, stop))
        };
        wait_ready(&g);
        let mut replica = Replica {
            memory: vec![0u8; (MIB << 20) as usize],
            state: Vec::new(),
        };

        // Protected run: the client sees only committed output.
        let stop = AtomicBool::new(false);
        let (mut w, mut r, mut next) = std::thread::scope(|s| {
            let epochs = s.spawn(|| run_epochs(&mut g, &out, &tap, &mut replica, &stop));
            let addr = SocketAddr::from((GUEST, 7000));
            let deadline = Instant::now() + Duration::from_secs(60);
            let w = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("connect {addr}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => panic!("connect {addr}: {e}"),
                }
            };
            w.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut r = BufReader::new(w.try_clone().unwrap());
            let mut w = w;
            let mut next = 1;
            for _ in 0..8 {
                assert_eq!(ask(&mut w, &mut r), next, "counter before the move");
                next += 1;
            }
            // The last request's answer is out; ask once more without
            // reading, so the primary dies with a request in flight.
            w.write_all(b"next\n").expect("send request");
            std::thread::sleep(Duration::from_millis(30));
            stop.store(true, Ordering::Relaxed);
            epochs.join().expect("epoch thread");
            (w, r, next)
        });
        // The primary dies; its uncommitted output is dropped.
        *port.lock().unwrap() = None;
        drop(g);
        out.seal();

        let out2 = Outbox::default();
        let t = Instant::now();
        let mut g2 = QemuGuest::restore(&spec, &replica.memory, &replica.state, seams(&out2))
            .expect("restore the replica");
        eprintln!("replica running {:?} after the primary died", t.elapsed());
        *port.lock().unwrap() = Some(g2.net().expect("NIC").guest_port());
        let stop = AtomicBool::new(false);
        let mut replica2 = Replica {
            memory: vec![0u8; (MIB << 20) as usize],
            state: Vec::new(),
        };
        std::thread::scope(|s| {
            let epochs = s.spawn(|| run_epochs(&mut g2, &out2, &tap, &mut replica2, &stop));
            // The request in flight is answered by the replica (TCP
            // retransmits it), then the stream goes on.
            let mut line = String::new();
            r.read_line(&mut line)
                .expect("answer to the request in flight");
            assert_eq!(
                line.trim().parse::<u64>().ok(),
                Some(next),
                "first answer after the move: {line:?}"
            );
            next += 1;
            for _ in 0..5 {
                assert_eq!(ask(&mut w, &mut r), next, "counter after the move");
                next += 1;
            }
            stop.store(true, Ordering::Relaxed);
            epochs.join().expect("epoch thread");
        });
        stop_rx.store(true, Ordering::Relaxed);
        rx.join().expect("rx thread");
        assert!(g2.is_running());
    });
}
