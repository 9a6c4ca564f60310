//! Semantic checks that a well-typed configuration can still fail: names
//! that must match, ranges, prefixes, and (for one host) files on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ipnet::IpNet;

use super::error::Issue;
use super::model::*;

/// Largest QEMU guest (64 GiB): QEMU tracks its dirty pages, so the pause
/// grows with what the guest writes, not with its RAM.
pub const QEMU_MAX_MIB: u64 = 65_536;

/// Checks everything that does not depend on the host the file is read on.
pub fn structure(cfg: &Config) -> Vec<Issue> {
    let mut v = Validator::default();
    v.replication("replication", &cfg.replication);
    v.sites(cfg);
    v.vms(cfg);
    v.groups(cfg);
    v.bgp(cfg);
    v.dns(cfg);
    v.hooks(cfg);
    v.failover(cfg);
    v.issues
}

/// Checks that the files the party `party` (a site or the witness) needs
/// are present: its own certificate and key, the CA, and the images, disks
/// and secrets of the VMs it runs or backs up.
pub fn files_for(cfg: &Config, party: &str) -> Vec<Issue> {
    let mut v = Validator::default();
    let mut known = false;
    for (i, s) in cfg.sites.iter().enumerate() {
        if s.name == party {
            known = true;
            v.tls_files(&format!("sites[{i}].tls"), &s.tls);
        }
    }
    if let Some(w) = &cfg.witness {
        if w.name == party && w.backend == WitnessBackend::Etcd {
            v.push(
                "--site",
                format!(
                    "expected the name of a site: the witness {party:?} is etcd \
                     (backend = \"etcd\"), not a remus-wan process"
                ),
            );
            return v.issues;
        }
        if w.name == party {
            known = true;
            v.tls_files("witness.tls", &w.tls);
        }
        // The sites are etcd's clients: they read its TLS files.
        if known && w.backend == WitnessBackend::Etcd {
            for (key, path) in [
                ("witness.ca", &w.ca),
                ("witness.cert", &w.cert),
                ("witness.key", &w.key),
            ] {
                if let Some(p) = path {
                    v.file_exists(key, p);
                }
            }
        }
    }
    if !known {
        v.push(
            "--site",
            format!(
                "expected the name of a site or of the witness ({}), found {party:?}",
                party_names(cfg).join(", ")
            ),
        );
        return v.issues;
    }
    for (i, vm) in cfg.vms.iter().enumerate() {
        if vm.primary != party && vm.backup != party {
            continue;
        }
        let key = format!("vms[{i}]");
        for (field, path) in [
            ("guest_image", &vm.guest_image),
            ("kernel", &vm.kernel),
            ("initramfs", &vm.initramfs),
            ("disk", &vm.disk),
        ] {
            if let Some(p) = path {
                v.file_exists(&format!("{key}.{field}"), p);
            }
        }
    }
    if let Some(bgp) = &cfg.netops.bgp {
        for (i, sp) in bgp.speakers.iter().enumerate() {
            if sp.site != party {
                continue;
            }
            for (j, p) in sp.peers.iter().enumerate() {
                if let Some(f) = &p.md5_password_file {
                    v.file_exists(
                        &format!("netops.bgp.speakers[{i}].peers[{j}].md5_password_file"),
                        f,
                    );
                }
            }
        }
    }
    if let Some(dns) = &cfg.netops.dns {
        v.file_exists("netops.dns.tsig_secret_file", &dns.tsig_secret_file);
    }
    for (i, h) in cfg.netops.hooks.iter().enumerate() {
        v.executable(&format!("netops.hooks[{i}].command"), &h.command);
    }
    v.issues
}

fn party_names(cfg: &Config) -> Vec<String> {
    let mut names: Vec<String> = cfg.sites.iter().map(|s| s.name.clone()).collect();
    if let Some(w) = &cfg.witness {
        names.push(w.name.clone());
    }
    names
}

#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
}

impl Validator {
    fn push(&mut self, key: &str, problem: impl Into<String>) {
        self.issues.push(Issue::new(key, problem));
    }

    fn range<T: PartialOrd + std::fmt::Display>(&mut self, key: &str, value: T, lo: T, hi: T) {
        if value < lo || value > hi {
            self.push(
                key,
                format!("expected a value from {lo} to {hi}, found {value}"),
            );
        }
    }

    fn replication(&mut self, key: &str, r: &Replication) {
        if let Some(c) = &r.congestion {
            if let Err(e) = c.parse::<wan::transport::CongestionControl>() {
                self.push(&format!("{key}.congestion"), e);
            }
        }
        self.range(
            &format!("{key}.epoch_interval_ms"),
            r.epoch_interval_ms,
            1,
            60_000,
        );
        self.range(
            &format!("{key}.page_cache_mib"),
            r.page_cache_mib,
            1,
            1 << 20,
        );
        self.range(
            &format!("{key}.compression_level"),
            r.compression_level,
            1,
            22,
        );
        self.range(
            &format!("{key}.max_epochs_in_flight"),
            r.max_epochs_in_flight,
            1,
            64,
        );
        self.range(&format!("{key}.max_epoch_mib"), r.max_epoch_mib, 1, 1 << 16);
        self.range(
            &format!("{key}.output_buffer_mib"),
            r.output_buffer_mib,
            1,
            1 << 14,
        );
    }

    fn name(&mut self, key: &str, name: &str, what: &str) {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !ok {
            self.push(
                key,
                format!(
                    "expected a {what} name of 1-63 lowercase letters, digits and inner hyphens \
                     (it is used as a certificate identity), found {name:?}"
                ),
            );
        }
    }

    fn sites(&mut self, cfg: &Config) {
        if cfg.sites.is_empty() {
            self.push("sites", "expected at least one [[sites]] table, found none");
        }
        let mut seen = BTreeSet::new();
        for (i, s) in cfg.sites.iter().enumerate() {
            let key = format!("sites[{i}]");
            self.name(&format!("{key}.name"), &s.name, "site");
            if !seen.insert(s.name.as_str()) {
                self.push(
                    &format!("{key}.name"),
                    format!("expected a unique site name, found {:?} twice", s.name),
                );
            }
            if s.listen.port() == 0 {
                self.push(&format!("{key}.listen"), "expected a non-zero UDP port");
            }
            if s.connect_addr().ip().is_unspecified() {
                self.push(
                    &format!("{key}.connect"),
                    format!(
                        "expected an address other parties can dial; `listen` is the wildcard \
                         {}, so set `connect`",
                        s.listen
                    ),
                );
            }
        }
        if let Some(w) = &cfg.witness {
            self.name("witness.name", &w.name, "witness");
            if seen.contains(w.name.as_str()) {
                self.push(
                    "witness.name",
                    format!(
                        "expected a name different from every site, found {:?}",
                        w.name
                    ),
                );
            }
            match w.backend {
                WitnessBackend::Builtin => self.builtin_witness(w),
                WitnessBackend::Etcd => self.etcd_witness(cfg, w),
            }
        }
    }

    fn builtin_witness(&mut self, w: &Witness) {
        if w.listen.port() == 0 {
            self.push("witness.listen", "expected a non-zero UDP port");
        }
        if w.tls.ca.as_os_str().is_empty() {
            self.push(
                "witness.tls",
                "expected a [witness.tls] table (ca, cert, key) for the built-in witness",
            );
        }
        let etcd_keys = [
            ("witness.endpoints", !w.endpoints.is_empty()),
            ("witness.ca", w.ca.is_some()),
            ("witness.cert", w.cert.is_some()),
            ("witness.key", w.key.is_some()),
            ("witness.prefix", w.prefix.is_some()),
        ];
        for (key, set) in etcd_keys {
            if set {
                self.push(
                    key,
                    "expected only with backend = \"etcd\" (the built-in witness has \
                     listen, connect and [witness.tls])",
                );
            }
        }
    }

    fn etcd_witness(&mut self, cfg: &Config, w: &Witness) {
        for (key, set) in [
            ("witness.listen", w.listen.port() != 0),
            ("witness.connect", w.connect.is_some()),
            ("witness.tls", !w.tls.ca.as_os_str().is_empty()),
        ] {
            if set {
                self.push(
                    key,
                    "expected only with the built-in witness; with backend = \"etcd\" the \
                     sites reach etcd at `endpoints` (TLS files: witness.ca, cert, key)",
                );
            }
        }
        if w.endpoints.is_empty() {
            self.push(
                "witness.endpoints",
                "expected at least one etcd member, such as \"https://192.0.2.10:2379\"",
            );
        }
        let mut https = 0;
        for (i, e) in w.endpoints.iter().enumerate() {
            match etcd_endpoint(e) {
                Some(tls) => https += usize::from(tls),
                None => self.push(
                    &format!("witness.endpoints[{i}]"),
                    format!("expected http://host:port or https://host:port, found {e:?}"),
                ),
            }
        }
        if https != 0 && https != w.endpoints.len() {
            self.push(
                "witness.endpoints",
                "expected all members over https or all over http, found both",
            );
        }
        if https == 0 && (w.ca.is_some() || w.cert.is_some()) {
            self.push(
                "witness.endpoints",
                "expected https:// endpoints: TLS files (witness.ca, cert) are set",
            );
        }
        if https != 0 && w.ca.is_none() {
            self.push(
                "witness.ca",
                "expected the CA file that signed the etcd members' certificates \
                 (the endpoints use https)",
            );
        }
        if w.cert.is_some() != w.key.is_some() {
            let key = if w.cert.is_some() {
                "witness.key"
            } else {
                "witness.cert"
            };
            self.push(
                key,
                "expected witness.cert and witness.key together (the sites' etcd client \
                 certificate)",
            );
        }
        if let Some(p) = &w.prefix {
            let ok = p.starts_with('/')
                && p.len() > 1
                && !p
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
            if !ok {
                self.push(
                    "witness.prefix",
                    format!(
                        "expected an etcd key prefix such as \"/remus-wan/prod\" (starting \
                         with / and without spaces), found {p:?}"
                    ),
                );
            }
        }
        // etcd lease TTLs are whole seconds, and etcd raises shorter ones
        // to its minimum (2 s with its default election timeout): the
        // lease the sites count on must be the one etcd enforces.
        let lease = cfg.failover.lease_ms;
        if !lease.is_multiple_of(1000) || lease < ETCD_MIN_LEASE_MS {
            self.push(
                "failover.lease_ms",
                format!(
                    "expected a whole number of seconds of at least {ETCD_MIN_LEASE_MS} with \
                     the etcd witness (etcd lease TTLs are whole seconds, 2 s at least), \
                     found {lease}"
                ),
            );
        }
    }

    fn site_ref(&mut self, key: &str, cfg: &Config, name: &str) -> bool {
        if cfg.sites.iter().any(|s| s.name == name) {
            return true;
        }
        let known: Vec<&str> = cfg.sites.iter().map(|s| s.name.as_str()).collect();
        self.push(
            key,
            format!(
                "expected the name of a site defined in [[sites]] ({}), found {name:?}",
                known.join(", ")
            ),
        );
        false
    }

    fn groups(&mut self, cfg: &Config) {
        let mut names = BTreeSet::new();
        let mut member_of: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, g) in cfg.groups.iter().enumerate() {
            let key = format!("groups[{i}]");
            self.name(&format!("{key}.name"), &g.name, "group");
            if !names.insert(g.name.as_str()) {
                self.push(
                    &format!("{key}.name"),
                    format!("expected a unique group name, found {:?} twice", g.name),
                );
            }
            if cfg.vm(&g.name).is_some() {
                self.push(
                    &format!("{key}.name"),
                    format!(
                        "expected a name no VM has: {:?} names the group's replica, lease and \
                         status entry, and is a VM's name too",
                        g.name
                    ),
                );
            }
            if g.vms.len() < 2 {
                self.push(
                    &format!("{key}.vms"),
                    format!(
                        "expected at least two VM names, found {}: a group of one VM is the VM itself",
                        g.vms.len()
                    ),
                );
            }
            let mut sites: Option<(&str, &str)> = None;
            // The first member's disk or none: the others must match.
            let mut disks: Option<(&str, bool)> = None;
            for (j, name) in g.vms.iter().enumerate() {
                let mkey = format!("{key}.vms[{j}]");
                let Some(vm) = cfg.vm(name) else {
                    self.push(
                        &mkey,
                        format!("expected the name of a [[vms]] entry, found {name:?}"),
                    );
                    continue;
                };
                if let Some(other) = member_of.insert(name, &g.name) {
                    self.push(
                        &mkey,
                        format!("expected a VM in no other group, found {name:?} in group {other:?} too"),
                    );
                }
                match sites {
                    None => sites = Some((&vm.primary, &vm.backup)),
                    Some((p, b)) if p != vm.primary || b != vm.backup => self.push(
                        &mkey,
                        format!(
                            "expected the group's sites (primary {p:?}, backup {b:?}), found VM \
                             {name:?} with primary {:?} and backup {:?}: a group runs at one site",
                            vm.primary, vm.backup
                        ),
                    ),
                    Some(_) => {}
                }
                if vm.backend != Backend::Kvm {
                    self.push(
                        &mkey,
                        format!(
                            "expected a VM with backend \"kvm\": VM {name:?} has backend {:?}, and this \
                             build groups micro-VMs only",
                            vm.backend
                        ),
                    );
                }
                let has = vm.disk.is_some();
                match disks {
                    None => disks = Some((name, has)),
                    Some((first, had)) if had != has => {
                        let says = |d: bool| if d { "has a `disk`" } else { "has no `disk`" };
                        self.push(
                            &mkey,
                            format!(
                                "expected every member with a `disk` or none: VM {name:?} {}, \
                                 VM {first:?} {} (a group's disks replicate as one)",
                                says(has),
                                says(had)
                            ),
                        )
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn vms(&mut self, cfg: &Config) {
        let mut names = BTreeSet::new();
        let mut prefixes: BTreeMap<IpNet, usize> = BTreeMap::new();
        for (i, vm) in cfg.vms.iter().enumerate() {
            let key = format!("vms[{i}]");
            self.name(&format!("{key}.name"), &vm.name, "VM");
            if !names.insert(vm.name.as_str()) {
                self.push(
                    &format!("{key}.name"),
                    format!("expected a unique VM name, found {:?} twice", vm.name),
                );
            }
            let p = self.site_ref(&format!("{key}.primary"), cfg, &vm.primary);
            let b = self.site_ref(&format!("{key}.backup"), cfg, &vm.backup);
            if p && b && vm.primary == vm.backup {
                self.push(
                    &format!("{key}.backup"),
                    format!(
                        "expected a site other than the primary {:?}: a replica in the same \
                         site does not survive the site",
                        vm.primary
                    ),
                );
            }
            match vm.backend {
                Backend::Kvm if vm.guest_image.is_none() => self.push(
                    &format!("{key}.guest_image"),
                    "expected the path of the micro-VM guest program (backend \"kvm\"); \
                     build it with `cargo xtask guest-image`",
                ),
                Backend::Qemu if vm.kernel.is_none() => self.push(
                    &format!("{key}.kernel"),
                    "expected the path of a Linux kernel image (backend \"qemu\")",
                ),
                Backend::Qemu if vm.initramfs.is_none() => self.push(
                    &format!("{key}.initramfs"),
                    "expected the path of the guest's initramfs (backend \"qemu\"); \
                     build both with `cargo xtask guest-image --linux`",
                ),
                _ => {}
            }
            if vm.backend == Backend::Qemu && !(64..=QEMU_MAX_MIB).contains(&vm.memory_mib) {
                self.push(
                    &format!("{key}.memory_mib"),
                    format!(
                        "expected 64 to {QEMU_MAX_MIB} MiB with backend \"qemu\", found {}",
                        vm.memory_mib
                    ),
                );
            }
            if vm.backend != Backend::Qemu && vm.accel != Accel::Auto {
                self.push(
                    &format!("{key}.accel"),
                    "expected no `accel` (or \"auto\"): it chooses QEMU's accelerator, \
                     and only backend \"qemu\" runs in QEMU (the micro-VM always uses KVM)",
                );
            }
            if vm.backend != Backend::Qemu && vm.dirty_tracking != DirtyTracking::Auto {
                self.push(
                    &format!("{key}.dirty_tracking"),
                    "expected no `dirty_tracking` (or \"auto\"): it chooses how QEMU's \
                     checkpoints find changed pages, and the micro-VM always uses KVM's dirty log",
                );
            }
            // The micro-VM maps guest memory with 2 MiB pages.
            if vm.memory_mib < 2 || vm.memory_mib % 2 != 0 || vm.memory_mib > 1 << 20 {
                self.push(
                    &format!("{key}.memory_mib"),
                    format!(
                        "expected an even number of MiB from 2 to 1048576, found {}",
                        vm.memory_mib
                    ),
                );
            }
            self.range(&format!("{key}.vcpus"), vm.vcpus, 1, 64);
            self.network(&format!("{key}.network"), &vm.network);
            for (j, net) in vm.service_prefixes.iter().enumerate() {
                let pkey = format!("{key}.service_prefixes[{j}]");
                if net.trunc() != *net {
                    self.push(
                        &pkey,
                        format!(
                            "expected a prefix with no host bits set, found {net} (did you mean {}?)",
                            net.trunc()
                        ),
                    );
                }
                if let Some(other) = prefixes.insert(*net, i) {
                    self.push(
                        &pkey,
                        format!(
                            "expected each prefix to belong to one VM, found {net} also in vms[{other}]"
                        ),
                    );
                }
            }
            self.announce(&format!("{key}.announce"), &vm.announce);
            if let Some(r) = &vm.replication {
                self.replication(&format!("{key}.replication"), r);
                for (name, set) in [
                    ("fec", r.fec.is_some()),
                    ("congestion", r.congestion.is_some()),
                ] {
                    if set {
                        self.push(
                            &format!("{key}.replication.{name}"),
                            format!(
                                "expected no value per VM: `{name}` belongs to the site's \
                                 endpoint, which all its VMs share; set it in [replication]"
                            ),
                        );
                    }
                }
            }
            for (j, rec) in vm.dns.iter().enumerate() {
                self.dns_record(&format!("{key}.dns[{j}]"), cfg, vm, rec);
            }
        }
    }

    fn network(&mut self, key: &str, n: &VmNetwork) {
        if n.tap.is_empty() || n.tap.len() > 15 || n.tap.contains(['/', ' ']) {
            self.push(
                &format!("{key}.tap"),
                format!(
                    "expected an interface name of 1-15 characters without '/' or spaces, found {:?}",
                    n.tap
                ),
            );
        }
        if parse_mac(&n.mac).is_none() {
            self.push(
                &format!("{key}.mac"),
                format!(
                    "expected a unicast MAC address like \"52:54:00:12:34:56\", found {:?}",
                    n.mac
                ),
            );
        }
        if let Some(gw) = n.gateway {
            if !n.address.contains(&gw) {
                self.push(
                    &format!("{key}.gateway"),
                    format!(
                        "expected an address inside the guest's network {}, found {gw}",
                        n.address.trunc()
                    ),
                );
            }
        }
    }

    fn announce(&mut self, key: &str, a: &Announce) {
        for (j, c) in a.communities.iter().enumerate() {
            if parse_community(c).is_none() {
                self.push(
                    &format!("{key}.communities[{j}]"),
                    format!(
                        "expected a community \"ASN:VALUE\" with two 16-bit numbers, found {c:?}"
                    ),
                );
            }
        }
        for (j, c) in a.large_communities.iter().enumerate() {
            if parse_large_community(c).is_none() {
                self.push(
                    &format!("{key}.large_communities[{j}]"),
                    format!(
                        "expected a large community \"ASN:DATA1:DATA2\" with three 32-bit numbers, found {c:?}"
                    ),
                );
            }
        }
        self.range(&format!("{key}.prepend"), a.prepend, 0, 32);
    }

    fn dns_record(&mut self, key: &str, cfg: &Config, vm: &Vm, rec: &DnsRecord) {
        match &cfg.netops.dns {
            None => self.push(
                key,
                "expected a [netops.dns] section: this VM has DNS records to update",
            ),
            Some(dns) => {
                if !in_zone(&rec.name, &dns.zone) {
                    self.push(
                        &format!("{key}.name"),
                        format!(
                            "expected a fully qualified name ending in '.' inside zone {:?}, found {:?}",
                            dns.zone, rec.name
                        ),
                    );
                }
            }
        }
        for site in rec.addresses.keys() {
            self.site_ref(&format!("{key}.addresses.{site}"), cfg, site);
        }
        for needed in [&vm.primary, &vm.backup] {
            if !rec.addresses.contains_key(needed.as_str()) {
                self.push(
                    &format!("{key}.addresses"),
                    format!("expected an address for site {needed:?}, where the VM can run"),
                );
            }
        }
        let families: BTreeSet<bool> = rec.addresses.values().map(|a| a.is_ipv4()).collect();
        if families.len() > 1 {
            self.push(
                &format!("{key}.addresses"),
                "expected addresses of one family per record (A or AAAA), found both",
            );
        }
    }

    fn bgp(&mut self, cfg: &Config) {
        let Some(bgp) = &cfg.netops.bgp else { return };
        if bgp.hold_time_s != 0 && bgp.hold_time_s < 3 {
            self.push(
                "netops.bgp.hold_time_s",
                format!(
                    "expected 0 or at least 3 seconds (RFC 4271), found {}",
                    bgp.hold_time_s
                ),
            );
        }
        self.range("netops.bgp.connect_retry_s", bgp.connect_retry_s, 1, 3600);
        self.range("netops.bgp.standby_prepend", bgp.standby_prepend, 1, 32);
        let mut sites = BTreeSet::new();
        for (i, sp) in bgp.speakers.iter().enumerate() {
            let key = format!("netops.bgp.speakers[{i}]");
            if self.site_ref(&format!("{key}.site"), cfg, &sp.site) && !sites.insert(&sp.site) {
                self.push(
                    &format!("{key}.site"),
                    format!("expected one speaker per site, found {:?} twice", sp.site),
                );
            }
            if sp.local_as == 0 || sp.local_as == 23456 {
                self.push(
                    &format!("{key}.local_as"),
                    format!(
                        "expected an AS number other than 0 and AS_TRANS 23456, found {}",
                        sp.local_as
                    ),
                );
            }
            if sp.router_id.is_unspecified() {
                self.push(
                    &format!("{key}.router_id"),
                    "expected a non-zero IPv4 router id",
                );
            }
            if sp.peers.is_empty() {
                self.push(&format!("{key}.peers"), "expected at least one peer");
            }
            for (j, p) in sp.peers.iter().enumerate() {
                let pkey = format!("{key}.peers[{j}]");
                if p.remote_as == 0 || p.remote_as == 23456 {
                    self.push(
                        &format!("{pkey}.remote_as"),
                        format!(
                            "expected an AS number other than 0 and AS_TRANS 23456, found {}",
                            p.remote_as
                        ),
                    );
                }
                if p.port == 0 {
                    self.push(&format!("{pkey}.port"), "expected a non-zero TCP port");
                }
            }
        }
        // A VM whose prefixes move by BGP needs a speaker wherever it can run.
        for (i, vm) in cfg.vms.iter().enumerate() {
            if vm.service_prefixes.is_empty() {
                continue;
            }
            for (field, site) in [("primary", &vm.primary), ("backup", &vm.backup)] {
                if cfg.sites.iter().any(|s| &s.name == site)
                    && !bgp.speakers.iter().any(|sp| &sp.site == site)
                {
                    self.push(
                        &format!("vms[{i}].{field}"),
                        format!(
                            "expected a BGP speaker for site {site:?} in [[netops.bgp.speakers]]: \
                             the VM has service_prefixes to announce there"
                        ),
                    );
                }
            }
        }
    }

    fn dns(&mut self, cfg: &Config) {
        let Some(dns) = &cfg.netops.dns else { return };
        if !dns.zone.ends_with('.') || dns.zone.len() < 2 {
            self.push(
                "netops.dns.zone",
                format!(
                    "expected a fully qualified zone name ending in '.', found {:?}",
                    dns.zone
                ),
            );
        }
        if dns.tsig_key_name.is_empty() {
            self.push("netops.dns.tsig_key_name", "expected a TSIG key name");
        }
        self.range("netops.dns.timeout_s", dns.timeout_s, 1, 300);
        self.range("netops.dns.retry_deadline_s", dns.retry_deadline_s, 0, 3600);
    }

    fn hooks(&mut self, cfg: &Config) {
        self.range(
            "netops.hook_exit_wait_s",
            cfg.netops.hook_exit_wait_s,
            0,
            3600,
        );
        for (i, h) in cfg.netops.hooks.iter().enumerate() {
            self.range(
                &format!("netops.hooks[{i}].timeout_s"),
                h.timeout_s,
                1,
                3600,
            );
        }
    }

    fn failover(&mut self, cfg: &Config) {
        let f = &cfg.failover;
        for (key, v) in [
            ("failover.heartbeat_ms", f.heartbeat_ms),
            ("failover.detection_timeout_ms", f.detection_timeout_ms),
            ("failover.lease_ms", f.lease_ms),
            ("failover.renew_ms", f.renew_ms),
        ] {
            self.range(key, v, 1, 600_000);
        }
        if let Err(e) = f.timers().validate() {
            self.push("failover", format!("expected consistent timers: {e}"));
        }
    }

    fn tls_files(&mut self, key: &str, tls: &Tls) {
        self.file_exists(&format!("{key}.ca"), &tls.ca);
        self.file_exists(&format!("{key}.cert"), &tls.cert);
        self.file_exists(&format!("{key}.key"), &tls.key);
    }

    fn file_exists(&mut self, key: &str, path: &Path) {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => self.push(
                key,
                format!("expected a file, found a directory at {}", path.display()),
            ),
            Err(e) => self.push(
                key,
                format!("expected a readable file at {}: {e}", path.display()),
            ),
        }
    }

    fn executable(&mut self, key: &str, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(_) => self.push(
                key,
                format!("expected an executable file at {}", path.display()),
            ),
            Err(e) => self.push(
                key,
                format!("expected an executable file at {}: {e}", path.display()),
            ),
        }
    }
}

/// etcd's shortest lease with its default election timeout (1 s): its
/// minimum TTL is 1.5 election timeouts, rounded up to whole seconds.
pub const ETCD_MIN_LEASE_MS: u64 = 2000;

/// `https://host:port` → Some(true), `http://host:port` → Some(false).
pub fn etcd_endpoint(e: &str) -> Option<bool> {
    let (tls, rest) = if let Some(r) = e.strip_prefix("https://") {
        (true, r)
    } else {
        (false, e.strip_prefix("http://")?)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':')?;
    let host_ok =
        !host.is_empty() && !host.contains('/') && !host.bytes().any(|b| b.is_ascii_whitespace());
    (host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)).then_some(tls)
}

/// `52:54:00:12:34:56` → bytes; refuses multicast addresses, which a NIC
/// cannot own.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || out[0] & 1 != 0 {
        return None;
    }
    Some(out)
}

/// `"65000:100"` → (65000, 100).
pub fn parse_community(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// `"65000:1:2"` → (65000, 1, 2).
pub fn parse_large_community(s: &str) -> Option<(u32, u32, u32)> {
    let mut it = s.split(':');
    let r = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    it.next().is_none().then_some(r)
}

fn in_zone(name: &str, zone: &str) -> bool {
    if !name.ends_with('.') {
        return false;
    }
    let (n, z) = (name.to_ascii_lowercase(), zone.to_ascii_lowercase());
    n == z || n.ends_with(&format!(".{z}"))
}

#[cfg(test)]
mod group_tests {
    use super::*;

    fn issues(groups: &str) -> Vec<String> {
        let text = format!(
            r#"
[[sites]]
name = "dc1"
listen = "127.0.0.1:7001"
[sites.tls]
ca = "ca.pem"
cert = "dc1.pem"
key = "dc1.key"

[[sites]]
name = "dc2"
listen = "127.0.0.1:7002"
[sites.tls]
ca = "ca.pem"
cert = "dc2.pem"
key = "dc2.key"

[[vms]]
name = "web1"
primary = "dc1"
backup = "dc2"
guest_image = "guest.elf"
memory_mib = 32
[vms.network]
tap = "tap0"
mac = "52:54:00:12:34:01"
address = "192.0.2.10/24"

[[vms]]
name = "db1"
primary = "dc1"
backup = "dc2"
guest_image = "guest.elf"
memory_mib = 32
[vms.network]
tap = "tap1"
mac = "52:54:00:12:34:02"
address = "192.0.2.11/24"

[[vms]]
name = "mail1"
primary = "dc2"
backup = "dc1"
guest_image = "guest.elf"
memory_mib = 32
disk = "mail1.img"
[vms.network]
tap = "tap2"
mac = "52:54:00:12:34:03"
address = "192.0.2.12/24"
{groups}
"#
        );
        match Config::parse(&text, Path::new("t.toml"), Path::new("/"), Vec::new()) {
            Ok(_) => Vec::new(),
            Err(e) if e.issues().is_empty() => vec![e.to_string()],
            Err(e) => e.issues().iter().map(|i| i.to_string()).collect(),
        }
    }

    #[test]
    fn a_group_of_vms_sharing_their_sites_is_accepted() {
        assert_eq!(
            issues("[[groups]]\nname = \"shop\"\nvms = [\"web1\", \"db1\"]\n"),
            Vec::<String>::new()
        );
    }

    /// A `[[vms]]` entry at dc1 backed up at dc2, with a disk if `disk`.
    fn vm_at_dc1(name: &str, n: u8, disk: bool) -> String {
        let disk = if disk {
            format!("disk = \"{name}.img\"\n")
        } else {
            String::new()
        };
        format!(
            "[[vms]]\nname = \"{name}\"\nprimary = \"dc1\"\nbackup = \"dc2\"\n\
             guest_image = \"guest.elf\"\nmemory_mib = 32\n{disk}[vms.network]\n\
             tap = \"tapx{n}\"\nmac = \"52:54:00:12:35:{n:02x}\"\naddress = \"192.0.2.{}/24\"\n",
            100 + n
        )
    }

    #[test]
    fn a_group_s_members_have_disks_all_or_none() {
        let (a, b, c) = (
            vm_at_dc1("db2", 1, true),
            vm_at_dc1("db3", 2, true),
            vm_at_dc1("web2", 3, false),
        );
        let all = issues(&format!(
            "{a}{b}[[groups]]\nname = \"shop\"\nvms = [\"db2\", \"db3\"]\n"
        ));
        assert_eq!(all, Vec::<String>::new());
        let mixed = issues(&format!(
            "{a}{c}[[groups]]\nname = \"shop\"\nvms = [\"db2\", \"web2\"]\n"
        ));
        assert!(
            mixed.iter().any(|i| i.contains("groups[0].vms[1]")
                && i.contains("every member with a `disk` or none")
                && i.contains("\"web2\" has no `disk`")),
            "{mixed:?}"
        );
    }

    #[test]
    fn each_bad_group_names_its_key() {
        let cases = [
            ("[[groups]]\nname = \"shop\"\nvms = [\"web1\"]\n", "groups[0].vms"),
            ("[[groups]]\nname = \"shop\"\nvms = [\"web1\", \"nope\"]\n", "groups[0].vms[1]"),
            ("[[groups]]\nname = \"web1\"\nvms = [\"web1\", \"db1\"]\n", "groups[0].name"),
            ("[[groups]]\nname = \"shop\"\nvms = [\"web1\", \"mail1\"]\n", "groups[0].vms[1]"),
            (
                "[[groups]]\nname = \"a\"\nvms = [\"web1\", \"db1\"]\n[[groups]]\nname = \"b\"\nvms = [\"db1\", \"web1\"]\n",
                "groups[1].vms[0]",
            ),
            ("[[groups]]\nname = \"shop\"\nvms = [\"web1\", \"db1\"]\ncolour = 1\n", "colour"),
        ];
        for (text, key) in cases {
            let found = issues(text);
            assert!(
                found.iter().any(|i| i.contains(key)),
                "{text}: expected an issue at {key}, found {found:?}"
            );
        }
    }
}
