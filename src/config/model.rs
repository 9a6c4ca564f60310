//! The typed shape of a remus-wan configuration file.
//!
//! Every struct denies unknown keys: a misspelt key is a configuration error
//! that names the key, never a silently ignored setting.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

/// A whole deployment: the same file is installed at every site and at the
/// witness; each process picks its own part with `--site`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub replication: Replication,
    pub sites: Vec<Site>,
    pub witness: Option<Witness>,
    #[serde(default)]
    pub vms: Vec<Vm>,
    /// Consistency groups: VMs checkpointed, committed, released and
    /// failed over together.
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub netops: Netops,
    #[serde(default)]
    pub failover: Failover,
}

/// A consistency group (`[[groups]]`): its VMs pause at the same epoch
/// boundary, commit at the backup together or not at all, release their
/// output together and fail over together under one lease. The group's
/// name names its replica, its lease and its status entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub vms: Vec<String>,
}

/// Failover timers (see docs/failover.md for the defaults' reasoning).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failover {
    pub heartbeat_ms: u64,
    pub detection_timeout_ms: u64,
    pub lease_ms: u64,
    pub renew_ms: u64,
    pub clock_margin_ms: u64,
}

impl Default for Failover {
    fn default() -> Self {
        let t = failover::Timers::default();
        Self {
            heartbeat_ms: t.heartbeat_interval.as_millis() as u64,
            detection_timeout_ms: t.detection_timeout.as_millis() as u64,
            lease_ms: t.lease.as_millis() as u64,
            renew_ms: t.renew_interval.as_millis() as u64,
            clock_margin_ms: t.clock_margin.as_millis() as u64,
        }
    }
}

impl Failover {
    pub fn timers(&self) -> failover::Timers {
        use std::time::Duration;
        failover::Timers {
            heartbeat_interval: Duration::from_millis(self.heartbeat_ms),
            detection_timeout: Duration::from_millis(self.detection_timeout_ms),
            lease: Duration::from_millis(self.lease_ms),
            renew_interval: Duration::from_millis(self.renew_ms),
            clock_margin: Duration::from_millis(self.clock_margin_ms),
        }
    }
}

/// Tuning of the checkpoint pipeline, shared by all protected VMs unless a
/// VM overrides it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replication {
    /// Time between two checkpoints. Output is held for about one interval
    /// plus one round trip, so this trades client latency for overhead.
    pub epoch_interval_ms: u64,
    /// Memory the sender may use to remember what it last sent per page
    /// (the base of XOR deltas).
    pub page_cache_mib: u64,
    /// zstd level for page payloads (1 is the right choice above ~100 Mbit/s).
    pub compression_level: i32,
    /// Epochs sent but not yet acknowledged before the primary stretches
    /// its interval instead of queueing more.
    pub max_epochs_in_flight: u32,
    /// The receiver refuses a single epoch larger than this.
    pub max_epoch_mib: u64,
    /// The guest's transmitted frames held while their epochs await
    /// commits, at most; past it frames are dropped (TCP resends them) and
    /// the primary checkpoints sooner.
    pub output_buffer_mib: u64,
    /// Forward error correction of the replication stream: Reed-Solomon
    /// repair datagrams sized to the loss the link measures, so an epoch
    /// that lost packets commits without waiting for their retransmission
    /// (docs/transport.md). A property of the site's endpoint, shared by
    /// all its VMs: set in `[replication]` only. Absent means on.
    pub fec: Option<bool>,
    /// Congestion controller of the replication connections:
    /// `loss-tolerant` (absent: the default), `bbr`, `bbr-bounded`,
    /// `cubic` or `newreno` (docs/transport.md). Like `fec`, a property of
    /// the site's endpoint: set in `[replication]` only.
    pub congestion: Option<String>,
}

impl Replication {
    /// Whether the site's replication endpoint uses FEC.
    pub fn fec(&self) -> bool {
        self.fec.unwrap_or(true)
    }

    /// The congestion controller of the site's replication endpoint (a
    /// value validation refused never gets here; the default otherwise).
    pub fn congestion(&self) -> wan::transport::CongestionControl {
        self.congestion
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or(wan::transport::CongestionControl::LossTolerant)
    }
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            epoch_interval_ms: 100,
            page_cache_mib: 256,
            compression_level: 1,
            max_epochs_in_flight: 4,
            max_epoch_mib: 512,
            output_buffer_mib: 64,
            fec: None,
            congestion: None,
        }
    }
}

/// One datacenter that can run or hold VMs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Short DNS-label name (`dc1`); it is also the identity in the site's
    /// certificate.
    pub name: String,
    /// Where this site's replication endpoint binds (UDP, QUIC).
    pub listen: SocketAddr,
    /// Where the other parties reach it (differs from `listen` behind NAT
    /// or when listening on a wildcard address).
    pub connect: Option<SocketAddr>,
    pub tls: Tls,
}

impl Site {
    /// The address peers dial.
    pub fn connect_addr(&self) -> SocketAddr {
        self.connect.unwrap_or(self.listen)
    }
}

/// The files `remus-wan certs init` writes for one party.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The deployment's site CA certificate (PEM), the only trust anchor.
    pub ca: PathBuf,
    /// This party's certificate (PEM).
    pub cert: PathBuf,
    /// This party's private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

/// The third party that grants the per-VM lease: the built-in witness
/// process (`listen`, `connect`, `tls`), or an etcd cluster the sites use
/// directly (`endpoints`, `ca`, `cert`, `key`, `prefix`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Witness {
    #[serde(default)]
    pub backend: WitnessBackend,
    #[serde(default = "default_witness_name")]
    pub name: String,
    /// Built-in witness only (required there: validation says so, naming
    /// the key, rather than serde's bare "missing field").
    #[serde(default = "unset_listen")]
    pub listen: SocketAddr,
    pub connect: Option<SocketAddr>,
    /// Built-in witness only; empty paths when absent (validation requires
    /// it for the built-in witness).
    #[serde(default)]
    pub tls: Tls,
    /// etcd only: `http://host:port` or `https://host:port` of the members.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// etcd only: the CA that signed the members' certificates (https).
    pub ca: Option<PathBuf>,
    /// etcd only: the sites' client certificate and key, when the cluster
    /// authenticates clients (`--client-cert-auth`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd only: the key prefix of this deployment's leases.
    pub prefix: Option<String>,
}

/// Who arbitrates the leases (`backend` in `[witness]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WitnessBackend {
    /// `remus-wan witness` at a third site.
    #[default]
    Builtin,
    /// An etcd cluster (one etcd lease per VM).
    Etcd,
}

fn default_witness_name() -> String {
    "witness".to_owned()
}

fn unset_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

/// The etcd key prefix when `prefix` is not set.
pub const DEFAULT_ETCD_PREFIX: &str = "/remus-wan";

impl Witness {
    pub fn connect_addr(&self) -> SocketAddr {
        self.connect.unwrap_or(self.listen)
    }

    /// The etcd key prefix, without a trailing slash.
    pub fn etcd_prefix(&self) -> &str {
        self.prefix
            .as_deref()
            .unwrap_or(DEFAULT_ETCD_PREFIX)
            .trim_end_matches('/')
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The built-in micro-VM.
    Kvm,
    /// A Linux guest in QEMU.
    Qemu,
    /// A Xen domain: not in this build (the configuration names it so a
    /// deployment can say what it runs; `protect` refuses it).
    Xen,
}

/// The accelerator of a QEMU VM (`accel` in `[[vms]]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where `/dev/kvm` opens and the CPU has hardware
    /// virtualization, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How a QEMU VM's checkpoints find the pages its guest changed
/// (`dirty_tracking` in `[[vms]]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyTracking {
    /// Kernel write tracking where the kernel can do it (Linux >= 6.7),
    /// else COLO where the QEMU release can, else the RAM compare.
    #[default]
    Auto,
    /// The kernel tracks QEMU's writes to guest RAM (userfaultfd).
    WriteProtect,
    /// remus-wan is QEMU's local COLO secondary.
    Colo,
    /// Guest RAM compared with a shadow copy at each checkpoint.
    Compare,
}

/// One protected virtual machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub name: String,
    /// Site that runs the VM when both are healthy.
    pub primary: String,
    /// Site that holds the replica and takes over.
    pub backup: String,
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// The micro-VM guest program (ELF), for `backend = "kvm"`.
    pub guest_image: Option<PathBuf>,
    /// Kernel and initramfs, for `backend = "qemu"`.
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub memory_mib: u64,
    /// How a `backend = "qemu"` VM runs: hardware virtualization, QEMU's
    /// software emulation, or whichever the host offers.
    #[serde(default)]
    pub accel: Accel,
    /// How a `backend = "qemu"` VM's checkpoints find changed pages.
    #[serde(default)]
    pub dirty_tracking: DirtyTracking,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Raw disk image; its writes are replicated with each epoch.
    pub disk: Option<PathBuf>,
    pub network: VmNetwork,
    /// Prefixes the VM serves from, moved between sites on takeover.
    #[serde(default)]
    pub service_prefixes: Vec<IpNet>,
    #[serde(default)]
    pub announce: Announce,
    #[serde(default)]
    pub dns: Vec<DnsRecord>,
    /// Per-VM override of `[replication]`.
    pub replication: Option<Replication>,
}

fn default_backend() -> Backend {
    Backend::Kvm
}

fn default_vcpus() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmNetwork {
    /// Host tap device the VM's NIC is attached to (created if missing).
    pub tap: String,
    /// The guest NIC's MAC address, `52:54:00:12:34:56`.
    pub mac: String,
    /// The guest's own address with its on-link prefix length.
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
}

/// BGP path attributes of the VM's announcements.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// RFC 1997 communities, `"65000:100"`.
    #[serde(default)]
    pub communities: Vec<String>,
    /// RFC 8092 large communities, `"65000:1:2"`.
    #[serde(default)]
    pub large_communities: Vec<String>,
    pub med: Option<u32>,
    /// Only sent to iBGP peers.
    pub local_pref: Option<u32>,
    /// Extra copies of the local AS in the path when active.
    #[serde(default)]
    pub prepend: u8,
}

/// A DNS record pointed at the active site's address for the VM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRecord {
    /// Fully qualified owner name inside `netops.dns.zone`.
    pub name: String,
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Address to publish while each site is active, keyed by site name.
    pub addresses: BTreeMap<String, IpAddr>,
}

fn default_ttl() -> u32 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Netops {
    pub bgp: Option<Bgp>,
    pub dns: Option<Dns>,
    #[serde(default)]
    pub hooks: Vec<Hook>,
    /// How long a stopping process waits for hooks still running (each is
    /// also bounded by its own `timeout_s`); those still running then are
    /// killed.
    #[serde(default = "default_hook_exit_wait")]
    pub hook_exit_wait_s: u32,
}

impl Default for Netops {
    fn default() -> Self {
        Self {
            bgp: None,
            dns: None,
            hooks: Vec::new(),
            hook_exit_wait_s: default_hook_exit_wait(),
        }
    }
}

fn default_hook_exit_wait() -> u32 {
    30
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StandbyPolicy {
    /// The standby site announces nothing.
    None,
    /// The standby site announces the VM's prefixes heavily prepended, as a
    /// fallback path the routers prefer only when the active one is gone.
    Prepend,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bgp {
    #[serde(default = "default_hold_time")]
    pub hold_time_s: u16,
    #[serde(default = "default_connect_retry")]
    pub connect_retry_s: u32,
    #[serde(default = "default_standby_policy")]
    pub standby: StandbyPolicy,
    #[serde(default = "default_standby_prepend")]
    pub standby_prepend: u8,
    /// One BGP speaker per site.
    pub speakers: Vec<BgpSpeaker>,
}

fn default_hold_time() -> u16 {
    90
}
fn default_connect_retry() -> u32 {
    30
}
fn default_standby_policy() -> StandbyPolicy {
    StandbyPolicy::None
}
fn default_standby_prepend() -> u8 {
    6
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSpeaker {
    pub site: String,
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub peers: Vec<BgpPeer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerMode {
    /// We open the TCP connection.
    Active,
    /// We wait for the router to connect.
    Passive,
    /// Both; the collision is resolved per RFC 4271 section 6.8.
    Both,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpPeer {
    pub address: IpAddr,
    #[serde(default = "default_bgp_port")]
    pub port: u16,
    pub remote_as: u32,
    #[serde(default = "default_peer_mode")]
    pub mode: PeerMode,
    /// Next hop announced for IPv4 prefixes (default: our session address).
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Next hop announced for IPv6 prefixes.
    pub next_hop_v6: Option<std::net::Ipv6Addr>,
    /// File holding the RFC 2385 TCP-MD5 password.
    pub md5_password_file: Option<PathBuf>,
}

fn default_bgp_port() -> u16 {
    179
}
fn default_peer_mode() -> PeerMode {
    PeerMode::Active
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TsigAlgorithm {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Primary name server accepting RFC 2136 updates.
    pub server: SocketAddr,
    pub zone: String,
    pub tsig_key_name: String,
    #[serde(default = "default_tsig_algorithm")]
    pub tsig_algorithm: TsigAlgorithm,
    /// File holding the base64 TSIG secret.
    pub tsig_secret_file: PathBuf,
    #[serde(default = "default_dns_timeout")]
    pub timeout_s: u32,
    /// Failed updates are retried with exponential backoff; no attempt
    /// starts after this long from the first (0: one attempt).
    #[serde(default = "default_dns_retry_deadline")]
    pub retry_deadline_s: u32,
}

fn default_tsig_algorithm() -> TsigAlgorithm {
    TsigAlgorithm::HmacSha256
}
fn default_dns_timeout() -> u32 {
    5
}
fn default_dns_retry_deadline() -> u32 {
    60
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookEvent {
    /// This site became active for a VM (takeover or switchover).
    Promote,
    /// This site stopped being active for a VM.
    Demote,
    /// This site fenced itself (lost both the peer and the witness).
    Fence,
    /// The VM runs unprotected (backup unreachable).
    ProtectionLost,
    /// The backup is back in sync.
    ProtectionRestored,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub event: HookEvent,
    /// Executable run with the event in `REMUS_WAN_*` environment variables.
    pub command: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "default_hook_timeout")]
    pub timeout_s: u32,
}

fn default_hook_timeout() -> u32 {
    30
}
