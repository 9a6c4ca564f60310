//! Plain configuration values, mirroring the `[netops]` and `[vms.announce]`
//! / `[[vms.dns]]` sections of the remus-wan configuration file. The root
//! crate converts its parsed configuration into these; netops never reads
//! files of its own except the secrets files named here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::bgp::session::PeerMode;
use crate::bgp::speaker::{PeerConfig, SpeakerConfig};
use crate::dns::TsigAlgorithm;

/// What the standby site announces (`netops.bgp.standby`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StandbyPolicy {
    /// Nothing.
    #[default]
    None,
    /// The same prefixes, AS path prepended `standby_prepend` times.
    Prepend,
}

/// `[netops.bgp]` for one site (its own speaker picked out of `speakers`).
#[derive(Debug, Clone)]
pub struct BgpSettings {
    pub hold_time_s: u16,
    pub connect_retry_s: u32,
    pub standby: StandbyPolicy,
    pub standby_prepend: u8,
    pub speaker: BgpSpeakerSettings,
}

/// `[[netops.bgp.speakers]]`.
#[derive(Debug, Clone)]
pub struct BgpSpeakerSettings {
    pub site: String,
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Where passive peers connect (default `0.0.0.0:179`).
    pub listen: Option<SocketAddr>,
    pub peers: Vec<BgpPeerSettings>,
}

/// `[[netops.bgp.speakers.peers]]`.
#[derive(Debug, Clone)]
pub struct BgpPeerSettings {
    pub address: IpAddr,
    pub port: u16,
    pub remote_as: u32,
    pub mode: PeerMode,
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
    /// File holding the TCP-MD5 password (read by [`BgpSettings::speaker_config`]).
    pub md5_password_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("reading {what} from {path}: {source}")]
pub struct SecretFileError {
    pub what: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Reads a secret file, trimming the trailing newline.
pub fn read_secret(path: &std::path::Path, what: &'static str) -> Result<String, SecretFileError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|source| SecretFileError {
            what,
            path: path.to_owned(),
            source,
        })
}

impl BgpSettings {
    /// The speaker configuration, with MD5 passwords read from their files.
    pub fn speaker_config(&self) -> Result<SpeakerConfig, SecretFileError> {
        let mut peers = Vec::new();
        for p in &self.speaker.peers {
            let md5_password = match &p.md5_password_file {
                Some(f) => Some(read_secret(f, "the TCP-MD5 password")?),
                None => None,
            };
            peers.push(PeerConfig {
                address: p.address,
                port: p.port,
                remote_as: p.remote_as,
                mode: p.mode,
                next_hop_v4: p.next_hop_v4,
                next_hop_v6: p.next_hop_v6,
                md5_password,
                local_address: None,
            });
        }
        Ok(SpeakerConfig {
            local_as: self.speaker.local_as,
            router_id: self.speaker.router_id,
            hold_time_s: self.hold_time_s,
            connect_retry: Duration::from_secs(self.connect_retry_s as u64),
            listen: self.speaker.listen,
            peers,
        })
    }
}

/// `[vms.announce]` of one VM, still as strings (see
/// [`crate::policy::AnnounceSettings::attributes`]).
#[derive(Debug, Clone, Default)]
pub struct AnnounceSettingsRaw {
    pub communities: Vec<String>,
    pub large_communities: Vec<String>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub prepend: u8,
}

/// `[netops.dns]`.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub server: SocketAddr,
    pub zone: String,
    pub tsig_key_name: String,
    pub tsig_algorithm: TsigAlgorithm,
    /// File holding the base64 TSIG secret.
    pub tsig_secret_file: PathBuf,
    /// Bound of each exchange with the server.
    pub timeout_s: u32,
    /// Retries (exponential backoff) start no attempt after this long
    /// from the first (0: one attempt).
    pub retry_deadline_s: u32,
}

/// Failover events hooks run on (`netops.hooks.event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookEvent {
    Promote,
    Demote,
    Fence,
    ProtectionLost,
    ProtectionRestored,
}

impl HookEvent {
    /// The kebab-case name used in the configuration and in
    /// `REMUS_WAN_EVENT`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HookEvent::Promote => "promote",
            HookEvent::Demote => "demote",
            HookEvent::Fence => "fence",
            HookEvent::ProtectionLost => "protection-lost",
            HookEvent::ProtectionRestored => "protection-restored",
        }
    }
}

/// `[[netops.hooks]]`.
#[derive(Debug, Clone)]
pub struct HookSettings {
    pub event: HookEvent,
    pub command: PathBuf,
    pub args: Vec<String>,
    pub timeout_s: u32,
}
