//! Kernel write tracking of guest RAM: which pages QEMU's guest wrote since
//! the last checkpoint, found in time proportional to the pages written,
//! with any QEMU release and under TCG or KVM.
//!
//! Linux (>= 6.7) can write-protect a range of memory with a userfaultfd in
//! *asynchronous* mode: the first write to a protected page is let through
//! by the kernel itself, which only clears the protection in the page table
//! entry. The `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` then lists the
//! pages written since, and re-protects them in the same walk (this is what
//! replaced soft-dirty bits for CRIU; soft-dirty is often compiled out, as
//! it is on the machines we test on). Every writer of guest RAM goes through
//! QEMU's page tables: TCG's stores, QEMU's device emulation (virtio rings,
//! disk reads into guest buffers), and KVM's guest writes (KVM maps a page
//! writable for the guest only after a write fault on QEMU's mapping, and a
//! re-protect invalidates KVM's mapping through the MMU notifier).
//!
//! A userfaultfd is tied to the address space that created it, so QEMU must
//! create it: a tiny LD_PRELOAD library ([`preload_env`], `preload.c`)
//! does that at QEMU's start and leaves the fd at a known number;
//! [`WriteTracker::attach`] takes a copy with `pidfd_getfd(2)` and does the
//! rest (API handshake, register, protect, scans) from our side.
//!
//! Correctness rests on one order: a page is reported by a scan and
//! re-protected in the same step, *before* its contents are copied. A write
//! after that step is reported by the next scan, so no write is ever lost;
//! at worst a page is sent twice.

pub mod maps;
pub mod uapi;
pub mod written;

use std::ffi::OsString;
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

pub use written::Written;

use uapi::*;

/// Bytes per page the tracker reports in.
const PAGE: u64 = 4096;
/// The fd number the preload library leaves the userfaultfd at in QEMU: high,
/// so QEMU's own files (lowest free numbers first) never take it.
pub const QEMU_UFFD_FD: i32 = 1000;
/// Regions per `PAGEMAP_SCAN` call (more are fetched in further calls).
const REGIONS_PER_SCAN: usize = 4096;
/// The preload library, built by build.rs.
static PRELOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libremus_wan_uffd.so"));

/// What can stop kernel write tracking. Each says what is missing.
#[derive(Debug, thiserror::Error)]
pub enum WpError {
    /// QEMU has no userfaultfd at the agreed number.
    #[error("QEMU (pid {pid}) has no userfaultfd at fd {fd}: the preload library did not run or userfaultfd(2) failed in QEMU (see QEMU's log): {source}")]
    NoFd {
        /// QEMU's pid.
        pid: u32,
        /// The fd number.
        fd: i32,
        /// From pidfd_getfd.
        #[source]
        source: std::io::Error,
    },
    /// The kernel lacks a feature (Linux >= 6.7 with CONFIG_USERFAULTFD and
    /// CONFIG_PTE_MARKER_UFFD_WP is needed).
    #[error("the kernel cannot track writes ({what}; needs Linux >= 6.7 with userfaultfd write-protect): {source}")]
    Kernel {
        /// The step that failed.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The RAM file is not mapped in QEMU.
    #[error("guest RAM ({len} bytes) is not mapped in QEMU (pid {pid})")]
    RamNotMapped {
        /// QEMU's pid.
        pid: u32,
        /// RAM bytes.
        len: u64,
    },
    /// An operating-system error elsewhere.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WpError {
    let what = what.into();
    move |source| WpError::Io { what, source }
}

/// Writes the preload library into `dir` and returns the environment that
/// makes a QEMU started with it create its userfaultfd.
pub fn preload_env(dir: &Path) -> Result<Vec<(OsString, OsString)>, WpError> {
    let lib = dir.join("libremus_wan_uffd.so");
    // Written under a temporary name and renamed: a QEMU starting at the
    // same time from the same folder never loads a half-written library.
    let tmp = dir.join(format!(".libremus_wan_uffd.{}.so", std::process::id()));
    std::fs::write(&tmp, PRELOAD).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &lib).map_err(io(format!("renaming to {}", lib.display())))?;
    Ok(vec![
        ("LD_PRELOAD".into(), lib.into_os_string()),
        ("REMUS_WAN_UFFD_FD".into(), QEMU_UFFD_FD.to_string().into()),
    ])
}

/// Write tracking of one QEMU's guest RAM.
#[derive(Debug)]
pub struct WriteTracker {
    uffd: OwnedFd,
    pagemap: File,
    /// Guest RAM's address in QEMU.
    start: u64,
    len: u64,
    regions: Vec<PageRegion>,
}

impl WriteTracker {
    /// Takes QEMU's userfaultfd (left by the preload library), finds the
    /// mapping of `ram` (the RAM file, `len` bytes) in QEMU, registers it
    /// and write-protects all of it: from here on every write is tracked.
    pub fn attach(pid: u32, ram: &File, len: u64) -> Result<WriteTracker, WpError> {
        let uffd = take_fd(pid, QEMU_UFFD_FD)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC
                | UFFD_FEATURE_WP_UNPOPULATED
                | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_API, &mut api).map_err(|source| WpError::Kernel {
            what: "UFFDIO_API with asynchronous write-protect",
            source,
        })?;

        let meta = {
            use std::os::unix::fs::MetadataExt;
            let m = ram.metadata().map_err(io("stat of the RAM file"))?;
            (m.dev(), m.ino())
        };
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(io(format!("reading /proc/{pid}/maps")))?;
        let start =
            maps::find(&maps, meta.0, meta.1, len).ok_or(WpError::RamNotMapped { pid, len })?;

        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_REGISTER, &mut reg).map_err(|source| WpError::Kernel {
            what: "UFFDIO_REGISTER of guest RAM in write-protect mode",
            source,
        })?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(io(format!("opening /proc/{pid}/pagemap")))?;
        let mut t = WriteTracker {
            uffd,
            pagemap,
            start,
            len,
            regions: vec![PageRegion::default(); REGIONS_PER_SCAN],
        };
        t.protect_all()?;
        // A first scan proves PAGEMAP_SCAN works here (Linux >= 6.7)
        // before anyone relies on it.
        t.take_written(|_| {})?;
        Ok(t)
    }

    /// Write-protects all of guest RAM (what was written before is
    /// forgotten).
    pub fn protect_all(&mut self) -> Result<(), WpError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: self.start,
                len: self.len,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(&self.uffd, UFFDIO_WRITEPROTECT, &mut wp).map_err(|source| WpError::Kernel {
            what: "UFFDIO_WRITEPROTECT of guest RAM",
            source,
        })
    }

    /// Reports every page written since the previous call (as page-number
    /// ranges from the start of RAM) and write-protects them again, in one
    /// walk of QEMU's page tables. Returns how many pages were reported.
    ///
    /// On an error some pages may have been re-protected without being
    /// reported: the caller must treat all of RAM as written (a full
    /// resend) before trusting this tracker again.
    pub fn take_written(&mut self, mut mark: impl FnMut(Range<u64>)) -> Result<u64, WpError> {
        let end = self.start + self.len;
        let mut from = self.start;
        let mut pages = 0;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: from,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len
            // regions into `self.regions`, which outlives the call.
            let n = unsafe {
                libc::ioctl(
                    self.pagemap.as_raw_fd(),
                    PAGEMAP_SCAN as libc::c_ulong,
                    &mut arg as *mut PmScanArg,
                )
            };
            if n < 0 {
                return Err(WpError::Kernel {
                    what: "PAGEMAP_SCAN of guest RAM",
                    source: std::io::Error::last_os_error(),
                });
            }
            for r in &self.regions[..(n as usize).min(self.regions.len())] {
                let (a, b) = (r.start.max(self.start), r.end.min(end));
                if b > a {
                    let first = (a - self.start) / PAGE;
                    let last = (b - self.start).div_ceil(PAGE);
                    pages += last - first;
                    mark(first..last);
                }
            }
            if arg.walk_end <= from {
                // No progress: the kernel must move walk_end forward.
                return Err(WpError::Kernel {
                    what: "PAGEMAP_SCAN made no progress",
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            from = arg.walk_end;
        }
        Ok(pages)
    }
}

fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: each request is paired by its callers with the struct the
    // kernel expects for it; the struct outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A copy of fd `fd` of process `pid` (`pidfd_open` + `pidfd_getfd`).
fn take_fd(pid: u32, fd: i32) -> Result<OwnedFd, WpError> {
    // SAFETY: plain syscalls with integer arguments; a returned fd is ours.
    let pidfd = unsafe { libc::syscall(SYS_PIDFD_OPEN, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return Err(io(format!("pidfd_open({pid})"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: as above.
    let got = unsafe { libc::syscall(SYS_PIDFD_GETFD, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(WpError::NoFd {
            pid,
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: pidfd_getfd returned a new fd (close-on-exec) that is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}
