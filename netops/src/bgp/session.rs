//! The BGP session finite state machine (RFC 4271 section 8), sans-IO.
//!
//! A [`Session`] owns no socket and reads no clock. The shell feeds it
//! events (`start`, `tcp_connected`, `received`, `handle_timeout`, ...)
//! with the current `Instant`, then drains [`Session::poll`] for actions
//! (connect, send these bytes, close, established, down, routes received)
//! and sleeps until [`Session::poll_timeout`]. Unit tests drive two
//! sessions back to back with a simulated clock.
//!
//! A session may hold two TCP connections at once while a connection
//! collision is being resolved (mode `Both`): the one we opened
//! ([`ConnId::Outbound`]) and the one the peer opened ([`ConnId::Inbound`]).
//! RFC 4271 section 6.8 decides which survives.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tracing::{debug, info, warn};

use super::route::{Route, RouteAttributes};
use super::update::{decode_update, ReceiveContext};
use super::wire::{self, code, Notification, OpenParams, PeerOpen, UpdateContext};

/// Which side opens the TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerMode {
    /// We connect to the peer.
    Active,
    /// We wait for the peer to connect.
    Passive,
    /// Both; collisions are resolved per RFC 4271 section 6.8.
    Both,
}

/// Static configuration of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub remote_as: u32,
    /// Hold time we propose, seconds (0, or at least 3).
    pub hold_time: u16,
    pub connect_retry: Duration,
    pub mode: PeerMode,
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
}

impl SessionConfig {
    pub fn is_ibgp(&self) -> bool {
        self.local_as == self.remote_as
    }
}

/// One of the (at most two) TCP connections of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnId {
    /// The connection we opened.
    Outbound,
    /// The connection the peer opened.
    Inbound,
}

/// RFC 4271 session states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        };
        f.write_str(s)
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open the outbound TCP connection; answer with `tcp_connected` or
    /// `tcp_failed` for [`ConnId::Outbound`].
    Connect,
    /// Write these bytes on the connection.
    Send { conn: ConnId, bytes: Vec<u8> },
    /// Close the connection once the bytes queued before are written.
    Close { conn: ConnId },
    /// The session reached Established.
    Established { peer_router_id: Ipv4Addr },
    /// The session left Established (or failed to get there).
    Down { reason: String },
    /// Routes received from the peer (after RFC 7606 handling).
    Routes {
        announced: Vec<IpNet>,
        withdrawn: Vec<IpNet>,
    },
}

/// Received prefixes remembered per session (beyond that they are counted).
pub const MAX_TRACKED_RECEIVED: usize = 100_000;

/// Hold time used before the OPENs are exchanged (RFC 4271 suggests 4 min).
const LARGE_HOLD: Duration = Duration::from_secs(240);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ConnState {
    Connecting,
    OpenSent,
    OpenConfirm,
    Established,
}

#[derive(Debug)]
struct Conn {
    state: ConnState,
    rx: Vec<u8>,
    local_addr: Option<IpAddr>,
    peer: Option<PeerOpen>,
    hold: Duration,
    hold_deadline: Option<Instant>,
    keepalive_at: Option<Instant>,
}

impl Conn {
    fn new(state: ConnState) -> Self {
        Self {
            state,
            rx: Vec::new(),
            local_addr: None,
            peer: None,
            hold: Duration::ZERO,
            hold_deadline: None,
            keepalive_at: None,
        }
    }
}

/// Counters and facts for `bgp status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    pub established_count: u64,
    pub updates_received: u64,
    pub updates_treated_as_withdraw: u64,
    pub attributes_discarded: u64,
    pub notifications_sent: u64,
    pub notifications_received: u64,
    /// Announcements received beyond [`MAX_TRACKED_RECEIVED`].
    pub received_not_tracked: u64,
}

/// A snapshot of a session for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    pub state: State,
    pub peer_router_id: Option<Ipv4Addr>,
    pub negotiated_hold_s: Option<u16>,
    pub established_since: Option<Instant>,
    /// Prefixes in our Adj-RIB-Out (announced while Established).
    pub announced: Vec<IpNet>,
    /// Prefixes we want to announce but cannot on this session (no next
    /// hop for the family, or the family was not negotiated).
    pub not_announceable: Vec<IpNet>,
    pub received_prefixes: usize,
    pub last_error: Option<String>,
    pub stats: SessionStats,
}

/// The BGP session state machine.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    admin_up: bool,
    out: Option<Conn>,
    inb: Option<Conn>,
    connect_retry_at: Option<Instant>,
    rib_out: BTreeMap<IpNet, RouteAttributes>,
    rib_in: BTreeSet<IpNet>,
    not_announceable: BTreeSet<IpNet>,
    actions: VecDeque<Action>,
    established_since: Option<Instant>,
    last_error: Option<String>,
    stats: SessionStats,
}

impl Session {
    pub fn new(cfg: SessionConfig) -> Self {
        Self {
            cfg,
            admin_up: false,
            out: None,
            inb: None,
            connect_retry_at: None,
            rib_out: BTreeMap::new(),
            rib_in: BTreeSet::new(),
            not_announceable: BTreeSet::new(),
            actions: VecDeque::new(),
            established_since: None,
            last_error: None,
            stats: SessionStats::default(),
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        match id {
            ConnId::Outbound => self.out.as_ref(),
            ConnId::Inbound => self.inb.as_ref(),
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        match id {
            ConnId::Outbound => self.out.as_mut(),
            ConnId::Inbound => self.inb.as_mut(),
        }
    }

    fn take_conn(&mut self, id: ConnId) -> Option<Conn> {
        match id {
            ConnId::Outbound => self.out.take(),
            ConnId::Inbound => self.inb.take(),
        }
    }

    fn other(id: ConnId) -> ConnId {
        match id {
            ConnId::Outbound => ConnId::Inbound,
            ConnId::Inbound => ConnId::Outbound,
        }
    }

    fn established_conn(&self) -> Option<ConnId> {
        [ConnId::Outbound, ConnId::Inbound]
            .into_iter()
            .find(|&c| self.conn(c).map(|c| c.state) == Some(ConnState::Established))
    }

    /// The RFC 4271 state of the session.
    pub fn state(&self) -> State {
        let best = [self.out.as_ref(), self.inb.as_ref()]
            .into_iter()
            .flatten()
            .map(|c| c.state)
            .max();
        match best {
            Some(ConnState::Established) => State::Established,
            Some(ConnState::OpenConfirm) => State::OpenConfirm,
            Some(ConnState::OpenSent) => State::OpenSent,
            Some(ConnState::Connecting) => State::Connect,
            None if self.admin_up && self.cfg.mode != PeerMode::Active => State::Active,
            None if self.admin_up && self.connect_retry_at.is_some() => State::Active,
            None => State::Idle,
        }
    }

    pub fn is_established(&self) -> bool {
        self.established_conn().is_some()
    }

    pub fn status(&self) -> SessionStatus {
        let est = self
            .established_conn()
            .and_then(|c| self.conn(c))
            .and_then(|c| c.peer.as_ref().map(|p| (p.router_id, c.hold)));
        SessionStatus {
            state: self.state(),
            peer_router_id: est.map(|e| e.0),
            negotiated_hold_s: est.map(|e| e.1.as_secs() as u16),
            established_since: self.established_since,
            announced: if est.is_some() {
                self.rib_out
                    .keys()
                    .filter(|p| !self.not_announceable.contains(p))
                    .copied()
                    .collect()
            } else {
                Vec::new()
            },
            not_announceable: self.not_announceable.iter().copied().collect(),
            received_prefixes: self.rib_in.len(),
            last_error: self.last_error.clone(),
            stats: self.stats.clone(),
        }
    }

    /// The routes we want announced (whether or not the session is up).
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        self.rib_out.iter().map(|(p, a)| Route::new(*p, a.clone()))
    }

    /// Prefixes the peer currently announces to us.
    pub fn received_prefixes(&self) -> impl Iterator<Item = &IpNet> {
        self.rib_in.iter()
    }

    /// Next action for the shell.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.connect_retry_at;
        for c in [self.out.as_ref(), self.inb.as_ref()].into_iter().flatten() {
            for d in [c.hold_deadline, c.keepalive_at].into_iter().flatten() {
                t = Some(t.map_or(d, |t| t.min(d)));
            }
        }
        t
    }

    // ----- administrative events -------------------------------------------

    /// ManualStart / AutomaticStart.
    pub fn start(&mut self, now: Instant) {
        if self.admin_up {
            return;
        }
        self.admin_up = true;
        self.begin(now);
    }

    fn begin(&mut self, now: Instant) {
        match self.cfg.mode {
            PeerMode::Active | PeerMode::Both => {
                if self.out.is_none() {
                    self.out = Some(Conn::new(ConnState::Connecting));
                    self.actions.push_back(Action::Connect);
                }
                self.connect_retry_at = Some(now + self.cfg.connect_retry);
            }
            PeerMode::Passive => {
                self.connect_retry_at = None;
            }
        }
    }

    /// ManualStop: CEASE (administrative shutdown) on every open connection.
    pub fn stop(&mut self, now: Instant) {
        self.admin_up = false;
        self.connect_retry_at = None;
        for id in [ConnId::Outbound, ConnId::Inbound] {
            if self.conn(id).is_some() {
                let notif = match self.conn(id).map(|c| c.state) {
                    Some(ConnState::Connecting) | None => None,
                    _ => Some(Notification::new(code::CEASE, 2, vec![])),
                };
                self.drop_conn(now, id, notif, "administrative shutdown".into());
            }
        }
    }

    // ----- TCP events --------------------------------------------------------

    /// The outbound connection is up; `local` is our address on it.
    pub fn tcp_connected(&mut self, now: Instant, conn: ConnId, local: IpAddr) {
        debug_assert_eq!(conn, ConnId::Outbound);
        let Some(c) = self.out.as_mut() else { return };
        if c.state != ConnState::Connecting {
            return;
        }
        c.local_addr = Some(local);
        c.state = ConnState::OpenSent;
        c.hold_deadline = Some(now + LARGE_HOLD);
        self.connect_retry_at = None;
        self.send_open(ConnId::Outbound);
    }

    /// The outbound connection attempt failed.
    pub fn tcp_failed(&mut self, now: Instant, conn: ConnId, reason: &str) {
        if self.conn(conn).map(|c| c.state) != Some(ConnState::Connecting) {
            return;
        }
        self.take_conn(conn);
        self.last_error = Some(format!("connect failed: {reason}"));
        if self.admin_up {
            // Retry when the connect-retry timer fires.
            self.connect_retry_at = Some(now + self.cfg.connect_retry);
        }
    }

    /// The peer opened a connection to us. Returns false when it must be
    /// refused (the shell closes it without a word).
    pub fn tcp_accepted(&mut self, now: Instant, local: IpAddr) -> bool {
        if !self.admin_up || self.cfg.mode == PeerMode::Active || self.inb.is_some() {
            return false;
        }
        if self.is_established() {
            // RFC 4271 6.8: a new connection while Established is refused.
            return false;
        }
        let mut c = Conn::new(ConnState::OpenSent);
        c.local_addr = Some(local);
        c.hold_deadline = Some(now + LARGE_HOLD);
        self.inb = Some(c);
        self.send_open(ConnId::Inbound);
        true
    }

    /// The TCP connection closed or broke.
    pub fn tcp_closed(&mut self, now: Instant, conn: ConnId) {
        if self.conn(conn).is_some() {
            self.drop_conn(now, conn, None, "connection closed by peer".into());
        }
    }

    // ----- routes ------------------------------------------------------------

    /// Replaces the set of routes to announce; sends the difference if
    /// Established, and everything again after each re-establishment.
    pub fn set_routes(&mut self, _now: Instant, routes: impl IntoIterator<Item = Route>) {
        let new: BTreeMap<IpNet, RouteAttributes> = routes
            .into_iter()
            .map(|r| (r.prefix.trunc(), r.attributes))
            .collect();
        let withdrawn: Vec<IpNet> = self
            .rib_out
            .keys()
            .filter(|p| !new.contains_key(p))
            .copied()
            .collect();
        let changed: Vec<Route> = new
            .iter()
            .filter(|(p, a)| self.rib_out.get(p) != Some(a))
            .map(|(p, a)| Route::new(*p, a.clone()))
            .collect();
        self.rib_out = new;
        for p in &withdrawn {
            self.not_announceable.remove(p);
        }
        if let Some(id) = self.established_conn() {
            for bytes in wire::encode_withdraw(&withdrawn) {
                self.actions.push_back(Action::Send { conn: id, bytes });
            }
            self.send_routes(id, changed);
        }
    }

    /// Adds or replaces announcements, keeping the others.
    pub fn announce(&mut self, now: Instant, routes: impl IntoIterator<Item = Route>) {
        let mut all = self.rib_out.clone();
        for r in routes {
            all.insert(r.prefix.trunc(), r.attributes);
        }
        self.set_routes(now, all.into_iter().map(|(p, a)| Route::new(p, a)));
    }

    /// Withdraws the given prefixes, keeping the others.
    pub fn withdraw(&mut self, now: Instant, prefixes: &[IpNet]) {
        let all: Vec<Route> = self
            .rib_out
            .iter()
            .filter(|(p, _)| !prefixes.iter().any(|w| w.trunc() == **p))
            .map(|(p, a)| Route::new(*p, a.clone()))
            .collect();
        self.set_routes(now, all);
    }

    fn next_hop_for(&self, conn: &Conn, r: &Route) -> Option<IpAddr> {
        if let Some(nh) = r.attributes.next_hop {
            if nh.is_ipv4() == matches!(r.prefix, IpNet::V4(_)) {
                return Some(nh);
            }
        }
        match r.prefix {
            IpNet::V4(_) => self.cfg.next_hop_v4.map(IpAddr::V4),
            IpNet::V6(_) => self.cfg.next_hop_v6.map(IpAddr::V6),
        }
        .or_else(|| wire::default_next_hop(&r.prefix, conn.local_addr))
    }

    fn send_routes(&mut self, id: ConnId, routes: Vec<Route>) {
        let Some(conn) = self.conn(id) else { return };
        let Some(peer) = conn.peer.clone() else {
            return;
        };
        let ctx = UpdateContext {
            local_as: self.cfg.local_as,
            ibgp: self.cfg.is_ibgp(),
            four_octet_as: peer.four_octet_as,
        };
        // Group by (attributes, next hop) so one UPDATE carries many prefixes.
        let mut groups: BTreeMap<(RouteAttributes, IpAddr), Vec<IpNet>> = BTreeMap::new();
        let mut bad = Vec::new();
        for r in routes {
            let family_ok = match r.prefix {
                IpNet::V4(_) => peer.ipv4_unicast,
                IpNet::V6(_) => peer.ipv6_unicast,
            };
            match self.next_hop_for(conn, &r) {
                Some(nh) if family_ok && wire::is_unicast_prefix(&r.prefix) => {
                    groups.entry((r.attributes, nh)).or_default().push(r.prefix);
                }
                _ => bad.push(r.prefix),
            }
        }
        for p in bad {
            warn!(
                prefix = %p,
                "cannot announce: not a unicast prefix, address family not negotiated, or no next hop"
            );
            self.not_announceable.insert(p);
        }
        let mut msgs = Vec::new();
        for ((attrs, nh), prefixes) in groups {
            for p in &prefixes {
                self.not_announceable.remove(p);
            }
            msgs.extend(wire::encode_announce(&ctx, &attrs, nh, &prefixes));
        }
        for bytes in msgs {
            self.actions.push_back(Action::Send { conn: id, bytes });
        }
    }

    // ----- timers ------------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant) {
        for id in [ConnId::Outbound, ConnId::Inbound] {
            let Some(c) = self.conn_mut(id) else { continue };
            if c.hold_deadline.is_some_and(|d| d <= now) {
                let reason = "hold timer expired".to_string();
                self.drop_conn(
                    now,
                    id,
                    Some(Notification::new(code::HOLD_TIMER_EXPIRED, 0, vec![])),
                    reason,
                );
                continue;
            }
            if let Some(k) = c.keepalive_at {
                if k <= now {
                    let interval = c.hold / 3;
                    c.keepalive_at = Some(now + interval);
                    self.actions.push_back(Action::Send {
                        conn: id,
                        bytes: wire::encode_keepalive(),
                    });
                }
            }
        }
        if self.connect_retry_at.is_some_and(|t| t <= now) {
            self.connect_retry_at = None;
            if self.admin_up {
                if self.out.as_ref().map(|c| c.state) == Some(ConnState::Connecting) {
                    // The attempt is taking too long: abandon it and retry.
                    self.out = None;
                    self.actions.push_back(Action::Close {
                        conn: ConnId::Outbound,
                    });
                }
                if self.out.is_none() && self.inb.is_none() {
                    self.begin(now);
                }
            }
        }
    }

    // ----- received bytes ----------------------------------------------------

    /// Bytes arrived on a connection.
    pub fn received(&mut self, now: Instant, id: ConnId, bytes: &[u8]) {
        let Some(c) = self.conn_mut(id) else { return };
        c.rx.extend_from_slice(bytes);
        loop {
            let Some(c) = self.conn_mut(id) else { return };
            let buf = std::mem::take(&mut c.rx);
            let step = match wire::split_message(&buf) {
                Err(n) => Err(n),
                Ok(None) => Ok(None),
                Ok(Some((framed, used))) => Ok(Some((framed.msg_type, buf[..used].to_vec(), used))),
            };
            match step {
                Err(n) => {
                    let reason = format!("received a malformed message: {}", n.describe());
                    self.drop_conn(now, id, Some(n), reason);
                    return;
                }
                Ok(None) => {
                    if let Some(c) = self.conn_mut(id) {
                        c.rx = buf;
                    }
                    return;
                }
                Ok(Some((t, msg, used))) => {
                    if let Some(c) = self.conn_mut(id) {
                        c.rx = buf[used..].to_vec();
                    }
                    self.handle_message(now, id, t, &msg);
                }
            }
        }
    }

    fn handle_message(&mut self, now: Instant, id: ConnId, t: u8, msg: &[u8]) {
        let Some(state) = self.conn(id).map(|c| c.state) else {
            return;
        };
        if t == wire::MSG_NOTIFICATION {
            let n = Notification::decode_body(&msg[wire::HEADER_LEN..])
                .unwrap_or_else(|| Notification::new(0, 0, vec![]));
            self.stats.notifications_received += 1;
            let reason = format!("peer sent NOTIFICATION: {}", n.describe());
            self.drop_conn(now, id, None, reason);
            return;
        }
        match (state, t) {
            (ConnState::OpenSent, wire::MSG_OPEN) => self.handle_open(now, id, msg),
            (ConnState::OpenConfirm, wire::MSG_KEEPALIVE) => {
                self.become_established(now, id);
            }
            (ConnState::Established, wire::MSG_KEEPALIVE) => self.reset_hold(now, id),
            (ConnState::Established, wire::MSG_UPDATE) => {
                self.reset_hold(now, id);
                self.handle_update(now, id, &msg[wire::HEADER_LEN..]);
            }
            (ConnState::Established, wire::MSG_ROUTE_REFRESH) => {
                self.reset_hold(now, id);
                let all: Vec<Route> = self.routes().collect();
                self.send_routes(id, all);
            }
            (ConnState::OpenConfirm, wire::MSG_ROUTE_REFRESH) => {}
            (s, _) => {
                let sub = match s {
                    ConnState::OpenSent => 1,
                    ConnState::OpenConfirm => 2,
                    ConnState::Established => 3,
                    ConnState::Connecting => 0,
                };
                let n = Notification::new(code::FSM, sub, vec![t]);
                let reason = format!("unexpected message type {t} in state {s:?}");
                self.drop_conn(now, id, Some(n), reason);
            }
        }
    }

    fn reset_hold(&mut self, now: Instant, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            if !c.hold.is_zero() {
                c.hold_deadline = Some(now + c.hold);
            }
        }
    }

    fn handle_open(&mut self, now: Instant, id: ConnId, msg: &[u8]) {
        let open = match wire::decode_open(msg) {
            Ok(o) => o,
            Err(n) => {
                let reason = format!("bad OPEN from peer: {}", n.describe());
                self.drop_conn(now, id, Some(n), reason);
                return;
            }
        };
        if open.asn != self.cfg.remote_as {
            let reason = format!(
                "peer AS {} does not match configured AS {}",
                open.asn, self.cfg.remote_as
            );
            let data = u16::try_from(open.asn)
                .unwrap_or(wire::AS_TRANS)
                .to_be_bytes();
            self.drop_conn(
                now,
                id,
                Some(Notification::new(code::OPEN, 2, data)),
                reason,
            );
            return;
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            self.drop_conn(
                now,
                id,
                Some(Notification::new(code::OPEN, 6, vec![])),
                format!("unacceptable hold time {}", open.hold_time),
            );
            return;
        }
        let bad_id = open.router_id.is_unspecified()
            || open.router_id.is_multicast()
            || open.router_id.is_broadcast()
            || (self.cfg.is_ibgp() && open.router_id == self.cfg.router_id);
        if bad_id {
            self.drop_conn(
                now,
                id,
                Some(Notification::new(code::OPEN, 3, vec![])),
                format!("bad BGP identifier {}", open.router_id),
            );
            return;
        }
        // Connection collision (RFC 4271 6.8).
        let other = Self::other(id);
        if let Some(o) = self.conn(other) {
            let resolve = match o.state {
                ConnState::Established => Some(id),
                ConnState::OpenConfirm => {
                    // The connection opened by the speaker with the higher
                    // BGP Identifier survives.
                    if u32::from(self.cfg.router_id) > u32::from(open.router_id) {
                        Some(ConnId::Inbound)
                    } else {
                        Some(ConnId::Outbound)
                    }
                }
                _ => None,
            };
            if let Some(loser) = resolve {
                info!(?loser, "connection collision resolved");
                self.drop_conn(
                    now,
                    loser,
                    Some(Notification::new(code::CEASE, 7, vec![])),
                    "connection collision resolution".into(),
                );
                if loser == id {
                    return;
                }
            }
        }
        let ours = self.cfg.hold_time;
        let hold = Duration::from_secs(ours.min(open.hold_time) as u64);
        let c = self.conn_mut(id).expect("connection exists");
        c.peer = Some(open);
        c.hold = hold;
        c.state = ConnState::OpenConfirm;
        if hold.is_zero() {
            c.hold_deadline = None;
            c.keepalive_at = None;
        } else {
            c.hold_deadline = Some(now + hold);
            c.keepalive_at = Some(now + hold / 3);
        }
        self.actions.push_back(Action::Send {
            conn: id,
            bytes: wire::encode_keepalive(),
        });
        // If the other connection is still in OpenSent we keep it until its
        // OPEN arrives (then the collision rule above decides).
    }

    fn become_established(&mut self, now: Instant, id: ConnId) {
        self.reset_hold(now, id);
        let c = self.conn_mut(id).expect("connection exists");
        c.state = ConnState::Established;
        let rid = c
            .peer
            .as_ref()
            .map(|p| p.router_id)
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        self.established_since = Some(now);
        self.stats.established_count += 1;
        self.last_error = None;
        self.connect_retry_at = None;
        info!(peer_router_id = %rid, "BGP session established");
        self.actions.push_back(Action::Established {
            peer_router_id: rid,
        });
        // A leftover connection still in OpenSent loses.
        let other = Self::other(id);
        if self.conn(other).is_some() {
            self.drop_conn(
                now,
                other,
                Some(Notification::new(code::CEASE, 7, vec![])),
                "connection collision resolution".into(),
            );
        }
        // Everything again after (re-)establishment.
        self.not_announceable.clear();
        let all: Vec<Route> = self.routes().collect();
        self.send_routes(id, all);
    }

    fn handle_update(&mut self, now: Instant, id: ConnId, body: &[u8]) {
        let Some(peer) = self.conn(id).and_then(|c| c.peer.clone()) else {
            return;
        };
        let ctx = ReceiveContext {
            four_octet_as: peer.four_octet_as,
            ibgp: self.cfg.is_ibgp(),
        };
        self.stats.updates_received += 1;
        match decode_update(body, ctx) {
            Err(n) => {
                let reason = format!("malformed UPDATE from peer: {}", n.describe());
                self.drop_conn(now, id, Some(n), reason);
            }
            Ok(u) => {
                if let Some(why) = &u.treat_as_withdraw {
                    self.stats.updates_treated_as_withdraw += 1;
                    warn!(
                        reason = %why,
                        prefixes = u.withdrawn.len(),
                        "RFC 7606: malformed UPDATE treated as withdraw, session kept"
                    );
                }
                for d in &u.discarded {
                    self.stats.attributes_discarded += 1;
                    warn!(reason = %d, "RFC 7606: attribute discarded");
                }
                for w in &u.withdrawn {
                    self.rib_in.remove(w);
                }
                for a in &u.announced {
                    // We only count what the peer sends (it should send
                    // nothing); a peer exporting a full table must not
                    // cost unbounded memory, nor tear the session down.
                    if self.rib_in.len() < MAX_TRACKED_RECEIVED {
                        self.rib_in.insert(*a);
                    } else if !self.rib_in.contains(a) {
                        self.stats.received_not_tracked += 1;
                    }
                }
                if !u.announced.is_empty() || !u.withdrawn.is_empty() {
                    self.actions.push_back(Action::Routes {
                        announced: u.announced,
                        withdrawn: u.withdrawn,
                    });
                }
            }
        }
    }

    fn send_open(&mut self, id: ConnId) {
        let bytes = wire::encode_open(&OpenParams {
            local_as: self.cfg.local_as,
            hold_time: self.cfg.hold_time,
            router_id: self.cfg.router_id,
        });
        self.actions.push_back(Action::Send { conn: id, bytes });
    }

    /// Tears one connection down: optional NOTIFICATION, close, and if it
    /// was the last one, restart after the connect-retry time.
    fn drop_conn(&mut self, now: Instant, id: ConnId, notif: Option<Notification>, reason: String) {
        let Some(c) = self.take_conn(id) else { return };
        if let Some(n) = notif {
            self.stats.notifications_sent += 1;
            debug!(notification = %n.describe(), ?id, "sending NOTIFICATION");
            self.actions.push_back(Action::Send {
                conn: id,
                bytes: n.encode(),
            });
        }
        self.actions.push_back(Action::Close { conn: id });
        let was_established = c.state == ConnState::Established;
        if c.state != ConnState::Connecting || reason != "connection collision resolution" {
            self.last_error = Some(reason.clone());
        }
        if was_established {
            warn!(%reason, "BGP session down");
            self.established_since = None;
            self.rib_in.clear();
            self.actions.push_back(Action::Down { reason });
        } else if reason != "connection collision resolution" {
            debug!(%reason, ?id, "BGP connection closed");
            if self.out.is_none() && self.inb.is_none() {
                self.actions.push_back(Action::Down { reason });
            }
        }
        if self.admin_up && self.out.is_none() && self.inb.is_none() {
            // Automatic restart after the connect-retry time (also for
            // passive peers, who simply keep listening).
            self.connect_retry_at = match self.cfg.mode {
                PeerMode::Passive => None,
                _ => Some(now + self.cfg.connect_retry),
            };
        } else if self.admin_up
            && self.out.is_none()
            && matches!(self.cfg.mode, PeerMode::Active | PeerMode::Both)
            && !self.is_established()
            && self.connect_retry_at.is_none()
        {
            self.connect_retry_at = Some(now + self.cfg.connect_retry);
        }
    }
}

#[cfg(test)]
mod tests;
