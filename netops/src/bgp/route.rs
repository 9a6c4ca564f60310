//! What we announce: a prefix and its path attributes, as plain values.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Path attributes of an announcement. ORIGIN is always IGP; AS_PATH is
/// built per session (our AS, `1 + prepend` times, towards eBGP peers; empty
/// towards iBGP peers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteAttributes {
    /// Next hop; `None`: the peer's configured next hop for the family, else
    /// our address on the session.
    pub next_hop: Option<IpAddr>,
    /// Extra copies of the local AS (eBGP only).
    pub prepend: u8,
    /// RFC 1997 communities as `(asn << 16) | value`.
    pub communities: Vec<u32>,
    /// RFC 8092 large communities `(global, local1, local2)`.
    pub large_communities: Vec<(u32, u32, u32)>,
    pub med: Option<u32>,
    /// Sent to iBGP peers only (default 100 there).
    pub local_pref: Option<u32>,
}

/// One announced prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub prefix: IpNet,
    pub attributes: RouteAttributes,
}

impl Route {
    pub fn new(prefix: IpNet, attributes: RouteAttributes) -> Self {
        Self {
            prefix: prefix.trunc(),
            attributes,
        }
    }
}

/// A community string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {text:?}: expected {expected}")]
pub struct CommunityParseError {
    kind: &'static str,
    text: String,
    expected: &'static str,
}

/// Parses `"65000:100"` into the 32-bit RFC 1997 value.
pub fn parse_community(s: &str) -> Result<u32, CommunityParseError> {
    let err = || CommunityParseError {
        kind: "community",
        text: s.to_owned(),
        expected: "ASN:VALUE with both parts in 0..=65535",
    };
    let (a, b) = s.trim().split_once(':').ok_or_else(err)?;
    let a = u16::from_str(a).map_err(|_| err())?;
    let b = u16::from_str(b).map_err(|_| err())?;
    Ok(((a as u32) << 16) | b as u32)
}

/// Parses `"65000:1:2"` into an RFC 8092 large community.
pub fn parse_large_community(s: &str) -> Result<(u32, u32, u32), CommunityParseError> {
    let err = || CommunityParseError {
        kind: "large community",
        text: s.to_owned(),
        expected: "GLOBAL:LOCAL1:LOCAL2 with each part in 0..=4294967295",
    };
    let mut it = s.trim().split(':');
    let mut next = || -> Result<u32, CommunityParseError> {
        u32::from_str(it.next().ok_or_else(err)?).map_err(|_| err())
    };
    let v = (next()?, next()?, next()?);
    if it.next().is_some() {
        return Err(err());
    }
    Ok(v)
}

/// `65000:100` formatting of an RFC 1997 community.
pub struct CommunityDisplay(pub u32);

impl fmt::Display for CommunityDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0 >> 16, self.0 & 0xffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn communities_parse() {
        assert_eq!(parse_community("65000:100").unwrap(), (65000 << 16) | 100);
        assert!(parse_community("70000:1").is_err());
        assert!(parse_community("65000").is_err());
        assert_eq!(
            parse_large_community("4200000000:1:2").unwrap(),
            (4200000000, 1, 2)
        );
        assert!(parse_large_community("1:2").is_err());
        assert!(parse_large_community("1:2:3:4").is_err());
        assert_eq!(CommunityDisplay((65000 << 16) | 7).to_string(), "65000:7");
    }
}
