//! BGP-4 messages on the wire.
//!
//! Outgoing messages (OPEN, UPDATE, KEEPALIVE, NOTIFICATION) are built with
//! `netgauze-bgp-pkt` types and serialised by that crate. Incoming bytes go
//! through our own framing (`split_message`) so that every header error maps
//! to the exact RFC 4271 NOTIFICATION; OPEN bodies are decoded by
//! `netgauze-bgp-pkt`; UPDATE bodies are walked by [`super::update`], which
//! applies RFC 7606 error handling attribute by attribute (a library parse
//! error is all-or-nothing, RFC 7606 is not).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::community::{Community, LargeCommunity};
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::notification::{
    BgpNotificationMessage, CeaseError, FiniteStateMachineError, HoldTimerExpiredError,
    MessageHeaderError, OpenMessageError, UpdateMessageError,
};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As2PathSegment, As4Path, As4PathSegment, AsPath, AsPathSegmentType, Communities,
    LargeCommunities, LocalPreference, MpReach, MpUnreach, MultiExitDiscriminator, NextHop, Origin,
    PathAttribute, PathAttributeValue,
};
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use netgauze_parse_utils::WritablePdu;

use crate::bgp::route::RouteAttributes;

/// Length of the fixed BGP header (marker, length, type).
pub const HEADER_LEN: usize = 19;
/// Largest message without the RFC 8654 extended-message capability (which
/// we do not advertise).
pub const MAX_MESSAGE_LEN: usize = 4096;
/// The AS number put in the 2-octet "My AS" field when ours needs 4 octets.
pub const AS_TRANS: u16 = 23456;

pub const MSG_OPEN: u8 = 1;
pub const MSG_UPDATE: u8 = 2;
pub const MSG_NOTIFICATION: u8 = 3;
pub const MSG_KEEPALIVE: u8 = 4;
pub const MSG_ROUTE_REFRESH: u8 = 5;

/// NOTIFICATION error codes (RFC 4271 section 4.5).
pub mod code {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
}

/// A NOTIFICATION as plain numbers: what we send and what we received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Self {
        Self {
            code,
            subcode,
            data: data.into(),
        }
    }

    /// Human-readable name of the code/subcode, for logs and status.
    pub fn describe(&self) -> String {
        let what = match (self.code, self.subcode) {
            (1, 1) => "message header error: connection not synchronized",
            (1, 2) => "message header error: bad message length",
            (1, 3) => "message header error: bad message type",
            (1, _) => "message header error",
            (2, 1) => "OPEN error: unsupported version number",
            (2, 2) => "OPEN error: bad peer AS",
            (2, 3) => "OPEN error: bad BGP identifier",
            (2, 4) => "OPEN error: unsupported optional parameter",
            (2, 6) => "OPEN error: unacceptable hold time",
            (2, 7) => "OPEN error: unsupported capability",
            (2, _) => "OPEN error",
            (3, 1) => "UPDATE error: malformed attribute list",
            (3, 2) => "UPDATE error: unrecognized well-known attribute",
            (3, 3) => "UPDATE error: missing well-known attribute",
            (3, 4) => "UPDATE error: attribute flags error",
            (3, 5) => "UPDATE error: attribute length error",
            (3, 6) => "UPDATE error: invalid ORIGIN attribute",
            (3, 8) => "UPDATE error: invalid NEXT_HOP attribute",
            (3, 9) => "UPDATE error: optional attribute error",
            (3, 10) => "UPDATE error: invalid network field",
            (3, 11) => "UPDATE error: malformed AS_PATH",
            (3, _) => "UPDATE error",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 1) => "cease: maximum number of prefixes reached",
            (6, 2) => "cease: administrative shutdown",
            (6, 3) => "cease: peer de-configured",
            (6, 4) => "cease: administrative reset",
            (6, 5) => "cease: connection rejected",
            (6, 6) => "cease: other configuration change",
            (6, 7) => "cease: connection collision resolution",
            (6, 8) => "cease: out of resources",
            (6, _) => "cease",
            _ => "unknown error code",
        };
        format!("{what} ({}/{})", self.code, self.subcode)
    }

    fn to_netgauze(&self) -> Option<BgpNotificationMessage> {
        let v: Box<[u8]> = self.data.clone().into();
        use BgpNotificationMessage as N;
        Some(match (self.code, self.subcode) {
            (1, 0) => N::MessageHeaderError(MessageHeaderError::Unspecific { value: v }),
            (1, 1) => {
                N::MessageHeaderError(MessageHeaderError::ConnectionNotSynchronized { value: v })
            }
            (1, 2) => N::MessageHeaderError(MessageHeaderError::BadMessageLength { value: v }),
            (1, 3) => N::MessageHeaderError(MessageHeaderError::BadMessageType { value: v }),
            (2, 0) => N::OpenMessageError(OpenMessageError::Unspecific { value: v }),
            (2, 1) => N::OpenMessageError(OpenMessageError::UnsupportedVersionNumber { value: v }),
            (2, 2) => N::OpenMessageError(OpenMessageError::BadPeerAs { value: v }),
            (2, 3) => N::OpenMessageError(OpenMessageError::BadBgpIdentifier { value: v }),
            (2, 4) => {
                N::OpenMessageError(OpenMessageError::UnsupportedOptionalParameter { value: v })
            }
            (2, 6) => N::OpenMessageError(OpenMessageError::UnacceptableHoldTime { value: v }),
            (2, 7) => N::OpenMessageError(OpenMessageError::UnsupportedCapability { value: v }),
            (3, 0) => N::UpdateMessageError(UpdateMessageError::Unspecific { value: v }),
            (3, 1) => {
                N::UpdateMessageError(UpdateMessageError::MalformedAttributeList { value: v })
            }
            (3, 2) => N::UpdateMessageError(UpdateMessageError::UnrecognizedWellKnownAttribute {
                value: v,
            }),
            (3, 3) => {
                N::UpdateMessageError(UpdateMessageError::MissingWellKnownAttribute { value: v })
            }
            (3, 4) => N::UpdateMessageError(UpdateMessageError::AttributeFlagsError { value: v }),
            (3, 5) => N::UpdateMessageError(UpdateMessageError::AttributeLengthError { value: v }),
            (3, 6) => {
                N::UpdateMessageError(UpdateMessageError::InvalidOriginAttribute { value: v })
            }
            (3, 8) => {
                N::UpdateMessageError(UpdateMessageError::InvalidNextHopAttribute { value: v })
            }
            (3, 9) => {
                N::UpdateMessageError(UpdateMessageError::OptionalAttributeError { value: v })
            }
            (3, 10) => N::UpdateMessageError(UpdateMessageError::InvalidNetworkField { value: v }),
            (3, 11) => N::UpdateMessageError(UpdateMessageError::MalformedAsPath { value: v }),
            (4, s) => N::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific {
                sub_code: s,
                value: v,
            }),
            (5, 0) => N::FiniteStateMachineError(FiniteStateMachineError::Unspecific { value: v }),
            (5, 1) => N::FiniteStateMachineError(
                FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value: v },
            ),
            (5, 2) => N::FiniteStateMachineError(
                FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value: v },
            ),
            (5, 3) => N::FiniteStateMachineError(
                FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value: v },
            ),
            (6, 1) => N::CeaseError(CeaseError::MaximumNumberOfPrefixesReached { value: v }),
            (6, 2) => N::CeaseError(CeaseError::AdministrativeShutdown { value: v }),
            (6, 3) => N::CeaseError(CeaseError::PeerDeConfigured { value: v }),
            (6, 4) => N::CeaseError(CeaseError::AdministrativeReset { value: v }),
            (6, 5) => N::CeaseError(CeaseError::ConnectionRejected { value: v }),
            (6, 6) => N::CeaseError(CeaseError::OtherConfigurationChange { value: v }),
            (6, 7) => N::CeaseError(CeaseError::ConnectionCollisionResolution { value: v }),
            (6, 8) => N::CeaseError(CeaseError::OutOfResources { value: v }),
            _ => return None,
        })
    }

    /// The NOTIFICATION message bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self.to_netgauze() {
            Some(n) => write_message(&BgpMessage::Notification(n)),
            None => {
                // A code netgauze has no variant for: frame it by hand.
                let mut body = vec![self.code, self.subcode];
                body.extend_from_slice(&self.data);
                frame(MSG_NOTIFICATION, &body)
            }
        }
    }

    /// Decodes a NOTIFICATION body (after the header).
    pub fn decode_body(body: &[u8]) -> Option<Self> {
        if body.len() < 2 {
            return None;
        }
        Some(Self::new(body[0], body[1], &body[2..]))
    }
}

fn write_message(msg: &BgpMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len());
    msg.write(&mut out)
        .expect("netgauze serialises the messages we build");
    out
}

/// Frames a body with the BGP header by hand (used only for bytes netgauze
/// cannot express, e.g. test messages and unknown NOTIFICATION codes).
pub fn frame(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut out = vec![0xff; 16];
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.push(msg_type);
    out.extend_from_slice(body);
    out
}

pub fn encode_keepalive() -> Vec<u8> {
    write_message(&BgpMessage::KeepAlive)
}

/// What we put in our OPEN.
#[derive(Debug, Clone)]
pub struct OpenParams {
    pub local_as: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
}

pub fn encode_open(p: &OpenParams) -> Vec<u8> {
    let my_as = u16::try_from(p.local_as).unwrap_or(AS_TRANS);
    let caps = vec![
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv4Unicast,
        )),
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(
            AddressType::Ipv6Unicast,
        )),
        BgpCapability::RouteRefresh,
        BgpCapability::FourOctetAs(FourOctetAsCapability::new(p.local_as)),
    ];
    let open = BgpOpenMessage::new(
        my_as,
        p.hold_time,
        p.router_id,
        vec![BgpOpenMessageParameter::new_capabilities(caps)],
    );
    write_message(&BgpMessage::Open(open))
}

/// The parts of a peer's OPEN the session acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOpen {
    pub version: u8,
    /// The peer's AS: the 4-octet capability if present, else "My AS".
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub four_octet_as: bool,
    pub ipv4_unicast: bool,
    pub ipv6_unicast: bool,
    pub route_refresh: bool,
}

/// Decodes a whole OPEN message (header included) with netgauze. On error,
/// returns the NOTIFICATION to send.
pub fn decode_open(msg: &[u8]) -> Result<PeerOpen, Notification> {
    // Check the version ourselves first: netgauze reports it as a parse
    // error, RFC 4271 wants "unsupported version" with our version as data.
    if msg.len() > HEADER_LEN && msg[HEADER_LEN] != 4 {
        return Err(Notification::new(code::OPEN, 1, 4u16.to_be_bytes()));
    }
    let mut ctx = BgpParsingContext::default();
    let mut reader = SliceReader::new(msg);
    let parsed = BgpMessage::parse(&mut reader, &mut ctx);
    let open = match parsed {
        Ok(BgpMessage::Open(open)) => open,
        Ok(_) => return Err(Notification::new(code::HEADER, 3, [msg[18]])),
        Err(e) => {
            use netgauze_bgp_pkt::wire::deserializer::open::{
                BgpOpenMessageParsingError as O, BgpParameterParsingError as P,
            };
            use netgauze_bgp_pkt::wire::deserializer::BgpMessageParsingError as E;
            let n = match e {
                E::BgpOpenMessageParsingError(O::UnacceptableHoldTime { .. }) => {
                    Notification::new(code::OPEN, 6, vec![])
                }
                E::BgpOpenMessageParsingError(O::InvalidBgpId { .. }) => {
                    Notification::new(code::OPEN, 3, vec![])
                }
                E::BgpOpenMessageParsingError(O::ParameterError(P::UndefinedParameterType {
                    ..
                })) => Notification::new(code::OPEN, 4, vec![]),
                _ => Notification::new(code::OPEN, 0, vec![]),
            };
            return Err(n);
        }
    };
    let mut out = PeerOpen {
        version: open.version(),
        asn: open.my_as() as u32,
        hold_time: open.hold_time(),
        router_id: open.bgp_id(),
        four_octet_as: false,
        ipv4_unicast: false,
        ipv6_unicast: false,
        route_refresh: false,
    };
    let mut any_mp = false;
    for cap in open.capabilities() {
        match cap {
            BgpCapability::FourOctetAs(c) => {
                out.four_octet_as = true;
                out.asn = c.asn4();
            }
            BgpCapability::MultiProtocolExtensions(mp) => {
                any_mp = true;
                match mp.address_type() {
                    AddressType::Ipv4Unicast => out.ipv4_unicast = true,
                    AddressType::Ipv6Unicast => out.ipv6_unicast = true,
                    _ => {}
                }
            }
            BgpCapability::RouteRefresh | BgpCapability::EnhancedRouteRefresh => {
                out.route_refresh = true
            }
            _ => {}
        }
    }
    if !any_mp {
        // RFC 4760: a speaker without MP capabilities does IPv4 unicast.
        out.ipv4_unicast = true;
    }
    Ok(out)
}

/// One framed message taken off the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed<'a> {
    pub msg_type: u8,
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

impl Framed<'_> {
    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// Takes one message off the front of `buf` if it is complete. `Ok(None)`:
/// more bytes needed. `Err`: a header error (RFC 4271 section 6.1) with the
/// NOTIFICATION to send; the connection cannot be resynchronised after it.
pub fn split_message(buf: &[u8]) -> Result<Option<(Framed<'_>, usize)>, Notification> {
    if buf.len() < HEADER_LEN {
        // A bad marker is reported as soon as we see it.
        if buf.iter().take(16).any(|&b| b != 0xff) {
            return Err(Notification::new(code::HEADER, 1, vec![]));
        }
        return Ok(None);
    }
    if buf[..16].iter().any(|&b| b != 0xff) {
        return Err(Notification::new(code::HEADER, 1, vec![]));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let msg_type = buf[18];
    let bad_len = || Notification::new(code::HEADER, 2, (len as u16).to_be_bytes());
    if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(bad_len());
    }
    let ok = match msg_type {
        MSG_OPEN => len >= 29,
        MSG_UPDATE => len >= 23,
        MSG_NOTIFICATION => len >= 21,
        MSG_KEEPALIVE => len == 19,
        MSG_ROUTE_REFRESH => len == 23,
        _ => return Err(Notification::new(code::HEADER, 3, [msg_type])),
    };
    if !ok {
        return Err(bad_len());
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some((
        Framed {
            msg_type,
            bytes: &buf[..len],
        },
        len,
    )))
}

/// How an UPDATE we send is encoded for one session.
#[derive(Debug, Clone, Copy)]
pub struct UpdateContext {
    pub local_as: u32,
    pub ibgp: bool,
    /// The peer advertised the 4-octet AS capability.
    pub four_octet_as: bool,
}

fn attr(optional: bool, transitive: bool, value: PathAttributeValue) -> PathAttribute {
    let a = PathAttribute::from(optional, transitive, false, false, value.clone())
        .expect("flags chosen per attribute type");
    // Use the extended length octet when the value does not fit in 255.
    if a.len() > 3 + 255 {
        PathAttribute::from(optional, transitive, false, true, value)
            .expect("flags chosen per attribute type")
    } else {
        a
    }
}

fn common_attributes(ctx: &UpdateContext, a: &RouteAttributes) -> Vec<PathAttribute> {
    let mut attrs = vec![attr(false, true, PathAttributeValue::Origin(Origin::IGP))];
    // AS_PATH: empty towards iBGP peers; our AS (1 + prepend times) towards eBGP.
    let count = if ctx.ibgp { 0 } else { 1 + a.prepend as usize };
    let path4 = vec![ctx.local_as; count];
    let mut as4_path = None;
    let as_path = if count == 0 {
        if ctx.four_octet_as {
            AsPath::as4_path_segments(Vec::<As4PathSegment>::new())
        } else {
            AsPath::as2_path_segments(Vec::<As2PathSegment>::new())
        }
    } else if ctx.four_octet_as {
        AsPath::as4_path_segments(vec![As4PathSegment::new(
            AsPathSegmentType::AsSequence,
            path4,
        )])
    } else {
        let two: Vec<u16> = path4
            .iter()
            .map(|&a| u16::try_from(a).unwrap_or(AS_TRANS))
            .collect();
        if ctx.local_as > u16::MAX as u32 {
            as4_path = Some(As4Path::new(vec![As4PathSegment::new(
                AsPathSegmentType::AsSequence,
                path4,
            )]));
        }
        AsPath::as2_path_segments(vec![As2PathSegment::new(
            AsPathSegmentType::AsSequence,
            two,
        )])
    };
    attrs.push(attr(false, true, PathAttributeValue::AsPath(as_path)));
    if let Some(p) = as4_path {
        attrs.push(attr(true, true, PathAttributeValue::As4Path(p)));
    }
    if let Some(med) = a.med {
        attrs.push(attr(
            true,
            false,
            PathAttributeValue::MultiExitDiscriminator(MultiExitDiscriminator::new(med)),
        ));
    }
    if ctx.ibgp {
        attrs.push(attr(
            false,
            true,
            PathAttributeValue::LocalPreference(LocalPreference::new(a.local_pref.unwrap_or(100))),
        ));
    }
    if !a.communities.is_empty() {
        let c: Vec<Community> = a.communities.iter().map(|&c| Community::new(c)).collect();
        attrs.push(attr(
            true,
            true,
            PathAttributeValue::Communities(Communities::new(c)),
        ));
    }
    if !a.large_communities.is_empty() {
        let c: Vec<LargeCommunity> = a
            .large_communities
            .iter()
            .map(|&(g, l1, l2)| LargeCommunity::new(g, l1, l2))
            .collect();
        attrs.push(attr(
            true,
            true,
            PathAttributeValue::LargeCommunities(LargeCommunities::new(c)),
        ));
    }
    attrs
}

/// Prefixes per UPDATE: keeps every message well under 4096 octets
/// (17 octets per IPv6 prefix, attributes bounded by the community lists).
const PREFIXES_PER_UPDATE: usize = 64;

/// Whether a prefix can be announced as unicast (netgauze refuses e.g.
/// multicast ranges in unicast NLRI).
pub fn is_unicast_prefix(p: &IpNet) -> bool {
    match p {
        IpNet::V4(n) => Ipv4Unicast::from_net(n.trunc()).is_ok(),
        IpNet::V6(n) => Ipv6Unicast::from_net(n.trunc()).is_ok(),
    }
}

fn v4(nets: &[Ipv4Net]) -> Vec<Ipv4UnicastAddress> {
    nets.iter()
        .filter_map(|n| Ipv4Unicast::from_net(n.trunc()).ok())
        .map(Ipv4UnicastAddress::new_no_path_id)
        .collect()
}

fn v6(nets: &[Ipv6Net]) -> Vec<Ipv6UnicastAddress> {
    nets.iter()
        .filter_map(|n| Ipv6Unicast::from_net(n.trunc()).ok())
        .map(|n| Ipv6UnicastAddress::new(None, n))
        .collect()
}

/// UPDATE messages announcing `prefixes` (all of one family) with `attrs`
/// and the given next hop.
pub fn encode_announce(
    ctx: &UpdateContext,
    attrs: &RouteAttributes,
    next_hop: IpAddr,
    prefixes: &[IpNet],
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut v4s = Vec::new();
    let mut v6s = Vec::new();
    for p in prefixes {
        match p {
            IpNet::V4(n) => v4s.push(*n),
            IpNet::V6(n) => v6s.push(*n),
        }
    }
    for chunk in v4s.chunks(PREFIXES_PER_UPDATE) {
        let IpAddr::V4(nh) = next_hop else { break };
        let mut pa = common_attributes(ctx, attrs);
        pa.insert(
            2,
            attr(false, true, PathAttributeValue::NextHop(NextHop::new(nh))),
        );
        let upd = BgpUpdateMessage::new(Vec::new(), pa, v4(chunk));
        out.push(write_message(&BgpMessage::Update(upd)));
    }
    for chunk in v6s.chunks(PREFIXES_PER_UPDATE) {
        let IpAddr::V6(nh) = next_hop else { break };
        let mut pa = common_attributes(ctx, attrs);
        pa.push(attr(
            true,
            false,
            PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                next_hop_global: nh,
                next_hop_local: None,
                nlri: v6(chunk).into(),
            }),
        ));
        let upd = BgpUpdateMessage::new(Vec::new(), pa, Vec::new());
        out.push(write_message(&BgpMessage::Update(upd)));
    }
    out
}

/// UPDATE messages withdrawing `prefixes`.
pub fn encode_withdraw(prefixes: &[IpNet]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let v4s: Vec<Ipv4Net> = prefixes
        .iter()
        .filter_map(|p| match p {
            IpNet::V4(n) => Some(*n),
            _ => None,
        })
        .collect();
    let v6s: Vec<Ipv6Net> = prefixes
        .iter()
        .filter_map(|p| match p {
            IpNet::V6(n) => Some(*n),
            _ => None,
        })
        .collect();
    for chunk in v4s.chunks(PREFIXES_PER_UPDATE * 4) {
        let upd = BgpUpdateMessage::new(v4(chunk), Vec::new(), Vec::new());
        out.push(write_message(&BgpMessage::Update(upd)));
    }
    for chunk in v6s.chunks(PREFIXES_PER_UPDATE) {
        let pa = vec![attr(
            true,
            false,
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast {
                nlri: v6(chunk).into(),
            }),
        )];
        let upd = BgpUpdateMessage::new(Vec::new(), pa, Vec::new());
        out.push(write_message(&BgpMessage::Update(upd)));
    }
    out
}

/// The default IPv6 next hop when none is configured and the session runs
/// over IPv6: the session's own address.
pub fn default_next_hop(prefix: &IpNet, local: Option<IpAddr>) -> Option<IpAddr> {
    match (prefix, local) {
        (IpNet::V4(_), Some(IpAddr::V4(a))) => Some(IpAddr::V4(a)),
        (IpNet::V6(_), Some(IpAddr::V6(a))) if a.to_ipv4_mapped().is_none() => Some(IpAddr::V6(a)),
        (IpNet::V4(_), Some(IpAddr::V6(a))) => a.to_ipv4_mapped().map(IpAddr::V4),
        _ => None,
    }
}
