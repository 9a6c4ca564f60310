//! Shared helpers of the micro-VM integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use hypervisor::guest_build::{self, GuestImages};

/// `true` when the test may run here; otherwise prints why and either
/// returns `false` (REMUS_WAN_ALLOW_SKIP=1) or panics with the reason.
pub fn require_kvm_root() -> bool {
    let mut why = Vec::new();
    if let Err(e) = hypervisor::kvm::available() {
        why.push(e.to_string());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        why.push("needs root (tap devices, network namespaces)".to_string());
    }
    if why.is_empty() {
        return true;
    }
    let msg = why.join("; ");
    if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED (REMUS_WAN_ALLOW_SKIP=1): {msg}");
        false
    } else {
        panic!("this test needs KVM and root: {msg} (set REMUS_WAN_ALLOW_SKIP=1 to skip)");
    }
}

/// The guest images: from REMUS_WAN_GUEST_DIR if set (prebuilt by
/// `cargo xtask guest-image`), else built once per test binary.
pub fn images() -> &'static GuestImages {
    static IMAGES: OnceLock<GuestImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guests");
        guest_build::from_env_or_build(&target).expect("guest images")
    })
}

/// Runs `f` in a fresh network namespace (see `hypervisor::netns`).
pub fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    hypervisor::netns::in_new_netns(f).expect("creating a network namespace")
}

/// A zero-filled raw disk image in a temporary directory.
pub fn disk_image(dir: &std::path::Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).expect("create disk image");
    f.set_len(mib << 20).expect("size disk image");
    p
}

/// Runs `ip ARGS`, panicking with its error.
pub fn ip(args: &[&str]) {
    hypervisor::netns::ip(args).expect("ip");
}
