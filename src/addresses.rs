//! Moving one VM's addresses to the site that runs it: this site's BGP
//! speaker, the DNS records and the operator hooks of `[netops]`, driven by
//! the failover events of the engine.
//!
//! Every BGP change carries the witness lease's fencing token
//! ([`netops::bgp::Speaker::set_group_routes`] refuses an older one), and
//! the engine calls [`Addresses::set_role`] with `Active` only while the
//! failover state machine allows this site to release the VM's output, so a
//! stale site can never announce. DNS updates carry the same token into
//! the zone (a fence TXT record per name, compare-and-swap, see
//! [`netops::dns`]): a site with an older token cannot overwrite records a
//! newer one wrote.
//!
//! Hooks run in the background and [`Addresses::shutdown`] waits for them
//! (at most `netops.hook_exit_wait_s`) before the process exits.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netops::bgp::Speaker;
use netops::config::{
    AnnounceSettingsRaw, BgpPeerSettings, BgpSettings, BgpSpeakerSettings, DnsSettings, HookEvent,
    HookSettings, StandbyPolicy,
};
use netops::dns::{DnsUpdater, Fence, RecordUpdate, TsigAlgorithm};
use netops::hooks::{HookContext, HookRunner};
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
    /// The site's speaker, shared with the site's other VMs.
    speaker: Option<Arc<Speaker>>,
    dns: Option<Arc<(DnsUpdater, Vec<RecordUpdate>)>>,
    /// The DNS update in flight, if any.
    dns_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    hooks: HookRunner,
    /// How long [`Addresses::shutdown`] waits for hooks still running.
    hook_exit_wait: Duration,
    role: Option<Role>,
    /// The fencing token of the last [`Addresses::set_role`].
    token: Option<u64>,
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Addresses")
            .field("site", &self.site)
            .field("vm", &self.vm)
            .field("bgp", &self.speaker.is_some())
            .field("dns", &self.dns.is_some())
            .field("hooks_running", &self.hooks.running())
            .finish()
    }
}

impl Addresses {
    /// Starts this site's BGP speaker (sessions come up at once, announcing
    /// nothing until [`Addresses::set_role`]) and prepares the DNS updater,
    /// for one VM alone. A site daemon serving many VMs starts the speaker
    /// once ([`Addresses::site_speaker`]) and gives it to each VM
    /// ([`Addresses::for_vm`]): the routers see one BGP session per site,
    /// each VM's routes a group of their own in it.
    pub async fn start(cfg: &Config, site: &str, vm: &Vm) -> Result<Self, AddressError> {
        let speaker = Self::site_speaker(cfg, site).await?;
        Self::for_vm(cfg, site, vm, speaker)
    }

    /// Starts site `site`'s BGP speaker, if `[netops.bgp]` has one for it.
    pub async fn site_speaker(
        cfg: &Config,
        site: &str,
    ) -> Result<Option<Arc<Speaker>>, AddressError> {
        let bgp_err = |message: String| AddressError::Bgp {
            site: site.to_owned(),
            message,
        };
        let Some(bgp) = &cfg.netops.bgp else {
            return Ok(None);
        };
        let Some(sp) = bgp.speakers.iter().find(|s| s.site == site) else {
            return Ok(None);
        };
        let settings = BgpSettings {
            hold_time_s: bgp.hold_time_s,
            connect_retry_s: bgp.connect_retry_s,
            standby: standby_policy(bgp.standby),
            standby_prepend: bgp.standby_prepend,
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
        Ok(Some(Arc::new(s)))
    }

    /// VM `vm`'s addresses at site `site`, announced through `speaker`
    /// (shared by every VM of the site).
    pub fn for_vm(
        cfg: &Config,
        site: &str,
        vm: &Vm,
        speaker: Option<Arc<Speaker>>,
    ) -> Result<Self, AddressError> {
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
        let (standby, standby_prepend) = match &cfg.netops.bgp {
            Some(bgp) => (standby_policy(bgp.standby), bgp.standby_prepend),
            None => (StandbyPolicy::None, 0),
        };
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
                    retry_deadline_s: d.retry_deadline_s,
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
                Some(Arc::new((updater, records)))
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
            dns_task: Mutex::new(None),
            hooks: HookRunner::new(hooks),
            hook_exit_wait: Duration::from_secs(cfg.netops.hook_exit_wait_s as u64),
            role: None,
            token: None,
        })
    }

    /// Announces (or withdraws) the VM's prefixes for `role`, under the
    /// fencing token the decision was taken with (also the token of the
    /// next [`Addresses::point_dns_here`]). Returns how long the local
    /// part took (the routers see it one UPDATE later).
    pub fn set_role(&mut self, role: Role, token: u64) -> Duration {
        let start = Instant::now();
        self.token = Some(token);
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

    /// Points the VM's DNS records at this site, in the background, under
    /// the fencing token of the last [`Addresses::set_role`]: a
    /// compare-and-swap UPDATE that refuses to overwrite records written
    /// under a newer token, retried with backoff up to
    /// `netops.dns.retry_deadline_s`. Failures are logged: the VM runs
    /// anyway, and BGP (if any) already moved its addresses.
    pub fn point_dns_here(&self) {
        let Some(dns) = self.dns.clone() else {
            return;
        };
        if dns.1.is_empty() {
            return;
        }
        let vm = self.vm.clone();
        let Some(token) = self.token else {
            warn!(vm = %vm, "DNS not updated: no fencing token yet (set_role first)");
            return;
        };
        let fence = Fence {
            token,
            site: self.site.clone(),
        };
        let task = tokio::spawn(async move {
            let (updater, records) = &*dns;
            match updater.update(records, &fence).await {
                Ok(r) => {
                    info!(vm = %vm, records = records.len(), token, attempts = r.attempts, ms = r.elapsed.as_millis() as u64, "DNS records point at this site")
                }
                Err(e @ netops::dns::DnsError::Stale { .. }) => {
                    warn!(vm = %vm, token, error = %e, "DNS not updated: a site with a newer fencing token wrote the records")
                }
                Err(e) => warn!(vm = %vm, token, error = %e, "DNS update failed"),
            }
        });
        // A newer move supersedes one still in flight.
        let mut slot = self.dns_task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.replace(task) {
            old.abort();
        }
    }

    /// Runs the operator's hooks for `event` in the background (never
    /// fails; each hook is bounded by its timeout), so a slow hook never
    /// delays a takeover or a fence. [`Addresses::shutdown`] waits for
    /// them.
    pub fn spawn_hooks(
        &self,
        event: HookEvent,
        token: u64,
        old_site: Option<&str>,
        new_site: Option<&str>,
    ) {
        self.hooks.spawn(HookContext {
            event,
            vm: self.vm.clone(),
            old_site: old_site.map(str::to_owned),
            new_site: new_site.map(str::to_owned),
            fencing_token: token,
            local_site: self.site.clone(),
        });
    }

    /// Hook events whose hooks still run.
    pub fn hooks_running(&self) -> usize {
        self.hooks.running()
    }

    /// Stops this site's part before the process exits (or the daemon
    /// stops serving the VM): closes the BGP sessions when no other VM of
    /// the site uses them (CEASE; withdraws nothing on purpose, the routers
    /// drop this site's routes with the sessions), else withdraws this VM's
    /// routes only; abandons a DNS update still
    /// retrying (this process no longer runs the VM), and waits for hooks
    /// still running (demote, fence, ...) at most
    /// `netops.hook_exit_wait_s`, killing those still running then. Call
    /// it on every way out of the process, errors included: hooks are cut
    /// off otherwise.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.speaker.take() {
            match Arc::try_unwrap(s) {
                // The site's last VM here: the sessions close (CEASE).
                Ok(s) => s.shutdown().await,
                // Other VMs of the site still use the sessions: only this
                // VM's routes go.
                Err(shared) => {
                    if let Err(e) =
                        shared.set_group_routes(&self.vm, self.token.unwrap_or(0), Vec::new())
                    {
                        warn!(vm = %self.vm, error = %e, "BGP withdrawal refused");
                    }
                }
            }
        }
        let task = self
            .dns_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = task {
            if !t.is_finished() {
                warn!(vm = %self.vm, "DNS update still retrying at exit: abandoned");
                t.abort();
            }
        }
        let killed = self.hooks.finish(self.hook_exit_wait).await;
        if killed > 0 {
            warn!(vm = %self.vm, events = killed, wait_s = self.hook_exit_wait.as_secs(), "hooks killed at exit (netops.hook_exit_wait_s)");
        }
    }
}

impl Drop for Addresses {
    fn drop(&mut self) {
        let running = self.hooks.running();
        if running > 0 {
            warn!(vm = %self.vm, events = running, "addresses dropped without shutdown(): hooks still running are cut off if the process exits now");
        }
    }
}

fn standby_policy(p: config::StandbyPolicy) -> StandbyPolicy {
    match p {
        config::StandbyPolicy::None => StandbyPolicy::None,
        config::StandbyPolicy::Prepend => StandbyPolicy::Prepend,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// The example deployment without BGP and DNS, with these hooks.
    fn config(hooks: Vec<config::Hook>, exit_wait_s: u32) -> Config {
        let text = include_str!("../configs/two-site.toml");
        let mut cfg = Config::parse(
            text,
            Path::new("two-site.toml"),
            Path::new("/nonexistent"),
            Vec::new(),
        )
        .unwrap();
        cfg.netops.bgp = None;
        cfg.netops.dns = None;
        cfg.netops.hooks = hooks;
        cfg.netops.hook_exit_wait_s = exit_wait_s;
        cfg
    }

    fn hook(event: config::HookEvent, command: PathBuf, timeout_s: u32) -> config::Hook {
        config::Hook {
            event,
            command,
            args: Vec::new(),
            timeout_s,
        }
    }

    /// A demote hook still running when the process stops (protect's
    /// shutdown right after the demotion) runs to its end.
    #[tokio::test]
    async fn shutdown_waits_for_hooks_still_running() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("demoted");
        let slow = script(
            dir.path(),
            "demote.sh",
            &format!(
                "sleep 0.5\necho \"$REMUS_WAN_EVENT $REMUS_WAN_FENCING_TOKEN\" > {}",
                out.display()
            ),
        );
        let cfg = config(vec![hook(config::HookEvent::Demote, slow, 30)], 30);
        let vm = cfg.vm("web1").unwrap().clone();
        let mut a = Addresses::start(&cfg, "dc1", &vm).await.unwrap();
        a.set_role(Role::Down, 7);
        a.spawn_hooks(HookEvent::Demote, 7, Some("dc1"), Some("dc2"));
        assert_eq!(a.hooks_running(), 1);
        a.shutdown().await;
        assert_eq!(
            std::fs::read_to_string(&out).unwrap_or_default().trim(),
            "demote 7",
            "the demote hook was cut off by shutdown"
        );
    }

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A hook that hangs is killed at `netops.hook_exit_wait_s`, and says so.
    #[tokio::test]
    async fn shutdown_kills_a_hanging_hook_at_the_bound_and_logs_it() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let hang = script(
            dir.path(),
            "fence.sh",
            &format!("echo $$ > {}\nsleep 600", pid_file.display()),
        );
        let cfg = config(vec![hook(config::HookEvent::Fence, hang, 600)], 1);
        let vm = cfg.vm("web1").unwrap().clone();
        let a = Addresses::start(&cfg, "dc1", &vm).await.unwrap();
        a.spawn_hooks(HookEvent::Fence, 3, None, None);
        let start = Instant::now();
        while !pid_file.exists() && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let start = Instant::now();
        a.shutdown().await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(8),
            "{took:?}"
        );
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        assert!(
            stat.is_empty()
                || stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, r)| r.starts_with('Z')),
            "the hook survived: {stat}"
        );
        let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
        assert!(text.contains("hooks killed at exit"), "{text}");
        assert!(
            text.contains("hook killed: still running when the process stopped"),
            "{text}"
        );
    }
}
