//! The standby endpoint of a site daemon over real QUIC on loopback: each
//! stream a primary opens reaches the VM it names (failover control streams
//! by their first message, replication streams by their HELLO), with every
//! byte intact; a stream for an unknown VM, or from a site that is not the
//! VM's peer, is refused (closed) and reaches nobody; a removed VM's
//! listener ends.

mod support;

use std::path::Path;
use std::time::Duration;

use remus_wan::arbiter::demux::{Router, CONTROL_MAGIC};
use remus_wan::witness::frame::{read_message, write_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wan::session::wire::{ControlFrame, Hello, PROTOCOL_VERSION};
use wan::transport::replication::Listener;
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

const LIMIT: Duration = Duration::from_secs(20);

fn pki(dir: &Path) {
    support::pki(dir, &["dc1", "dc2", "dc3"]);
}

fn endpoint(dir: &Path, site: &str, allowed: &[&str]) -> Endpoint {
    let mut cfg = TransportConfig::new(TlsPaths::in_dir(dir, site));
    cfg.allowed_clients = allowed.iter().map(|s| s.to_string()).collect();
    Endpoint::bind("127.0.0.1:0".parse().expect("addr"), cfg).expect("bind")
}

fn hello(vm: &str) -> Vec<u8> {
    ControlFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        site: "dc1".into(),
        vm_id: vm.into(),
        next_epoch: 1,
    })
    .encode()
    .to_vec()
}

fn heartbeat() -> failover::Message {
    failover::Message::Heartbeat {
        seq: 7,
        token: 3,
        stance: failover::Stance::Active,
    }
}

/// Waits until the peer closes or resets `recv` (the router refused it).
async fn refused(mut recv: quinn::RecvStream) {
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(LIMIT, recv.read(&mut buf))
        .await
        .expect("a refused stream is closed, not left open");
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "a refused stream got data: {end:?}"
    );
}

#[tokio::test]
async fn streams_reach_the_vm_they_name_from_its_peer_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    pki(dir.path());
    let server = endpoint(dir.path(), "dc2", &["dc1", "dc3"]);
    let addr = server.local_addr().expect("addr");
    let router = Router::serve(server.clone());
    let (mut web_links, mut web_control) = router.add("web1", "dc1");
    let (mut db_links, _db_control) = router.add("db1", "dc1");
    assert_eq!(router.vms(), ["db1", "web1"]);

    let dc1 = endpoint(dir.path(), "dc1", &[]);
    let conn = dc1.connect(addr, "dc2").await.expect("connect");

    // A replication stream for db1, then one for web1 on the same
    // connection: each reaches its VM, starting with its HELLO.
    for (vm, listener) in [("db1", &mut db_links), ("web1", &mut web_links)] {
        let (mut send, _recv) = conn.open_bi().await.expect("stream");
        let mut bytes = hello(vm);
        bytes.extend_from_slice(b"epoch bytes follow");
        send.write_all(&bytes).await.expect("write");
        let mut link = tokio::time::timeout(LIMIT, listener.accept())
            .await
            .expect("routed in time")
            .expect("link");
        let mut got = vec![0u8; bytes.len()];
        link.read.read_exact(&mut got).await.expect("read");
        assert_eq!(got, bytes, "{vm}: the stream's bytes, HELLO included");
        assert!(link.peer.contains("dc1"), "{}", link.peer);
        // Keep the stream open until the end of this check.
        drop(send);
    }

    // A failover control stream for web1: its first message is handed
    // back to the reader.
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(&CONTROL_MAGIC).await.expect("magic");
    write_message(&mut send, "web1", &heartbeat())
        .await
        .expect("message");
    let mut ctl = tokio::time::timeout(LIMIT, web_control.recv())
        .await
        .expect("routed in time")
        .expect("control stream");
    let (vm, msg) = read_message(&mut ctl.read)
        .await
        .expect("read")
        .expect("a message");
    assert_eq!((vm.as_str(), msg), ("web1", heartbeat()));

    // An unknown VM: refused.
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    send.write_all(&hello("mail1")).await.expect("write");
    refused(recv).await;

    // web1 from dc3 (not its peer): refused, for both kinds of stream.
    let dc3 = endpoint(dir.path(), "dc3", &[]);
    let conn3 = dc3.connect(addr, "dc2").await.expect("connect");
    let (mut send, recv) = conn3.open_bi().await.expect("stream");
    send.write_all(&hello("web1")).await.expect("write");
    refused(recv).await;
    let (mut send, recv) = conn3.open_bi().await.expect("stream");
    send.write_all(&CONTROL_MAGIC).await.expect("magic");
    write_message(&mut send, "web1", &heartbeat())
        .await
        .expect("message");
    refused(recv).await;

    // A removed VM's listener ends, and its streams are refused.
    router.remove("web1");
    let ended = tokio::time::timeout(LIMIT, web_links.accept())
        .await
        .expect("ends in time");
    assert!(ended.is_err(), "a removed VM's listener ends");
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    send.write_all(&hello("web1")).await.expect("write");
    refused(recv).await;

    server.close();
    dc1.close();
    dc3.close();
}

/// The site daemon's replication links are FEC-protected like the
/// single-VM listener's: once the router has read a stream's HELLO, the
/// routed reader answers the primary's FEC, so the primary sends repair
/// datagrams, and every byte still arrives once and in order, the HELLO
/// the router read included.
#[tokio::test]
async fn a_routed_replication_stream_is_protected_by_fec() {
    let dir = tempfile::tempdir().expect("tempdir");
    pki(dir.path());
    let server = endpoint(dir.path(), "dc2", &["dc1"]);
    assert!(server.config().fec, "FEC is on by default");
    let addr = server.local_addr().expect("addr");
    let router = Router::serve(server.clone());
    let (mut links, _control) = router.add("web1", "dc1");

    let dc1 = endpoint(dir.path(), "dc1", &[]);
    let conn = dc1.connect(addr, "dc2").await.expect("connect");
    let (send, recv) = conn.open_bi().await.expect("stream");
    let mut primary = dc1.replication_link(conn, send, recv, "site dc2".into());
    let mut sent = hello("web1");
    primary.write.write_all(&sent).await.expect("write");
    primary.write.flush().await.expect("flush");
    let mut backup = tokio::time::timeout(LIMIT, links.accept())
        .await
        .expect("routed in time")
        .expect("link");

    // Bursts (each one flushed: a burst end, where repairs go out) until
    // the primary has heard the backup's FEC and protected one.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut got = Vec::new();
    for burst in 0u32.. {
        let bytes: Vec<u8> = (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(31) ^ burst) as u8)
            .collect();
        primary.write.write_all(&bytes).await.expect("write");
        primary.write.flush().await.expect("flush");
        sent.extend_from_slice(&bytes);
        let mut more = vec![0u8; sent.len() - got.len()];
        tokio::time::timeout(LIMIT, backup.read.read_exact(&mut more))
            .await
            .expect("the burst arrives in time")
            .expect("read");
        got.extend_from_slice(&more);
        if dc1.fec_totals().datagrams_sent > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the primary sent no FEC datagram in {burst} bursts: the routed reader never answered its FEC"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the routed stream's bytes, HELLO included");

    server.close();
    dc1.close();
}
