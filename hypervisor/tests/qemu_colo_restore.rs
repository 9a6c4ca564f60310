//! The COLO mode's takeover path on a real QEMU: a running Linux guest's
//! migration stream (what the sink parses: configuration, RAM block list,
//! pages, device sections, description) is turned into a replica image of
//! `frame_count()` frames plus a state envelope, and a second QEMU started
//! from them through a synthesized stream continues the guest.
//!
//! QEMU 10.0/10.1 cannot enter COLO (see `colo::version`), but their
//! initial migration is the same stream, so this path is tested on them.

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::qemu::{spec, ticks, wait_console, wait_ready};
use hypervisor::kvm::Seams;
use hypervisor::qemu::colo::{ColoState, Event, Layout, StreamParser};
use hypervisor::qemu::QemuGuest;
use serde_json::json;

const MIB: u64 = 1024;

/// Migrates `g` into our parser: the replica image and the envelope.
fn capture(g: &mut QemuGuest, frames: u64) -> (Vec<u8>, Vec<u8>) {
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    ours.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let q = g.qmp();
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": false}]})),
    )
    .expect("caps");
    q.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1u64 << 40})),
    )
    .expect("params");
    q.execute_with_fd("getfd", Some(json!({"fdname": "cap"})), theirs.as_fd())
        .expect("getfd");
    q.execute("migrate", Some(json!({"uri": "fd:cap"})))
        .expect("migrate");
    drop(theirs);
    let ram_pages = MIB * 256;
    let mut image = vec![0u8; frames as usize * 4096];
    let mut p = StreamParser::new();
    let mut layout = None;
    let mut buf = vec![0u8; 1 << 20];
    let mut devices = None;
    while devices.is_none() {
        let n = ours.read(&mut buf).expect("read the migration stream");
        assert!(n > 0, "QEMU closed the stream before its end");
        p.push(&buf[..n]);
        while let Some(ev) = p.next().expect("the stream parses") {
            match ev {
                Event::Blocks => layout = Some(Layout::new(p.blocks(), ram_pages).expect("layout")),
                Event::Page {
                    block,
                    offset,
                    data,
                } => {
                    let f = layout.as_ref().expect("blocks first").frame(block, offset) as usize;
                    data.write_to(&mut image[f * 4096..(f + 1) * 4096]);
                }
                Event::InitialEnd { devices: d } => devices = Some(d.to_vec()),
                _ => {}
            }
        }
    }
    let st = ColoState {
        configuration: p.configuration().to_vec(),
        ram_section_id: p.ram_section_id().expect("ram section"),
        footers: p.footers(),
        blocks: p.blocks().to_vec(),
        devices: devices.expect("devices"),
    };
    let mut env = Vec::new();
    st.encode(&mut env);
    (image, env)
}

#[test]
fn a_replica_continues_from_a_synthesized_stream() {
    let Some(image) = common::require_qemu() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = spec(image, dir.path(), MIB);
    let mut g = QemuGuest::start(&spec, Seams::default()).expect("start QEMU");
    wait_ready(&g);
    wait_console(&g, "ticks", Duration::from_secs(60), |c| {
        ticks(c).len() >= 2
    });
    let frames = spec.frame_count();
    assert_eq!(hypervisor::ProtectedGuest::frame_count(&g), frames);
    let t = Instant::now();
    let (replica, env) = capture(&mut g, frames);
    let captured = t.elapsed();
    // The migration stopped the guest: its console is the checkpoint's.
    let at_checkpoint = *ticks(&g.console()).last().expect("ticks");
    drop(g);

    // Bad input first: a corrupt envelope and a truncated device part.
    let e = QemuGuest::restore(&spec, &replica, &env[..env.len() / 2], Seams::default())
        .expect_err("truncated envelope");
    assert!(e.to_string().contains("truncated"), "{e}");
    let mut st = ColoState::decode(&env).expect("envelope");
    st.devices.truncate(st.devices.len() / 2);
    let mut bad = Vec::new();
    st.encode(&mut bad);
    let e = QemuGuest::restore(&spec, &replica, &bad, Seams::default())
        .expect_err("truncated device state");
    eprintln!("truncated device state: {e}");

    let t = Instant::now();
    let r = QemuGuest::restore(&spec, &replica, &env, Seams::default()).expect("restore");
    let restored = t.elapsed();
    let console = wait_console(&r, "the replica to tick", Duration::from_secs(60), |c| {
        ticks(c).len() >= 3
    });
    let seen = ticks(&console);
    eprintln!(
        "{MIB} MiB: capture {captured:?}, restore (RAM write + synthesized stream + load) {restored:?}; \
         last tick at the checkpoint {at_checkpoint}, replica's first {:?}",
        &seen[..3]
    );
    assert!(!console.contains("remus-wan guest ready"), "booted afresh");
    assert!(
        seen[0] == at_checkpoint + 1 || seen[0] == at_checkpoint + 2,
        "the ticker continues after {at_checkpoint}: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
}

/// COLO mode asked for explicitly on a QEMU that cannot do it is a typed
/// error naming the release and the way out; Auto falls back to Compare.
#[test]
fn colo_mode_is_refused_where_qemu_cannot_do_it() {
    use hypervisor::qemu::{DirtyTracking, Error};
    let Some(image) = common::require_qemu() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let base = spec(image, dir.path(), 256);
    match QemuGuest::start(
        &base.clone().dirty_tracking(DirtyTracking::Colo),
        Seams::default(),
    ) {
        Err(Error::ColoUnsupported(u)) => eprintln!("refused: {u}"),
        Ok(g) => {
            // A QEMU where COLO works (9.x, >= 10.2): the sink is on.
            assert!(g.colo());
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    let g = QemuGuest::start(&base, Seams::default()).expect("Auto starts");
    eprintln!(
        "Auto resolved to {}",
        if g.colo() { "colo" } else { "compare" }
    );
}
