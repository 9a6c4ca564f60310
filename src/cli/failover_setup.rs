//! Failover for `protect` and `standby`: with a `[witness]` in the
//! configuration, the VM runs under the witness lease rules (automatic
//! takeover, fencing); without one, there is no automatic failover.

use failover::{Event, SiteId};
use tokio::sync::mpsc::UnboundedReceiver;
use wan::transport::{Endpoint, TransportConfig};

use super::common;
use crate::arbiter::link::LinkKind;
use crate::arbiter::{self, ArbiterHandle, ArbiterOptions, StartAs};
use crate::config::{Config, Site, Vm};

/// The witness's numbering of sites: `SiteId(i + 1)` is the i-th site.
pub fn site_id(cfg: &Config, name: &str) -> Option<SiteId> {
    cfg.sites
        .iter()
        .position(|s| s.name == name)
        .map(|i| SiteId(i as u32 + 1))
}

/// Starts the failover shell for `vm` at site `me`, or `None` when the
/// configuration has no witness. `to_peer` is how the other site is
/// reached (the primary dials; the backup accepts).
pub fn start(
    cfg: &Config,
    vm: &Vm,
    me: &str,
    start_as: StartAs,
    to_peer: LinkKind,
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
    // The witness link has its own endpoint (an ephemeral port), so it
    // never waits behind replication traffic in one congestion window.
    let endpoint = ephemeral_endpoint(site)?;
    let timers = cfg.failover.timers();
    Ok(Some(arbiter::spawn(ArbiterOptions {
        vm: vm.name.clone(),
        me: me_id,
        peer: peer_id,
        start_as,
        timers,
        to_witness: LinkKind::Dial {
            endpoint,
            addr: w.connect_addr(),
            name: w.name.clone(),
            control: false,
        },
        to_peer,
    })))
}

/// A QUIC endpoint of `site` on an ephemeral port of its address, for a
/// failover link it dials.
fn ephemeral_endpoint(site: &Site) -> Result<Endpoint, String> {
    Endpoint::bind(
        std::net::SocketAddr::new(site.listen.ip(), 0),
        TransportConfig::new(common::tls_paths(&site.tls)),
    )
    .map_err(|e| format!("failover endpoint: {e}"))
}

/// The failover link from `me` to its peer site, which `me` dials (the
/// site that runs the VM reaches the one holding the replica).
pub fn dial_peer(me: &Site, peer: &Site) -> Result<LinkKind, String> {
    Ok(LinkKind::Dial {
        endpoint: ephemeral_endpoint(me)?,
        addr: peer.connect_addr(),
        name: peer.name.clone(),
        control: true,
    })
}
