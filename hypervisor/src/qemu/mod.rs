//! `qemu`: a real Linux guest in QEMU (KVM where the host has hardware
//! virtualization, TCG otherwise), protected through QMP.
//!
//! Guest RAM is a file in tmpfs that QEMU maps shared and so do we. Each
//! checkpoint is QMP `stop`, the changed pages found ([`write_protect`]:
//! the pages the kernel saw QEMU write since the last checkpoint, compared
//! with the shadow of what was sent, [`shadow`]; or, as a fallback, all RAM
//! compared with the shadow), the device state through `migrate` with
//! `x-ignore-shared` into a memfd ([`devstate`]), and `cont`. The replica
//! is a second QEMU started with `-incoming defer` on the replica's RAM
//! image, which loads the device state and continues. remus-wan is the
//! NIC's backend (`-netdev stream`, [`netdev`]), so the guest's output can
//! be held per epoch.
//!
//! With kernel write tracking the pause follows the pages written, not the
//! size of RAM. See docs/qemu-backend.md.
//!
//! ```no_run
//! use hypervisor::qemu::{Accel, LinuxImage, QemuGuest, QemuSpec};
//! use hypervisor::{Checkpoint, ProtectedGuest};
//! let image = LinuxImage::in_dir("target/guest/linux".as_ref())?;
//! let spec = QemuSpec::new("web1", image, "/tmp").accel(Accel::Tcg);
//! let mut guest = QemuGuest::start(&spec, Default::default())?;
//! let mut cp = Checkpoint::default();
//! guest.checkpoint(&mut cp, &mut || {})?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod colo;
pub mod devstate;
pub mod error;
pub mod guest;
pub mod nbd;
pub mod netdev;
pub mod process;
pub mod qmp;
pub mod shadow;
pub mod spec;
pub mod tap_bridge;
pub mod write_protect;

pub use colo::layout::frame_count;
pub use error::{Error, Result};
pub use guest::{QemuGuest, QemuTimings};
pub use nbd::NbdServer;
pub use spec::{Accel, DirtyTracking, LinuxImage, QemuNetSpec, QemuSpec, MAX_MEMORY_MIB};
pub use tap_bridge::TapBridge;

/// Whether a QEMU binary runs here (`qemu-system-x86_64 --version`).
pub fn available(binary: &std::path::Path) -> Result<()> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| Error::QemuMissing {
            binary: binary.to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::QemuMissing {
            binary: binary.to_owned(),
            source: std::io::Error::other(format!("--version exited with {}", out.status)),
        })
    }
}
