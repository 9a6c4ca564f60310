//! FEC-protected replication links on loopback, through the WAN emulator:
//! epochs arrive intact and in order with losses rebuilt from repair
//! datagrams, sites with and without FEC interoperate, and a peer's
//! nonsense datagram closes the link with a typed error. No wall-clock
//! assertions: every wait is bounded by a generous timeout.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use wan::emulator::{Emulator, EmulatorConfig, LinkParams};
use wan::session::{EpochKind, ReceiverConfig, ReceiverEvent, SenderConfig, SenderEvent};
use wan::transport::bench::write_test_pki;
use wan::transport::fec::link::FecTotals;
use wan::transport::replication::{spawn_receiver, spawn_sender, QuicDialer, QuicListener};
use wan::transport::{Endpoint, TlsPaths, TransportConfig, CLOSE_FEC_ERROR};

const WAIT: Duration = Duration::from_secs(60);

fn tcfg(dir: &Path, site: &str, fec: bool) -> TransportConfig {
    let mut c = TransportConfig::new(TlsPaths::in_dir(dir, site));
    if site == "dc2" {
        c.allowed_clients = vec!["dc1".into()];
    }
    c.fec = fec;
    c
}

fn bind(cfg: TransportConfig) -> Endpoint {
    Endpoint::bind("127.0.0.1:0".parse().unwrap(), cfg).unwrap()
}

fn payload(epoch: u64, size: usize) -> Bytes {
    let mut x = epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Bytes::from(
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

/// Replicates `n` epochs one after the other (each pushed once the
/// previous one committed: every epoch is its own burst) from a primary
/// with `fec_a` to a backup with `fec_b` through a lossy link; checks every
/// epoch's bytes and order. Returns (primary, backup) endpoints.
/// What [`replicate`] leaves: both endpoints, and the FEC figures of the
/// sender's status and of the receiver's handle (what the VM's metrics
/// show at each site).
struct Replicated {
    primary: Endpoint,
    backup: Endpoint,
    sender: Option<FecTotals>,
    receiver: Option<FecTotals>,
}

/// Replicates `n` epochs through the emulator with `loss`.
async fn replicate(fec_a: bool, fec_b: bool, loss: f64, n: u64) -> Replicated {
    let tmp = tempfile::tempdir().unwrap();
    write_test_pki(tmp.path()).unwrap();
    let backup = bind(tcfg(tmp.path(), "dc2", fec_b));
    let emu = Emulator::start(EmulatorConfig::new(backup.local_addr().unwrap()).with_link(
        LinkParams::symmetric(Duration::from_millis(20), loss, Some(40_000_000)),
    ))
    .await
    .unwrap();
    let mut rc = ReceiverConfig::new("dc2", "web1");
    rc.peer_timeout = Duration::from_secs(5);
    let (rh, mut rev) = spawn_receiver(QuicListener::new(backup.clone()), rc, 0);
    let receiver = rh.clone();
    let (applied_tx, mut applied) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = rev.recv().await {
            if let ReceiverEvent::Epoch {
                epoch, payload: p, ..
            } = ev
            {
                assert_eq!(p, payload(epoch, p.len()), "epoch {epoch} corrupted");
                let _ = applied_tx.send(epoch);
                if rh.commit(epoch).await.is_err() {
                    return;
                }
            }
        }
    });
    let primary = bind(tcfg(tmp.path(), "dc1", fec_a));
    let mut sc = SenderConfig::new("dc1", "web1");
    sc.peer_timeout = Duration::from_secs(5);
    let (sh, mut sev) = spawn_sender(
        QuicDialer {
            endpoint: primary.clone(),
            addr: emu.local_addr(),
            peer_site: "dc2".into(),
        },
        sc,
        1,
    );
    for e in 1..=n {
        let kind = if e == 1 {
            EpochKind::Full
        } else {
            EpochKind::Delta
        };
        sh.push_epoch(kind, payload(e, 200_000 + e as usize * 7_919))
            .await
            .unwrap();
        tokio::time::timeout(WAIT, async {
            while let Some(ev) = sev.recv().await {
                if matches!(ev, SenderEvent::Committed { epoch } if epoch >= e) {
                    return;
                }
            }
            panic!("sender stopped");
        })
        .await
        .unwrap_or_else(|_| panic!("epoch {e} not committed in time"));
    }
    let mut got = Vec::new();
    while let Ok(e) = applied.try_recv() {
        got.push(e);
    }
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
    let st = emu.handle().stats();
    assert!(st.forward.lost + st.backward.lost > 0, "{st:?}");
    let sender = sh.status().fec;
    sh.close().await;
    Replicated {
        primary,
        backup,
        sender,
        receiver: receiver.fec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_arrive_intact_and_losses_are_rebuilt_from_repairs() {
    // 3 % loss, ~150 packets per epoch: losses in nearly every epoch (the
    // chance of none at all in 10 epochs is below 1e-60).
    let Replicated {
        primary,
        backup,
        sender,
        receiver,
    } = replicate(true, true, 0.03, 10).await;
    let a = primary.fec_totals();
    let b = backup.fec_totals();
    assert!(a.datagrams_sent > 0, "{a:?}");
    // The sender's status (what the VM's metrics show) counts its links'
    // datagrams: all of this endpoint's, up to the last status refresh.
    let s = sender.expect("a FEC link's figures in the sender's status");
    assert!(
        s.datagrams_sent > 0 && s.datagrams_sent <= a.datagrams_sent,
        "{s:?} vs {a:?}"
    );
    // Likewise the receiver's handle: the shards it rebuilt (every epoch
    // was applied before the last commit, so they are counted).
    let r = receiver.expect("a FEC link's figures in the receiver's handle");
    assert!(
        r.recovered_shards > 0 && r.recovered_shards <= b.recovered_shards,
        "{r:?} vs {b:?}"
    );
    assert!(b.recovered_shards > 0, "{b:?}");
    assert!(b.decoded_windows > 0, "{b:?}");
    // The backup's commit messages are mirrored too.
    assert!(b.datagrams_sent > 0, "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_with_and_without_fec_interoperate() {
    // The backup does not ask for repairs: the primary sends none.
    let Replicated {
        primary, backup, ..
    } = replicate(true, false, 0.01, 4).await;
    assert_eq!(primary.fec_totals().datagrams_sent, 0);
    assert_eq!(backup.fec_totals(), Default::default());
    // The primary asks, the backup has no FEC: plain stream both ways.
    let Replicated {
        primary,
        backup,
        sender,
        ..
    } = replicate(false, true, 0.01, 4).await;
    assert_eq!(primary.fec_totals(), Default::default());
    assert_eq!(sender, None, "no FEC link, no FEC figures");
    assert_eq!(backup.fec_totals().datagrams_sent, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonsense_datagram_closes_the_link_with_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_test_pki(tmp.path()).unwrap();
    let server = bind(tcfg(tmp.path(), "dc2", true));
    let client = bind(tcfg(tmp.path(), "dc1", false));
    let addr = server.local_addr().unwrap();
    let s2 = server.clone();
    let accept = tokio::spawn(async move {
        let conn = s2.accept().await.unwrap();
        let (send, recv) = conn.accept_bi().await.unwrap();
        let mut link = s2.replication_link(conn, send, recv, "dc1".into());
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        loop {
            match link.read.read(&mut buf).await {
                Ok(0) => panic!("EOF instead of an error"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, e),
            }
        }
    });
    let conn = client.connect(addr, "dc2").await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"first bytes").await.unwrap();
    // A window whose length does not match its shards.
    let mut bogus = vec![b'R'];
    bogus.extend_from_slice(&0u64.to_be_bytes());
    bogus.extend_from_slice(&100_000u32.to_be_bytes());
    bogus.extend_from_slice(&[0x04, 0x00, 0x00, 0x01, 0x00, 0x04, 0x00, 0x00]);
    bogus.resize(bogus.len() + 1024, 0);
    conn.quinn().send_datagram(Bytes::from(bogus)).unwrap();
    let (got, err) = tokio::time::timeout(WAIT, accept)
        .await
        .expect("the reader saw the error")
        .unwrap();
    assert!(b"first bytes".starts_with(&got), "{got:?}");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("window length"), "{err}");
    let closed = tokio::time::timeout(WAIT, conn.quinn().closed())
        .await
        .expect("closed");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(CLOSE_FEC_ERROR));
        }
        other => panic!("closed by {other:?}"),
    }
}
