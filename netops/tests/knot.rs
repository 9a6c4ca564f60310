//! The RFC 2136 + TSIG updater against a real Knot DNS server on loopback.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use netops::dns::{
    encode_base64, DnsError, DnsUpdater, Fence, RecordUpdate, RetryPolicy, TsigAlgorithm,
};

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
        Self::start_on(dir, free_port())
    }

    fn start_on(dir: &Path, port: u16) -> Knot {
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

fn fence(token: u64, site: &str) -> Fence {
    Fence {
        token,
        site: site.into(),
    }
}

fn web1(address: &str) -> RecordUpdate {
    RecordUpdate {
        name: "web1.example.com".into(),
        ttl: 30,
        address: address.parse().unwrap(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
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
        let f = fence(1, "dc2");
        good.update(
            &[
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
            ],
            &f,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", knot.log()));
        assert_eq!(knot.dig("web1.example.com", "A"), "203.0.113.10");
        assert_eq!(knot.dig("web1-v6.example.com", "AAAA"), "2001:db8::10");
        // The fence record of each name travels with it.
        assert_eq!(
            knot.dig("_remus-wan.web1.example.com", "TXT"),
            "\"remus-wan fencing-token=1 site=dc2\""
        );
        assert_eq!(
            knot.dig("_remus-wan.web1-v6.example.com", "TXT"),
            "\"remus-wan fencing-token=1 site=dc2\""
        );

        // Moving again replaces (never adds to) the record.
        good.update(&[RecordUpdate {
            name: "web1.example.com".into(),
            ttl: 30,
            address: "198.51.100.20".parse().unwrap(),
        }], &f)
        .await
        .unwrap();
        assert_eq!(knot.dig("web1.example.com", "A"), "198.51.100.20");

        // Switching a name from IPv4 to IPv6 removes the A record.
        good.update(&[RecordUpdate {
            name: "web1.example.com".into(),
            ttl: 30,
            address: "2001:db8::20".parse().unwrap(),
        }], &f)
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
            }], &f)
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
            }], &f)
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
            }], &f)
            .await
            .unwrap_err();
        eprintln!("other zone: {err}");
        // The fence record's query comes first: Knot refuses queries for a
        // zone it does not serve.
        assert!(
            matches!(&err, DnsError::Rejected { rcode, .. } if rcode.contains("Refused") || rcode.contains("Not authorized")),
            "{err:?}"
        );
        assert_eq!(knot.dig("web1.example.com", "AAAA"), "2001:db8::20");
    });
}

/// RFC 2136 prerequisite on the fence record: a site holding an older
/// fencing token cannot overwrite what a newer one wrote, whether it reads
/// the newer record first (refused before sending) or read before the
/// newer write (the server refuses the UPDATE; it reads again and stops).
#[test]
fn knot_keeps_a_stale_site_from_overwriting_a_newer_record() {
    if !preflight_no_root(
        "knot_keeps_a_stale_site_from_overwriting",
        &["knotd", "kdig"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let knot = Knot::start(dir.path());
    runtime().block_on(async {
        let u = updater(&knot, "example.com", KEY_NAME, SECRET);
        // dc1 read the records while it still held token 4...
        let seen_by_dc1 = u.read_fences(&[web1("192.0.2.1")]).await.unwrap();
        assert_eq!(seen_by_dc1.names[0].rrset, None);
        // ...then dc2 took over under token 5.
        u.update(&[web1("192.0.2.2")], &fence(5, "dc2"))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", knot.log()));
        assert_eq!(knot.dig("web1.example.com", "A"), "192.0.2.2");

        // dc1's UPDATE built on its old read: the prerequisite fails.
        let err = u
            .update_once(&[web1("192.0.2.1")], &fence(4, "dc1"), &seen_by_dc1)
            .await
            .unwrap_err();
        assert!(matches!(err, DnsError::Conflict { .. }), "{err:?}");
        // The whole update with retries: reads again, finds token 5, stops.
        let err = u
            .update(&[web1("192.0.2.1")], &fence(4, "dc1"))
            .await
            .unwrap_err();
        eprintln!("stale site: {err}");
        assert!(
            matches!(&err, DnsError::Stale { current: 5, ours: 4, current_site: Some(s), .. } if s == "dc2"),
            "{err:?}"
        );
        assert_eq!(knot.dig("web1.example.com", "A"), "192.0.2.2");
        assert_eq!(
            knot.dig("_remus-wan.web1.example.com", "TXT"),
            "\"remus-wan fencing-token=5 site=dc2\""
        );

        // The same token again (a retry after a lost answer) and a newer
        // one both write.
        u.update(&[web1("192.0.2.2")], &fence(5, "dc2")).await.unwrap();
        u.update(&[web1("192.0.2.1")], &fence(6, "dc1")).await.unwrap();
        assert_eq!(knot.dig("web1.example.com", "A"), "192.0.2.1");
        assert_eq!(
            knot.dig("_remus-wan.web1.example.com", "TXT"),
            "\"remus-wan fencing-token=6 site=dc1\""
        );
    });
}

/// Two sites updating at once from the same read: the server applies one
/// UPDATE and refuses the other; with retries, the record always ends up
/// with the higher token's address.
#[test]
fn knot_lets_one_of_two_concurrent_updates_win() {
    if !preflight_no_root(
        "knot_lets_one_of_two_concurrent_updates_win",
        &["knotd", "kdig"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let knot = Knot::start(dir.path());
    runtime().block_on(async {
        let u = updater(&knot, "example.com", KEY_NAME, SECRET);
        let mut token = 10;
        for round in 0..5 {
            let seen = u.read_fences(&[web1("192.0.2.1")]).await.unwrap();
            let (r1, r2) = ([web1("192.0.2.1")], [web1("192.0.2.2")]);
            let (f1, f2) = (fence(token + 1, "dc1"), fence(token + 2, "dc2"));
            let (a, b) = tokio::join!(
                u.update_once(&r1, &f1, &seen),
                u.update_once(&r2, &f2, &seen),
            );
            assert!(
                a.is_ok() != b.is_ok(),
                "round {round}: exactly one must win: {a:?} {b:?}\n{}",
                knot.log()
            );
            let loser = a.err().or(b.err()).unwrap();
            assert!(matches!(loser, DnsError::Conflict { .. }), "{loser:?}");
            token += 2;
        }
        for _ in 0..5 {
            let (r1, r2) = ([web1("192.0.2.1")], [web1("192.0.2.2")]);
            let (f1, f2) = (fence(token + 1, "dc1"), fence(token + 2, "dc2"));
            let (a, b) = tokio::join!(u.update(&r1, &f1), u.update(&r2, &f2));
            b.unwrap_or_else(|e| panic!("the newer token must win: {e}\n{}", knot.log()));
            if let Err(e) = a {
                assert!(matches!(e, DnsError::Stale { .. }), "{e:?}");
            }
            assert_eq!(knot.dig("web1.example.com", "A"), "192.0.2.2");
            assert_eq!(
                knot.dig("_remus-wan.web1.example.com", "TXT"),
                format!("\"remus-wan fencing-token={} site=dc2\"", token + 2)
            );
            token += 2;
        }
    });
}

/// No server yet: the update retries with backoff (logged) and succeeds
/// once Knot starts; with a short deadline it gives up, bounded.
#[test]
fn knot_started_late_still_gets_the_update() {
    if !preflight_no_root(
        "knot_started_late_still_gets_the_update",
        &["knotd", "kdig"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let rt = runtime();
    let make = |deadline: Duration| {
        DnsUpdater::new(
            addr,
            "example.com",
            KEY_NAME,
            TsigAlgorithm::HmacSha256,
            SECRET.to_vec(),
            Duration::from_secs(2),
        )
        .unwrap()
        .with_retry(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            deadline,
        })
    };
    // Nobody answers: bounded.
    let start = std::time::Instant::now();
    let err = rt
        .block_on(make(Duration::from_millis(700)).update(&[web1("192.0.2.2")], &fence(1, "dc2")))
        .unwrap_err();
    assert!(matches!(err, DnsError::GaveUp { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    let pending = rt.spawn({
        let u = make(Duration::from_secs(30));
        async move { u.update(&[web1("192.0.2.2")], &fence(1, "dc2")).await }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let knot = Knot::start_on(dir.path(), port);
    let report = rt
        .block_on(pending)
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", knot.log()));
    assert!(report.attempts > 1, "{report:?}");
    assert_eq!(knot.dig("web1.example.com", "A"), "192.0.2.2");
}
