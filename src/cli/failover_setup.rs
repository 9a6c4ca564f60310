//! Failover for `protect` and `standby`: with a `[witness]` in the
//! configuration, the VM runs under the witness lease rules (automatic
//! takeover, fencing); without one, there is no automatic failover.

use failover::{Event, SiteId};
use tokio::sync::mpsc::UnboundedReceiver;
use wan::transport::{Endpoint, TransportConfig};

use super::common;
use crate::arbiter::link::LinkKind;
use crate::arbiter::{self, ArbiterHandle, ArbiterOptions, StartAs};
use crate::config::{Config, Site, Vm, WitnessBackend};

/// The witness's numbering of sites: `SiteId(i + 1)` is the i-th site.
pub fn site_id(cfg: &Config, name: &str) -> Option<SiteId> {
    cfg.sites
        .iter()
        .position(|s| s.name == name)
        .map(|i| SiteId(i as u32 + 1))
}

/// Starts the failover shell for `vm` at site `me`, or `None` when the
/// configuration has no witness. `to_peer` is how the other site is
/// reached (the primary dials; the backup accepts). `endpoint`: the site
/// daemon's failover endpoint, shared by all its VMs' links (else one of
/// this VM's own).
pub fn start(
    cfg: &Config,
    vm: &Vm,
    me: &str,
    start_as: StartAs,
    to_peer: LinkKind,
    endpoint: Option<&Endpoint>,
) -> Result<Option<(ArbiterHandle, UnboundedReceiver<Event>)>, String> {
    let Some(w) = &cfg.witness else {
        return Ok(None);
    };
    let peer = if me == vm.primary {
        &vm.backup
    } else {
        &vm.primary
    };
    let (Some(me_id), Some(peer_id), Some(site)) =
        (site_id(cfg, me), site_id(cfg, peer), cfg.site(me))
    else {
        return Err(format!("`vms.{}`: unknown site", vm.name));
    };
    let timers = cfg.failover.timers();
    let to_witness = witness_link(cfg, w, site, me_id, endpoint)?;
    Ok(Some(arbiter::spawn(ArbiterOptions {
        vm: vm.name.clone(),
        me: me_id,
        peer: peer_id,
        start_as,
        timers,
        to_witness,
        to_peer,
    })))
}

/// How site `me` reaches the arbiter: the built-in witness over QUIC, or
/// etcd.
fn witness_link(
    cfg: &Config,
    w: &crate::config::Witness,
    site: &Site,
    me: SiteId,
    endpoint: Option<&Endpoint>,
) -> Result<LinkKind, String> {
    match w.backend {
        // The witness link has its own endpoint (an ephemeral port, shared
        // by the failover links of a daemon's VMs), so it never waits
        // behind replication traffic in one congestion window or socket.
        WitnessBackend::Builtin => Ok(LinkKind::Dial {
            endpoint: failover_endpoint(site, endpoint)?,
            addr: w.connect_addr(),
            name: w.name.clone(),
            control: false,
        }),
        #[cfg(feature = "etcd")]
        WitnessBackend::Etcd => {
            let timers = cfg.failover.timers();
            Ok(LinkKind::Etcd {
                link: crate::arbiter::etcd::EtcdLink {
                    endpoints: w.endpoints.clone(),
                    ca: w.ca.clone(),
                    cert: w.cert.clone(),
                    key: w.key.clone(),
                    prefix: w.etcd_prefix().to_owned(),
                    // Validated: whole seconds.
                    ttl_secs: timers.lease.as_secs().max(1) as i64,
                    op_timeout: (timers.lease / 2).max(std::time::Duration::from_millis(500)),
                },
                me,
            })
        }
        #[cfg(not(feature = "etcd"))]
        WitnessBackend::Etcd => {
            let _ = (cfg, me);
            Err(
                "`witness.backend`: this build has no etcd support (built without the \
                 `etcd` feature)"
                    .to_owned(),
            )
        }
    }
}

/// `shared`, or else a new endpoint of `site` for one VM's link.
fn failover_endpoint(site: &Site, shared: Option<&Endpoint>) -> Result<Endpoint, String> {
    match shared {
        Some(e) => Ok(e.clone()),
        None => ephemeral_endpoint(site),
    }
}

/// A QUIC endpoint of `site` on an ephemeral port of its address, for
/// failover links it dials.
pub fn ephemeral_endpoint(site: &Site) -> Result<Endpoint, String> {
    Endpoint::bind(
        std::net::SocketAddr::new(site.listen.ip(), 0),
        TransportConfig::new(common::tls_paths(&site.tls)),
    )
    .map_err(|e| format!("failover endpoint: {e}"))
}

/// The failover link from `me` to its peer site, which `me` dials (the
/// site that runs the VM reaches the one holding the replica).
pub fn dial_peer(me: &Site, peer: &Site, endpoint: Option<&Endpoint>) -> Result<LinkKind, String> {
    Ok(LinkKind::Dial {
        endpoint: failover_endpoint(me, endpoint)?,
        addr: peer.connect_addr(),
        name: peer.name.clone(),
        control: true,
    })
}
