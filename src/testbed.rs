//! Local deployments on one machine, for the demo, the benchmarks and the
//! end-to-end tests: two sites on loopback ports, a micro-VM behind a tap,
//! certificates in the same folder; and the client-side check of the
//! guest's counter stream.

use std::path::{Path, PathBuf};

use crate::certs::{init_site, CertsError, InitOptions};

/// A two-site deployment (dc1 primary, dc2 backup) of VM `web1` on loopback.
#[derive(Debug, Clone)]
pub struct LocalDeployment {
    /// Folder for the configuration, PKI and disk image.
    pub dir: PathBuf,
    /// The network guest ELF.
    pub guest_image: PathBuf,
    pub epoch_interval_ms: u64,
    /// Guest memory (the bench's largest dirtying working set needs more
    /// than the 64 MiB the demo and tests use).
    pub memory_mib: u64,
    /// UDP ports of dc1 and dc2.
    pub ports: (u16, u16),
    /// Port dc1 dials to reach dc2 (a WAN emulator in front of it), if not dc2's own.
    pub dc2_connect_port: Option<u16>,
    /// Host tap (persistent, made by the caller with 192.0.2.1/24).
    pub tap: String,
    pub mac: String,
    /// UDP port of a witness on loopback: with it, takeover is automatic
    /// (fast failover timers suited to loopback).
    pub witness_port: Option<u16>,
}

impl LocalDeployment {
    /// Writes certificates for dc1 and dc2, a 4 MiB disk image and the
    /// configuration; returns the configuration's path.
    pub fn write(&self) -> Result<PathBuf, CertsError> {
        for site in ["dc1", "dc2", "witness"] {
            if !self.dir.join("pki").join(format!("{site}.pem")).exists() {
                init_site(&InitOptions {
                    site: site.into(),
                    out: self.dir.join("pki"),
                    ca_dir: None,
                    days: 2,
                })?;
            }
        }
        let io = |source| CertsError::Write {
            path: self.dir.clone(),
            source,
        };
        std::fs::File::create(self.dir.join("web1.img"))
            .and_then(|f| f.set_len(4 << 20))
            .map_err(io)?;
        let path = self.dir.join("deployment.toml");
        let vm = self.vm_text("web1", &self.tap, &self.mac, "192.0.2.10");
        std::fs::write(&path, self.config_text(&vm)).map_err(io)?;
        Ok(path)
    }

    /// As [`LocalDeployment::write`], with `count` VMs `vm1`..`vmN` (a
    /// 1 MiB disk each), all primary at dc1 and backed up at dc2: VM `i`
    /// is behind tap `<tap><i>` with MAC `<mac prefix>:<i>` at
    /// 192.0.2.(10 + i). The taps are the caller's (on one bridge holding
    /// 192.0.2.1/24).
    pub fn write_fleet(&self, count: usize) -> Result<PathBuf, CertsError> {
        self.write_fleet_with(count, None)
    }

    /// As [`LocalDeployment::write_fleet`]; with `group`, the VMs form one
    /// consistency group of that name (their disks replicate as one).
    pub fn write_fleet_with(
        &self,
        count: usize,
        group: Option<&str>,
    ) -> Result<PathBuf, CertsError> {
        self.write()?;
        let io = |source| CertsError::Write {
            path: self.dir.clone(),
            source,
        };
        let prefix = self
            .mac
            .rsplit_once(':')
            .map_or("52:54:00:12:40", |(p, _)| p);
        let mut vms = String::new();
        for i in 1..=count {
            let name = format!("vm{i}");
            let disk = self.dir.join(format!("{name}.img"));
            // Kept if there (a reload must not wipe a running VM's disk).
            if !disk.exists() {
                std::fs::File::create(&disk)
                    .and_then(|f| f.set_len(1 << 20))
                    .map_err(io)?;
            }
            let text = self.vm_text(
                &name,
                &fleet_tap(&self.tap, i),
                &format!("{prefix}:{i:02x}"),
                &fleet_address(i).to_string(),
            );
            vms.push_str(&text);
            vms.push('\n');
        }
        if let Some(g) = group {
            let names: Vec<String> = (1..=count).map(|i| format!("\"vm{i}\"")).collect();
            vms.push_str(&format!(
                "[[groups]]\nname = \"{g}\"\nvms = [{}]\n",
                names.join(", ")
            ));
        }
        let path = self.dir.join("fleet.toml");
        std::fs::write(&path, self.config_text(&vms)).map_err(io)?;
        Ok(path)
    }

    fn vm_text(&self, name: &str, tap: &str, mac: &str, address: &str) -> String {
        format!(
            "[[vms]]\nname = \"{name}\"\nprimary = \"dc1\"\nbackup = \"dc2\"\nguest_image = \"{image}\"\n\
             memory_mib = {memory}\ndisk = \"{disk}\"\n[vms.network]\ntap = \"{tap}\"\nmac = \"{mac}\"\n\
             address = \"{address}/24\"\ngateway = \"192.0.2.1\"\n",
            memory = self.memory_mib,
            image = self.guest_image.display(),
            disk = self.dir.join(format!("{name}.img")).display(),
        )
    }

    fn config_text(&self, vms: &str) -> String {
        let pki = self.dir.join("pki");
        let site = |name: &str, port: u16, connect: Option<u16>| {
            let connect = connect
                .map(|p| format!("connect = \"127.0.0.1:{p}\"\n"))
                .unwrap_or_default();
            format!(
                "[[sites]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n{connect}[sites.tls]\n\
                 ca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n",
                ca = pki.join("ca.pem").display(),
                cert = pki.join(format!("{name}.pem")).display(),
                key = pki.join(format!("{name}.key")).display(),
            )
        };
        let witness = self
            .witness_port
            .map(|p| {
                format!(
                    "[failover]\nheartbeat_ms = 100\ndetection_timeout_ms = 1000\nlease_ms = 800\n\
                     renew_ms = 200\nclock_margin_ms = 50\n\n[witness]\nname = \"witness\"\n\
                     listen = \"127.0.0.1:{p}\"\n[witness.tls]\nca = \"{ca}\"\ncert = \"{cert}\"\n\
                     key = \"{key}\"\n\n",
                    ca = pki.join("ca.pem").display(),
                    cert = pki.join("witness.pem").display(),
                    key = pki.join("witness.key").display(),
                )
            })
            .unwrap_or_default();
        format!(
            "[replication]\nepoch_interval_ms = {interval}\nmax_epochs_in_flight = 4\n\n{dc1}{dc2}{witness}{vms}",
            interval = self.epoch_interval_ms,
            dc1 = site("dc1", self.ports.0, None),
            dc2 = site("dc2", self.ports.1, self.dc2_connect_port),
        )
    }
}

/// The tap of VM `i` of a fleet whose taps start with `prefix`.
pub fn fleet_tap(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

/// The address of VM `i` of a fleet.
pub fn fleet_address(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// Checks the guest's counter stream (consecutive big-endian u64 from 0)
/// across reads of any size.
#[derive(Debug, Default)]
pub struct CounterCheck {
    /// The next value expected.
    pub next: u64,
    partial: Vec<u8>,
}

impl CounterCheck {
    /// Feeds received bytes; an error names the first value out of
    /// sequence (a gap or a duplicate).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.partial.extend_from_slice(bytes);
        let whole = self.partial.len() / 8 * 8;
        for c in self.partial[..whole].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = u64::from_be_bytes(b);
            if v != self.next {
                return Err(format!(
                    "counter stream broken: expected {}, got {v} (gap or duplicate)",
                    self.next
                ));
            }
            self.next += 1;
        }
        self.partial.drain(..whole);
        Ok(())
    }
}

/// One `disk synchronised` line of a protect log (what a sync sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSync {
    /// `full`, `incremental` or `checksum`.
    pub mode: String,
    pub sent_bytes: u64,
    pub sent_blocks: u64,
    pub took_ms: u64,
}

/// Every `disk synchronised` line of a protect log, in order.
pub fn disk_syncs(log: &str) -> Vec<DiskSync> {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        let rest = &line[at..];
        let end = rest.find(' ').unwrap_or(rest.len());
        Some(rest[..end].trim_matches('"').to_owned())
    };
    log.lines()
        .filter(|l| l.contains("disk synchronised"))
        .filter_map(|l| {
            Some(DiskSync {
                mode: field(l, "mode")?,
                sent_bytes: field(l, "sent_bytes")?.parse().ok()?,
                sent_blocks: field(l, "sent_blocks")?.parse().ok()?,
                took_ms: field(l, "took_ms")?.parse().ok()?,
            })
        })
        .collect()
}

/// Makes tap `name` in the current network namespace with the guests'
/// gateway address (192.0.2.1/24) and brings it up.
pub fn gateway_tap(name: &str) -> std::io::Result<()> {
    hypervisor::netns::ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    hypervisor::netns::ip(&["addr", "add", "192.0.2.1/24", "dev", name])?;
    hypervisor::netns::ip(&["link", "set", "dev", name, "up"])?;
    Ok(())
}

/// The path as given, or relative to the current directory made absolute.
pub fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sync_lines_are_read_from_a_log() {
        let log = "2026 INFO remus_wan::engine::protect: disk synchronised vm=web1 mode=\"checksum\" disk_bytes=4194304 sent_bytes=131072 sent_blocks=2 compared_blocks=64 took_ms=913\nother line\n";
        assert_eq!(
            disk_syncs(log),
            [DiskSync {
                mode: "checksum".into(),
                sent_bytes: 131072,
                sent_blocks: 2,
                took_ms: 913
            }]
        );
    }

    #[test]
    fn counter_check_spots_gaps_and_duplicates_across_reads() {
        let bytes: Vec<u8> = (0u64..4).flat_map(|v| v.to_be_bytes()).collect();
        let mut c = CounterCheck::default();
        c.feed(&bytes[..5]).unwrap();
        c.feed(&bytes[5..]).unwrap();
        assert_eq!(c.next, 4);
        assert!(c.feed(&6u64.to_be_bytes()).is_err());
        let mut d = CounterCheck::default();
        assert!(d.feed(&[0u8; 16]).is_err(), "0 twice is a duplicate");
    }

    #[test]
    fn the_written_deployment_is_a_valid_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("guest.elf");
        std::fs::write(&image, b"\x7fELF").unwrap();
        let d = LocalDeployment {
            dir: dir.path().to_owned(),
            guest_image: image,
            epoch_interval_ms: 50,
            memory_mib: 96,
            ports: (17001, 17002),
            dc2_connect_port: Some(17010),
            tap: "rwtest0".into(),
            mac: "52:54:00:12:39:01".into(),
            witness_port: Some(17011),
        };
        let path = d.write().unwrap();
        let cfg = crate::config::Config::load_with_env(&path, Vec::new()).unwrap();
        assert_eq!(cfg.check_files("dc1"), vec![]);
        assert_eq!(cfg.site("dc2").unwrap().connect_addr().port(), 17010);
        assert_eq!(cfg.replication.epoch_interval_ms, 50);
        assert_eq!(cfg.vms[0].memory_mib, 96);
    }

    #[test]
    fn the_written_fleet_is_a_valid_configuration_of_distinct_vms() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("guest.elf");
        std::fs::write(&image, b"\x7fELF").unwrap();
        let d = LocalDeployment {
            dir: dir.path().to_owned(),
            guest_image: image,
            epoch_interval_ms: 100,
            memory_mib: 32,
            ports: (17001, 17002),
            dc2_connect_port: None,
            tap: "rwfl".into(),
            mac: "52:54:00:12:40:00".into(),
            witness_port: Some(17011),
        };
        let path = d.write_fleet(3).unwrap();
        let cfg = crate::config::Config::load_with_env(&path, Vec::new()).unwrap();
        assert_eq!(cfg.check_files("dc1"), vec![]);
        let names: Vec<&str> = cfg.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vm1", "vm2", "vm3"]);
        let macs: Vec<&str> = cfg.vms.iter().map(|v| v.network.mac.as_str()).collect();
        assert_eq!(
            macs,
            [
                "52:54:00:12:40:01",
                "52:54:00:12:40:02",
                "52:54:00:12:40:03"
            ]
        );
        assert_eq!(cfg.vms[2].network.tap, "rwfl3");
        assert_eq!(cfg.vms[2].network.address.addr(), fleet_address(3));
    }
}
