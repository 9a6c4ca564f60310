//! Failover messages cross the network: they round-trip exactly, and any
//! byte string decodes to a message or a typed error, never a panic.

use std::time::Duration;

use failover::wire::{decode, encode, WireError, MAX_MESSAGE_LEN};
use failover::{Message, SiteId, Stance};
use proptest::prelude::*;

fn stance() -> impl Strategy<Value = Stance> {
    prop_oneof![
        Just(Stance::Active),
        Just(Stance::Standby),
        Just(Stance::Candidate),
        Just(Stance::Idle)
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), stance())
            .prop_map(|(seq, token, stance)| Message::Heartbeat { seq, token, stance }),
        (any::<u64>(), any::<u64>(), stance())
            .prop_map(|(seq, token, stance)| Message::HeartbeatAck { seq, token, stance }),
        (any::<u64>(), any::<u64>()).prop_map(|(req, token)| Message::LeaseRequest { req, token }),
        (
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(req, g, token, h)| Message::LeaseReply {
                req,
                granted: g.map(Duration::from_micros),
                token,
                holder: h.map(SiteId),
            }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(req, token, to)| Message::Handover {
            req,
            token,
            to: SiteId(to)
        }),
    ]
}

proptest! {
    #[test]
    fn round_trip(vm in "[a-z][a-z0-9-]{0,62}", msg in message()) {
        let bytes = encode(&vm, &msg).expect("encodable");
        prop_assert!(bytes.len() <= MAX_MESSAGE_LEN);
        prop_assert_eq!(decode(&bytes), Ok((vm, msg)));
    }

    #[test]
    fn truncation_is_an_error(msg in message(), cut in 0usize..80) {
        let bytes = encode("web1", &msg).expect("encodable");
        let cut = cut.min(bytes.len().saturating_sub(1));
        prop_assert!(decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn flipped_bytes_never_panic(msg in message(), at in 0usize..80, x in 1u8..=255) {
        let mut bytes = encode("web1", &msg).expect("encodable");
        let at = at % bytes.len();
        bytes[at] ^= x;
        let _ = decode(&bytes);
    }
}

#[test]
fn specific_errors() {
    let ok = encode("web1", &Message::LeaseRequest { req: 1, token: 2 }).expect("ok");
    let mut v = ok.clone();
    v[0] = 9;
    assert_eq!(decode(&v), Err(WireError::UnsupportedVersion { found: 9 }));
    let mut k = ok.clone();
    k[1] = 77;
    assert_eq!(decode(&k), Err(WireError::UnknownKind(77)));
    let mut t = ok.clone();
    t.push(0);
    assert_eq!(decode(&t), Err(WireError::Trailing(1)));
    assert!(matches!(decode(&ok[..5]), Err(WireError::Truncated { .. })));
    assert_eq!(
        encode("", &Message::LeaseRequest { req: 1, token: 2 }),
        Err(WireError::BadVmName)
    );
}
