//! The body of the `bgp_decode` fuzz target (netops/fuzz), kept here so
//! the seed corpus also runs as an ordinary test.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::session::{Action, ConnId, PeerMode, Session, SessionConfig};
use super::update::{decode_update, ReceiveContext};
use super::wire::{self, OpenParams};

/// Feeds `data` to every decoder that sees peer bytes. The first byte picks
/// options; the rest is the input.
pub fn bgp_decode(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // 1. Framing and the per-message decoders.
    let mut buf = rest;
    while let Ok(Some((framed, used))) = wire::split_message(buf) {
        match framed.msg_type {
            wire::MSG_OPEN => {
                let _ = wire::decode_open(framed.bytes);
            }
            wire::MSG_UPDATE => {
                let _ = decode_update(
                    framed.body(),
                    ReceiveContext {
                        four_octet_as: sel & 1 != 0,
                        ibgp: sel & 2 != 0,
                    },
                );
            }
            wire::MSG_NOTIFICATION => {
                let _ = wire::Notification::decode_body(framed.body()).map(|n| n.describe());
            }
            _ => {}
        }
        buf = &buf[used..];
    }
    // 2. The bare UPDATE body decoder.
    let _ = decode_update(
        rest,
        ReceiveContext {
            four_octet_as: sel & 1 != 0,
            ibgp: sel & 2 != 0,
        },
    );
    // 3. An Established session receiving the bytes (in two pieces).
    let mut s = established_session(sel & 2 != 0);
    let now = Instant::now();
    let cut = (sel as usize >> 2).min(rest.len());
    s.received(now, ConnId::Outbound, &rest[..cut]);
    s.received(now, ConnId::Outbound, &rest[cut..]);
    s.handle_timeout(now + Duration::from_secs(1));
    while s.poll().is_some() {}
}

fn established_session(ibgp: bool) -> Session {
    let remote_as = if ibgp { 65000 } else { 65001 };
    let mut s = Session::new(SessionConfig {
        local_as: 65000,
        router_id: "10.0.0.1".parse().unwrap(),
        remote_as,
        hold_time: 90,
        connect_retry: Duration::from_secs(5),
        mode: PeerMode::Active,
        next_hop_v4: None,
        next_hop_v6: None,
    });
    let now = Instant::now();
    s.start(now);
    s.tcp_connected(now, ConnId::Outbound, IpAddr::from([192, 0, 2, 1]));
    let open = wire::encode_open(&OpenParams {
        local_as: remote_as,
        hold_time: 90,
        router_id: "10.0.0.2".parse().unwrap(),
    });
    s.received(now, ConnId::Outbound, &open);
    s.received(now, ConnId::Outbound, &wire::encode_keepalive());
    while let Some(a) = s.poll() {
        let _ = matches!(a, Action::Established { .. });
    }
    debug_assert!(s.is_established());
    s
}

/// Seed inputs for the corpus (also used by the tests).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    v.push([vec![1u8], wire::encode_keepalive()].concat());
    v.push(
        [
            vec![1u8],
            wire::encode_open(&OpenParams {
                local_as: 65001,
                hold_time: 90,
                router_id: "10.0.0.2".parse().unwrap(),
            }),
        ]
        .concat(),
    );
    let attrs = super::route::RouteAttributes {
        prepend: 2,
        communities: vec![1, 2],
        large_communities: vec![(1, 2, 3)],
        med: Some(5),
        local_pref: Some(7),
        next_hop: None,
    };
    let ctx = wire::UpdateContext {
        local_as: 65001,
        ibgp: false,
        four_octet_as: true,
    };
    for (nh, p) in [
        ("192.0.2.1", "203.0.113.0/24"),
        ("2001:db8::1", "2001:db8:1::/48"),
    ] {
        for m in wire::encode_announce(&ctx, &attrs, nh.parse().unwrap(), &[p.parse().unwrap()]) {
            v.push([vec![1u8], m].concat());
        }
        for m in wire::encode_withdraw(&[p.parse().unwrap()]) {
            v.push([vec![1u8], m].concat());
        }
    }
    v.push([vec![0u8], wire::Notification::new(6, 2, vec![]).encode()].concat());
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_and_their_truncations_do_not_panic() {
        for s in super::seeds() {
            for n in 0..=s.len() {
                super::bgp_decode(&s[..n]);
            }
            // Flip every byte once.
            for i in 1..s.len() {
                let mut m = s.clone();
                m[i] ^= 0xff;
                super::bgp_decode(&m);
            }
        }
    }
}
