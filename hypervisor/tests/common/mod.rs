//! Shared helpers of the micro-VM integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use hypervisor::guest_build::{self, GuestImages};

pub mod qemu;

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
    skip_or_panic("KVM and root", &why.join("; "))
}

/// Prints a skip notice and returns `false` under REMUS_WAN_ALLOW_SKIP=1,
/// else panics with what the test needs and why it is missing.
fn skip_or_panic(needs: &str, msg: &str) -> bool {
    if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED (REMUS_WAN_ALLOW_SKIP=1): {msg}");
        false
    } else {
        panic!("this test needs {needs}: {msg} (set REMUS_WAN_ALLOW_SKIP=1 to skip)");
    }
}

/// `true` when running as root; otherwise a skip or a panic saying why.
pub fn require_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_panic("root", &format!("needs root ({why})"))
}

/// The Linux guest image when QEMU can run it here (QEMU installed, image
/// built); otherwise as [`require_kvm_root`]: a skip or a panic saying why.
pub fn require_qemu() -> Option<hypervisor::qemu::LinuxImage> {
    let mut why = Vec::new();
    if let Err(e) = hypervisor::qemu::available("qemu-system-x86_64".as_ref()) {
        why.push(e.to_string());
    }
    let image = hypervisor::qemu::LinuxImage::from_env_or_workspace();
    if let Err(e) = &image {
        why.push(e.to_string());
    }
    match image {
        Ok(i) if why.is_empty() => Some(i),
        _ => {
            skip_or_panic("QEMU and the Linux guest", &why.join("; "));
            None
        }
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

/// Holds the guest's transmitted frames until their epoch commits, as the
/// replication engine does (output commit).
#[derive(Clone, Default)]
pub struct Outbox(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl hypervisor::kvm::devices::net::FrameSink for Outbox {
    fn send(&mut self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

impl Outbox {
    /// Closes the epoch: the frames sent so far.
    pub fn seal(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Sends committed frames out of the VM's tap.
pub fn release(tap: &mut hypervisor::kvm::devices::tap::Tap, frames: Vec<Vec<u8>>) {
    use hypervisor::kvm::devices::net::FrameSink;
    for f in frames {
        tap.send(&f);
    }
}

/// A copy of the whole guest RAM (the guest must be paused for it to be
/// a consistent one).
pub fn snapshot_memory(mem: &hypervisor::kvm::memory::GuestMemoryMmap, out: &mut Vec<u8>) {
    use hypervisor::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    let len = (mem.last_addr().0 + 1) as usize;
    out.resize(len, 0);
    // Chunked so vm-memory's copy stays fast.
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        mem.read_slice(chunk, GuestAddress((i << 20) as u64))
            .expect("read guest memory");
    }
}

/// Writes a checkpoint's pages into a replica memory image.
pub fn apply_pages(replica: &mut [u8], cp: &hypervisor::Checkpoint, page_size: usize) {
    for (frame, page) in cp.page_slices(page_size) {
        let off = frame as usize * page_size;
        replica[off..off + page_size].copy_from_slice(page);
    }
}

/// First page where two images differ.
pub fn first_difference(a: &[u8], b: &[u8], page_size: usize) -> Option<usize> {
    a.chunks(page_size)
        .zip(b.chunks(page_size))
        .position(|(x, y)| x != y)
}

/// A persistent tap with the host side's address, made before the VM
/// attaches to it (so it outlives a VM process and keeps its MAC).
pub fn persistent_tap(name: &str, host_cidr: &str, mac: &str) {
    ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
    ip(&["link", "set", "dev", name, "address", mac]);
    ip(&["addr", "add", host_cidr, "dev", name]);
    ip(&["link", "set", "dev", name, "up"]);
}

/// Connects to a guest's TCP service. The first ARP exchange with a guest
/// that just booted can time out on a loaded machine ("no route to
/// host"): that is retried for a bounded time; anything else panics.
pub fn connect_guest(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => return s,
            Err(e) if e.raw_os_error() == Some(libc::EHOSTUNREACH) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
}
