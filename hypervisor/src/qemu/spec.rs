//! What a QEMU guest is made of: a plain description (the `remus-wan`
//! crate converts its configuration into it), and the Linux guest image.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::colo::layout::frame_count;
use super::error::{Error, Result};

/// Largest guest RAM the backend takes (64 GiB).
pub const MAX_MEMORY_MIB: u64 = 65_536;

/// Which accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and the CPU advertises hardware
    /// virtualization (vmx/svm), TCG otherwise.
    #[default]
    Auto,
    /// Software emulation: slow, but runs anywhere.
    Tcg,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
}

impl Accel {
    /// The accelerator to pass to `-accel`.
    pub fn resolve(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto => {
                let kvm = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                let hw = std::fs::read_to_string("/proc/cpuinfo")
                    .map(|c| {
                        c.lines()
                            .filter(|l| l.starts_with("flags"))
                            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
                    })
                    .unwrap_or(false);
                if kvm && hw {
                    "kvm"
                } else {
                    "tcg"
                }
            }
        }
    }
}

/// How the backend finds the pages a guest changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// [`DirtyTracking::WriteProtect`] where the kernel can do it, else
    /// [`DirtyTracking::Colo`] where the QEMU binary supports it (see
    /// `colo::version`), else [`DirtyTracking::Compare`].
    #[default]
    Auto,
    /// The kernel tracks QEMU's writes to guest RAM (userfaultfd
    /// write-protect in asynchronous mode, scanned with `PAGEMAP_SCAN`; see
    /// `write_protect`): pause O(pages written), any QEMU, TCG or KVM.
    /// Needs Linux >= 6.7.
    WriteProtect,
    /// remus-wan is the local COLO secondary of its QEMU: QEMU's own dirty
    /// tracking, pause O(dirty pages). Refused on QEMU releases where COLO
    /// does not work (see `colo::version`).
    Colo,
    /// Compare guest RAM with a shadow at each checkpoint: pause O(RAM),
    /// works with any QEMU.
    Compare,
}

/// The Linux guest built by `cargo xtask guest-image --linux`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxImage {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initrd.cpio`).
    pub initrd: PathBuf,
}

impl LinuxImage {
    /// The image in `dir` (as `cargo xtask guest-image --linux` writes it);
    /// an error names the missing file and how to build it.
    pub fn in_dir(dir: &Path) -> Result<LinuxImage> {
        let img = LinuxImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
        };
        for p in [&img.kernel, &img.initrd] {
            std::fs::metadata(p).map_err(|source| Error::GuestImage {
                path: p.clone(),
                source,
            })?;
        }
        Ok(img)
    }
}

impl LinuxImage {
    /// The image tests and benchmarks use: `$REMUS_WAN_GUEST_DIR/linux`
    /// when that variable is set (`cargo xtask test` sets it), else the
    /// workspace's `target/guest/linux` (where `cargo xtask guest-image
    /// --linux` writes it).
    pub fn from_env_or_workspace() -> Result<LinuxImage> {
        let dir = match std::env::var_os(crate::guest_build::GUEST_DIR_ENV) {
            Some(d) => PathBuf::from(d).join("linux"),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/linux"),
        };
        LinuxImage::in_dir(&dir)
    }
}

/// The guest's network interface; its backend is remus-wan itself
/// (`-netdev stream`), see `netdev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuNetSpec {
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// Guest IPv4 address and prefix length (kernel command line
    /// `rw.ip=`, applied by the guest's /init).
    pub address: Option<(Ipv4Addr, u8)>,
    /// Default gateway (`rw.gw=`).
    pub gateway: Option<Ipv4Addr>,
}

/// A Linux VM in QEMU.
#[derive(Debug, Clone)]
pub struct QemuSpec {
    /// Name (file names, logs, errors).
    pub name: String,
    /// Kernel and initramfs.
    pub image: LinuxImage,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Extra kernel command line.
    pub cmdline_extra: String,
    /// Network interface, if any.
    pub network: Option<QemuNetSpec>,
    /// Raw disk image, served to the guest by remus-wan over NBD (so its
    /// writes pass through the engine's write hook), as a virtio disk.
    pub disk: Option<PathBuf>,
    /// Folder for QEMU's sockets and logs (must exist; short, since unix
    /// socket paths are limited to 107 bytes).
    pub run_dir: PathBuf,
    /// Folder of the guest RAM file: tmpfs, so the RAM is shared memory
    /// that both QEMU and remus-wan map.
    pub ram_dir: PathBuf,
    /// The QEMU binary.
    pub qemu_binary: PathBuf,
    /// How dirty pages are found.
    pub dirty_tracking: DirtyTracking,
}

impl QemuSpec {
    /// A spec with 256 MiB, no network, automatic accelerator, RAM in
    /// `/dev/shm`.
    pub fn new(name: impl Into<String>, image: LinuxImage, run_dir: impl Into<PathBuf>) -> Self {
        QemuSpec {
            name: name.into(),
            image,
            memory_mib: 256,
            vcpus: 1,
            accel: Accel::Auto,
            cmdline_extra: String::new(),
            network: None,
            disk: None,
            run_dir: run_dir.into(),
            ram_dir: PathBuf::from("/dev/shm"),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            dirty_tracking: DirtyTracking::Auto,
        }
    }

    /// Sets the RAM size.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the number of virtual CPUs (at least 1).
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n.max(1);
        self
    }

    /// Sets the accelerator.
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Adds a network interface.
    pub fn network(mut self, net: QemuNetSpec) -> Self {
        self.network = Some(net);
        self
    }

    /// Adds a disk (raw image served over NBD by remus-wan).
    pub fn disk(mut self, image: impl Into<PathBuf>) -> Self {
        self.disk = Some(image.into());
        self
    }

    /// Sets how dirty pages are found.
    pub fn dirty_tracking(mut self, t: DirtyTracking) -> Self {
        self.dirty_tracking = t;
        self
    }

    /// Frames the engine numbers for this guest: the main RAM, then a
    /// fixed reserve for QEMU's other RAM blocks (firmware, ROMs), in
    /// both dirty-tracking modes (see `colo::layout`).
    pub fn frame_count(&self) -> u64 {
        frame_count(self.memory_mib)
    }

    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    pub(crate) fn validate(&self) -> Result<()> {
        // Above 3 GiB the PC splits guest-physical RAM around the 32-bit
        // hole, but it stays one RAM block (`mem`, one file): a frame is
        // still an offset into the RAM file.
        if self.memory_mib < 64 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::Spec(format!(
                "memory_mib {} outside 64..={MAX_MEMORY_MIB}",
                self.memory_mib
            )));
        }
        if !self.run_dir.is_dir() {
            return Err(Error::Spec(format!(
                "run_dir {} is not a folder",
                self.run_dir.display()
            )));
        }
        Ok(())
    }
}
