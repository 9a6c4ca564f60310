//! The standby over real QUIC: a primary streams encoded epochs, the
//! standby commits each one all-or-nothing; a corrupted epoch is refused,
//! the sender falls back to a full resync, and nothing corrupt ever
//! reaches the replica; and corruption on the wire itself (bits flipped
//! by the WAN emulator) is dropped by QUIC and never reaches the standby.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use remus_wan::certs::{init_site, InitOptions};
use remus_wan::engine::standby::StandbyStats;
use remus_wan::engine::standby::{self, StandbyOptions};
use remus_wan::replica::ReplicaStore;
use wan::codec::{Encoder, EncoderConfig};
use wan::emulator::{Emulator, EmulatorConfig, LinkParams};
use wan::session::{EpochKind, SenderConfig, SenderEvent};
use wan::transport::replication::{spawn_sender, QuicDialer};
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

const PS: usize = 4096;
const FRAMES: u64 = 512;
const DISK: u64 = 256 * 1024;

struct Guest {
    mem: Vec<u8>,
    disk: Vec<u8>,
    rng: u64,
}

impl Guest {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
    /// Dirties memory and disk; returns the dirty frames and disk write.
    fn run_a_while(&mut self, epoch: u64) -> (Vec<u64>, (u64, Vec<u8>)) {
        let mut frames: Vec<u64> = (0..20).map(|_| self.rand() % FRAMES).collect();
        frames.sort_unstable();
        frames.dedup();
        for &f in &frames {
            let at = f as usize * PS + (self.rand() as usize % (PS - 8));
            self.mem[at..at + 8].copy_from_slice(&epoch.to_le_bytes());
        }
        let off = self.rand() % (DISK - 4096);
        let data = vec![(epoch % 255) as u8; 4096];
        self.disk[off as usize..off as usize + 4096].copy_from_slice(&data);
        (frames, (off, data))
    }
    fn pages<'a>(&'a self, frames: &'a [u64]) -> Vec<(u64, &'a [u8])> {
        frames
            .iter()
            .map(|&f| (f, &self.mem[f as usize * PS..(f as usize + 1) * PS]))
            .collect()
    }
}

fn pki(dir: &Path) {
    support::pki(dir, &["dc1", "dc2"]);
}

async fn wait_committed(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<SenderEvent>,
    want: u64,
    resync: &mut bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("epoch {want} not committed in time"))
            .expect("sender alive");
        match ev {
            SenderEvent::Committed { epoch } if epoch >= want => return,
            SenderEvent::ResyncRequired { .. } => {
                *resync = true;
                return;
            }
            SenderEvent::Failed { error } => panic!("session failed: {error}"),
            _ => {}
        }
    }
}

/// A standby of VM web1 (dc2) listening on loopback, with its PKI and
/// replica folders under `dir`.
struct Standby {
    addr: std::net::SocketAddr,
    pki_dir: std::path::PathBuf,
    replica_dir: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<StandbyStats, standby::StandbyError>>,
}

fn start_standby(dir: &Path) -> Standby {
    let pki_dir = dir.join("pki");
    pki(&pki_dir);
    let replica_dir = dir.join("replicas/web1");
    let opts = StandbyOptions {
        site: "dc2".into(),
        primary: "dc1".into(),
        vm: "web1".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: TlsPaths::in_dir(&pki_dir, "dc2"),
        replica_dir: replica_dir.clone(),
        page_size: PS,
        frames: FRAMES,
        disk_bytes: DISK,
        max_epoch_bytes: 64 << 20,
        seed_disk: None,
    };
    let endpoint = standby::bind(&opts).expect("bind");
    let addr = endpoint.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(standby::run(opts, endpoint, async move {
        let _ = stopped.await;
    }));
    Standby {
        addr,
        pki_dir,
        replica_dir,
        stop,
        server,
    }
}

/// Checks the replica the standby left in `replica_dir` is exactly the
/// guest at `epoch`.
fn assert_replica_is(replica_dir: &Path, g: &Guest, epoch: u64) {
    let store = ReplicaStore::open(replica_dir).expect("replica");
    assert_eq!(store.meta().epoch, Some(epoch));
    assert!(store.meta().consistent);
    assert!(
        store.memory() == &g.mem[..],
        "replica memory differs from the primary"
    );
    let mut disk = vec![0; DISK as usize];
    store.read_disk(0, &mut disk).expect("disk");
    assert!(disk == g.disk, "replica disk differs from the primary");
    assert_eq!(
        store.state().expect("state"),
        format!("state {epoch}").into_bytes()
    );
}

fn new_guest() -> Guest {
    Guest {
        mem: (0..FRAMES as usize * PS).map(|i| (i / 97) as u8).collect(),
        disk: vec![0; DISK as usize],
        rng: 99,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_commit_and_a_corrupt_one_forces_a_clean_resync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Standby {
        addr,
        pki_dir,
        replica_dir,
        stop,
        server,
    } = start_standby(dir.path());

    let client = Endpoint::bind(
        "127.0.0.1:0".parse().expect("addr"),
        TransportConfig::new(TlsPaths::in_dir(&pki_dir, "dc1")),
    )
    .expect("client endpoint");
    let (sender, mut events) = spawn_sender(
        QuicDialer {
            endpoint: client,
            addr,
            peer_site: "dc2".into(),
        },
        SenderConfig::new("dc1", "web1"),
        1,
    );
    let mut enc = Encoder::new(EncoderConfig {
        vm_id: 1,
        ..EncoderConfig::default()
    })
    .expect("encoder");
    let mut g = new_guest();

    // The full image first (with state: a consistent checkpoint).
    let all: Vec<u64> = (0..FRAMES).collect();
    let whole = enc
        .encode(1, &g.pages(&all), b"state 1", &[(0, &g.disk[..])])
        .expect("encode");
    let e = sender
        .push_epoch(EpochKind::Full, Bytes::from(whole))
        .await
        .expect("push");
    assert_eq!(e, 1);
    let mut epoch = 1;
    let mut resync = false;
    let mut corrupted_at = None;
    for round in 0..40u64 {
        epoch += 1;
        let (frames, (off, data)) = g.run_a_while(epoch);
        let state = format!("state {epoch}");
        let mut bytes = enc
            .encode(
                epoch,
                &g.pages(&frames),
                state.as_bytes(),
                &[(off, &data[..])],
            )
            .expect("encode");
        if round == 20 {
            // A bit flips in an epoch (a faulty NIC, a bug): the replica
            // must refuse it.
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x10;
            corrupted_at = Some(epoch);
        }
        let pushed = sender
            .push_epoch(EpochKind::Delta, Bytes::from(bytes))
            .await;
        match pushed {
            Ok(n) => assert_eq!(n, epoch),
            Err(e) => panic!("push {epoch}: {e}"),
        }
        enc.acknowledge(epoch - 1);
        wait_committed(&mut events, epoch, &mut resync).await;
        if resync {
            break;
        }
    }
    assert!(
        resync,
        "the corrupted epoch {corrupted_at:?} must force a resync"
    );
    // Full resync: everything whole, from scratch.
    enc.reset();
    epoch += 1;
    let whole = enc
        .encode(
            epoch,
            &g.pages(&all),
            format!("state {epoch}").as_bytes(),
            &[(0, &g.disk[..])],
        )
        .expect("encode");
    let n = sender
        .push_epoch(EpochKind::Full, Bytes::from(whole))
        .await
        .expect("push full");
    epoch = n;
    let mut resync = false;
    wait_committed(&mut events, epoch, &mut resync).await;
    assert!(!resync);
    for _ in 0..5 {
        epoch += 1;
        let (frames, (off, data)) = g.run_a_while(epoch);
        let bytes = enc
            .encode(
                epoch,
                &g.pages(&frames),
                format!("state {epoch}").as_bytes(),
                &[(off, &data[..])],
            )
            .expect("encode");
        assert_eq!(
            sender
                .push_epoch(EpochKind::Delta, Bytes::from(bytes))
                .await
                .expect("push"),
            epoch
        );
        wait_committed(&mut events, epoch, &mut resync).await;
        assert!(!resync);
    }
    sender.close().await;
    let _ = stop.send(());
    let stats = server.await.expect("join").expect("standby ran");
    assert!(stats.epochs_rejected >= 1, "{stats:?}");
    assert_eq!(stats.committed_epoch, Some(epoch));
    assert_replica_is(&replica_dir, &g, epoch);
}

/// Replication through a WAN emulator that flips one random bit in 10 % of
/// the datagrams each way (`LinkParams::corrupt`). QUIC authenticates every
/// packet with an AEAD tag, so the receiving endpoint drops each corrupted
/// datagram: corruption on the wire becomes packet loss, which QUIC
/// retransmits. The session therefore keeps committing every epoch without
/// a resync, the standby never sees a corrupt epoch (none rejected by its
/// own checksum), and the replica ends exactly equal to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_link_becomes_loss_and_the_replica_stays_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Standby {
        addr,
        pki_dir,
        replica_dir,
        stop,
        server,
    } = start_standby(dir.path());
    let mut ecfg = EmulatorConfig::new(addr).with_link(LinkParams {
        corrupt: 0.1,
        ..LinkParams::default()
    });
    ecfg.seed = 7;
    let emu = Emulator::start(ecfg).await.expect("emulator");

    let client = Endpoint::bind(
        "127.0.0.1:0".parse().expect("addr"),
        TransportConfig::new(TlsPaths::in_dir(&pki_dir, "dc1")),
    )
    .expect("client endpoint");
    let (sender, mut events) = spawn_sender(
        QuicDialer {
            endpoint: client,
            addr: emu.local_addr(),
            peer_site: "dc2".into(),
        },
        SenderConfig::new("dc1", "web1"),
        1,
    );
    let mut enc = Encoder::new(EncoderConfig {
        vm_id: 1,
        ..EncoderConfig::default()
    })
    .expect("encoder");
    let mut g = new_guest();
    let all: Vec<u64> = (0..FRAMES).collect();
    let whole = enc
        .encode(1, &g.pages(&all), b"state 1", &[(0, &g.disk[..])])
        .expect("encode");
    let mut epoch = sender
        .push_epoch(EpochKind::Full, Bytes::from(whole))
        .await
        .expect("push");
    let mut resync = false;
    wait_committed(&mut events, epoch, &mut resync).await;
    assert!(!resync, "the full image needed a resync");
    for _ in 0..60 {
        epoch += 1;
        let (frames, (off, data)) = g.run_a_while(epoch);
        let bytes = enc
            .encode(
                epoch,
                &g.pages(&frames),
                format!("state {epoch}").as_bytes(),
                &[(off, &data[..])],
            )
            .expect("encode");
        let n = sender
            .push_epoch(EpochKind::Delta, Bytes::from(bytes))
            .await
            .expect("push");
        assert_eq!(n, epoch);
        enc.acknowledge(epoch - 1);
        wait_committed(&mut events, epoch, &mut resync).await;
        assert!(
            !resync,
            "epoch {epoch} needed a resync over a corrupting link"
        );
    }
    let link = emu.handle().stats();
    eprintln!("emulated link: {link:?}");
    sender.close().await;
    let _ = stop.send(());
    let stats = server.await.expect("join").expect("standby ran");
    // The link did corrupt traffic both ways (each epoch is a few datagrams
    // each way: about 15 corrupted expected per direction).
    assert!(link.forward.corrupted > 0, "{link:?}");
    assert!(link.backward.corrupted > 0, "{link:?}");
    assert_eq!(stats.epochs_rejected, 0, "{stats:?}");
    assert_eq!(stats.committed_epoch, Some(epoch));
    assert_replica_is(&replica_dir, &g, epoch);
}

#[test]
fn standby_command_runs_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    for site in ["dc1", "dc2", "witness"] {
        init_site(&InitOptions {
            site: site.into(),
            out: pki_dir.clone(),
            ca_dir: None,
            days: 2,
        })
        .expect("certs");
    }
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/two-site.toml"),
    )
    .expect("example");
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let cfg = example
        .replace("0.0.0.0:7700", &format!("127.0.0.1:{port}"))
        .replace("../target/guest/netguest.elf", "guest.elf");
    std::fs::write(dir.path().join("c.toml"), cfg).expect("config");
    std::fs::write(dir.path().join("guest.elf"), b"\x7fELF").expect("guest");
    std::fs::write(dir.path().join("web1.img"), vec![0u8; 65536]).expect("disk");
    std::fs::write(pki_dir.join("tsig.secret"), b"c2VjcmV0\n").expect("secret");
    std::fs::create_dir_all(dir.path().join("hooks")).expect("hooks");
    let hook = dir.path().join("hooks/notify.sh");
    std::fs::write(&hook, "#!/bin/sh\n").expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let mut child = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
        .args(["standby", "--site", "dc2", "--config"])
        .arg(dir.path().join("c.toml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let listening = loop {
        match lines.next() {
            Some(Ok(l)) => {
                let hit = l.contains("standby listening");
                seen.push(l);
                if hit {
                    break true;
                }
                if seen.len() > 200 {
                    break false;
                }
            }
            _ => break false,
        }
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(listening, "standby never listened:\n{}", seen.join("\n"));
    assert_eq!(status.code(), Some(0), "{}", seen.join("\n"));
}
