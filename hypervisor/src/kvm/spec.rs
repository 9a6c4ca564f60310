//! What a micro-VM is made of: a plain description, independent of any
//! configuration file format (the `remus-wan` crate converts its config).

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use super::hot_pages::Config as HotPagesConfig;

/// A micro-VM to build.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Name (for logs and errors).
    pub name: String,
    /// Path to the guest ELF image.
    pub guest_image: PathBuf,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Raw disk image, exposed as virtio-blk.
    pub disk: Option<PathBuf>,
    /// The part of `disk` the VM sees (offset, bytes); the whole image if
    /// none (a member of a consistency group resumed from the group's
    /// replica sees its own part of it).
    pub disk_window: Option<(u64, u64)>,
    /// Network device, exposed as virtio-net.
    pub network: Option<NetSpec>,
    /// Dirtying workload of the network guest.
    pub workload: Workload,
    /// Where the debug console goes.
    pub console: ConsoleSpec,
    /// Free argument passed to the guest program (`BootInfo::arg`).
    pub guest_arg: u64,
    /// Serve virtio-net transmit in a worker thread that polls the ring
    /// with notifications off (default: far fewer exits, 5x the stream
    /// throughput here), instead of in the vCPU thread on each notification
    /// (one exit per frame, but no extra thread).
    pub tx_worker: bool,
    /// Keep pages the guest rewrites every epoch writable between
    /// checkpoints (`hot_pages`); default from the environment
    /// ([`crate::kvm::hot_pages::Config::from_env`]).
    pub hot_pages: HotPagesConfig,
}

/// A virtio-net device backed by a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Tap device name (created if missing).
    pub tap: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// Guest IPv4 address.
    pub address: Ipv4Addr,
    /// Prefix length of `address`.
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
}

/// Memory-dirtying workload the guest runs beside its services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Workload {
    /// Working set in 4 KiB pages (0: no workload).
    pub dirty_set_pages: u64,
    /// Pages written per millisecond.
    pub dirty_pages_per_ms: u64,
}

/// Where console output goes (it is always kept in memory too).
#[derive(Debug, Clone, Default)]
pub struct ConsoleSpec {
    /// Append console lines to this file.
    pub log_file: Option<PathBuf>,
    /// Also print console lines on standard error.
    pub to_terminal: bool,
}

impl VmSpec {
    /// A spec with one vCPU, 64 MiB, no devices.
    pub fn new(name: impl Into<String>, guest_image: impl Into<PathBuf>) -> Self {
        VmSpec {
            name: name.into(),
            guest_image: guest_image.into(),
            memory_mib: 64,
            vcpus: 1,
            disk: None,
            disk_window: None,
            network: None,
            workload: Workload::default(),
            console: ConsoleSpec::default(),
            guest_arg: 0,
            tx_worker: true,
            hot_pages: HotPagesConfig::from_env(),
        }
    }

    /// Sets RAM size.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }

    /// Adds a virtio-blk disk.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.disk = Some(path.into());
        self.disk_window = None;
        self
    }

    /// Adds a virtio-blk disk of `len` bytes of `path` from `offset`.
    pub fn disk_window(mut self, path: impl Into<PathBuf>, offset: u64, len: u64) -> Self {
        self.disk = Some(path.into());
        self.disk_window = Some((offset, len));
        self
    }

    /// Adds a virtio-net device.
    pub fn network(mut self, net: NetSpec) -> Self {
        self.network = Some(net);
        self
    }

    /// Sets the dirtying workload.
    pub fn workload(mut self, w: Workload) -> Self {
        self.workload = w;
        self
    }

    /// Sets the guest program's argument.
    pub fn guest_arg(mut self, arg: u64) -> Self {
        self.guest_arg = arg;
        self
    }

    /// Serves transmit in a polling worker thread (see `tx_worker`).
    pub fn tx_worker(mut self, on: bool) -> Self {
        self.tx_worker = on;
        self
    }

    /// Sets the hot-page policy (see `hot_pages`).
    pub fn hot_pages(mut self, c: HotPagesConfig) -> Self {
        self.hot_pages = c;
        self
    }

    /// Sets the console destination.
    pub fn console(mut self, c: ConsoleSpec) -> Self {
        self.console = c;
        self
    }
}

impl NetSpec {
    /// Parses `"52:54:00:12:34:56"`.
    pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        parts.next().is_none().then_some(mac)
    }

    /// Parses `"192.0.2.10/24"`.
    pub fn parse_address(s: &str) -> Option<(Ipv4Addr, u8)> {
        let (a, p) = s.split_once('/')?;
        let p: u8 = p.parse().ok()?;
        (p <= 32).then_some((a.parse().ok()?, p))
    }
}

pub use crate::seams::Seams;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mac_and_address() {
        assert_eq!(
            NetSpec::parse_mac("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        assert_eq!(NetSpec::parse_mac("52:54:00:12:34"), None);
        assert_eq!(NetSpec::parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(
            NetSpec::parse_address("192.0.2.10/24"),
            Some((Ipv4Addr::new(192, 0, 2, 10), 24))
        );
        assert_eq!(NetSpec::parse_address("192.0.2.10/33"), None);
    }
}
