//! Decoding received UPDATE messages with RFC 7606 ("Revised Error Handling
//! for BGP UPDATE Messages") semantics.
//!
//! Three outcomes, as RFC 7606 section 2 defines them:
//! - **session reset**: the message structure is broken so its NLRI cannot be
//!   located (withdrawn/attribute lengths inconsistent, NLRI field malformed,
//!   MP_REACH/MP_UNREACH malformed or repeated, unrecognized well-known
//!   attribute). Returned as `Err(Notification)`.
//! - **treat-as-withdraw**: an attribute that affects route selection is
//!   malformed; every prefix the UPDATE announces is handled as withdrawn and
//!   the session stays up.
//! - **attribute discard**: an attribute that does not affect selection is
//!   malformed (or repeated); it is ignored.
//!
//! The walker never panics on any input (there is a fuzz target and a
//! proptest for that) and never allocates more than the input size.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::wire::{code, Notification};

/// How the sending peer's UPDATE is to be read.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveContext {
    /// 4-octet AS numbers in AS_PATH (both sides advertised the capability).
    pub four_octet_as: bool,
    /// The peer is in our AS (LOCAL_PREF is legitimate).
    pub ibgp: bool,
}

/// The decoded content of a received UPDATE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedUpdate {
    /// Prefixes announced and accepted.
    pub announced: Vec<IpNet>,
    /// Prefixes withdrawn, including those withdrawn by treat-as-withdraw.
    pub withdrawn: Vec<IpNet>,
    pub next_hop: Option<IpAddr>,
    pub as_path: Vec<u32>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<(u32, u32, u32)>,
    /// Set when RFC 7606 treat-as-withdraw applied: why.
    pub treat_as_withdraw: Option<String>,
    /// Attributes ignored by RFC 7606 attribute discard: why.
    pub discarded: Vec<String>,
}

const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_MED: u8 = 4;
const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_ATOMIC_AGGREGATE: u8 = 6;
const ATTR_AGGREGATOR: u8 = 7;
const ATTR_COMMUNITIES: u8 = 8;
const ATTR_ORIGINATOR_ID: u8 = 9;
const ATTR_CLUSTER_LIST: u8 = 10;
const ATTR_MP_REACH: u8 = 14;
const ATTR_MP_UNREACH: u8 = 15;
const ATTR_EXT_COMMUNITIES: u8 = 16;
const ATTR_AS4_PATH: u8 = 17;
const ATTR_AS4_AGGREGATOR: u8 = 18;
const ATTR_LARGE_COMMUNITIES: u8 = 32;

const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_EXTENDED: u8 = 0x10;

fn update_err(subcode: u8, data: &[u8]) -> Notification {
    Notification::new(code::UPDATE, subcode, data)
}

/// Parses a sequence of (length, prefix) NLRI entries of one family.
/// `None` when syntactically broken (bad length or truncated).
fn parse_prefixes(mut b: &[u8], v6: bool) -> Option<Vec<IpNet>> {
    let max = if v6 { 128 } else { 32 };
    let mut out = Vec::new();
    while let Some((&len, rest)) = b.split_first() {
        if len > max {
            return None;
        }
        let n = (len as usize).div_ceil(8);
        if rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let net = if v6 {
            let mut a = [0u8; 16];
            a[..n].copy_from_slice(bytes);
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).ok()?.trunc())
        } else {
            let mut a = [0u8; 4];
            a[..n].copy_from_slice(bytes);
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), len).ok()?.trunc())
        };
        out.push(net);
        b = rest;
    }
    Some(out)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Expected (optional, transitive) flags of the attributes we know.
fn expected_flags(t: u8) -> Option<(bool, bool)> {
    Some(match t {
        ATTR_ORIGIN | ATTR_AS_PATH | ATTR_NEXT_HOP | ATTR_LOCAL_PREF | ATTR_ATOMIC_AGGREGATE => {
            (false, true)
        }
        ATTR_MED | ATTR_ORIGINATOR_ID | ATTR_CLUSTER_LIST | ATTR_MP_REACH | ATTR_MP_UNREACH => {
            (true, false)
        }
        ATTR_AGGREGATOR
        | ATTR_COMMUNITIES
        | ATTR_EXT_COMMUNITIES
        | ATTR_AS4_PATH
        | ATTR_AS4_AGGREGATOR
        | ATTR_LARGE_COMMUNITIES => (true, true),
        _ => return None,
    })
}

/// Is `t` an attribute whose malformation only leads to attribute discard?
fn discard_only(t: u8) -> bool {
    matches!(
        t,
        ATTR_ATOMIC_AGGREGATE | ATTR_AGGREGATOR | ATTR_AS4_PATH | ATTR_AS4_AGGREGATOR
    )
}

/// Parses AS_PATH / AS4_PATH segments; `None` if malformed.
fn parse_as_path(mut b: &[u8], four: bool) -> Option<Vec<u32>> {
    let w = if four { 4 } else { 2 };
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 2 {
            return None;
        }
        let (seg_type, count) = (b[0], b[1] as usize);
        // RFC 7606 7.2: unknown segment type or zero-length segment is malformed.
        if !(1..=4).contains(&seg_type) || count == 0 {
            return None;
        }
        let n = count * w;
        if b.len() < 2 + n {
            return None;
        }
        for asn in b[2..2 + n].chunks_exact(w) {
            out.push(if four {
                be32(asn)
            } else {
                u16::from_be_bytes([asn[0], asn[1]]) as u32
            });
        }
        b = &b[2 + n..];
    }
    Some(out)
}

/// Decodes an UPDATE body (the bytes after the 19-octet header).
pub fn decode_update(body: &[u8], ctx: ReceiveContext) -> Result<ReceivedUpdate, Notification> {
    let mut out = ReceivedUpdate::default();
    // RFC 7606 section 4: lengths that cannot be reconciled => session reset.
    if body.len() < 4 {
        return Err(update_err(1, &[]));
    }
    let wlen = u16::from_be_bytes([body[0], body[1]]) as usize;
    if 2 + wlen + 2 > body.len() {
        return Err(update_err(1, &[]));
    }
    let withdrawn_field = &body[2..2 + wlen];
    let alen = u16::from_be_bytes([body[2 + wlen], body[3 + wlen]]) as usize;
    let attrs_start = 4 + wlen;
    if attrs_start + alen > body.len() {
        return Err(update_err(1, &[]));
    }
    let attrs = &body[attrs_start..attrs_start + alen];
    let nlri_field = &body[attrs_start + alen..];

    out.withdrawn = parse_prefixes(withdrawn_field, false).ok_or_else(|| update_err(10, &[]))?;
    let nlri = parse_prefixes(nlri_field, false).ok_or_else(|| update_err(10, &[]))?;

    let mut seen = [false; 256];
    let mut taw: Option<String> = None;
    let mut mp_reach: Vec<IpNet> = Vec::new();
    let mut mp_next_hop = None;
    let mut has_origin = false;
    let mut has_as_path = false;
    let mut has_next_hop = false;

    let mut rest = attrs;
    while !rest.is_empty() {
        // Attribute header: flags, type, length (1 or 2 octets).
        if rest.len() < 3 || (rest[0] & FLAG_EXTENDED != 0 && rest.len() < 4) {
            taw.get_or_insert_with(|| "attribute header truncated".into());
            break;
        }
        let flags = rest[0];
        let t = rest[1];
        let (len, hdr) = if flags & FLAG_EXTENDED != 0 {
            (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4)
        } else {
            (rest[2] as usize, 3)
        };
        if rest.len() < hdr + len {
            // RFC 7606 section 4: attribute overruns the attribute section.
            if t == ATTR_MP_REACH || t == ATTR_MP_UNREACH {
                return Err(update_err(9, &[]));
            }
            taw.get_or_insert_with(|| format!("attribute {t} overruns the attribute section"));
            break;
        }
        let v = &rest[hdr..hdr + len];
        rest = &rest[hdr + len..];

        // RFC 7606 3(g): repeated attributes.
        if seen[t as usize] {
            if t == ATTR_MP_REACH || t == ATTR_MP_UNREACH {
                return Err(update_err(1, &[]));
            }
            out.discarded.push(format!("repeated attribute {t}"));
            continue;
        }
        seen[t as usize] = true;

        // RFC 7606 3(c): flags in conflict with the attribute's definition.
        if let Some((opt, trans)) = expected_flags(t) {
            let flag_opt = flags & FLAG_OPTIONAL != 0;
            let flag_trans = flags & FLAG_TRANSITIVE != 0;
            if flag_opt != opt || flag_trans != trans {
                if t == ATTR_MP_REACH || t == ATTR_MP_UNREACH {
                    return Err(update_err(4, &[]));
                }
                if discard_only(t) {
                    out.discarded
                        .push(format!("attribute {t} with wrong flags"));
                } else {
                    taw.get_or_insert_with(|| format!("attribute {t} with wrong flags"));
                }
                continue;
            }
        }

        match t {
            ATTR_ORIGIN => {
                if len != 1 || v[0] > 2 {
                    taw.get_or_insert_with(|| "malformed ORIGIN".into());
                }
                has_origin = true;
            }
            ATTR_AS_PATH => match parse_as_path(v, ctx.four_octet_as) {
                Some(p) => {
                    out.as_path = p;
                    has_as_path = true;
                }
                None => {
                    taw.get_or_insert_with(|| "malformed AS_PATH".into());
                    has_as_path = true;
                }
            },
            ATTR_NEXT_HOP => {
                if len != 4 {
                    taw.get_or_insert_with(|| "malformed NEXT_HOP".into());
                } else {
                    out.next_hop = Some(IpAddr::V4(Ipv4Addr::from(be32(v))));
                }
                has_next_hop = true;
            }
            ATTR_MED => {
                if len != 4 {
                    taw.get_or_insert_with(|| "malformed MULTI_EXIT_DISC".into());
                } else {
                    out.med = Some(be32(v));
                }
            }
            ATTR_LOCAL_PREF => {
                if !ctx.ibgp {
                    // RFC 7606 7.5: from an external peer it is discarded.
                    out.discarded.push("LOCAL_PREF from an eBGP peer".into());
                } else if len != 4 {
                    taw.get_or_insert_with(|| "malformed LOCAL_PREF".into());
                } else {
                    out.local_pref = Some(be32(v));
                }
            }
            ATTR_ATOMIC_AGGREGATE => {
                if len != 0 {
                    out.discarded.push("malformed ATOMIC_AGGREGATE".into());
                }
            }
            ATTR_AGGREGATOR => {
                let want = if ctx.four_octet_as { 8 } else { 6 };
                if len != want {
                    out.discarded.push("malformed AGGREGATOR".into());
                }
            }
            ATTR_AS4_AGGREGATOR => {
                if len != 8 {
                    out.discarded.push("malformed AS4_AGGREGATOR".into());
                }
            }
            ATTR_AS4_PATH => {
                if parse_as_path(v, true).is_none() {
                    out.discarded.push("malformed AS4_PATH".into());
                }
            }
            ATTR_COMMUNITIES => {
                if len == 0 || len % 4 != 0 {
                    taw.get_or_insert_with(|| "malformed COMMUNITIES".into());
                } else {
                    out.communities = v.chunks_exact(4).map(be32).collect();
                }
            }
            ATTR_LARGE_COMMUNITIES => {
                if len == 0 || len % 12 != 0 {
                    taw.get_or_insert_with(|| "malformed LARGE_COMMUNITY".into());
                } else {
                    out.large_communities = v
                        .chunks_exact(12)
                        .map(|c| (be32(&c[0..4]), be32(&c[4..8]), be32(&c[8..12])))
                        .collect();
                }
            }
            ATTR_EXT_COMMUNITIES => {
                if len % 8 != 0 {
                    taw.get_or_insert_with(|| "malformed EXTENDED_COMMUNITIES".into());
                }
            }
            ATTR_ORIGINATOR_ID => {
                if len != 4 {
                    taw.get_or_insert_with(|| "malformed ORIGINATOR_ID".into());
                }
            }
            ATTR_CLUSTER_LIST => {
                if len == 0 || len % 4 != 0 {
                    taw.get_or_insert_with(|| "malformed CLUSTER_LIST".into());
                }
            }
            ATTR_MP_REACH => {
                // AFI(2) SAFI(1) NH-len(1) NH reserved(1) NLRI
                if v.len() < 5 {
                    return Err(update_err(9, &[]));
                }
                let afi = u16::from_be_bytes([v[0], v[1]]);
                let safi = v[2];
                let nhl = v[3] as usize;
                if v.len() < 4 + nhl + 1 {
                    return Err(update_err(9, &[]));
                }
                let nh = &v[4..4 + nhl];
                let nlri_bytes = &v[5 + nhl..];
                match (afi, safi) {
                    (1, 1) => {
                        if nhl != 4 && nhl != 16 && nhl != 32 {
                            return Err(update_err(9, &[]));
                        }
                        mp_next_hop = Some(if nhl == 4 {
                            IpAddr::V4(Ipv4Addr::from(be32(nh)))
                        } else {
                            let mut a = [0u8; 16];
                            a.copy_from_slice(&nh[..16]);
                            IpAddr::V6(Ipv6Addr::from(a))
                        });
                        mp_reach =
                            parse_prefixes(nlri_bytes, false).ok_or_else(|| update_err(9, &[]))?;
                    }
                    (2, 1) => {
                        if nhl != 16 && nhl != 32 {
                            return Err(update_err(9, &[]));
                        }
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&nh[..16]);
                        mp_next_hop = Some(IpAddr::V6(Ipv6Addr::from(a)));
                        mp_reach =
                            parse_prefixes(nlri_bytes, true).ok_or_else(|| update_err(9, &[]))?;
                    }
                    // Families we did not negotiate: ignored.
                    _ => {}
                }
            }
            ATTR_MP_UNREACH => {
                if v.len() < 3 {
                    return Err(update_err(9, &[]));
                }
                let afi = u16::from_be_bytes([v[0], v[1]]);
                let safi = v[2];
                let nlri_bytes = &v[3..];
                match (afi, safi) {
                    (1, 1) | (2, 1) => {
                        let w = parse_prefixes(nlri_bytes, afi == 2)
                            .ok_or_else(|| update_err(9, &[]))?;
                        out.withdrawn.extend(w);
                    }
                    _ => {}
                }
            }
            _ => {
                if flags & FLAG_OPTIONAL == 0 {
                    // RFC 4271 6.3, kept by RFC 7606: unrecognized well-known.
                    let mut data = vec![flags, t];
                    data.extend_from_slice(
                        &(len as u16).to_be_bytes()[if hdr == 4 { 0 } else { 1 }..],
                    );
                    data.extend_from_slice(v);
                    return Err(update_err(2, &data));
                }
                // Unrecognized optional attribute: ignored.
            }
        }
    }

    let announcing = !nlri.is_empty() || !mp_reach.is_empty();
    if announcing && taw.is_none() {
        // RFC 7606 3(d): missing well-known mandatory attributes.
        if !has_origin {
            taw = Some("missing ORIGIN".into());
        } else if !has_as_path {
            taw = Some("missing AS_PATH".into());
        } else if !nlri.is_empty() && !has_next_hop {
            taw = Some("missing NEXT_HOP".into());
        }
    }
    if !mp_reach.is_empty() {
        out.next_hop = mp_next_hop.or(out.next_hop);
    }
    let mut announced = nlri;
    announced.extend(mp_reach);
    if taw.is_some() {
        out.withdrawn.extend(announced);
        out.treat_as_withdraw = taw;
    } else {
        out.announced = announced;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
