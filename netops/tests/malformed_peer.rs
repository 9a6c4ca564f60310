//! The tokio speaker against a scripted "peer" on loopback that sends
//! malformed messages: RFC 7606 treat-as-withdraw keeps the session, a
//! broken header gets its NOTIFICATION and the speaker reconnects after
//! the connect-retry time. No daemon and no root needed.

use std::time::Duration;

use netops::bgp::wire::{self, frame, OpenParams, HEADER_LEN, MSG_UPDATE};
use netops::bgp::{PeerConfig, Speaker, SpeakerConfig, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn read_msg(s: &mut TcpStream) -> Vec<u8> {
    let mut hdr = [0u8; HEADER_LEN];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut hdr))
        .await
        .expect("message within 30 s")
        .expect("read header");
    let len = u16::from_be_bytes([hdr[16], hdr[17]]) as usize;
    let mut body = vec![0u8; len - HEADER_LEN];
    s.read_exact(&mut body).await.unwrap();
    [hdr.to_vec(), body].concat()
}

/// Accepts the speaker, exchanges OPEN/KEEPALIVE; returns the stream once
/// Established from the speaker's point of view.
async fn establish(l: &TcpListener) -> TcpStream {
    establish_with_hold(l, 30).await
}

async fn establish_with_hold(l: &TcpListener, hold_time: u16) -> TcpStream {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), l.accept())
        .await
        .expect("speaker connects within 30 s")
        .unwrap();
    let open = read_msg(&mut s).await;
    assert_eq!(open[18], wire::MSG_OPEN);
    s.write_all(&wire::encode_open(&OpenParams {
        local_as: 65001,
        hold_time,
        router_id: "10.9.9.9".parse().unwrap(),
    }))
    .await
    .unwrap();
    s.write_all(&wire::encode_keepalive()).await.unwrap();
    // The speaker's KEEPALIVE answering our OPEN.
    loop {
        let m = read_msg(&mut s).await;
        if m[18] == wire::MSG_KEEPALIVE {
            break;
        }
    }
    s
}

async fn wait_status(
    speaker: &Speaker,
    what: &str,
    pred: impl Fn(&netops::bgp::PeerStatus) -> bool,
) {
    for _ in 0..120 {
        let st = speaker.status().await;
        if pred(&st.peers[0]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}: {}", speaker.status().await);
}

fn update(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(attrs);
    body.extend_from_slice(nlri);
    frame(MSG_UPDATE, &body)
}

#[tokio::test]
async fn malformed_messages_never_crash_the_speaker() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut peer = PeerConfig::new("127.0.0.1".parse().unwrap(), 65001);
    peer.port = l.local_addr().unwrap().port();
    let speaker = Speaker::start(SpeakerConfig {
        local_as: 65000,
        router_id: "10.0.0.1".parse().unwrap(),
        hold_time_s: 30,
        connect_retry: Duration::from_secs(1),
        listen: None,
        peers: vec![peer],
    })
    .await
    .unwrap();

    let mut s = establish(&l).await;
    wait_status(&speaker, "Established", |p| p.state == State::Established).await;

    let good: Vec<u8> = [
        &[0x40, 1, 1, 0][..],
        &[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9],
        &[0x40, 3, 4, 127, 0, 0, 1],
    ]
    .concat();
    s.write_all(&update(&good, &[24, 198, 51, 100]))
        .await
        .unwrap();
    wait_status(&speaker, "one received prefix", |p| {
        p.received_prefixes == 1
    })
    .await;

    // Malformed COMMUNITIES (length 3): treat-as-withdraw, session kept.
    let bad: Vec<u8> = [&good[..], &[0xc0, 8, 3, 0, 0, 1]].concat();
    s.write_all(&update(&bad, &[24, 198, 51, 100]))
        .await
        .unwrap();
    wait_status(&speaker, "treat-as-withdraw", |p| {
        p.stats.updates_treated_as_withdraw == 1 && p.received_prefixes == 0
    })
    .await;
    assert_eq!(speaker.status().await.peers[0].state, State::Established);

    // A broken marker: NOTIFICATION 1/1, then the connection closes.
    let mut broken = wire::encode_keepalive();
    broken[0] = 0;
    s.write_all(&broken).await.unwrap();
    let n = loop {
        let m = read_msg(&mut s).await;
        if m[18] == wire::MSG_NOTIFICATION {
            break m;
        }
    };
    assert_eq!((n[19], n[20]), (1, 1));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;

    // The speaker reconnects after connect-retry and comes back up.
    let _s2 = establish(&l).await;
    wait_status(&speaker, "re-established", |p| {
        p.state == State::Established && p.stats.established_count == 2
    })
    .await;
    speaker.shutdown().await;
}

#[tokio::test]
async fn silent_peer_gets_hold_timer_expired() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut peer = PeerConfig::new("127.0.0.1".parse().unwrap(), 65001);
    peer.port = l.local_addr().unwrap().port();
    let speaker = Speaker::start(SpeakerConfig {
        local_as: 65000,
        router_id: "10.0.0.1".parse().unwrap(),
        hold_time_s: 30,
        connect_retry: Duration::from_secs(1),
        listen: None,
        peers: vec![peer],
    })
    .await
    .unwrap();
    // The peer proposes 3 s and then says nothing more.
    let mut s = establish_with_hold(&l, 3).await;
    let mut keepalives = 0;
    let n = loop {
        let m = read_msg(&mut s).await;
        match m[18] {
            wire::MSG_KEEPALIVE => keepalives += 1,
            wire::MSG_NOTIFICATION => break m,
            _ => {}
        }
    };
    assert_eq!((n[19], n[20]), (4, 0), "hold timer expired");
    assert!(keepalives >= 1, "keepalives every hold/3 before that");
    wait_status(&speaker, "hold timer expiry reported", |p| {
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("hold timer expired"))
    })
    .await;
}
