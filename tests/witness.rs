//! The witness over real QUIC with mutual TLS on loopback: grants, refusals,
//! durable tokens across a restart, foreign certificates refused, garbage
//! survived.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use failover::{Message, SiteId, Timers};
use remus_wan::certs::{init_site, InitOptions};
use remus_wan::witness::frame::{read_message, write_message};
use remus_wan::witness::{WitnessOptions, WitnessServer};
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

fn pki(dir: &Path) {
    for site in ["dc1", "dc2", "witness"] {
        init_site(&InitOptions {
            site: site.into(),
            out: dir.to_owned(),
            ca_dir: None,
            days: 2,
        })
        .expect("certs");
    }
}

fn timers() -> Timers {
    Timers {
        heartbeat_interval: Duration::from_millis(50),
        detection_timeout: Duration::from_millis(600),
        lease: Duration::from_millis(400),
        renew_interval: Duration::from_millis(100),
        clock_margin: Duration::from_millis(20),
    }
}

fn start(
    pki: &Path,
    state: &Path,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let server = WitnessServer::bind(WitnessOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: TlsPaths::in_dir(pki, "witness"),
        sites: vec!["dc1".into(), "dc2".into()],
        timers: timers(),
        state_dir: state.to_owned(),
    })
    .expect("witness binds");
    let addr = server.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

struct Client {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _endpoint: Endpoint,
    _conn: wan::transport::Connection,
    req: u64,
}

impl Client {
    async fn connect(tls: TlsPaths, witness: SocketAddr) -> Result<Self, String> {
        let endpoint = Endpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            TransportConfig::new(tls),
        )
        .map_err(|e| e.to_string())?;
        let conn = endpoint
            .connect(witness, "witness")
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(Self {
            send,
            recv,
            _endpoint: endpoint,
            _conn: conn,
            req: 0,
        })
    }

    /// Asks for the lease; returns (granted, token, holder).
    async fn request(&mut self, token: u64) -> (bool, u64, Option<SiteId>) {
        self.req += 1;
        let msg = Message::LeaseRequest {
            req: self.req,
            token,
        };
        write_message(&mut self.send, "web1", &msg)
            .await
            .expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(10), read_message(&mut self.recv))
            .await
            .expect("witness answers in time")
            .expect("valid reply")
            .expect("stream open");
        match reply {
            (
                vm,
                Message::LeaseReply {
                    req,
                    granted,
                    token,
                    holder,
                },
            ) => {
                assert_eq!(vm, "web1");
                assert_eq!(req, self.req);
                (granted.is_some(), token, holder)
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

#[tokio::test]
async fn one_holder_at_a_time_and_tokens_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let state = dir.path().join("state");
    let (addr, stop, task) = start(&pki_dir, &state);

    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    let mut dc2 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    assert_eq!(dc1.request(0).await, (true, 1, Some(SiteId(1))));
    assert_eq!(dc2.request(0).await, (false, 1, Some(SiteId(1))));
    assert_eq!(
        dc1.request(1).await,
        (true, 1, Some(SiteId(1))),
        "renewal keeps the token"
    );
    let stored = std::fs::read_to_string(state.join("witness-leases.json")).expect("persisted");
    assert!(stored.contains("\"dc1\""), "{stored}");

    // Restart the witness on the same state.
    let _ = stop.send(());
    task.await.expect("witness task");
    drop((dc1, dc2));
    let (addr, stop, task) = start(&pki_dir, &state);
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    let mut dc2 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    // Right after a restart nobody but the recorded holder gets the lease.
    assert_eq!(dc2.request(1).await, (false, 1, Some(SiteId(1))));
    assert_eq!(dc1.request(1).await, (true, 1, Some(SiteId(1))));
    // dc1 stops renewing: once its lease has run out, dc2 gets a new token.
    let mut granted = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = dc2.request(1).await;
        if r.0 {
            granted = Some(r);
            break;
        }
    }
    assert_eq!(granted, Some((true, 2, Some(SiteId(2)))));
    // And the old holder is refused, learning the newer token.
    assert_eq!(dc1.request(1).await, (false, 2, Some(SiteId(2))));
    let _ = stop.send(());
    task.await.expect("witness task");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let other = dir.path().join("other");
    pki(&other);
    let (addr, stop, task) = start(&pki_dir, &dir.path().join("state"));
    let err = match Client::connect(TlsPaths::in_dir(&other, "dc1"), addr).await {
        Ok(mut c) => {
            // The handshake may complete on the client before the server
            // refuses; then the first request fails instead.
            c.req += 1;
            let msg = Message::LeaseRequest { req: 1, token: 0 };
            let _ = write_message(&mut c.send, "web1", &msg).await;
            match tokio::time::timeout(Duration::from_secs(10), read_message(&mut c.recv)).await {
                Ok(Ok(Some(r))) => panic!("a foreign certificate got an answer: {r:?}"),
                _ => "refused after handshake".to_string(),
            }
        }
        Err(e) => e,
    };
    assert!(!err.is_empty());
    // The witness still serves its own sites.
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    assert!(dc1.request(0).await.0);
    let _ = stop.send(());
    task.await.expect("witness task");
}

#[tokio::test]
async fn garbage_closes_that_stream_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let (addr, stop, task) = start(&pki_dir, &dir.path().join("state"));
    let mut bad = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    bad.send
        .write_all(&[40, 0, 9, 9, 9, 9])
        .await
        .expect("write");
    bad.send.write_all(&[0u8; 40]).await.expect("write");
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    assert_eq!(dc1.request(0).await, (true, 1, Some(SiteId(1))));
    let _ = stop.send(());
    task.await.expect("witness task");
}

#[test]
fn witness_cli_refuses_a_config_without_witness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/two-site.toml"),
    )
    .expect("example");
    let start = text.find("[witness]").expect("witness section");
    let end = text.find("[[vms]]").expect("vms");
    std::fs::write(&cfg, format!("{}{}", &text[..start], &text[end..])).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_remus-wan"))
        .args(["witness", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[witness]"));
}
