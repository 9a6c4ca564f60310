//! Two sites on loopback: mutual TLS, streaming epochs, refusals, a link
//! cut through the WAN emulator, oversized epochs. No wall-clock
//! assertions: every wait is bounded by a generous timeout.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use wan::emulator::{Emulator, EmulatorConfig, LinkParams};
use wan::session::wire::{self, ControlFrame, Decoder, Hello, Item};
use wan::session::{
    Backoff, EpochKind, PushError, ReceiverConfig, ReceiverEvent, SenderConfig, SenderEvent,
    SessionError,
};
use wan::transport::replication::{
    spawn_receiver, spawn_sender, HandleError, QuicDialer, QuicListener, ReceiverHandle,
};
use wan::transport::{CongestionControl, Endpoint, TlsPaths, TransportConfig, TransportError};

const LOCAL: &str = "127.0.0.1:0";
const WAIT: Duration = Duration::from_secs(60);

/// A CA written as `ca.pem` in `dir`, able to sign site certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(dir: &Path, cn: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Self {
            issuer: Issuer::new(p, key),
        }
    }

    /// `<site>.pem` / `<site>.key` in `dir`, SAN = CN = `site`.
    fn site(&self, dir: &Path, site: &str) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![site.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, site);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{site}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{site}.key")), key.serialize_pem()).unwrap();
    }
}

/// One CA with dc1, dc2 and dc3; and a foreign CA with its own dc1.
struct Pki {
    _tmp: tempfile::TempDir,
    good: std::path::PathBuf,
    foreign: std::path::PathBuf,
}

fn pki() -> Pki {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::create_dir_all(&foreign).unwrap();
    let ca = Ca::new(&good, "remus-wan site CA");
    for s in ["dc1", "dc2", "dc3"] {
        ca.site(&good, s);
    }
    let other = Ca::new(&foreign, "remus-wan site CA");
    other.site(&foreign, "dc1");
    other.site(&foreign, "dc2");
    Pki {
        _tmp: tmp,
        good,
        foreign,
    }
}

fn tcfg(dir: &Path, site: &str, allowed: &[&str]) -> TransportConfig {
    let mut c = TransportConfig::new(TlsPaths::in_dir(dir, site));
    c.allowed_clients = allowed.iter().map(|s| s.to_string()).collect();
    c
}

fn bind(cfg: TransportConfig) -> Endpoint {
    Endpoint::bind(LOCAL.parse().unwrap(), cfg).unwrap()
}

fn payload(epoch: u64, size: usize) -> Bytes {
    let mut v = vec![0u8; size];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (epoch as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    Bytes::from(v)
}

/// The backup's engine: checks every epoch applies on top of the replica
/// (delta = replica + 1, full = newer) and its bytes, then commits.
fn spawn_engine(
    handle: ReceiverHandle,
    mut events: mpsc::UnboundedReceiver<ReceiverEvent>,
) -> (
    mpsc::UnboundedReceiver<u64>,
    mpsc::UnboundedReceiver<SessionError>,
) {
    let (applied_tx, applied_rx) = mpsc::unbounded_channel();
    let (err_tx, err_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut replica = handle.committed();
        while let Some(ev) = events.recv().await {
            match ev {
                ReceiverEvent::Epoch {
                    epoch,
                    kind,
                    payload: p,
                } => {
                    match kind {
                        EpochKind::Delta => assert_eq!(epoch, replica + 1, "delta on wrong base"),
                        EpochKind::Full => assert!(epoch > replica),
                    }
                    assert_eq!(p, payload(epoch, p.len()), "epoch {epoch} corrupted");
                    replica = epoch;
                    let _ = applied_tx.send(epoch);
                    handle.commit(epoch).await.unwrap();
                }
                ReceiverEvent::Close { error } => {
                    let _ = err_tx.send(error);
                }
                ReceiverEvent::Hello { .. } => {}
                // Verify and disk-sync frames are not sent here.
                _ => {}
            }
        }
    });
    (applied_rx, err_rx)
}

async fn wait_committed(
    events: &mut mpsc::UnboundedReceiver<SenderEvent>,
    epoch: u64,
) -> Vec<SenderEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.recv().await {
            let done = matches!(ev, SenderEvent::Committed { epoch: e } if e >= epoch);
            seen.push(ev);
            if done {
                return;
            }
        }
        panic!("sender stopped: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("epoch {epoch} not committed in time"));
    seen
}

fn sender_cfg() -> SenderConfig {
    let mut c = SenderConfig::new("dc1", "web1");
    c.max_in_flight = 4;
    c.peer_timeout = Duration::from_secs(3);
    c.heartbeat_interval = Duration::from_millis(300);
    c.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    c
}

fn receiver_cfg() -> ReceiverConfig {
    let mut c = ReceiverConfig::new("dc2", "web1");
    c.peer_timeout = Duration::from_secs(3);
    c.heartbeat_interval = Duration::from_millis(300);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_authenticate_and_stream_epochs() {
    let pki = pki();
    let backup = bind(tcfg(&pki.good, "dc2", &["dc1"]));
    let addr = backup.local_addr().unwrap();
    let (rh, rev) = spawn_receiver(QuicListener::new(backup), receiver_cfg(), 0);
    let (mut applied, _errs) = spawn_engine(rh.clone(), rev);

    let primary = bind(tcfg(&pki.good, "dc1", &[]));
    let dialer = QuicDialer {
        endpoint: primary,
        addr,
        peer_site: "dc2".into(),
    };
    let (sh, mut sev) = spawn_sender(dialer, sender_cfg(), 1);
    let n = 20u64;
    for e in 1..=n {
        let kind = if e == 1 {
            EpochKind::Full
        } else {
            EpochKind::Delta
        };
        let size = (e as usize * 97_531) % 3_000_000 + 1;
        let got = sh.push_epoch(kind, payload(e, size)).await.unwrap();
        assert_eq!(got, e);
    }
    let seen = wait_committed(&mut sev, n).await;
    assert!(seen.iter().any(|e| matches!(
        e,
        SenderEvent::Connected { peer_site, receiver_committed: 0, resume_from: 1 } if peer_site == "dc2"
    )));
    let mut got = Vec::new();
    while let Ok(e) = applied.try_recv() {
        got.push(e);
    }
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
    assert_eq!(rh.committed(), n);
    let st = sh.status();
    assert!(st.connected);
    assert_eq!(st.committed, n);
    let link = st.link.expect("QUIC stats");
    assert!(link.cwnd > 0 && link.sent_packets > 0 && link.rtt > Duration::ZERO);
    sh.close().await;
}

async fn expect_refused(client: Endpoint, server: Endpoint, peer_site: &str) -> (String, String) {
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn(async move { tokio::time::timeout(WAIT, server.accept()).await });
    let c = tokio::time::timeout(WAIT, client.connect(addr, peer_site))
        .await
        .expect("connect finished");
    let client_err = match c {
        Err(e) => e.to_string(),
        Ok(conn) => {
            // TLS 1.3: the client may finish before the server refuses its
            // certificate; the connection then dies at once.
            let e = conn.open_bi().await.map(|_| ()).and(
                tokio::time::timeout(WAIT, conn.accept_bi())
                    .await
                    .expect("bounded")
                    .map(|_| ()),
            );
            format!("{:?}", e.expect_err("refused connection must not work"))
        }
    };
    let server_err = accept
        .await
        .unwrap()
        .expect("accept finished")
        .expect_err("server must refuse")
        .to_string();
    (client_err, server_err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = pki();
    let server = bind(tcfg(&pki.good, "dc2", &["dc1"]));
    let mut c = tcfg(&pki.foreign, "dc1", &[]);
    c.tls.ca = pki.good.join("ca.pem"); // trusts the right CA, presents a foreign cert
    let client = bind(c);
    let (ce, se) = expect_refused(client, server, "dc2").await;
    assert!(se.contains("handshake with client at"), "{se}");
    assert!(
        se.to_lowercase().contains("issuer") || se.contains("certificate"),
        "{se}"
    );
    assert!(!ce.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused() {
    let pki = pki();
    let mut s = tcfg(&pki.foreign, "dc2", &[]);
    s.tls.ca = pki.good.join("ca.pem");
    let server = bind(s);
    let client = bind(tcfg(&pki.good, "dc1", &[]));
    let (ce, _se) = expect_refused(client, server, "dc2").await;
    assert!(ce.contains("site dc2 at"), "{ce}");
    assert!(ce.contains("invalid peer certificate"), "{ce}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_ca_but_wrong_site_name_is_refused_both_ways() {
    let pki = pki();
    // The server is dc3, the client expects dc2.
    let server = bind(tcfg(&pki.good, "dc3", &[]));
    let client = bind(tcfg(&pki.good, "dc1", &[]));
    let (ce, _) = expect_refused(client, server, "dc2").await;
    assert!(ce.contains("not valid for name \"dc2\""), "{ce}");

    // The client is dc3, the server only takes dc1.
    let server = bind(tcfg(&pki.good, "dc2", &["dc1"]));
    let client = bind(tcfg(&pki.good, "dc3", &[]));
    let (_, se) = expect_refused(client, server, "dc2").await;
    assert!(
        se.contains("names none of the expected sites [\"dc1\"]"),
        "{se}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_mismatch_names_both_versions() {
    let pki = pki();
    let server = bind(tcfg(&pki.good, "dc2", &["dc1"]));
    let addr = server.local_addr().unwrap();
    let mut c = tcfg(&pki.good, "dc1", &[]);
    c.protocol_version = 2;
    let client = bind(c);
    let accept = tokio::spawn(async move { server.accept().await });
    let ce = tokio::time::timeout(WAIT, client.connect(addr, "dc2"))
        .await
        .unwrap()
        .unwrap_err();
    match &ce {
        TransportError::VersionMismatch { ours, theirs, .. } => {
            assert_eq!(ours, "remus-wan/2");
            assert_eq!(theirs, "remus-wan/1");
        }
        other => panic!("{other}"),
    }
    let se = tokio::time::timeout(WAIT, accept)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(
        se.to_string(),
        format!(
            "protocol version mismatch with site dc1 at {}: we speak remus-wan/1, the peer speaks remus-wan/2",
            client.local_addr().unwrap()
        )
    );
}

/// `bbr-bounded` with a short requested ACK delay carries every epoch
/// intact, in order, through a lossy rate-limited link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_bbr_with_a_short_ack_delay_replicates_intact_through_a_lossy_link() {
    let pki = pki();
    let tune = |mut c: TransportConfig| {
        c.congestion = CongestionControl::BoundedBbr;
        c.ack_delay = Some(Duration::from_millis(5));
        c
    };
    let backup = bind(tune(tcfg(&pki.good, "dc2", &["dc1"])));
    let baddr = backup.local_addr().unwrap();
    let emu = Emulator::start(EmulatorConfig::new(baddr).with_link(LinkParams::symmetric(
        Duration::from_millis(20),
        0.01,
        Some(40_000_000),
    )))
    .await
    .unwrap();
    let (rh, rev) = spawn_receiver(QuicListener::new(backup), receiver_cfg(), 0);
    let (mut applied, _errs) = spawn_engine(rh.clone(), rev);
    let primary = bind(tune(tcfg(&pki.good, "dc1", &[])));
    let dialer = QuicDialer {
        endpoint: primary,
        addr: emu.local_addr(),
        peer_site: "dc2".into(),
    };
    let (sh, mut sev) = spawn_sender(dialer, sender_cfg(), 1);
    let n = 12u64;
    for e in 1..=n {
        let kind = if e == 1 {
            EpochKind::Full
        } else {
            EpochKind::Delta
        };
        sh.push_epoch(kind, payload(e, 300_000 + e as usize * 1000))
            .await
            .unwrap();
    }
    wait_committed(&mut sev, n).await;
    let mut got = Vec::new();
    while let Ok(e) = applied.try_recv() {
        got.push(e);
    }
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
    let st = emu.handle().stats();
    assert!(st.forward.lost + st.backward.lost > 0, "{st:?}");
    sh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_epoch_keeps_the_replica_and_resumes_without_duplicates() {
    let pki = pki();
    let backup = bind(tcfg(&pki.good, "dc2", &["dc1"]));
    let baddr = backup.local_addr().unwrap();
    let emu = Emulator::start(EmulatorConfig::new(baddr).with_link(LinkParams::symmetric(
        Duration::from_millis(10),
        0.0,
        Some(40_000_000),
    )))
    .await
    .unwrap();
    let link = emu.handle();
    let (rh, rev) = spawn_receiver(QuicListener::new(backup), receiver_cfg(), 0);
    let (mut applied, mut rerrs) = spawn_engine(rh.clone(), rev);

    let mut pc = tcfg(&pki.good, "dc1", &[]);
    pc.idle_timeout = Duration::from_secs(4);
    pc.keep_alive = Duration::from_millis(500);
    let primary = bind(pc);
    let dialer = QuicDialer {
        endpoint: primary,
        addr: emu.local_addr(),
        peer_site: "dc2".into(),
    };
    let (sh, mut sev) = spawn_sender(dialer, sender_cfg(), 1);
    sh.push_epoch(EpochKind::Full, payload(1, 100_000))
        .await
        .unwrap();
    sh.push_epoch(EpochKind::Delta, payload(2, 50_000))
        .await
        .unwrap();
    sh.push_epoch(EpochKind::Delta, payload(3, 50_000))
        .await
        .unwrap();
    wait_committed(&mut sev, 3).await;

    // A 6 MB epoch takes over a second at 40 Mbit/s: cut once part of it passed.
    let before = link.stats().forward.bytes;
    sh.push_epoch(EpochKind::Delta, payload(4, 6_000_000))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while link.stats().forward.bytes < before + 1_000_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("epoch 4 started flowing");
    link.cut();
    // Both ends notice the silence; the receiver drops the partial epoch.
    let err = tokio::time::timeout(WAIT, rerrs.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            err,
            SessionError::Stalled { epoch: 4, .. } | SessionError::PeerTimeout(_)
        ),
        "{err}"
    );
    assert_eq!(
        rh.committed(),
        3,
        "the replica stays at its last committed epoch"
    );
    // More epochs are produced while the link is down.
    sh.push_epoch(EpochKind::Delta, payload(5, 10_000))
        .await
        .unwrap();
    sh.push_epoch(EpochKind::Delta, payload(6, 10_000))
        .await
        .unwrap();
    assert_eq!(rh.committed(), 3);
    link.heal();
    let seen = wait_committed(&mut sev, 6).await;
    assert!(
        seen.iter()
            .any(|e| matches!(e, SenderEvent::Disconnected { .. })),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(
            e,
            SenderEvent::Connected {
                receiver_committed: 3,
                resume_from: 4,
                ..
            }
        )),
        "{seen:?}"
    );
    let mut got = Vec::new();
    while let Ok(e) = applied.try_recv() {
        got.push(e);
    }
    assert_eq!(
        got,
        vec![1, 2, 3, 4, 5, 6],
        "each epoch applied exactly once, in order"
    );
    assert!(link.stats().forward.partition_drops > 0);
    sh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_epoch_is_refused_and_the_session_stays_healthy() {
    let pki = pki();
    let backup = bind(tcfg(&pki.good, "dc2", &["dc1"]));
    let addr = backup.local_addr().unwrap();
    let mut rc = receiver_cfg();
    rc.max_epoch_size = 1_000_000;
    let (rh, rev) = spawn_receiver(QuicListener::new(backup), rc, 0);
    let (mut applied, mut rerrs) = spawn_engine(rh.clone(), rev);

    let primary = bind(tcfg(&pki.good, "dc1", &[]));
    let dialer = QuicDialer {
        endpoint: primary.clone(),
        addr,
        peer_site: "dc2".into(),
    };
    let (sh, mut sev) = spawn_sender(dialer, sender_cfg(), 1);
    sh.push_epoch(EpochKind::Full, payload(1, 1000))
        .await
        .unwrap();
    wait_committed(&mut sev, 1).await;
    // The sender knows the receiver's limit from HELLO_ACK.
    assert_eq!(
        sh.push_epoch(EpochKind::Delta, payload(2, 2_000_000)).await,
        Err(HandleError::Push(PushError::EpochTooLarge {
            size: 2_000_000,
            limit: 1_000_000
        }))
    );
    sh.push_epoch(EpochKind::Delta, payload(2, 900_000))
        .await
        .unwrap();
    wait_committed(&mut sev, 2).await;
    assert_eq!(applied.recv().await, Some(1));
    assert_eq!(applied.recv().await, Some(2));
    sh.close().await;

    // A peer that ignores the limit gets an ERROR frame and a clean close;
    // the receiver keeps its replica and takes the next sender.
    let rogue_ep = bind(tcfg(&pki.good, "dc1", &[]));
    let conn = rogue_ep.connect(addr, "dc2").await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = ControlFrame::Hello(Hello {
        version: wire::PROTOCOL_VERSION,
        site: "dc1".into(),
        vm_id: "web1".into(),
        next_epoch: 3,
    });
    send.write_all(&hello.encode()).await.unwrap();
    send.write_all(&wire::encode_epoch_header(3, EpochKind::Delta, 50_000_000))
        .await
        .unwrap();
    send.write_all(&[0u8; 10_000]).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, AsyncReadExt::read_to_end(&mut recv, &mut got)).await;
    let mut d = Decoder::new();
    d.push(&got);
    let mut error = None;
    while let Ok(Some(item)) = d.next_item() {
        if let Item::Control(ControlFrame::Error(e)) = item {
            error = Some(e);
        }
    }
    let error = error.expect("an ERROR frame before the close");
    assert_eq!(error.code, wire::ErrorCode::EpochTooLarge);
    assert_eq!(error.epoch, 3);
    assert!(error
        .message
        .contains("over the receiver's limit of 1000000 bytes"));
    let err = tokio::time::timeout(WAIT, async {
        loop {
            let e = rerrs.recv().await.unwrap();
            if matches!(e, SessionError::EpochTooLarge { .. }) {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        err,
        SessionError::EpochTooLarge {
            epoch: 3,
            size: 50_000_000,
            limit: 1_000_000
        }
    );
    assert_eq!(rh.committed(), 2);

    let dialer = QuicDialer {
        endpoint: primary,
        addr,
        peer_site: "dc2".into(),
    };
    let (sh, mut sev) = spawn_sender(dialer, sender_cfg(), 3);
    sh.push_epoch(EpochKind::Delta, payload(3, 1000))
        .await
        .unwrap();
    wait_committed(&mut sev, 3).await;
    assert_eq!(applied.recv().await, Some(3));
}

async fn echo_server() -> SocketAddr {
    let s = UdpSocket::bind(LOCAL).await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        for _ in 0..100_000 {
            let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_secs(60), s.recv_from(&mut buf)).await
            else {
                return;
            };
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_relays_and_its_partition_cuts_and_heals() {
    let up = echo_server().await;
    let emu = Emulator::start(EmulatorConfig::new(up).with_link(LinkParams::symmetric(
        Duration::from_millis(20),
        0.0,
        None,
    )))
    .await
    .unwrap();
    let h = emu.handle();
    let c = UdpSocket::bind(LOCAL).await.unwrap();
    let mut buf = [0u8; 64];
    c.send_to(b"one", emu.local_addr()).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, c.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"one");
    h.cut();
    for _ in 0..5 {
        c.send_to(b"lost", emu.local_addr()).await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing crosses a cut link"
    );
    assert_eq!(h.stats().forward.partition_drops, 5);
    h.heal();
    c.send_to(b"two", emu.local_addr()).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, c.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"two");
    let s = h.stats();
    assert_eq!(s.forward.packets, 2);
    assert_eq!(s.backward.packets, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_loss_is_applied_and_counted() {
    let up = echo_server().await;
    let p = LinkParams {
        loss: 0.5,
        ..LinkParams::default()
    };
    let mut cfg = EmulatorConfig::new(up);
    cfg.forward = p;
    cfg.seed = 42;
    let emu = Emulator::start(cfg).await.unwrap();
    let c = UdpSocket::bind(LOCAL).await.unwrap();
    for _ in 0..200 {
        c.send_to(b"x", emu.local_addr()).await.unwrap();
    }
    let h = emu.handle();
    tokio::time::timeout(WAIT, async {
        loop {
            let s = h.stats().forward;
            if s.packets + s.lost == 200 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .map(|s| {
        assert!(s.lost > 50 && s.lost < 150, "{s:?}");
    })
    .unwrap();
}
