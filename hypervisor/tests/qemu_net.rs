//! The qemu backend's NIC: remus-wan is QEMU's `-netdev stream` peer.
//! Frames the guest sends reach our sink and are held per epoch (sealed at
//! the checkpoint's `at_pause`); nothing arrives while the guest is
//! stopped; frames we give the guest arrive at once (an ARP reply lets its
//! ping go out); a replica continues on its own NIC backend.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::qemu::{spec, wait_ready};
use common::Outbox;
use hypervisor::kvm::Seams;
use hypervisor::qemu::{QemuGuest, QemuNetSpec};
use hypervisor::{Checkpoint, ProtectedGuest};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const GW_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn from_guest(f: &[u8]) -> bool {
    f.len() >= 14 && f[6..12] == GUEST_MAC
}

/// An ARP request from the guest for the gateway.
fn is_arp_for_gw(f: &[u8]) -> bool {
    from_guest(f)
        && f.len() >= 42
        && f[12..14] == [8, 6]
        && f[20..22] == [0, 1]
        && f[38..42] == GW_IP.octets()
}

/// An ICMP echo request from the guest to the gateway.
fn is_ping_to_gw(f: &[u8]) -> bool {
    from_guest(f)
        && f.len() >= 35
        && f[12..14] == [8, 0]
        && f[23] == 1
        && f[30..34] == GW_IP.octets()
        && f[34] == 8
}

fn arp_reply() -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&GW_IP.octets());
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP.octets());
    f
}

/// Checkpoints every 100 ms, sealing the outbox at each epoch boundary,
/// until a held epoch has a frame matching `pred` (at most `timeout`).
fn epochs_until(
    g: &mut QemuGuest,
    out: &Outbox,
    cp: &mut Checkpoint,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[u8]) -> bool,
) -> usize {
    let deadline = Instant::now() + timeout;
    let mut epochs = 0;
    loop {
        let mut sealed = Vec::new();
        g.checkpoint(cp, &mut || sealed = out.seal())
            .expect("checkpoint");
        epochs += 1;
        if sealed.iter().any(|f| pred(f)) {
            return epochs;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} from the guest within {timeout:?} ({} frames in total)",
            g.net().map(|n| n.tx_frames()).unwrap_or(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn guest_frames_are_held_per_epoch_and_replies_reach_the_guest() {
    let Some(image) = common::require_qemu() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = spec(image, dir.path(), 128).network(QemuNetSpec {
        mac: GUEST_MAC,
        address: Some((GUEST_IP, 24)),
        gateway: Some(GW_IP),
    });
    let out = Outbox::default();
    let mut g = QemuGuest::start(
        &spec,
        Seams {
            frame_sink: Some(Box::new(out.clone())),
            write_hook: None,
        },
    )
    .expect("start QEMU");
    wait_ready(&g);
    let mut cp = Checkpoint::default();

    // The guest pings its gateway every second: first it asks for the
    // gateway's MAC.
    epochs_until(
        &mut g,
        &out,
        &mut cp,
        "ARP request",
        Duration::from_secs(60),
        is_arp_for_gw,
    );

    // Stopped, the guest sends nothing (its ARP retries keep coming while
    // it runs).
    g.pause().expect("pause");
    out.seal();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        out.seal().is_empty(),
        "frames arrived while the guest was stopped"
    );
    g.resume().expect("resume");

    // Our answer goes in at once; the ping follows.
    g.net()
        .expect("NIC")
        .send_to_guest(&arp_reply())
        .expect("send ARP reply");
    epochs_until(
        &mut g,
        &out,
        &mut cp,
        "ICMP echo request",
        Duration::from_secs(30),
        is_ping_to_gw,
    );

    // A replica from a checkpoint taken now keeps pinging through its own
    // NIC backend (its ARP cache came with the RAM).
    let mut replica = vec![0u8; 128 << 20];
    g.pause().expect("pause");
    g.checkpoint(&mut cp, &mut || {}).expect("checkpoint");
    g.read_ram(&mut replica);
    let state = cp.state.clone();
    drop(g);
    let out2 = Outbox::default();
    let mut r = QemuGuest::restore(
        &spec,
        &replica,
        &state,
        Seams {
            frame_sink: Some(Box::new(out2.clone())),
            write_hook: None,
        },
    )
    .expect("restore");
    epochs_until(
        &mut r,
        &out2,
        &mut cp,
        "ping from the replica",
        Duration::from_secs(30),
        |f| is_ping_to_gw(f) || is_arp_for_gw(f),
    );
}
