//! The RFC 2136 + TSIG updater against a real Knot DNS server on loopback.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use netops::dns::{encode_base64, DnsError, DnsUpdater, RecordUpdate, TsigAlgorithm};

const KEY_NAME: &str = "remus-key.";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A port free on 127.0.0.1 for both TCP and UDP (bounded attempts).
fn free_port() -> u16 {
    for _ in 0..50 {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

struct Knot {
    port: u16,
    _daemon: Daemon,
}

impl Knot {
    fn start(dir: &Path) -> Knot {
        let port = free_port();
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(
            dir.join("example.com.zone"),
            "$ORIGIN example.com.\n$TTL 300\n\
             @ SOA ns1.example.com. hostmaster.example.com. 1 3600 600 86400 300\n\
             @ NS ns1.example.com.\n\
             ns1 A 192.0.2.53\n\
             web1 A 198.51.100.10\n",
        )
        .unwrap();
        let conf = format!(
            r#"server:
    rundir: "{dir}"
    listen: 127.0.0.1@{port}
log:
  - target: stderr
    any: info
database:
    storage: "{dir}/db"
key:
  - id: {KEY_NAME}
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: update_acl
    key: {KEY_NAME}
    action: update
template:
  - id: default
    storage: "{dir}"
    file: "%s.zone"
zone:
  - domain: example.com
    acl: update_acl
"#,
            dir = dir.display(),
            secret = encode_base64(SECRET),
        );
        let conf_path = dir.join("knot.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new("knotd");
        cmd.arg("-c").arg(&conf_path);
        let mut daemon = Daemon::spawn("knotd", cmd, &dir.join("knotd.log"));
        // Bounded wait until the zone answers.
        let mut ready = false;
        for _ in 0..100 {
            daemon.assert_running();
            let out = output(Command::new("kdig").args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+short",
                "+timeout=1",
                "+retry=0",
                "example.com",
                "SOA",
            ]));
            if out.contains("hostmaster") {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ready, "knotd never served the zone:\n{}", daemon.log_text());
        Knot {
            port,
            _daemon: daemon,
        }
    }

    fn log(&self) -> String {
        self._daemon.log_text()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn dig(&self, name: &str, rtype: &str) -> String {
        output(Command::new("kdig").args([
            "@127.0.0.1",
            "-p",
            &self.port.to_string(),
            "+short",
            "+timeout=2",
            "+retry=0",
            name,
            rtype,
        ]))
        .trim()
        .to_string()
    }
}

fn updater(knot: &Knot, zone: &str, key: &str, secret: &[u8]) -> DnsUpdater {
    DnsUpdater::new(
        knot.addr(),
        zone,
        key,
        TsigAlgorithm::HmacSha256,
        secret.to_vec(),
        Duration::from_secs(5),
    )
    .unwrap()
}

#[test]
fn knot_applies_signed_updates_and_refuses_bad_keys() {
    if !preflight_no_root("knot_applies_signed_updates", &["knotd", "kdig"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let knot = Knot::start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let good = updater(&knot, "example.com", KEY_NAME, SECRET);
        good.update(&[
            RecordUpdate {
                name: "web1.example.com".into(),
                ttl: 30,
                address: "203.0.113.10".parse().unwrap(),
            },
            RecordUpdate {
                name: "web1-v6.example.com".into(),
                ttl: 30,
                address: "2001:db8::10".parse().unwrap(),
            },
        ])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", knot.log()));
        assert_eq!(knot.dig("web1.example.com", "A"), "203.0.113.10");
        assert_eq!(knot.dig("web1-v6.example.com", "AAAA"), "2001:db8::10");

        // Moving again replaces (never adds to) the record.
        good.update(&[RecordUpdate {
            name: "web1.example.com".into(),
            ttl: 30,
            address: "198.51.100.20".parse().unwrap(),
        }])
        .await
        .unwrap();
        assert_eq!(knot.dig("web1.example.com", "A"), "198.51.100.20");

        // Switching a name from IPv4 to IPv6 removes the A record.
        good.update(&[RecordUpdate {
            name: "web1.example.com".into(),
            ttl: 30,
            address: "2001:db8::20".parse().unwrap(),
        }])
        .await
        .unwrap();
        assert_eq!(knot.dig("web1.example.com", "AAAA"), "2001:db8::20");
        assert_eq!(knot.dig("web1.example.com", "A"), "");

        // Wrong secret: refused, reported, nothing changes.
        let bad = updater(
            &knot,
            "example.com",
            KEY_NAME,
            b"not-the-right-secret-at-all!!!!!",
        );
        let err = bad
            .update(&[RecordUpdate {
                name: "web1.example.com".into(),
                ttl: 30,
                address: "192.0.2.99".parse().unwrap(),
            }])
            .await
            .unwrap_err();
        eprintln!("wrong secret: {err}");
        assert!(
            matches!(&err, DnsError::BadTsig { detail, .. } if detail.contains("BadSig")),
            "{err:?}"
        );
        assert_eq!(knot.dig("web1.example.com", "AAAA"), "2001:db8::20");

        // Unknown key name: refused and reported.
        let unknown = updater(&knot, "example.com", "nobody.", SECRET);
        let err = unknown
            .update(&[RecordUpdate {
                name: "web1.example.com".into(),
                ttl: 30,
                address: "192.0.2.99".parse().unwrap(),
            }])
            .await
            .unwrap_err();
        eprintln!("unknown key: {err}");
        assert!(
            matches!(&err, DnsError::BadTsig { detail, .. } if detail.contains("BadKey")),
            "{err:?}"
        );

        // A zone the server does not serve: NOTAUTH.
        let other = updater(&knot, "example.org", KEY_NAME, SECRET);
        let err = other
            .update(&[RecordUpdate {
                name: "web1.example.org".into(),
                ttl: 30,
                address: "192.0.2.99".parse().unwrap(),
            }])
            .await
            .unwrap_err();
        eprintln!("other zone: {err}");
        assert!(
            matches!(&err, DnsError::Rejected { rcode, .. } if rcode.contains("Not authorized")),
            "{err:?}"
        );
        assert_eq!(knot.dig("web1.example.com", "AAAA"), "2001:db8::20");
    });
}
