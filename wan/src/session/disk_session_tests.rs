//! The disk frames inside a session (sans-IO, bytes shuttled by hand):
//! the standby's report comes before `Connected`, a sync's DISK_SYNC frame
//! precedes its opening epoch every time that epoch is sent, and a peer
//! that floods hash requests is refused.

use std::time::Instant;

use bytes::Bytes;

use super::wire::{DiskReport, DiskSync, DiskSyncMode, ReplicaReport, SyncBegin};
use super::{
    EpochKind, Receiver, ReceiverConfig, ReceiverEvent, Sender, SenderConfig, SenderEvent,
};

fn shuttle(s: &mut Sender, r: &mut Receiver, now: Instant) {
    // Bounded: a session quiesces within a few exchanges.
    for _ in 0..50 {
        let mut moved = false;
        while let Some(b) = s.poll_transmit(now) {
            let _ = r.handle_input(&b, now);
            moved = true;
        }
        while let Some(b) = r.poll_transmit(now) {
            s.handle_input(&b, now);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn begin(epoch: u64) -> DiskSync {
    DiskSync::Begin(SyncBegin {
        epoch,
        lineage: 42,
        mode: DiskSyncMode::Incremental,
        base: 7,
        block_size: 64 << 10,
        disk_bytes: 1 << 20,
    })
}

fn drain_r(r: &mut Receiver) -> Vec<ReceiverEvent> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

fn drain_s(s: &mut Sender) -> Vec<SenderEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

#[test]
fn report_then_connected_and_the_prelude_goes_with_its_epoch_every_time() {
    let now = Instant::now();
    let mut s = Sender::new(SenderConfig::new("dc1", "web1"), 1, now);
    let mut r = Receiver::new(ReceiverConfig::new("dc2", "web1"), 0, now);
    let report = ReplicaReport {
        lineage: 42,
        epoch: 7,
        consistent: true,
        disk_bytes: 1 << 20,
        seed_bytes: 0,
    };
    r.set_report(report);
    r.handle_connected(now);
    s.handle_connected(now);
    shuttle(&mut s, &mut r, now);
    let evs = drain_s(&mut s);
    let at_report = evs
        .iter()
        .position(|e| *e == SenderEvent::DiskReport(DiskReport::Replica(report)));
    let at_connected = evs
        .iter()
        .position(|e| matches!(e, SenderEvent::Connected { .. }));
    assert!(
        at_report.is_some() && at_report < at_connected,
        "report before Connected: {evs:?}"
    );
    assert_eq!(s.peer_report(), Some(report));

    let e = s
        .push_epoch_with_prelude(
            EpochKind::Full,
            Bytes::from_static(b"x"),
            Some(begin(1)),
            now,
        )
        .unwrap();
    shuttle(&mut s, &mut r, now);
    let evs = drain_r(&mut r);
    let kinds: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            ReceiverEvent::DiskSync(d) => Some(format!("{d:?}")),
            ReceiverEvent::Epoch { epoch, .. } => Some(format!("epoch {epoch}")),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec![format!("{:?}", begin(1)), format!("epoch {e}")]);

    // The link drops before the epoch is acknowledged: it is sent again,
    // its prelude first.
    s.handle_disconnected(now, "test");
    r.handle_disconnected(now, "test");
    r.reject(e, "lost with the connection", now);
    drain_r(&mut r);
    let later = now + std::time::Duration::from_secs(60);
    s.handle_timeout(later);
    drain_s(&mut s);
    r.handle_connected(later);
    s.handle_connected(later);
    shuttle(&mut s, &mut r, later);
    let evs = drain_r(&mut r);
    let first_sync = evs
        .iter()
        .position(|e| matches!(e, ReceiverEvent::DiskSync(_)));
    let epoch_at = evs
        .iter()
        .position(|e| matches!(e, ReceiverEvent::Epoch { .. }));
    assert!(
        first_sync.is_some() && first_sync < epoch_at,
        "prelude resent before its epoch: {evs:?}"
    );
}

#[test]
fn hash_requests_flow_and_a_flood_is_refused() {
    let now = Instant::now();
    let mut s = Sender::new(SenderConfig::new("dc1", "web1"), 1, now);
    let mut r = Receiver::new(ReceiverConfig::new("dc2", "web1"), 0, now);
    r.handle_connected(now);
    s.handle_connected(now);
    shuttle(&mut s, &mut r, now);
    drain_s(&mut s);
    drain_r(&mut r);
    assert!(s.send_disk_sync(
        DiskSync::HashRequest {
            first_block: 0,
            count: 2
        },
        now
    ));
    shuttle(&mut s, &mut r, now);
    let evs = drain_r(&mut r);
    assert!(
        evs.contains(&ReceiverEvent::DiskSync(DiskSync::HashRequest {
            first_block: 0,
            count: 2
        }))
    );
    r.disk_report(
        DiskReport::Hashes {
            first_block: 0,
            hashes: vec![1, 2],
        },
        now,
    );
    shuttle(&mut s, &mut r, now);
    assert!(
        drain_s(&mut s).contains(&SenderEvent::DiskReport(DiskReport::Hashes {
            first_block: 0,
            hashes: vec![1, 2]
        }))
    );
    // More unanswered requests than allowed: the receiver closes.
    for i in 0..=super::receiver::MAX_PENDING_HASH_REQUESTS as u64 {
        s.send_disk_sync(
            DiskSync::HashRequest {
                first_block: i,
                count: 1,
            },
            now,
        );
    }
    shuttle(&mut s, &mut r, now);
    assert!(drain_r(&mut r)
        .iter()
        .any(|e| matches!(e, ReceiverEvent::Close { .. })));
}
