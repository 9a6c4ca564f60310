//! The VMM core with the trivial counter guest: entry in ring 3, console,
//! exit code, faults, stop, dirty log.

mod common;

use std::time::Duration;

use hypervisor::kvm::{Error, Exit, Vm, VmSpec};

fn spec(arg: u64) -> VmSpec {
    VmSpec::new("counter", &common::images().counter)
        .memory_mib(32)
        .guest_arg(arg)
}

#[test]
fn counter_guest_runs_to_its_exit_code() {
    if !common::require_kvm_root() {
        return;
    }
    let vm = Vm::start(&spec(0), Default::default()).expect("start");
    assert!(vm.wait(Duration::from_secs(60)), "guest did not finish");
    let ready = vm
        .wait_ready(Duration::from_secs(1))
        .expect("ready reported");
    let lines = vm.console_lines();
    let exit = vm.shutdown().expect("clean exit");
    assert_eq!(exit, Exit::Guest(42), "console: {lines:?}");
    assert!(lines.iter().any(|l| l == "count 10"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l == "sse: sqrt(2) = 1.414214"),
        "{lines:?}"
    );
    eprintln!("counter guest ready after {ready:?}");
}

#[test]
fn guest_faults_are_reported_with_their_vector() {
    if !common::require_kvm_root() {
        return;
    }
    for (arg, vector) in [(1u64, 6u8), (2, 14)] {
        let vm = Vm::start(&spec(arg), Default::default()).expect("start");
        assert!(vm.wait(Duration::from_secs(60)), "guest did not stop");
        match vm.shutdown() {
            Err(Error::GuestFault { vector: v, .. }) => assert_eq!(v, vector),
            other => panic!("mode {arg}: expected a fault with vector {vector}, got {other:?}"),
        }
    }
}

#[test]
fn a_spinning_guest_is_stopped_and_its_writes_are_in_the_dirty_log() {
    if !common::require_kvm_root() {
        return;
    }
    let vm = Vm::start(
        &spec(4).vcpus(2).workload(hypervisor::kvm::Workload {
            dirty_set_pages: 100,
            dirty_pages_per_ms: 0,
        }),
        Default::default(),
    )
    .expect("start");
    vm.wait_ready(Duration::from_secs(60)).expect("ready");
    let log = vm.take_dirty_log().expect("dirty log");
    let base = (32u64 << 20) / 2 / 4096;
    for page in base..base + 100 {
        assert!(
            log[(page / 64) as usize] & (1 << (page % 64)) != 0,
            "page {page} not dirty"
        );
    }
    assert!(
        !vm.wait(Duration::from_millis(50)),
        "guest should still spin"
    );
    assert_eq!(vm.shutdown().expect("stop"), Exit::Stopped);
}

#[test]
fn clear_errors_for_missing_image_and_disk() {
    let e = Vm::start(
        &VmSpec::new("x", "/nonexistent/guest.elf"),
        Default::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cargo xtask guest-image"), "{e}");
    let e = Vm::start(
        &VmSpec::new("x", std::env::current_exe().unwrap()).disk("/nonexistent/disk.img"),
        Default::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("disk image"), "{e}");
    let e = Vm::start(&VmSpec::new("x", "/").memory_mib(1), Default::default()).unwrap_err();
    assert!(e.to_string().contains("memory_mib"), "{e}");
}

#[test]
fn a_refused_tap_is_reported_as_such() {
    if !common::require_kvm_root() {
        return;
    }
    let spec = spec(0).network(hypervisor::kvm::NetSpec {
        tap: "bad name/with slash".into(),
        mac: [0x52, 0x54, 0, 0, 0, 9],
        address: std::net::Ipv4Addr::new(192, 0, 2, 99),
        prefix_len: 24,
        gateway: None,
    });
    let e = Vm::start(&spec, Default::default()).unwrap_err();
    assert!(matches!(e, Error::Tap { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot create tap device"), "{e}");
}
