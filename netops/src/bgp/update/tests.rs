//! RFC 7606 cases, one per rule, plus property tests.

use proptest::prelude::*;

use super::*;
use crate::bgp::route::RouteAttributes;
use crate::bgp::wire::{encode_announce, encode_withdraw, UpdateContext};

const EBGP: ReceiveContext = ReceiveContext {
    four_octet_as: true,
    ibgp: false,
};
const IBGP: ReceiveContext = ReceiveContext {
    four_octet_as: true,
    ibgp: true,
};

fn origin(v: u8) -> Vec<u8> {
    vec![0x40, 1, 1, v]
}
fn as_path4(asns: &[u32]) -> Vec<u8> {
    let mut v = vec![0x40, 2, (2 + 4 * asns.len()) as u8, 2, asns.len() as u8];
    for a in asns {
        v.extend_from_slice(&a.to_be_bytes());
    }
    v
}
fn next_hop() -> Vec<u8> {
    vec![0x40, 3, 4, 192, 0, 2, 1]
}
fn base() -> Vec<u8> {
    [origin(0), as_path4(&[65001]), next_hop()].concat()
}
const NLRI: &[u8] = &[24, 198, 51, 100];

fn body(withdrawn: &[u8], attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut b = (withdrawn.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(withdrawn);
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(nlri);
    b
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn taw(attrs: &[u8]) -> ReceivedUpdate {
    let u = decode_update(&body(&[], attrs, NLRI), EBGP).unwrap();
    assert!(
        u.treat_as_withdraw.is_some(),
        "expected treat-as-withdraw: {u:?}"
    );
    assert!(u.announced.is_empty());
    assert_eq!(u.withdrawn, vec![net("198.51.100.0/24")]);
    u
}

#[test]
fn well_formed_update_is_accepted() {
    let u = decode_update(&body(&[16, 10, 1], &base(), NLRI), EBGP).unwrap();
    assert_eq!(u.announced, vec![net("198.51.100.0/24")]);
    assert_eq!(u.withdrawn, vec![net("10.1.0.0/16")]);
    assert_eq!(u.as_path, vec![65001]);
    assert!(u.treat_as_withdraw.is_none() && u.discarded.is_empty());
}

#[test]
fn inconsistent_lengths_are_session_reset() {
    // Withdrawn length beyond the message.
    let mut b = body(&[], &base(), NLRI);
    b[1] = 200;
    assert_eq!(decode_update(&b, EBGP).unwrap_err().subcode, 1);
    // Total attribute length beyond the message.
    let mut b = body(&[], &base(), NLRI);
    b[3] = 250;
    assert_eq!(decode_update(&b, EBGP).unwrap_err().subcode, 1);
    // Too short to hold the two length fields.
    assert!(decode_update(&[0, 0, 0], EBGP).is_err());
}

#[test]
fn malformed_nlri_field_is_session_reset() {
    let e = decode_update(&body(&[], &base(), &[33, 1, 2, 3, 4, 5]), EBGP).unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 10));
    let e = decode_update(&body(&[], &base(), &[24, 1]), EBGP).unwrap_err();
    assert_eq!(e.subcode, 10);
    let e = decode_update(&body(&[24, 1], &[], &[]), EBGP).unwrap_err();
    assert_eq!(e.subcode, 10);
}

#[test]
fn bad_origin_as_path_next_hop_med_are_treat_as_withdraw() {
    taw(&[origin(3), as_path4(&[1]), next_hop()].concat());
    taw(&[vec![0x40, 1, 2, 0, 0], as_path4(&[1]), next_hop()].concat());
    // AS_PATH with a zero-length segment.
    taw(&[origin(0), vec![0x40, 2, 2, 2, 0], next_hop()].concat());
    // AS_PATH segment overrunning the attribute.
    taw(&[origin(0), vec![0x40, 2, 3, 2, 5, 0], next_hop()].concat());
    // Unknown segment type.
    taw(&[origin(0), vec![0x40, 2, 6, 9, 1, 0, 0, 0, 1], next_hop()].concat());
    taw(&[origin(0), as_path4(&[1]), vec![0x40, 3, 3, 1, 2, 3]].concat());
    taw(&[base(), vec![0x80, 4, 3, 0, 0, 1]].concat());
}

#[test]
fn communities_and_large_communities_bad_length_are_treat_as_withdraw() {
    taw(&[base(), vec![0xc0, 8, 3, 0, 0, 1]].concat());
    taw(&[base(), vec![0xc0, 32, 8, 0, 0, 0, 1, 0, 0, 0, 2]].concat());
    let ok = decode_update(
        &body(
            &[],
            &[base(), vec![0xc0, 8, 4, 0xfd, 0xe8, 0, 100]].concat(),
            NLRI,
        ),
        EBGP,
    )
    .unwrap();
    assert_eq!(ok.communities, vec![(65000 << 16) | 100]);
}

#[test]
fn missing_mandatory_attributes_are_treat_as_withdraw() {
    taw(&[as_path4(&[1]), next_hop()].concat());
    taw(&[origin(0), next_hop()].concat());
    taw(&[origin(0), as_path4(&[1])].concat());
    // A pure withdrawal needs no attributes at all.
    let u = decode_update(&body(&[24, 198, 51, 100], &[], &[]), EBGP).unwrap();
    assert_eq!(u.withdrawn, vec![net("198.51.100.0/24")]);
}

#[test]
fn wrong_flags_are_treat_as_withdraw_or_discard() {
    // ORIGIN marked optional.
    taw(&[vec![0xc0, 1, 1, 0], as_path4(&[1]), next_hop()].concat());
    // ATOMIC_AGGREGATE marked optional: discarded, route kept.
    let u = decode_update(&body(&[], &[base(), vec![0xc0, 6, 0]].concat(), NLRI), EBGP).unwrap();
    assert_eq!(u.announced.len(), 1);
    assert_eq!(u.discarded.len(), 1);
}

#[test]
fn attribute_discard_cases_keep_the_route() {
    for extra in [
        vec![0x40, 6, 1, 0],            // ATOMIC_AGGREGATE with a value
        vec![0xc0, 7, 3, 1, 2, 3],      // AGGREGATOR wrong length
        vec![0xc0, 17, 3, 2, 1, 0],     // AS4_PATH malformed
        vec![0xc0, 18, 2, 0, 0],        // AS4_AGGREGATOR wrong length
        vec![0x40, 5, 4, 0, 0, 0, 100], // LOCAL_PREF from an eBGP peer
    ] {
        let u = decode_update(&body(&[], &[base(), extra.clone()].concat(), NLRI), EBGP).unwrap();
        assert_eq!(u.announced.len(), 1, "{extra:?}: {u:?}");
        assert_eq!(u.discarded.len(), 1, "{extra:?}: {u:?}");
        assert!(u.treat_as_withdraw.is_none());
    }
}

#[test]
fn local_pref_from_ibgp_is_used_and_checked() {
    let u = decode_update(
        &body(
            &[],
            &[base(), vec![0x40, 5, 4, 0, 0, 0, 100]].concat(),
            NLRI,
        ),
        IBGP,
    )
    .unwrap();
    assert_eq!(u.local_pref, Some(100));
    let u = decode_update(
        &body(&[], &[base(), vec![0x40, 5, 3, 0, 0, 100]].concat(), NLRI),
        IBGP,
    )
    .unwrap();
    assert!(u.treat_as_withdraw.is_some());
}

#[test]
fn repeated_attribute_is_discarded_but_repeated_mp_reach_resets() {
    let u = decode_update(&body(&[], &[base(), origin(1)].concat(), NLRI), EBGP).unwrap();
    assert_eq!(u.announced.len(), 1);
    assert_eq!(u.discarded, vec!["repeated attribute 1".to_string()]);
    let mp = vec![0x80, 15, 3, 0, 2, 1];
    let e = decode_update(&body(&[], &[mp.clone(), mp].concat(), &[]), EBGP).unwrap_err();
    assert_eq!(e.subcode, 1);
}

#[test]
fn attribute_overrunning_the_section_is_treat_as_withdraw() {
    let mut attrs = base();
    attrs.extend_from_slice(&[0xc0, 8, 40, 0, 0]); // claims 40 octets, has 2
    taw(&attrs);
    let mut attrs = base();
    attrs.extend_from_slice(&[0xc0]); // a lone flags octet
    taw(&attrs);
}

#[test]
fn unrecognized_well_known_attribute_resets() {
    let e = decode_update(
        &body(&[], &[base(), vec![0x40, 99, 1, 0]].concat(), NLRI),
        EBGP,
    )
    .unwrap_err();
    assert_eq!((e.code, e.subcode), (3, 2));
    // Unknown optional attributes are ignored.
    let u = decode_update(
        &body(&[], &[base(), vec![0xc0, 99, 1, 0]].concat(), NLRI),
        EBGP,
    )
    .unwrap();
    assert_eq!(u.announced.len(), 1);
}

#[test]
fn mp_reach_ipv6_and_its_errors() {
    let mut mp = vec![0x90, 14, 0, 0, 0, 2, 1, 16];
    mp.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    mp.push(0);
    mp.extend_from_slice(&[48, 0x20, 0x01, 0x0d, 0xb8, 0x01, 0x00]);
    let len = (mp.len() - 4) as u16;
    mp[2..4].copy_from_slice(&len.to_be_bytes());
    let attrs = [origin(0), as_path4(&[1]), mp.clone()].concat();
    let u = decode_update(&body(&[], &attrs, &[]), EBGP).unwrap();
    assert_eq!(u.announced, vec![net("2001:db8:100::/48")]);
    assert_eq!(u.next_hop, Some("2001:db8::1".parse().unwrap()));
    // Next hop length inconsistent: session reset.
    let mut bad = mp.clone();
    bad[7] = 15;
    let attrs = [origin(0), as_path4(&[1]), bad].concat();
    assert_eq!(
        decode_update(&body(&[], &attrs, &[]), EBGP)
            .unwrap_err()
            .subcode,
        9
    );
    // Broken NLRI inside MP_REACH: session reset.
    let mut bad = mp.clone();
    let n = bad.len();
    bad[n - 7] = 129;
    let attrs = [origin(0), as_path4(&[1]), bad].concat();
    assert!(decode_update(&body(&[], &attrs, &[]), EBGP).is_err());
    // MP_REACH with wrong flags: session reset (its NLRI cannot be trusted).
    let mut bad = mp;
    bad[0] = 0xd0;
    let attrs = [origin(0), as_path4(&[1]), bad].concat();
    assert_eq!(
        decode_update(&body(&[], &attrs, &[]), EBGP)
            .unwrap_err()
            .subcode,
        4
    );
}

#[test]
fn two_octet_as_path_when_not_negotiated() {
    let ctx = ReceiveContext {
        four_octet_as: false,
        ibgp: false,
    };
    let attrs = [origin(0), vec![0x40, 2, 4, 2, 1, 0xfd, 0xe9], next_hop()].concat();
    let u = decode_update(&body(&[], &attrs, NLRI), ctx).unwrap();
    assert_eq!(u.as_path, vec![65001]);
}

fn arb_attrs() -> impl Strategy<Value = RouteAttributes> {
    (
        0u8..5,
        proptest::collection::vec(any::<u32>(), 0..5),
        proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u32>()), 0..4),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(prepend, communities, large_communities, med, local_pref)| RouteAttributes {
                next_hop: None,
                prepend,
                communities,
                large_communities,
                med,
                local_pref,
            },
        )
}

fn arb_prefix() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc())),
        (any::<u128>(), 0u8..=128)
            .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc())),
    ]
}

proptest! {
    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), ibgp in any::<bool>(), four in any::<bool>()) {
        let _ = decode_update(&bytes, ReceiveContext { four_octet_as: four, ibgp });
    }

    #[test]
    fn what_we_encode_decodes_to_the_same_routes(
        attrs in arb_attrs(),
        prefixes in proptest::collection::btree_set(arb_prefix(), 1..150),
        ibgp in any::<bool>(),
        four in any::<bool>(),
    ) {
        let prefixes: Vec<IpNet> = prefixes.into_iter().collect();
        let ctx = UpdateContext { local_as: 65000, ibgp, four_octet_as: four };
        let rctx = ReceiveContext { four_octet_as: four, ibgp };
        let mut got4 = Vec::new();
        let mut got6 = Vec::new();
        for (nh, got) in [("192.0.2.1", &mut got4), ("2001:db8::1", &mut got6)] {
            for m in encode_announce(&ctx, &attrs, nh.parse().unwrap(), &prefixes) {
                prop_assert!(m.len() <= crate::bgp::wire::MAX_MESSAGE_LEN);
                let (framed, used) = crate::bgp::wire::split_message(&m).unwrap().unwrap();
                prop_assert_eq!(used, m.len());
                let u = decode_update(framed.body(), rctx).unwrap();
                prop_assert!(u.treat_as_withdraw.is_none(), "{:?}", u);
                prop_assert!(u.discarded.is_empty(), "{:?}", u);
                prop_assert_eq!(&u.communities, &attrs.communities);
                prop_assert_eq!(&u.large_communities, &attrs.large_communities);
                prop_assert_eq!(u.med, attrs.med);
                if ibgp {
                    prop_assert_eq!(u.local_pref, Some(attrs.local_pref.unwrap_or(100)));
                    prop_assert!(u.as_path.is_empty());
                } else {
                    prop_assert_eq!(u.as_path.len(), 1 + attrs.prepend as usize);
                }
                got.extend(u.announced);
            }
        }
        let unicast = |p: &&IpNet| crate::bgp::wire::is_unicast_prefix(p);
        let want4: Vec<IpNet> = prefixes.iter().filter(unicast).filter(|p| p.addr().is_ipv4()).copied().collect();
        let want6: Vec<IpNet> = prefixes.iter().filter(unicast).filter(|p| p.addr().is_ipv6()).copied().collect();
        got4.sort();
        got6.sort();
        prop_assert_eq!(got4, want4);
        prop_assert_eq!(got6, want6);

        let mut withdrawn = Vec::new();
        for m in encode_withdraw(&prefixes) {
            prop_assert!(m.len() <= crate::bgp::wire::MAX_MESSAGE_LEN);
            let u = decode_update(&m[19..], rctx).unwrap();
            withdrawn.extend(u.withdrawn);
        }
        withdrawn.sort();
        let mut all: Vec<IpNet> = prefixes.iter().filter(unicast).copied().collect();
        all.sort();
        prop_assert_eq!(withdrawn, all);
    }
}
