//! Announcement policy: what a site announces for a set of prefixes when it
//! is the active site, and when it is the standby.
//!
//! | role    | `standby = "none"` | `standby = "prepend"`                        |
//! |---------|--------------------|----------------------------------------------|
//! | active  | prefixes, configured attributes (prepend `announce.prepend`) | same |
//! | standby | nothing            | prefixes, prepend `announce.prepend + standby_prepend` |
//! | fenced  | nothing            | nothing                                      |
//!
//! A fenced site (lost both its peer and the witness) withdraws everything:
//! it must not attract traffic it cannot serve.
//!
//! AS-path prepending has no effect inside an AS (the AS path towards iBGP
//! peers is empty), so the standby announcement also carries a LOCAL_PREF
//! [`STANDBY_LOCAL_PREF_DROP`] below the active one (LOCAL_PREF is only
//! sent to iBGP peers).

use ipnet::IpNet;

use crate::bgp::route::{
    parse_community, parse_large_community, CommunityParseError, Route, RouteAttributes,
};
use crate::config::{AnnounceSettingsRaw, StandbyPolicy};

/// How much lower the standby's LOCAL_PREF is than the active one's.
pub const STANDBY_LOCAL_PREF_DROP: u32 = 50;

/// The role of this site for one set of prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
    /// Fenced or stopped: announce nothing.
    Down,
}

/// Parsed `[vms.announce]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnounceSettings {
    pub attributes: RouteAttributes,
}

impl AnnounceSettings {
    /// Parses the community strings of the configuration.
    pub fn parse(raw: &AnnounceSettingsRaw) -> Result<Self, CommunityParseError> {
        let communities = raw
            .communities
            .iter()
            .map(|c| parse_community(c))
            .collect::<Result<Vec<_>, _>>()?;
        let large_communities = raw
            .large_communities
            .iter()
            .map(|c| parse_large_community(c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            attributes: RouteAttributes {
                next_hop: None,
                prepend: raw.prepend,
                communities,
                large_communities,
                med: raw.med,
                local_pref: raw.local_pref,
            },
        })
    }
}

/// The routes to announce for `prefixes` in `role`.
pub fn routes_for(
    role: Role,
    prefixes: &[IpNet],
    announce: &AnnounceSettings,
    standby: StandbyPolicy,
    standby_prepend: u8,
) -> Vec<Route> {
    let attrs = match (role, standby) {
        (Role::Active, _) => announce.attributes.clone(),
        (Role::Standby, StandbyPolicy::Prepend) => {
            let mut a = announce.attributes.clone();
            a.prepend = a.prepend.saturating_add(standby_prepend);
            a.local_pref = Some(
                a.local_pref
                    .unwrap_or(100)
                    .saturating_sub(STANDBY_LOCAL_PREF_DROP),
            );
            a
        }
        (Role::Standby, StandbyPolicy::None) | (Role::Down, _) => return Vec::new(),
    };
    prefixes
        .iter()
        .map(|p| Route::new(*p, attrs.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AnnounceSettings {
        AnnounceSettings::parse(&AnnounceSettingsRaw {
            communities: vec!["65000:100".into()],
            large_communities: vec!["65000:1:2".into()],
            med: Some(10),
            local_pref: Some(200),
            prepend: 1,
        })
        .unwrap()
    }

    #[test]
    fn active_standby_down() {
        let p: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap()];
        let s = settings();
        let a = routes_for(Role::Active, &p, &s, StandbyPolicy::Prepend, 6);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].attributes.prepend, 1);
        assert_eq!(a[0].attributes.communities, vec![(65000 << 16) | 100]);
        let sb = routes_for(Role::Standby, &p, &s, StandbyPolicy::Prepend, 6);
        assert_eq!(sb[0].attributes.prepend, 7);
        assert_eq!(sb[0].attributes.local_pref, Some(150));
        assert!(routes_for(Role::Standby, &p, &s, StandbyPolicy::None, 6).is_empty());
        assert!(routes_for(Role::Down, &p, &s, StandbyPolicy::Prepend, 6).is_empty());
    }

    #[test]
    fn bad_community_is_reported() {
        let e = AnnounceSettings::parse(&AnnounceSettingsRaw {
            communities: vec!["nope".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("nope"));
    }
}
