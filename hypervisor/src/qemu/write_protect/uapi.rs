//! The kernel interfaces the write tracker uses (Linux >= 6.7), spelled out
//! here because the C headers of older distributions (and the libc crate)
//! do not carry them: userfaultfd's write-protect mode with asynchronous
//! resolution, and the pagemap `PAGEMAP_SCAN` ioctl.

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
/// Write-protect shmem and hugetlbfs (Linux 5.19).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Pages never touched count as write-protected too (Linux 6.7).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves a write to a protected page itself, only noting that
/// the page was written (Linux 6.7): no fault reaches user space.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Register a range for write-protect tracking.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// Set (rather than clear) write protection.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

/// `UFFDIO_API`.
pub const UFFDIO_API: u64 = iowr(0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, std::mem::size_of::<UffdioRegister>());
/// `UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, std::mem::size_of::<UffdioWriteprotect>());

/// `struct page_region`: pages `[start, end)` sharing `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `PAGEMAP_SCAN` (an ioctl on `/proc/PID/pagemap`).
pub const PAGEMAP_SCAN: u64 = iowr(b'f' as u64, 16, std::mem::size_of::<PmScanArg>());
/// Write-protect the pages that match, atomically with reporting them.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail unless every VMA in the range is registered in async WP mode.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// The page was written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `pidfd_open(2)`.
pub const SYS_PIDFD_OPEN: libc::c_long = 434;
/// `pidfd_getfd(2)`.
pub const SYS_PIDFD_GETFD: libc::c_long = 438;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from linux/userfaultfd.h and linux/fs.h on x86_64.
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
    }
}
