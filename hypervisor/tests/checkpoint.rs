//! Checkpoints of the network guest in one process: after every checkpoint
//! the replica memory (pages applied) equals the guest memory at the pause,
//! over many epochs of the dirtying workload with pre-copy rounds mixed
//! in; then the VM is restored from the replica and the same TCP
//! connections go on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hypervisor::kvm::{self, NetSpec, Seams, Vm, VmSpec, Workload};
use hypervisor::{Checkpoint, ProtectedGuest};

const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const TAP: &str = "rwcp0";

fn spec(disk: &std::path::Path) -> VmSpec {
    VmSpec::new("cp", &common::images().net)
        .memory_mib(64)
        .disk(disk)
        .workload(Workload {
            dirty_set_pages: 2048,
            dirty_pages_per_ms: 100,
        })
        .network(NetSpec {
            tap: TAP.into(),
            mac: [0x52, 0x54, 0, 0x12, 0x35, 0x01],
            address: GUEST,
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
        })
}

fn connect(port: u16) -> TcpStream {
    let s = common::connect_guest(SocketAddr::from((GUEST, port)));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads `n` more counter values, checking they continue from `next`.
fn read_counter(s: &mut TcpStream, next: &mut u64, n: usize) {
    let mut buf = vec![0u8; n * 8];
    s.read_exact(&mut buf).expect("counter read");
    for c in buf.chunks_exact(8) {
        let v = u64::from_be_bytes(c.try_into().unwrap());
        assert_eq!(v, *next, "counter stream broken (gap or duplicate)");
        *next += 1;
    }
}

struct Kv {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Kv {
    fn new() -> Kv {
        let s = connect(7000);
        Kv {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
    fn ask(&mut self, line: &str) -> String {
        writeln!(self.w, "{line}").expect("kv write");
        let mut reply = String::new();
        self.r.read_line(&mut reply).expect("kv read");
        reply.trim_end().to_string()
    }
}

/// Checkpoints until `stop`: every epoch, the replica must equal the guest
/// memory as it was at the pause. Returns the replica image, the last
/// state blob and the number of epochs.
fn checkpoint_loop(
    vm: &mut Vm,
    stop: &AtomicBool,
    outbox: &common::Outbox,
) -> (Vec<u8>, Vec<u8>, usize) {
    let ps = vm.page_size();
    let frames = vm.frame_count();
    let mem = vm.memory().clone();
    let mut tap = vm.tap().expect("tap");
    let mut replica = vec![0u8; frames as usize * ps];
    let mut at_pause_image = Vec::new();
    let mut cp = Checkpoint::default();
    let mut pre = Checkpoint::default();
    let mut epochs = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while epochs < 50 || (!stop.load(Ordering::Acquire) && epochs < 3000) {
        assert!(Instant::now() < deadline, "checkpoint loop ran too long");
        std::thread::sleep(Duration::from_millis(10));
        if epochs % 5 == 3 {
            vm.precopy_round(1000, &mut pre).expect("pre-copy round");
            assert!(pre.frames.len() <= 1000);
            common::apply_pages(&mut replica, &pre, ps);
        }
        let mut sealed = Vec::new();
        vm.checkpoint(&mut cp, &mut || {
            sealed = outbox.seal();
            common::snapshot_memory(&mem, &mut at_pause_image);
        })
        .expect("checkpoint");
        if epochs == 0 {
            assert_eq!(
                cp.frames.len() as u64,
                frames,
                "first checkpoint is the full image"
            );
        }
        assert!(
            cp.frames.windows(2).all(|w| w[0] < w[1]),
            "frames ascending"
        );
        assert_eq!(cp.pages.len(), cp.frames.len() * ps);
        common::apply_pages(&mut replica, &cp, ps);
        if let Some(p) = common::first_difference(&replica, &at_pause_image, ps) {
            panic!(
                "epoch {epochs}: replica page {p} differs from the guest's ({} dirty pages)",
                cp.frames.len()
            );
        }
        kvm::VmState::decode(&cp.state).expect("state decodes");
        // Committed: release the epoch's output.
        common::release(&mut tap, sealed);
        epochs += 1;
    }
    (replica, cp.state.clone(), epochs)
}

#[test]
fn replica_equals_guest_after_every_checkpoint_and_resumes_the_same_connections() {
    if !common::require_kvm_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = common::disk_image(dir.path(), 4);
    let spec = spec(&disk);
    common::in_new_netns(|| {
        common::persistent_tap(TAP, "192.0.2.1/24", "02:00:00:00:05:01");
        let outbox = common::Outbox::default();
        let mut vm = Vm::start(
            &spec,
            Seams {
                frame_sink: Some(Box::new(outbox.clone())),
                write_hook: None,
            },
        )
        .expect("start");
        vm.wait_ready(Duration::from_secs(60)).expect("ready");
        let stop = AtomicBool::new(false);
        let mut counter_next = 0u64;
        let (mut counter, mut kv, (replica, state, epochs)) = std::thread::scope(|s| {
            let cp = s.spawn(|| checkpoint_loop(&mut vm, &stop, &outbox));
            let client = || {
                let mut counter = connect(9000);
                read_counter(&mut counter, &mut counter_next, 100_000);
                let mut kv = Kv::new();
                for i in 0..10 {
                    assert_eq!(kv.ask(&format!("SET key{i} value{i}")), "OK");
                    read_counter(&mut counter, &mut counter_next, 10_000);
                }
                (counter, kv)
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(client));
            stop.store(true, Ordering::Release);
            let out = cp.join().expect("checkpoint thread");
            match r {
                Ok((c, k)) => (c, k, out),
                Err(e) => std::panic::resume_unwind(e),
            }
        });
        eprintln!("{epochs} epochs checked, counter at {counter_next}");
        assert!(epochs >= 50);
        vm.shutdown().expect("primary stops cleanly");

        // The replica: same tap (persistent), same disk, same connections.
        let vm = kvm::restore(&spec, &replica, &state, Seams::default()).expect("restore");
        read_counter(&mut counter, &mut counter_next, 50_000);
        for i in 0..10 {
            assert_eq!(kv.ask(&format!("GET key{i}")), format!("VALUE value{i}"));
        }
        assert_eq!(kv.ask("COUNT"), "COUNT 10");
        vm.shutdown().expect("replica stops cleanly");
    });
}

#[test]
fn corrupt_or_mismatched_state_is_refused() {
    if !common::require_kvm_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = common::disk_image(dir.path(), 4);
    // Two vCPUs: the second one is parked by the guest, and stays so.
    let spec = VmSpec::new("bad", &common::images().counter)
        .memory_mib(32)
        .vcpus(2)
        .guest_arg(3);
    let mut vm = Vm::start(&spec, Seams::default()).expect("start");
    vm.wait_ready(Duration::from_secs(60)).expect("ready");
    let mut cp = Checkpoint::default();
    let mut image = vec![0u8; vm.frame_count() as usize * vm.page_size()];
    // Until the second vCPU has reached its park (bounded).
    for _ in 0..100 {
        vm.checkpoint(&mut cp, &mut || {}).expect("checkpoint");
        common::apply_pages(&mut image, &cp, vm.page_size());
        if kvm::VmState::decode(&cp.state).expect("decodes").vcpus[1].parked {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.shutdown().expect("stop");
    let state = cp.state.clone();
    let decoded = kvm::VmState::decode(&state).expect("decodes");
    eprintln!("state blob of 2 vCPUs: {} bytes", state.len());
    assert_eq!(decoded.vcpus.len(), 2);
    assert!(!decoded.vcpus[0].parked && decoded.vcpus[1].parked);
    assert!(
        decoded.vcpus[0].msrs.len() > 10,
        "MSRs saved: {}",
        decoded.vcpus[0].msrs.len()
    );

    let mut flipped = state.clone();
    flipped[state.len() / 2] ^= 0x40;
    for (what, blob) in [
        ("flipped", &flipped[..]),
        ("truncated", &state[..state.len() - 1]),
        ("empty", &[][..]),
    ] {
        match kvm::restore(&spec, &image, blob, Seams::default()) {
            Err(kvm::Error::State(e)) => eprintln!("{what}: refused: {e}"),
            other => panic!("{what} blob: expected a state error, got {other:?}"),
        }
    }
    // The state fits, but not this VM (different RAM size, a disk).
    let e = kvm::restore(
        &spec.clone().memory_mib(64),
        &image,
        &state,
        Seams::default(),
    )
    .unwrap_err();
    assert!(matches!(e, kvm::Error::Restore(_)), "{e:?}");
    let e = kvm::restore(&spec.clone().disk(&disk), &image, &state, Seams::default()).unwrap_err();
    assert!(matches!(e, kvm::Error::Restore(_)), "{e:?}");
    // The replica files are untouched, and the intact state still restores.
    let vm = kvm::restore(&spec, &image, &state, Seams::default()).expect("intact state restores");
    assert!(
        !vm.wait(Duration::from_millis(200)),
        "restored guest spins on"
    );
    vm.shutdown().expect("stop");
}

/// Counts frames and passes them to the tap once it is known.
#[derive(Clone, Default)]
struct Counting {
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tap: std::sync::Arc<std::sync::Mutex<Option<hypervisor::kvm::devices::tap::Tap>>>,
}

impl hypervisor::kvm::devices::net::FrameSink for Counting {
    fn send(&mut self, frame: &[u8]) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        if let Some(t) = self.tap.lock().unwrap().as_mut() {
            t.send(frame);
        }
    }
}

#[test]
fn while_paused_no_frame_leaves_and_no_guest_memory_changes() {
    if !common::require_kvm_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = common::disk_image(dir.path(), 4);
    let spec = spec(&disk);
    common::in_new_netns(|| {
        common::persistent_tap(TAP, "192.0.2.1/24", "02:00:00:00:05:03");
        let sink = Counting::default();
        let mut vm = Vm::start(
            &spec,
            Seams {
                frame_sink: Some(Box::new(sink.clone())),
                write_hook: None,
            },
        )
        .expect("start");
        *sink.tap.lock().unwrap() = vm.tap();
        vm.wait_ready(Duration::from_secs(60)).expect("ready");
        let mut counter = connect(9000);
        let mut next = 0;
        read_counter(&mut counter, &mut next, 20_000);
        // Frames keep arriving while paused: the client's ACKs and pings.
        let pinger = std::process::Command::new("ping")
            .args(["-i", "0.01", "-c", "100", "-q", &GUEST.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok();
        for round in 0..5 {
            vm.pause().expect("pause");
            let before = sink.sent.load(Ordering::SeqCst);
            vm.take_dirty_log().expect("dirty log");
            std::thread::sleep(Duration::from_millis(100));
            let log = vm.take_dirty_log().expect("dirty log");
            let dirty = hypervisor::kvm::memory::count_dirty(&log);
            assert_eq!(
                sink.sent.load(Ordering::SeqCst),
                before,
                "round {round}: a frame left while paused"
            );
            assert_eq!(dirty, 0, "round {round}: guest memory changed while paused");
            assert!(vm.is_running());
            vm.resume().expect("resume");
            read_counter(&mut counter, &mut next, 20_000);
        }
        if let Some(mut p) = pinger {
            let _ = p.kill();
            let _ = p.wait();
        }
        vm.shutdown().expect("stop");
    });
}

/// Reads the counter stream until `stop`, checking every value; returns
/// the stream, the next expected value and the first bytes of that value
/// when the reader stopped inside it (the rest is still to come: released
/// output not read yet, or output the next generation sends again).
fn stream_counter(
    mut s: TcpStream,
    mut next: u64,
    stop: &AtomicBool,
    progress: &std::sync::atomic::AtomicU64,
) -> (TcpStream, u64, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "counter reader ran too long");
        match s.read(&mut buf) {
            Ok(0) => panic!("counter connection closed by the guest"),
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                let whole = partial.len() / 8 * 8;
                for c in partial[..whole].chunks_exact(8) {
                    let v = u64::from_be_bytes(c.try_into().unwrap());
                    assert_eq!(v, next, "counter stream broken (gap or duplicate)");
                    next += 1;
                }
                partial.drain(..whole);
                progress.store(next, Ordering::Release);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("counter connection failed: {e}"),
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (s, next, partial)
}

/// Completes a value whose first bytes `partial` were read already.
fn finish_value(s: &mut TcpStream, next: &mut u64, partial: &[u8]) {
    if partial.is_empty() {
        return;
    }
    let mut rest = vec![0u8; 8 - partial.len()];
    s.read_exact(&mut rest).expect("counter read");
    let mut whole = partial.to_vec();
    whole.extend_from_slice(&rest);
    let v = u64::from_be_bytes(whole.try_into().unwrap());
    assert_eq!(v, *next, "counter stream broken (gap or duplicate)");
    *next += 1;
}

/// Waits (bounded) until the reader has passed `value`, releasing the
/// guest's output at once meanwhile (a site running the VM unprotected).
fn serve_unprotected(
    outbox: &common::Outbox,
    tap: &mut hypervisor::kvm::devices::tap::Tap,
    progress: &std::sync::atomic::AtomicU64,
    value: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Acquire) < value {
        assert!(
            Instant::now() < deadline,
            "the client never reached {value} (at {})",
            progress.load(Ordering::Acquire)
        );
        common::release(tap, outbox.seal());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What a promoted site does when it protects the VM back to the old
/// primary's site: the VM it runs was itself restored from a replica; it
/// serves unprotected for a while, then pre-copies its whole memory into a
/// fresh replica while it keeps serving, then takes its first checkpoint.
/// That replica must equal the guest at the pause, and a VM restored from
/// it (the VM taken back right after that first checkpoint) must continue
/// the same connection.
#[test]
fn a_restored_guest_protected_again_resumes_from_its_first_checkpoint() {
    if !common::require_kvm_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = common::disk_image(dir.path(), 4);
    let spec = spec(&disk);
    common::in_new_netns(|| {
        common::persistent_tap(TAP, "192.0.2.1/24", "02:00:00:00:05:04");
        // Generation 1: a fresh VM under checkpoints.
        let outbox = common::Outbox::default();
        let mut vm = Vm::start(
            &spec,
            Seams {
                frame_sink: Some(Box::new(outbox.clone())),
                write_hook: None,
            },
        )
        .expect("start");
        vm.wait_ready(Duration::from_secs(60)).expect("ready");
        let stop = AtomicBool::new(false);
        let mut next = 0u64;
        let (counter, (replica, state, _)) = std::thread::scope(|s| {
            let cp = s.spawn(|| checkpoint_loop(&mut vm, &stop, &outbox));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut c = connect(9000);
                read_counter(&mut c, &mut next, 20_000);
                c
            }));
            stop.store(true, Ordering::Release);
            let out = cp.join().expect("checkpoint thread");
            match r {
                Ok(c) => (c, out),
                Err(e) => std::panic::resume_unwind(e),
            }
        });
        vm.shutdown().expect("generation 1 stops");

        // Generation 2: restored; serves unprotected, then is protected
        // again from scratch.
        let outbox = common::Outbox::default();
        let mut vm = kvm::restore(
            &spec,
            &replica,
            &state,
            Seams {
                frame_sink: Some(Box::new(outbox.clone())),
                write_hook: None,
            },
        )
        .expect("restore generation 2");
        let mut tap = vm.tap().expect("tap");
        let mem = vm.memory().clone();
        let ps = vm.page_size();
        let mut replica = vec![0u8; vm.frame_count() as usize * ps];
        let stop = AtomicBool::new(false);
        let progress = std::sync::atomic::AtomicU64::new(next);
        let (counter, next, partial, state) = std::thread::scope(|s| {
            let reader = s.spawn(|| stream_counter(counter, next, &stop, &progress));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                serve_unprotected(&outbox, &mut tap, &progress, next + 20_000);
                // Pre-copy: rounds of at most 1000 pages while the guest
                // runs and its output still leaves at once.
                let mut pre = Checkpoint::default();
                let mut rounds = 0;
                loop {
                    vm.precopy_round(1000, &mut pre).expect("pre-copy round");
                    common::apply_pages(&mut replica, &pre, ps);
                    common::release(&mut tap, outbox.seal());
                    rounds += 1;
                    if pre.frames.len() < 1000 && rounds > 16 {
                        break;
                    }
                    assert!(rounds < 10_000, "pre-copy never converged");
                }
                let mut cp = Checkpoint::default();
                let mut sealed = Vec::new();
                let mut at_pause = Vec::new();
                vm.checkpoint(&mut cp, &mut || {
                    sealed = outbox.seal();
                    common::snapshot_memory(&mem, &mut at_pause);
                })
                .expect("first checkpoint");
                common::apply_pages(&mut replica, &cp, ps);
                if let Some(p) = common::first_difference(&replica, &at_pause, ps) {
                    panic!("after pre-copy and the first checkpoint, replica page {p} differs from the guest's");
                }
                // Committed: its output leaves; nothing later does. What
                // the client has not read yet stays in its socket (or is
                // sent again by generation 3): no need to wait for it.
                common::release(&mut tap, sealed);
                let at = progress.load(Ordering::Acquire);
                eprintln!("pre-copy in {rounds} rounds; first checkpoint with the client at {at}");
                cp.state.clone()
            }));
            stop.store(true, Ordering::Release);
            let (c, n, partial) = reader.join().expect("reader");
            match r {
                Ok(state) => (c, n, partial, state),
                Err(e) => std::panic::resume_unwind(e),
            }
        });
        vm.shutdown().expect("generation 2 stops");
        drop(tap);

        // Generation 3: taken back from the first checkpoint.
        let mut counter = counter;
        let mut next = next;
        let vm =
            kvm::restore(&spec, &replica, &state, Seams::default()).expect("restore generation 3");
        finish_value(&mut counter, &mut next, &partial);
        read_counter(&mut counter, &mut next, 50_000);
        eprintln!("generation 3 continues the stream to {next}");
        vm.shutdown().expect("generation 3 stops");
    });
}
