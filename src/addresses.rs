//! Moving one VM's addresses to the site that runs it: this site's BGP
//! speaker, the DNS records and the operator hooks of `[netops]`, driven by
//! the failover events of the engine.
//!
//! Every BGP change carries the witness lease's fencing token
//! ([`netops::bgp::Speaker::set_group_routes`] refuses an older one), and
//! the engine calls [`Addresses::set_role`] with `Active` only while the
//! failover state machine allows this site to release the VM's output, so a
//! stale site can never announce.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use netops::bgp::Speaker;
use netops::config::{
    AnnounceSettingsRaw, BgpPeerSettings, BgpSettings, BgpSpeakerSettings, DnsSettings, HookEvent,
    HookSettings, StandbyPolicy,
};
use netops::dns::{DnsUpdater, RecordUpdate, TsigAlgorithm};
use netops::hooks::{run_hooks, HookContext};
use netops::policy::{routes_for, AnnounceSettings, Role};
use tracing::{info, warn};

use crate::config::{self, Config, Vm};

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("`vms.announce` of {vm}: {message}")]
    Announce { vm: String, message: String },
    #[error("`netops.bgp` for site {site}: {message}")]
    Bgp { site: String, message: String },
    #[error("`netops.dns`: {0}")]
    Dns(#[from] netops::dns::DnsError),
}

/// This site's means of moving one VM's addresses.
pub struct Addresses {
    site: String,
    vm: String,
    prefixes: Vec<ipnet::IpNet>,
    announce: AnnounceSettings,
    standby: StandbyPolicy,
    standby_prepend: u8,
    speaker: Option<Speaker>,
    dns: Option<(DnsUpdater, Vec<RecordUpdate>)>,
    hooks: Vec<HookSettings>,
    role: Option<Role>,
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Addresses")
            .field("site", &self.site)
            .field("vm", &self.vm)
            .field("bgp", &self.speaker.is_some())
            .field("dns", &self.dns.is_some())
            .field("hooks", &self.hooks.len())
            .finish()
    }
}

impl Addresses {
    /// Starts this site's BGP speaker (sessions come up at once, announcing
    /// nothing until [`Addresses::set_role`]) and prepares the DNS updater.
    pub async fn start(cfg: &Config, site: &str, vm: &Vm) -> Result<Self, AddressError> {
        let announce = AnnounceSettings::parse(&AnnounceSettingsRaw {
            communities: vm.announce.communities.clone(),
            large_communities: vm.announce.large_communities.clone(),
            med: vm.announce.med,
            local_pref: vm.announce.local_pref,
            prepend: vm.announce.prepend,
        })
        .map_err(|e| AddressError::Announce {
            vm: vm.name.clone(),
            message: e.to_string(),
        })?;
        let bgp_err = |message: String| AddressError::Bgp {
            site: site.to_owned(),
            message,
        };
        let (mut speaker, mut standby, mut standby_prepend) = (None, StandbyPolicy::None, 0);
        if let Some(bgp) = &cfg.netops.bgp {
            standby = match bgp.standby {
                config::StandbyPolicy::None => StandbyPolicy::None,
                config::StandbyPolicy::Prepend => StandbyPolicy::Prepend,
            };
            standby_prepend = bgp.standby_prepend;
            if let Some(sp) = bgp.speakers.iter().find(|s| s.site == site) {
                let settings = BgpSettings {
                    hold_time_s: bgp.hold_time_s,
                    connect_retry_s: bgp.connect_retry_s,
                    standby,
                    standby_prepend,
                    speaker: BgpSpeakerSettings {
                        site: sp.site.clone(),
                        local_as: sp.local_as,
                        router_id: sp.router_id,
                        listen: None,
                        peers: sp.peers.iter().map(peer_settings).collect(),
                    },
                };
                let scfg = settings
                    .speaker_config()
                    .map_err(|e| bgp_err(e.to_string()))?;
                let s = Speaker::start(scfg)
                    .await
                    .map_err(|e| bgp_err(e.to_string()))?;
                info!(site, peers = sp.peers.len(), "BGP speaker started");
                speaker = Some(s);
            }
        }
        let dns = match &cfg.netops.dns {
            Some(d) if !vm.dns.is_empty() => {
                let updater = DnsUpdater::from_settings(&DnsSettings {
                    server: d.server,
                    zone: d.zone.clone(),
                    tsig_key_name: d.tsig_key_name.clone(),
                    tsig_algorithm: match d.tsig_algorithm {
                        config::TsigAlgorithm::HmacSha256 => TsigAlgorithm::HmacSha256,
                        config::TsigAlgorithm::HmacSha384 => TsigAlgorithm::HmacSha384,
                        config::TsigAlgorithm::HmacSha512 => TsigAlgorithm::HmacSha512,
                    },
                    tsig_secret_file: d.tsig_secret_file.clone(),
                    timeout_s: d.timeout_s,
                })?;
                let records: Vec<RecordUpdate> = vm
                    .dns
                    .iter()
                    .filter_map(|r| {
                        r.addresses.get(site).map(|a: &IpAddr| RecordUpdate {
                            name: r.name.clone(),
                            ttl: r.ttl,
                            address: *a,
                        })
                    })
                    .collect();
                Some((updater, records))
            }
            _ => None,
        };
        let hooks = cfg
            .netops
            .hooks
            .iter()
            .map(|h| HookSettings {
                event: hook_event(h.event),
                command: h.command.clone(),
                args: h.args.clone(),
                timeout_s: h.timeout_s,
            })
            .collect();
        Ok(Self {
            site: site.to_owned(),
            vm: vm.name.clone(),
            prefixes: vm.service_prefixes.clone(),
            announce,
            standby,
            standby_prepend,
            speaker,
            dns,
            hooks,
            role: None,
        })
    }

    /// Announces (or withdraws) the VM's prefixes for `role`, under the
    /// fencing token the decision was taken with. Returns how long the
    /// local part took (the routers see it one UPDATE later).
    pub fn set_role(&mut self, role: Role, token: u64) -> Duration {
        let start = Instant::now();
        if self.role == Some(role) {
            return Duration::ZERO;
        }
        self.role = Some(role);
        let Some(speaker) = &self.speaker else {
            return Duration::ZERO;
        };
        let routes = routes_for(
            role,
            &self.prefixes,
            &self.announce,
            self.standby,
            self.standby_prepend,
        );
        let n = routes.len();
        match speaker.set_group_routes(&self.vm, token, routes) {
            Ok(()) => {
                info!(vm = %self.vm, site = %self.site, ?role, token, routes = n, "BGP announcements set")
            }
            Err(e) => warn!(vm = %self.vm, error = %e, "BGP change refused"),
        }
        start.elapsed()
    }

    /// Points the VM's DNS records at this site, in the background (the
    /// update has its own timeout). Failures are logged: the VM runs
    /// anyway, and BGP (if any) already moved its addresses.
    pub fn point_dns_here(&self) {
        let dns = self.dns.clone();
        let vm = self.vm.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            if let Some((updater, records)) = dns {
                if !records.is_empty() {
                    match updater.update(&records).await {
                        Ok(()) => {
                            info!(vm = %vm, records = records.len(), ms = start.elapsed().as_millis() as u64, "DNS records point at this site")
                        }
                        Err(e) => warn!(vm = %vm, error = %e, "DNS update failed"),
                    }
                }
            }
        });
    }

    /// Runs the operator's hooks for `event` in the background (never
    /// fails; each hook is bounded by its timeout), so a slow hook never
    /// delays a takeover or a fence.
    pub fn spawn_hooks(
        &self,
        event: HookEvent,
        token: u64,
        old_site: Option<&str>,
        new_site: Option<&str>,
    ) {
        if self.hooks.iter().all(|h| h.event != event) {
            return;
        }
        let ctx = HookContext {
            event,
            vm: self.vm.clone(),
            old_site: old_site.map(str::to_owned),
            new_site: new_site.map(str::to_owned),
            fencing_token: token,
            local_site: self.site.clone(),
        };
        let hooks = self.hooks.clone();
        let vm = self.vm.clone();
        tokio::spawn(async move {
            for o in run_hooks(&hooks, &ctx).await {
                if !o.ok() {
                    warn!(vm = %vm, hook = %o.command.display(), result = ?o.result, output = %o.output, "hook failed");
                }
            }
        });
    }

    /// Withdraws nothing on purpose: a stopping process closes its BGP
    /// sessions with a CEASE, and the routers drop its routes with them.
    pub async fn shutdown(self) {
        if let Some(s) = self.speaker {
            s.shutdown().await;
        }
    }
}

fn peer_settings(p: &config::BgpPeer) -> BgpPeerSettings {
    BgpPeerSettings {
        address: p.address,
        port: p.port,
        remote_as: p.remote_as,
        mode: match p.mode {
            config::PeerMode::Active => netops::bgp::PeerMode::Active,
            config::PeerMode::Passive => netops::bgp::PeerMode::Passive,
            config::PeerMode::Both => netops::bgp::PeerMode::Both,
        },
        next_hop_v4: p.next_hop_v4,
        next_hop_v6: p.next_hop_v6,
        md5_password_file: p.md5_password_file.clone(),
    }
}

fn hook_event(e: config::HookEvent) -> HookEvent {
    match e {
        config::HookEvent::Promote => HookEvent::Promote,
        config::HookEvent::Demote => HookEvent::Demote,
        config::HookEvent::Fence => HookEvent::Fence,
        config::HookEvent::ProtectionLost => HookEvent::ProtectionLost,
        config::HookEvent::ProtectionRestored => HookEvent::ProtectionRestored,
    }
}
