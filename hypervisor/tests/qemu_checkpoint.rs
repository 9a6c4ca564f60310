//! The qemu backend end to end: boot the Linux guest under TCG, take
//! checkpoints (stop, find the changed pages, device state through
//! `migrate`, cont), check the replica image against guest RAM at paused
//! checkpoints, then continue the guest from the last checkpoint in a
//! second QEMU (`-incoming defer`) after the first one is killed. Run with
//! kernel write tracking and with the RAM compare: a page either misses
//! shows up as a difference at a paused checkpoint.

mod common;

use std::time::{Duration, Instant};

use common::qemu::{spec, ticks, wait_console, wait_ready};
use hypervisor::kvm::Seams;
use hypervisor::qemu::{DirtyTracking, QemuGuest};
use hypervisor::{Checkpoint, ProtectedGuest};

const MIB: u64 = 128;

fn apply(replica: &mut [u8], cp: &Checkpoint) {
    common::apply_pages(replica, cp, 4096);
}

#[test]
fn checkpoints_then_a_second_qemu_continues_the_guest_with_kernel_write_tracking() {
    checkpoints_then_a_second_qemu_continues_the_guest(DirtyTracking::WriteProtect);
}

#[test]
fn checkpoints_then_a_second_qemu_continues_the_guest_with_the_ram_compare() {
    checkpoints_then_a_second_qemu_continues_the_guest(DirtyTracking::Compare);
}

fn checkpoints_then_a_second_qemu_continues_the_guest(tracking: DirtyTracking) {
    let Some(image) = common::require_qemu() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = spec(image, dir.path(), MIB).dirty_tracking(tracking);
    let mut g = QemuGuest::start(&spec, Seams::default()).expect("start QEMU");
    assert_eq!(g.dirty_tracking(), tracking);
    wait_ready(&g);

    let mut replica = vec![0u8; g.frame_count() as usize * 4096];
    let mut cp = Checkpoint::default();
    let mut now = Vec::new();

    // Pre-copy while the guest runs: bounded rounds, the first ones carry
    // the whole image in frame order; pages torn by the running guest are
    // sent again later.
    let max = 8192;
    let mut rounds = 0;
    let mut sent = 0u64;
    loop {
        g.precopy_round(max, &mut cp).expect("pre-copy round");
        apply(&mut replica, &cp);
        sent += cp.frames.len() as u64;
        rounds += 1;
        if cp.frames.len() < max || rounds > 200 {
            break;
        }
    }
    // Compare and write-protect modes fill the main RAM frames; the
    // reserve after them (QEMU's other RAM blocks) is COLO mode's.
    let ram_frames = MIB * 256;
    assert_eq!(g.frame_count(), hypervisor::qemu::frame_count(MIB));
    assert!(sent >= ram_frames, "pre-copy sent the whole image");
    assert!(rounds >= ram_frames as usize / max, "rounds are bounded");

    // The first checkpoint after pre-copy carries only what changed since.
    let mut boundaries = 0;
    g.checkpoint(&mut cp, &mut || boundaries += 1)
        .expect("first checkpoint");
    assert_eq!(boundaries, 1, "at_pause runs once per checkpoint");
    assert!((cp.frames.len() as u64) < g.frame_count() / 2);
    assert!(!cp.state.is_empty());
    apply(&mut replica, &cp);

    // Running epochs, every few a paused one where the replica must equal
    // guest RAM exactly.
    let mut changed = Vec::new();
    for epoch in 0..24 {
        std::thread::sleep(Duration::from_millis(100));
        let paused = epoch % 6 == 5;
        if paused {
            g.pause().expect("pause");
        }
        g.checkpoint(&mut cp, &mut || {}).expect("checkpoint");
        apply(&mut replica, &cp);
        changed.push(cp.frames.len());
        if paused {
            g.read_ram(&mut now);
            assert_eq!(
                common::first_difference(&replica[..now.len()], &now, 4096),
                None,
                "replica differs from guest RAM after epoch {epoch}"
            );
            g.resume().expect("resume");
        }
        assert!(g.is_running());
    }
    assert!(
        changed.iter().all(|&n| (n as u64) < g.frame_count() / 2),
        "later checkpoints carry only changed pages: {changed:?}"
    );
    assert!(changed.iter().any(|&n| n > 0), "the guest changes memory");

    // The checkpoint the replica will continue from, taken paused so the
    // console at that instant is known.
    g.pause().expect("pause");
    g.checkpoint(&mut cp, &mut || {}).expect("final checkpoint");
    apply(&mut replica, &cp);
    let state = cp.state.clone();
    let at_checkpoint = *ticks(&g.console())
        .last()
        .expect("ticks before the checkpoint");
    g.resume().expect("resume");
    // The primary goes on past the checkpoint, then dies.
    wait_console(&g, "the primary to tick on", Duration::from_secs(60), |c| {
        ticks(c).last().is_some_and(|&t| t >= at_checkpoint + 5)
    });
    let primary_pid = g.pid();
    drop(g);
    assert!(
        !std::path::Path::new(&format!("/proc/{primary_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{primary_pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true),
        "QEMU {primary_pid} still runs after drop"
    );

    let t = Instant::now();
    let mut r =
        QemuGuest::restore(&spec, &replica, &state, Seams::default()).expect("restore replica");
    let resumed = t.elapsed();
    let console = wait_console(&r, "the replica to tick", Duration::from_secs(60), |c| {
        ticks(c).len() >= 3
    });
    let seen = ticks(&console);
    eprintln!(
        "replica resumed in {resumed:?}; primary's last tick at the checkpoint {at_checkpoint}, replica's first ticks {:?}",
        &seen[..3]
    );
    assert!(
        !console.contains("remus-wan guest ready"),
        "the replica booted afresh instead of continuing:\n{console}"
    );
    assert!(
        seen[0] == at_checkpoint + 1 || seen[0] == at_checkpoint + 2,
        "the replica's ticker should continue right after {at_checkpoint} (a tick cut mid-line \
         at the pause ends on the replica), got {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");

    // The new guest is protected in its turn: a full image first, then
    // changes.
    r.checkpoint(&mut cp, &mut || {})
        .expect("checkpoint the replica");
    assert_eq!(cp.frames.len() as u64, MIB * 256);
    std::thread::sleep(Duration::from_millis(100));
    r.checkpoint(&mut cp, &mut || {})
        .expect("checkpoint the replica");
    assert!((cp.frames.len() as u64) < r.frame_count() / 2);
    assert!(r.is_running());

    // QEMU dying under the backend is reported as such.
    // SAFETY: kill(2) on the PID of the QEMU this test started.
    unsafe { libc::kill(r.pid() as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!r.is_running());
    match r.checkpoint(&mut cp, &mut || {}) {
        Err(hypervisor::GuestError::NotRunning) => {}
        other => panic!("checkpoint of a dead QEMU: {other:?}"),
    }
}

#[test]
fn restore_refuses_a_bad_replica() {
    let Some(image) = common::require_qemu() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = spec(image, dir.path(), MIB);
    let ram = vec![0u8; (MIB << 20) as usize];
    let e = QemuGuest::restore(&spec, &ram[..4096], b"QEVM\0\0\0\x03", Seams::default())
        .expect_err("short image");
    assert!(e.to_string().contains("memory image"), "{e}");
    let e = QemuGuest::restore(&spec, &ram, b"garbage", Seams::default())
        .expect_err("not a migration stream");
    assert!(e.to_string().contains("migration stream"), "{e}");
    // A stream with the right header but truncated: QEMU refuses it and
    // the error says so (QEMU is killed when the guest is dropped).
    let e = QemuGuest::restore(&spec, &ram, b"QEVM\0\0\0\x03\x01", Seams::default())
        .expect_err("truncated stream");
    eprintln!("truncated stream: {e}");
    assert!(e.to_string().contains("QEMU exited"), "{e}");
}
