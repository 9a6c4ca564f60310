//! Two sessions back to back over simulated TCP links, with a virtual clock.

use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::*;
use crate::bgp::route::{Route, RouteAttributes};
use crate::bgp::update::{decode_update, ReceiveContext};
use crate::bgp::wire::{self, frame, MSG_KEEPALIVE, MSG_NOTIFICATION, MSG_OPEN, MSG_UPDATE};

const A_IP: &str = "192.0.2.1";
const B_IP: &str = "192.0.2.2";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

struct Link {
    a: ConnId,
    b: ConnId,
    blackhole: bool,
}

/// What one side did, for assertions.
#[derive(Default)]
struct Log {
    sent: Vec<(ConnId, Vec<u8>)>,
    events: Vec<Action>,
}

impl Log {
    fn sent_of_type(&self, t: u8) -> Vec<&Vec<u8>> {
        self.sent
            .iter()
            .filter(|(_, b)| b.len() >= 19 && b[18] == t)
            .map(|(_, b)| b)
            .collect()
    }
    fn notifications(&self) -> Vec<(u8, u8)> {
        self.sent_of_type(MSG_NOTIFICATION)
            .iter()
            .map(|b| (b[19], b[20]))
            .collect()
    }
    fn established(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Action::Established { .. }))
            .count()
    }
    fn downs(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Action::Down { reason } => Some(reason.as_str()),
                _ => None,
            })
            .collect()
    }
    fn received_routes(&self) -> (Vec<IpNet>, Vec<IpNet>) {
        let mut a = Vec::new();
        let mut w = Vec::new();
        for e in &self.events {
            if let Action::Routes {
                announced,
                withdrawn,
            } = e
            {
                a.extend(announced.iter().copied());
                w.extend(withdrawn.iter().copied());
            }
        }
        (a, w)
    }
}

struct Pair {
    a: Session,
    b: Session,
    now: Instant,
    links: Vec<Link>,
    log_a: Log,
    log_b: Log,
    /// When false, connection attempts fail (peer unreachable).
    reachable: bool,
}

fn cfg(local_as: u32, rid: &str, remote_as: u32, mode: PeerMode) -> SessionConfig {
    SessionConfig {
        local_as,
        router_id: rid.parse().unwrap(),
        remote_as,
        hold_time: 9,
        connect_retry: Duration::from_secs(5),
        mode,
        next_hop_v4: None,
        next_hop_v6: Some("2001:db8::1".parse().unwrap()),
    }
}

impl Pair {
    fn new(a: SessionConfig, b: SessionConfig) -> Self {
        Self {
            a: Session::new(a),
            b: Session::new(b),
            now: Instant::now(),
            links: Vec::new(),
            log_a: Log::default(),
            log_b: Log::default(),
            reachable: true,
        }
    }

    /// A (65000, active) and B (65001, passive): the usual set-up.
    fn standard() -> Self {
        Self::new(
            cfg(65000, "10.0.0.1", 65001, PeerMode::Active),
            cfg(65001, "10.0.0.2", 65000, PeerMode::Passive),
        )
    }

    fn start(&mut self) {
        let now = self.now;
        self.a.start(now);
        self.b.start(now);
        self.run();
    }

    fn side(&mut self, s: Side) -> (&mut Session, &mut Session) {
        match s {
            Side::A => (&mut self.a, &mut self.b),
            Side::B => (&mut self.b, &mut self.a),
        }
    }

    fn link_of(&self, s: Side, c: ConnId) -> Option<usize> {
        self.links.iter().position(|l| match s {
            Side::A => l.a == c,
            Side::B => l.b == c,
        })
    }

    fn peer_conn(&self, s: Side, i: usize) -> ConnId {
        match s {
            Side::A => self.links[i].b,
            Side::B => self.links[i].a,
        }
    }

    /// Processes actions until both sides are quiet (bounded).
    fn run(&mut self) {
        for _ in 0..1000 {
            let mut queue = Vec::new();
            while let Some(x) = self.a.poll() {
                queue.push((Side::A, x));
            }
            while let Some(x) = self.b.poll() {
                queue.push((Side::B, x));
            }
            if queue.is_empty() {
                return;
            }
            for (s, act) in queue {
                self.apply(s, act);
            }
        }
        panic!("sessions never went quiet");
    }

    fn apply(&mut self, s: Side, act: Action) {
        let now = self.now;
        let other = match s {
            Side::A => Side::B,
            Side::B => Side::A,
        };
        let log = match s {
            Side::A => &mut self.log_a,
            Side::B => &mut self.log_b,
        };
        match act {
            Action::Connect => {
                let reachable = self.reachable;
                let (me, peer) = self.side(s);
                let local: IpAddr = if s == Side::A { A_IP } else { B_IP }.parse().unwrap();
                let remote: IpAddr = if s == Side::A { B_IP } else { A_IP }.parse().unwrap();
                if reachable && peer.tcp_accepted(now, remote) {
                    me.tcp_connected(now, ConnId::Outbound, local);
                    let l = match s {
                        Side::A => Link {
                            a: ConnId::Outbound,
                            b: ConnId::Inbound,
                            blackhole: false,
                        },
                        Side::B => Link {
                            a: ConnId::Inbound,
                            b: ConnId::Outbound,
                            blackhole: false,
                        },
                    };
                    self.links.push(l);
                } else {
                    me.tcp_failed(now, ConnId::Outbound, "connection refused");
                }
            }
            Action::Send { conn, bytes } => {
                log.sent.push((conn, bytes.clone()));
                if let Some(i) = self.link_of(s, conn) {
                    if !self.links[i].blackhole {
                        let pc = self.peer_conn(s, i);
                        let (_, peer) = self.side(s);
                        peer.received(now, pc, &bytes);
                    }
                }
            }
            Action::Close { conn } => {
                if let Some(i) = self.link_of(s, conn) {
                    let pc = self.peer_conn(s, i);
                    self.links.remove(i);
                    let (_, peer) = self.side(s);
                    peer.tcp_closed(now, pc);
                }
                let _ = other;
            }
            e => log.events.push(e),
        }
    }

    /// Moves the clock forward to `now + d`, firing timers in order.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..100_000 {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    self.a.handle_timeout(now);
                    self.b.handle_timeout(now);
                    self.run();
                }
                _ => {
                    self.now = end;
                    self.run();
                    return;
                }
            }
        }
        panic!("timer storm");
    }

    /// Injects raw bytes as if B sent them on its connection to A.
    fn inject_to_a(&mut self, bytes: &[u8]) {
        let i = self.links.first().expect("a link");
        let conn = i.a;
        let now = self.now;
        self.a.received(now, conn, bytes);
        self.run();
    }
}

fn route(p: &str) -> Route {
    Route::new(
        p.parse().unwrap(),
        RouteAttributes {
            prepend: 1,
            communities: vec![(65000 << 16) | 100],
            large_communities: vec![(65000, 1, 2)],
            med: Some(50),
            ..Default::default()
        },
    )
}

#[test]
fn open_negotiation_establishes_both_sides() {
    let mut p = Pair::standard();
    p.start();
    assert!(p.a.is_established(), "A: {:?}", p.a.status());
    assert!(p.b.is_established());
    assert_eq!(p.log_a.established(), 1);
    let s = p.a.status();
    assert_eq!(s.state, State::Established);
    assert_eq!(s.peer_router_id, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(s.negotiated_hold_s, Some(9));
    // Our OPEN carries 4-octet AS and MP IPv4 + IPv6 unicast.
    let open = p.log_a.sent_of_type(MSG_OPEN)[0].clone();
    let po = wire::decode_open(&open).unwrap();
    assert!(po.four_octet_as && po.ipv4_unicast && po.ipv6_unicast && po.route_refresh);
    assert_eq!(po.asn, 65000);
}

#[test]
fn four_octet_as_and_lower_hold_time_negotiated() {
    let mut a = cfg(4_200_000_000, "10.0.0.1", 65001, PeerMode::Active);
    a.hold_time = 30;
    let mut b = cfg(65001, "10.0.0.2", 4_200_000_000, PeerMode::Passive);
    b.hold_time = 6;
    let mut p = Pair::new(a, b);
    p.start();
    assert!(p.a.is_established() && p.b.is_established());
    assert_eq!(p.a.status().negotiated_hold_s, Some(6));
    // My AS field carries AS_TRANS.
    let open = p.log_a.sent_of_type(MSG_OPEN)[0].clone();
    assert_eq!(u16::from_be_bytes([open[20], open[21]]), wire::AS_TRANS);
    // Announcements carry the 4-octet AS in AS_PATH.
    p.a.set_routes(p.now, vec![route("203.0.113.0/24")]);
    p.run();
    let upd = p.log_a.sent_of_type(MSG_UPDATE).last().unwrap().to_vec();
    let u = decode_update(
        &upd[19..],
        ReceiveContext {
            four_octet_as: true,
            ibgp: false,
        },
    )
    .unwrap();
    assert_eq!(u.as_path, vec![4_200_000_000, 4_200_000_000]);
}

#[test]
fn announce_with_attributes_and_withdraw() {
    let mut p = Pair::standard();
    p.start();
    p.a.set_routes(
        p.now,
        vec![route("203.0.113.0/24"), route("2001:db8:100::/48")],
    );
    p.run();
    let (ann, _) = p.log_b.received_routes();
    assert!(ann.contains(&"203.0.113.0/24".parse().unwrap()));
    assert!(ann.contains(&"2001:db8:100::/48".parse().unwrap()));
    assert_eq!(p.b.received_prefixes().count(), 2);

    // Check the attributes on the wire.
    let ctx = ReceiveContext {
        four_octet_as: true,
        ibgp: false,
    };
    let updates: Vec<_> = p
        .log_a
        .sent_of_type(MSG_UPDATE)
        .iter()
        .map(|b| decode_update(&b[19..], ctx).unwrap())
        .collect();
    let v4 = updates
        .iter()
        .find(|u| u.announced.contains(&"203.0.113.0/24".parse().unwrap()))
        .unwrap();
    assert_eq!(v4.as_path, vec![65000, 65000]);
    assert_eq!(v4.next_hop, Some(A_IP.parse().unwrap()));
    assert_eq!(v4.med, Some(50));
    assert_eq!(v4.communities, vec![(65000 << 16) | 100]);
    assert_eq!(v4.large_communities, vec![(65000, 1, 2)]);
    assert_eq!(v4.local_pref, None, "no LOCAL_PREF towards eBGP");
    let v6 = updates
        .iter()
        .find(|u| u.announced.contains(&"2001:db8:100::/48".parse().unwrap()))
        .unwrap();
    assert_eq!(v6.next_hop, Some("2001:db8::1".parse().unwrap()));

    p.a.withdraw(p.now, &["203.0.113.0/24".parse().unwrap()]);
    p.run();
    let (_, wd) = p.log_b.received_routes();
    assert_eq!(wd, vec!["203.0.113.0/24".parse::<IpNet>().unwrap()]);
    assert_eq!(p.b.received_prefixes().count(), 1);
    assert_eq!(p.a.status().announced.len(), 1);
}

#[test]
fn ibgp_sends_local_pref_and_empty_as_path() {
    let mut p = Pair::new(
        cfg(65000, "10.0.0.1", 65000, PeerMode::Active),
        cfg(65000, "10.0.0.2", 65000, PeerMode::Passive),
    );
    p.start();
    let mut r = route("203.0.113.0/24");
    r.attributes.local_pref = Some(250);
    p.a.set_routes(p.now, vec![r]);
    p.run();
    let upd = p.log_a.sent_of_type(MSG_UPDATE).last().unwrap().to_vec();
    let u = decode_update(
        &upd[19..],
        ReceiveContext {
            four_octet_as: true,
            ibgp: true,
        },
    )
    .unwrap();
    assert_eq!(u.local_pref, Some(250));
    assert!(u.as_path.is_empty());
    assert_eq!(u.announced.len(), 1);
}

#[test]
fn ibgp_same_router_id_is_refused() {
    let mut p = Pair::new(
        cfg(65000, "10.0.0.1", 65000, PeerMode::Active),
        cfg(65000, "10.0.0.1", 65000, PeerMode::Passive),
    );
    p.start();
    assert!(!p.a.is_established());
    assert!(p.log_b.notifications().contains(&(2, 3)));
}

#[test]
fn keepalives_every_third_of_hold_time_keep_the_session_up() {
    let mut p = Pair::standard();
    p.start();
    let before = p.log_a.sent_of_type(MSG_KEEPALIVE).len();
    p.advance(Duration::from_secs(30));
    let after = p.log_a.sent_of_type(MSG_KEEPALIVE).len();
    // 30 s at one keepalive per 3 s.
    assert!(after - before >= 9, "{before} -> {after}");
    assert!(p.a.is_established() && p.b.is_established());
    assert!(p.log_a.downs().is_empty());
}

#[test]
fn hold_timer_expiry_sends_notification_then_reconnects_and_reannounces() {
    let mut p = Pair::standard();
    p.start();
    p.a.set_routes(p.now, vec![route("203.0.113.0/24")]);
    p.run();
    // The link silently drops everything.
    for l in &mut p.links {
        l.blackhole = true;
    }
    p.advance(Duration::from_secs(10));
    assert!(
        p.log_a.notifications().contains(&(4, 0)),
        "{:?}",
        p.log_a.notifications()
    );
    assert!(p
        .log_a
        .downs()
        .iter()
        .any(|r| r.contains("hold timer expired")));
    assert!(!p.a.is_established());
    // After connect-retry, A reconnects and announces everything again.
    let updates_before = p.log_a.sent_of_type(MSG_UPDATE).len();
    p.advance(Duration::from_secs(10));
    assert!(p.a.is_established(), "{:?}", p.a.status());
    assert_eq!(p.log_a.established(), 2);
    assert!(p.log_a.sent_of_type(MSG_UPDATE).len() > updates_before);
    assert_eq!(p.b.received_prefixes().count(), 1);
}

#[test]
fn bad_peer_as_gets_open_error_notification() {
    let mut p = Pair::new(
        cfg(65000, "10.0.0.1", 65001, PeerMode::Active),
        cfg(65001, "10.0.0.2", 65999, PeerMode::Passive),
    );
    p.start();
    assert!(!p.a.is_established());
    assert_eq!(p.log_b.notifications(), vec![(2, 2)]);
    assert!(
        p.log_a.downs().iter().any(|r| r.contains("bad peer AS")),
        "{:?}",
        p.log_a.downs()
    );
    assert!(p.a.status().last_error.unwrap().contains("bad peer AS"));
    // A keeps retrying every connect-retry interval.
    let opens = p.log_a.sent_of_type(MSG_OPEN).len();
    p.advance(Duration::from_secs(11));
    assert!(p.log_a.sent_of_type(MSG_OPEN).len() >= opens + 2);
}

#[test]
fn malformed_header_gets_notification_and_restart_after_connect_retry() {
    let mut p = Pair::standard();
    p.start();
    let mut bad = wire::encode_keepalive();
    bad[3] = 0; // broken marker
    p.inject_to_a(&bad);
    assert!(p.log_a.notifications().contains(&(1, 1)));
    assert!(!p.a.is_established());
    p.advance(Duration::from_secs(6));
    assert!(p.a.is_established());
    assert_eq!(p.log_a.established(), 2);
}

#[test]
fn bad_length_and_bad_type_notifications() {
    let mut p = Pair::standard();
    p.start();
    let mut bad = wire::encode_keepalive();
    bad[17] = 20; // KEEPALIVE must be exactly 19 octets
    p.inject_to_a(&bad);
    assert!(p.log_a.notifications().contains(&(1, 2)));

    let mut p = Pair::standard();
    p.start();
    p.inject_to_a(&frame(9, &[]));
    assert!(p.log_a.notifications().contains(&(1, 3)));
}

fn raw_update(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(attrs);
    body.extend_from_slice(nlri);
    frame(MSG_UPDATE, &body)
}

const GOOD_ATTRS: &[u8] = &[
    0x40, 1, 1, 0, // ORIGIN IGP
    0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9, // AS_PATH SEQ [65001]
    0x40, 3, 4, 192, 0, 2, 2, // NEXT_HOP
];

#[test]
fn attribute_error_is_treat_as_withdraw_and_session_stays_up() {
    let mut p = Pair::standard();
    p.start();
    p.inject_to_a(&raw_update(GOOD_ATTRS, &[24, 198, 51, 100]));
    assert_eq!(p.a.received_prefixes().count(), 1);
    // Same prefix, ORIGIN value 7: malformed -> treat-as-withdraw.
    let mut attrs = GOOD_ATTRS.to_vec();
    attrs[3] = 7;
    p.inject_to_a(&raw_update(&attrs, &[24, 198, 51, 100]));
    assert!(p.a.is_established());
    assert_eq!(p.a.received_prefixes().count(), 0);
    assert_eq!(p.a.status().stats.updates_treated_as_withdraw, 1);
    assert!(p.log_a.notifications().is_empty());
}

#[test]
fn structural_update_error_resets_the_session() {
    let mut p = Pair::standard();
    p.start();
    // Total path attribute length larger than the message.
    let mut body = vec![0, 0, 0, 200];
    body.extend_from_slice(GOOD_ATTRS);
    p.inject_to_a(&frame(MSG_UPDATE, &body));
    assert_eq!(p.log_a.notifications(), vec![(3, 1)]);
    assert!(!p.a.is_established());
}

#[test]
fn cease_on_shutdown() {
    let mut p = Pair::standard();
    p.start();
    let now = p.now;
    p.a.stop(now);
    p.run();
    assert_eq!(p.log_a.notifications(), vec![(6, 2)]);
    assert!(!p.a.is_established() && !p.b.is_established());
    assert!(p
        .log_b
        .downs()
        .iter()
        .any(|r| r.contains("administrative shutdown")));
    assert_eq!(p.a.state(), State::Idle);
    // Stopped sessions do not come back by themselves.
    p.advance(Duration::from_secs(30));
    assert_eq!(p.log_a.established(), 1);
}

#[test]
fn unexpected_message_in_open_sent_is_fsm_error() {
    let mut p = Pair::standard();
    p.reachable = true;
    let now = p.now;
    p.a.start(now);
    // Deliver the Connect by hand, swallowing the OPEN from B.
    assert_eq!(p.a.poll(), Some(Action::Connect));
    p.a.tcp_connected(now, ConnId::Outbound, A_IP.parse().unwrap());
    while p.a.poll().is_some() {}
    p.a.received(now, ConnId::Outbound, &wire::encode_keepalive());
    let mut sent = Vec::new();
    while let Some(a) = p.a.poll() {
        if let Action::Send { bytes, .. } = a {
            sent.push((bytes[19], bytes[20]));
        }
    }
    assert_eq!(sent, vec![(5, 1)]);
}

#[test]
fn unreachable_peer_is_retried_every_connect_retry() {
    let mut p = Pair::standard();
    p.reachable = false;
    p.start();
    assert_eq!(p.a.state(), State::Active);
    p.reachable = true;
    p.advance(Duration::from_secs(6));
    assert!(p.a.is_established());
}

#[test]
fn collision_keeps_connection_of_higher_router_id() {
    for (rid_a, rid_b, survivor_a) in [
        ("10.0.0.9", "10.0.0.2", ConnId::Outbound),
        ("10.0.0.1", "10.0.0.2", ConnId::Inbound),
    ] {
        let mut p = Pair::new(
            cfg(65000, rid_a, 65001, PeerMode::Both),
            cfg(65001, rid_b, 65000, PeerMode::Both),
        );
        p.start();
        assert!(p.a.is_established() && p.b.is_established());
        assert_eq!(p.links.len(), 1, "exactly one connection survives");
        assert_eq!(p.links[0].a, survivor_a);
        assert!(
            p.log_a.notifications().contains(&(6, 7)) || p.log_b.notifications().contains(&(6, 7))
        );
        // Routes flow over the survivor.
        p.a.set_routes(p.now, vec![route("203.0.113.0/24")]);
        p.run();
        assert_eq!(p.b.received_prefixes().count(), 1);
    }
}

#[test]
fn route_refresh_resends_everything() {
    let mut p = Pair::standard();
    p.start();
    p.a.set_routes(p.now, vec![route("203.0.113.0/24")]);
    p.run();
    let n = p.log_a.sent_of_type(MSG_UPDATE).len();
    // ROUTE-REFRESH for IPv4 unicast.
    p.inject_to_a(&frame(wire::MSG_ROUTE_REFRESH, &[0, 1, 0, 1]));
    assert_eq!(p.log_a.sent_of_type(MSG_UPDATE).len(), n + 1);
    assert!(p.a.is_established());
}

#[test]
fn v6_route_without_next_hop_over_v4_session_is_reported() {
    let mut a = cfg(65000, "10.0.0.1", 65001, PeerMode::Active);
    a.next_hop_v6 = None;
    let mut p = Pair::new(a, cfg(65001, "10.0.0.2", 65000, PeerMode::Passive));
    p.start();
    p.a.set_routes(
        p.now,
        vec![route("2001:db8:100::/48"), route("203.0.113.0/24")],
    );
    p.run();
    let s = p.a.status();
    assert_eq!(
        s.not_announceable,
        vec!["2001:db8:100::/48".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        s.announced,
        vec!["203.0.113.0/24".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn bytes_arriving_in_pieces_are_reassembled() {
    let mut p = Pair::standard();
    p.start();
    let msg = raw_update(GOOD_ATTRS, &[24, 198, 51, 100]);
    for b in msg.chunks(3) {
        p.inject_to_a(b);
    }
    assert_eq!(p.a.received_prefixes().count(), 1);
    assert!(p.a.is_established());
}
