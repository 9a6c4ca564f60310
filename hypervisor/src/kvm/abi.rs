//! The contract between the VMM and the guest programs in `hypervisor/guests`.
//!
//! This file is compiled twice: into the VMM and, through `#[path]`, into the
//! guests' `no_std` runtime. It therefore holds only plain constants and
//! `repr(C)` data, no `std`.

/// 8-bit `out`: one byte for the debug console.
pub const PORT_CONSOLE_BYTE: u16 = 0x00e9;
/// 32-bit `out`: the guest wrote that many bytes at [`CONSOLE_BUF`]; print them.
pub const PORT_CONSOLE_FLUSH: u16 = 0x00ea;
/// 32-bit `out`: the guest exits with this code.
pub const PORT_EXIT: u16 = 0x00f4;
/// 32-bit `out`: secondary vCPU parks until the VM stops.
pub const PORT_PARK: u16 = 0x00f5;
/// 32-bit `out`: a guest event, see `EVENT_*`.
pub const PORT_EVENT: u16 = 0x00f6;
/// 32-bit `out`: the guest has nothing to do for up to that many
/// microseconds; the VMM sleeps the vCPU until then or until a device has
/// something for the guest (a received frame).
pub const PORT_IDLE: u16 = 0x00f7;
/// Longest idle the VMM grants, in microseconds.
pub const MAX_IDLE_US: u32 = 100_000;

/// The guest is up and its services listen.
pub const EVENT_READY: u32 = 1;

/// Guest-physical address of the [`BootInfo`] page (also passed in `rdi`).
pub const BOOT_INFO: u64 = 0xb000;
/// Guest-physical address of the console buffer page.
pub const CONSOLE_BUF: u64 = 0xc000;
/// Size of the console buffer.
pub const CONSOLE_BUF_SIZE: usize = 4096;
/// Lowest address the guest image may be loaded at.
pub const IMAGE_START: u64 = 0x20_0000;
/// Base of the virtio-mmio windows (outside RAM, not in any memslot).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices a VM can have.
pub const MAX_MMIO_DEVICES: usize = 8;
/// Per-vCPU stack size; vCPU `i`'s stack ends at `mem_size - i * STACK_SIZE`.
pub const STACK_SIZE: u64 = 1 << 20;

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = 0x5245_4d55_535f_564d; // "REMUS_VM"
/// `BootInfo::version`.
pub const BOOT_VERSION: u32 = 1;

/// One virtio-mmio device window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioWindow {
    /// Guest-physical base address.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// Virtio device id (1 = net, 2 = block).
    pub device_id: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

/// What the VMM tells the guest at start (at [`BOOT_INFO`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Bytes of RAM, from guest-physical 0.
    pub mem_size: u64,
    /// TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u64,
    /// MAC address of the network device.
    pub mac: [u8; 6],
    /// 1 when `ipv4`/`prefix_len` are set.
    pub has_ipv4: u8,
    /// IPv4 prefix length.
    pub prefix_len: u8,
    /// IPv4 address of the guest.
    pub ipv4: [u8; 4],
    /// Default gateway (valid when `has_gateway` is 1).
    pub gateway: [u8; 4],
    /// 1 when `gateway` is set.
    pub has_gateway: u8,
    /// Reserved, zero.
    pub _pad0: [u8; 7],
    /// Dirtying workload: size of the working set in 4 KiB pages (0 = off).
    pub dirty_set_pages: u64,
    /// Dirtying workload: pages written per millisecond.
    pub dirty_pages_per_ms: u64,
    /// Free argument for the guest program (test modes).
    pub arg: u64,
    /// Number of valid entries in `mmio`.
    pub mmio_count: u64,
    /// The virtio-mmio windows.
    pub mmio: [MmioWindow; MAX_MMIO_DEVICES],
}
