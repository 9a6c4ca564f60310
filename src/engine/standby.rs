//! `remus-wan standby`: holds the replica of a VM and commits each epoch
//! all-or-nothing before acknowledging it.
//!
//! Epochs arrive from the replication receiver fully staged. Each one is
//! decoded against the replica (verifying checksum, bounds and base),
//! journaled and applied ([`ReplicaStore::commit`]), and only then
//! acknowledged. A refused epoch is reported to the sender, which resends
//! what is missing (a full resync when it must); the replica keeps its last
//! committed epoch.
//!
//! A full resync never destroys the replica it replaces: it is built in
//! `<vm>.resync/` and swapped in (one rename) only when it has reached a
//! consistent checkpoint. An epoch whose state blob is empty is a pre-copy
//! round (pages only, taken while the guest ran); one with state is a
//! checkpoint the VM can resume from.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use wan::codec::{Decoder, DecoderConfig};
use wan::session::wire::{DiskReport, DiskSync, DiskSyncMode, ReplicaReport, SyncBegin};
use wan::session::wire::{VerifyHashes, VerifyOutcome, VerifyRegion, VerifyResult};
use wan::session::{EpochKind, ReceiverConfig, ReceiverEvent};
use wan::transport::replication::{spawn_receiver, QuicListener};
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

use super::disk_image::DiskImage;
use super::verify;
use crate::addresses::Addresses;
use crate::arbiter::ArbiterHandle;
use crate::replica::{ReplicaStore, StoreError};
use failover::Event;
use netops::config::HookEvent;
use netops::policy::Role;
use wan::transport::replication::Listener;

#[derive(Debug, Clone)]
pub struct StandbyOptions {
    /// This (backup) site.
    pub site: String,
    /// The primary site allowed to replicate to us.
    pub primary: String,
    pub vm: String,
    pub listen: std::net::SocketAddr,
    pub tls: TlsPaths,
    /// Replica folder of this VM (`<state>/<vm>`).
    pub replica_dir: PathBuf,
    pub page_size: usize,
    pub frames: u64,
    pub disk_bytes: u64,
    pub max_epoch_bytes: u64,
    /// An old copy of the VM's disk at this site (the image the VM ran
    /// from here before a takeover moved it away; a group's: its members'
    /// images), used to seed a checksum resync when no replica disk is
    /// there.
    pub seed_disk: Option<DiskImage>,
}

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(transparent)]
    Transport(#[from] wan::transport::TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("takeover failed: {0}")]
    Activation(String),
    #[error("another site runs the VM under fencing token {token}: stopped here for good")]
    Superseded { token: u64 },
    #[error("cannot swap in the resynchronised replica: {0}")]
    Swap(std::io::Error),
}

/// Counters the standby reports (status, metrics, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StandbyStats {
    pub committed_epoch: Option<u64>,
    pub epochs_committed: u64,
    pub epochs_rejected: u64,
    pub bytes_received: u64,
    pub consistent: bool,
    /// Disk bytes copied locally to seed resynchronised replicas.
    pub seeded_bytes: u64,
    /// Blocks hashed for checksum resyncs.
    pub blocks_hashed: u64,
}

/// The replica being fed: the live one, or one under resync beside it.
struct Target {
    live: Option<ReplicaStore>,
    resync: Option<ReplicaStore>,
}

pub struct Standby {
    opts: StandbyOptions,
    target: Target,
    decoder: Decoder,
    pub stats: StandbyStats,
    /// How the next full epoch seeds its disk (DISK_SYNC before it).
    plan: Option<SyncBegin>,
    /// How the replica under resync was seeded.
    resync_mode: Option<DiskSyncMode>,
    /// One block, reused by hash requests.
    hash_buf: Vec<u8>,
}

impl Standby {
    /// Opens (recovering) the replica, or notes that none exists yet.
    pub fn open(opts: StandbyOptions) -> Result<Self, StandbyError> {
        recover_interrupted_swap(&opts.replica_dir)?;
        let live = if opts.replica_dir.join("meta.json").exists() {
            match ReplicaStore::open(&opts.replica_dir) {
                Ok(s) => Some(s),
                Err(StoreError::NeedsResync { reason, .. }) => {
                    warn!(vm = %opts.vm, reason, "replica unusable: waiting for a full resync");
                    None
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let mut stats = StandbyStats::default();
        if let Some(l) = &live {
            stats.committed_epoch = l.meta().epoch;
            stats.consistent = l.meta().consistent;
            info!(vm = %opts.vm, epoch = ?l.meta().epoch, consistent = l.meta().consistent, "replica recovered");
        }
        let decoder = Decoder::new(DecoderConfig {
            max_epoch_bytes: opts.max_epoch_bytes,
            ..DecoderConfig::default()
        })
        .map_err(StoreError::Codec)?;
        Ok(Self {
            opts,
            target: Target { live, resync: None },
            decoder,
            stats,
            plan: None,
            resync_mode: None,
            hash_buf: Vec::new(),
        })
    }

    /// The last committed epoch of the live replica (what HELLO reports).
    pub fn committed(&self) -> u64 {
        self.target
            .live
            .as_ref()
            .and_then(|s| s.meta().epoch)
            .unwrap_or(0)
    }

    fn resync_dir(&self) -> PathBuf {
        resync_dir_of(&self.opts.replica_dir)
    }

    /// Verifies and commits one epoch; returns whether to acknowledge it.
    pub fn apply(&mut self, epoch: u64, kind: EpochKind, payload: &[u8]) -> Result<(), String> {
        self.stats.bytes_received += payload.len() as u64;
        if kind == EpochKind::Full {
            let dir = self.resync_dir();
            info!(vm = %self.opts.vm, epoch, "full resync begins (the current replica stays until it completes)");
            self.target.resync = None;
            let mut store = ReplicaStore::create(
                &dir,
                &self.opts.vm,
                self.opts.page_size,
                self.opts.frames,
                self.opts.disk_bytes,
            )
            .map_err(|e| e.to_string())?;
            let plan = self.plan.take().filter(|p| p.epoch == epoch);
            self.seed(&mut store, plan.as_ref())?;
            self.target.resync = Some(store);
        }
        if let Some(live) = &mut self.target.live {
            if live.is_half_applied() {
                // An epoch passed its commit point without being applied
                // whole: replay it before decoding against this replica.
                live.finish_half_applied().map_err(|e| e.to_string())?;
            }
        }
        let result = {
            let store = match (&mut self.target.resync, &mut self.target.live) {
                (Some(r), _) => r,
                (None, Some(l)) => l,
                (None, None) => {
                    return Err(format!(
                        "epoch {epoch} is a delta but this standby holds no replica: a full resync is needed"
                    ))
                }
            };
            self.decoder
                .decode(payload, &*store)
                .map_err(|e| e.to_string())
                .and_then(|staged| {
                    let consistent = !staged.state_blob().is_empty();
                    store
                        .commit(staged, 0, consistent || store.meta().consistent)
                        .map(|e| (e, consistent))
                        .map_err(|e| e.to_string())
                })
        };
        match result {
            Ok((committed, consistent)) => {
                if consistent && self.target.resync.is_some() {
                    self.swap_in_resync().map_err(|e| e.to_string())?;
                }
                self.stats.committed_epoch = Some(committed);
                self.stats.epochs_committed += 1;
                self.stats.consistent = self
                    .target
                    .live
                    .as_ref()
                    .is_some_and(|l| l.meta().consistent);
                Ok(())
            }
            Err(e) => {
                self.stats.epochs_rejected += 1;
                warn!(vm = %self.opts.vm, epoch, error = %e, "epoch refused; the replica keeps its last committed epoch");
                Err(e)
            }
        }
    }

    /// Seeds the disk of a new replica as the sync's DISK_SYNC frame says:
    /// zeros (full), a copy of the live replica (incremental: only if it is
    /// the consistent replica of that lineage the primary counted from), or
    /// a copy of an old local disk (checksum). A seed that cannot be had
    /// refuses the epoch; the primary then sends the whole disk.
    fn seed(&mut self, store: &mut ReplicaStore, plan: Option<&SyncBegin>) -> Result<(), String> {
        let mode = plan.map_or(DiskSyncMode::Full, |p| p.mode);
        self.resync_mode = Some(mode);
        let Some(p) = plan else {
            return Ok(());
        };
        if p.mode != DiskSyncMode::Full && p.disk_bytes != self.opts.disk_bytes {
            return Err(format!(
                "cannot seed a {} resync: the primary's disk is {} bytes, this site's {}",
                p.mode.name(),
                p.disk_bytes,
                self.opts.disk_bytes
            ));
        }
        let from = match p.mode {
            DiskSyncMode::Full => None,
            DiskSyncMode::Incremental => {
                let r = self.report();
                if !(r.consistent
                    && r.lineage == p.lineage
                    && r.epoch >= p.base
                    && r.disk_bytes == p.disk_bytes)
                {
                    return Err(format!(
                        "cannot seed an incremental resync from epoch {} of lineage {:016x}: this standby holds {r:?}",
                        p.base, p.lineage
                    ));
                }
                self.target
                    .live
                    .as_ref()
                    .map(|l| DiskImage::file(l.disk_path()))
            }
            DiskSyncMode::Checksum => match self.seed_source() {
                Some((disk, _)) => Some(disk),
                None => {
                    return Err(
                        "cannot seed a checksum resync: no old copy of the disk here".into(),
                    )
                }
            },
        };
        if let Some(from) = from {
            let started = Instant::now();
            let copied = tokio::task::block_in_place(|| store.seed_disk(&from))
                .map_err(|e| e.to_string())?;
            self.stats.seeded_bytes += copied;
            info!(vm = %self.opts.vm, mode = p.mode.name(), from = %from, copied_bytes = copied, took_ms = started.elapsed().as_millis() as u64, "new replica's disk seeded from a local copy");
        }
        store.set_lineage(p.lineage).map_err(|e| e.to_string())
    }

    /// An old copy of the disk to seed a checksum resync from: the
    /// replica folder's disk (diverged, unusable, or consistent), or the
    /// VM's own image at this site (a group's: its members' images); same
    /// size as the VM's disk.
    fn seed_source(&self) -> Option<(DiskImage, u64)> {
        let want = self.opts.disk_bytes;
        if want == 0 {
            return None;
        }
        let candidates = [
            Some(DiskImage::file(self.opts.replica_dir.join("disk.img"))),
            self.opts.seed_disk.clone(),
        ];
        candidates.into_iter().flatten().find_map(|d| {
            let n = d.bytes().ok()?;
            (n == want).then_some((d, n))
        })
    }

    /// What this standby holds, told to the primary before HELLO_ACK.
    pub fn report(&self) -> ReplicaReport {
        let live = self.target.live.as_ref();
        ReplicaReport {
            lineage: live.map_or(0, |l| l.meta().lineage),
            epoch: live.and_then(|l| l.meta().epoch).unwrap_or(0),
            consistent: live.is_some_and(|l| l.meta().consistent && !l.is_half_applied()),
            disk_bytes: live.map_or(0, |l| l.meta().disk_bytes),
            seed_bytes: self.seed_source().map_or(0, |(_, n)| n),
        }
    }

    /// Hashes blocks of the replica under a checksum resync.
    pub fn hash_request(&mut self, first_block: u64, count: u32) -> DiskReport {
        let (Some(r), Some(DiskSyncMode::Checksum)) = (&self.target.resync, self.resync_mode)
        else {
            return DiskReport::NoSeed { first_block };
        };
        let Some(f) = r.disk_file() else {
            return DiskReport::NoSeed { first_block };
        };
        match super::disksync::hash_blocks(
            f,
            r.meta().disk_bytes,
            first_block,
            count,
            &mut self.hash_buf,
        ) {
            Ok(hashes) => {
                self.stats.blocks_hashed += hashes.len() as u64;
                DiskReport::Hashes {
                    first_block,
                    hashes,
                }
            }
            Err(e) => {
                warn!(vm = %self.opts.vm, error = %e, first_block, "hashing the seeded disk failed");
                DiskReport::NoSeed { first_block }
            }
        }
    }

    /// A DISK_SYNC frame from the primary.
    pub fn disk_sync(&mut self, d: DiskSync) -> Option<DiskReport> {
        match d {
            DiskSync::Begin(b) => {
                info!(vm = %self.opts.vm, epoch = b.epoch, mode = b.mode.name(), base = b.base, "disk synchronisation announced");
                self.plan = Some(b);
                None
            }
            DiskSync::HashRequest { first_block, count } => {
                Some(tokio::task::block_in_place(|| {
                    self.hash_request(first_block, count)
                }))
            }
        }
    }

    /// Replaces the live replica with the resynchronised one. Two renames
    /// (live to `.old`, `.resync` to live): a crash between them is
    /// finished or undone by [`recover_interrupted_swap`] at the next open.
    fn swap_in_resync(&mut self) -> Result<(), StandbyError> {
        let Some(store) = self.target.resync.take() else {
            return Ok(());
        };
        let from = store.dir().to_owned();
        drop(store);
        self.target.live = None;
        let old = self.opts.replica_dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if self.opts.replica_dir.exists() {
            std::fs::rename(&self.opts.replica_dir, &old).map_err(StandbyError::Swap)?;
        }
        crate::faults::point("standby.swap");
        std::fs::rename(&from, &self.opts.replica_dir).map_err(StandbyError::Swap)?;
        let _ = std::fs::remove_dir_all(&old);
        self.target.live = Some(ReplicaStore::open(&self.opts.replica_dir)?);
        info!(vm = %self.opts.vm, "resynchronised replica is consistent: it is now the replica");
        Ok(())
    }

    /// The live replica (for activation).
    pub fn replica(&self) -> Option<&ReplicaStore> {
        self.target.live.as_ref()
    }

    /// Online verify: compares the primary's hashes of a slice at epoch
    /// `req.epoch` with the replica. Events come in stream order, so the
    /// replica is at that epoch exactly when it committed it (and nothing
    /// after it is applied yet).
    pub fn verify(&self, req: &VerifyHashes) -> VerifyResult {
        let outcome = self.compare(req);
        if let VerifyOutcome::Compared { differing } = &outcome {
            if !differing.is_empty() {
                warn!(vm = %self.opts.vm, epoch = req.epoch, region = req.region.name(), first = req.first, differing = differing.len(), "verify: the replica differs from the primary");
            }
        }
        VerifyResult {
            id: req.id,
            epoch: req.epoch,
            region: req.region,
            first: req.first,
            count: req.hashes.len() as u32,
            outcome,
        }
    }

    fn compare(&self, req: &VerifyHashes) -> VerifyOutcome {
        if self.target.resync.is_some() {
            return VerifyOutcome::Retry("a full resync is under way".into());
        }
        let Some(live) = &self.target.live else {
            return VerifyOutcome::Failed("this standby holds no replica".into());
        };
        if live.meta().epoch != Some(req.epoch) || live.is_half_applied() {
            return VerifyOutcome::Retry(format!(
                "the replica is at epoch {:?}, not {}",
                live.meta().epoch,
                req.epoch
            ));
        }
        let n = req.hashes.len() as u64;
        let unit = req.unit as u64;
        let (start, end) = match req
            .first
            .checked_mul(unit)
            .zip(req.first.checked_add(n).and_then(|e| e.checked_mul(unit)))
        {
            Some(r) => r,
            None => return VerifyOutcome::Failed("slice out of range".into()),
        };
        let mine: Vec<u64> = match req.region {
            VerifyRegion::Memory => {
                let mem = live.memory();
                if req.unit as usize != live.meta().page_size || end > mem.len() as u64 {
                    return VerifyOutcome::Failed(format!(
                        "memory slice {}+{n} of {}-byte pages is outside the replica ({} frames of {} bytes)",
                        req.first,
                        req.unit,
                        live.meta().frames,
                        live.meta().page_size
                    ));
                }
                mem[start as usize..end as usize]
                    .chunks(req.unit as usize)
                    .map(verify::hash_unit)
                    .collect()
            }
            VerifyRegion::Disk => {
                let size = live.meta().disk_bytes;
                let end = end.min(size);
                if start >= end || n * unit > 64 << 20 {
                    return VerifyOutcome::Failed(format!(
                        "disk slice at byte {start} is outside the replica disk of {size} bytes"
                    ));
                }
                let mut buf = vec![0u8; (end - start) as usize];
                if let Err(e) = live.read_disk(start, &mut buf) {
                    return VerifyOutcome::Failed(e.to_string());
                }
                buf.chunks(req.unit as usize)
                    .map(verify::hash_unit)
                    .collect()
            }
        };
        let differing = mine
            .iter()
            .zip(&req.hashes)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u32)
            .chain((mine.len()..req.hashes.len()).map(|i| i as u32))
            .collect();
        VerifyOutcome::Compared { differing }
    }

    /// Test-only fault (`REMUS_WAN_TEST_CORRUPT`): flips a byte of the
    /// live replica behind the engine's back, as a bad disk would.
    fn corrupt_for_test(&mut self, c: &crate::faults::Corruption) {
        use std::os::unix::fs::FileExt;
        let (file, offset) = match c.region {
            VerifyRegion::Memory => ("memory.img", c.offset),
            VerifyRegion::Disk => ("disk.img", c.offset),
        };
        let path = self.opts.replica_dir.join(file);
        let r = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .and_then(|f| {
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, offset)?;
                b[0] ^= 0x5a;
                f.write_all_at(&b, offset)
            });
        match r {
            Ok(()) => {
                warn!(vm = %self.opts.vm, file, offset, "test fault: replica corrupted on purpose")
            }
            Err(e) => {
                warn!(vm = %self.opts.vm, file, offset, error = %e, "test fault: could not corrupt the replica")
            }
        }
    }
}

/// The standby's QUIC endpoint: only the VM's primary site may connect.
pub fn bind(opts: &StandbyOptions) -> Result<Endpoint, StandbyError> {
    let mut cfg = TransportConfig::new(opts.tls.clone());
    cfg.allowed_clients = vec![opts.primary.clone()];
    Ok(Endpoint::bind(opts.listen, cfg)?)
}

/// Runs the standby on `endpoint` until `shutdown`; returns its final
/// statistics.
pub async fn run(
    opts: StandbyOptions,
    endpoint: Endpoint,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<StandbyStats, StandbyError> {
    let listener = QuicListener::new(endpoint.clone());
    run_with(opts, listener, Some(endpoint), shutdown, None, None).await
}

/// What a promoted standby hands to the code that runs the VM: the
/// failover verdicts, the addresses, and when to stop.
pub struct Activation {
    pub arbiter: ArbiterHandle,
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    pub addresses: Option<Addresses>,
    pub shutdown: tokio::sync::oneshot::Receiver<()>,
}

/// How the VM resumed at takeover stopped running here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActiveEnd {
    /// Shut down by the operator (SIGTERM), or the guest stopped.
    Stopped,
    /// Another site runs it now (a newer token, or a switchover).
    Superseded { token: u64 },
}

/// The running VM after takeover (it protects itself towards the old
/// primary once a standby answers there).
pub type RunActive =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<ActiveEnd, String>> + Send>>;

/// Resumes the VM from the live replica (its last committed epoch) and
/// returns what runs it.
pub type Activate = Box<dyn FnOnce(&ReplicaStore, Activation) -> Result<RunActive, String> + Send>;

/// Automatic takeover: the failover shell's verdicts, how to resume the
/// VM, and how to move its addresses.
pub struct Takeover {
    pub arbiter: ArbiterHandle,
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    pub activate: Activate,
    pub addresses: Option<Addresses>,
}

/// As [`run`], on connections from `listener`, publishing figures for
/// `/metrics` and `/status`, and with automatic takeover when `takeover`
/// is given. After a takeover the process runs the VM until `shutdown`.
/// `endpoint`, if given, is this VM's alone and closes when it stops (a
/// site daemon's shared endpoint is not passed).
pub async fn run_with<L: Listener>(
    opts: StandbyOptions,
    listener: L,
    endpoint: Option<Endpoint>,
    shutdown: impl std::future::Future<Output = ()>,
    published: Option<crate::metrics::Published>,
    takeover: Option<Takeover>,
) -> Result<StandbyStats, StandbyError> {
    let arbiter = takeover.as_ref().map(|t| t.arbiter.clone());
    let publish = |s: &StandbyStats, fec: Option<wan::transport::fec::link::FecTotals>| {
        if let Some(p) = &published {
            let v = crate::metrics::VmStatus {
                vm: opts.vm.clone(),
                role: "standby".into(),
                state: if s.consistent {
                    "replica ok"
                } else {
                    "syncing"
                }
                .into(),
                peer: opts.primary.clone(),
                epochs: s.epochs_committed,
                committed_epoch: s.committed_epoch.unwrap_or(0),
                wire_bytes_per_epoch: s.bytes_received as f64 / s.epochs_committed.max(1) as f64,
                epochs_rejected: s.epochs_rejected,
                fec_rebuilt_shards: fec.map(|f| f.recovered_shards),
                failover: arbiter
                    .as_ref()
                    .map(|a| crate::metrics::FailoverStatus::from_snapshot(&a.snapshot())),
                ..Default::default()
            };
            crate::metrics::publish_vm(p, v);
        }
    };
    let mut standby = Standby::open(opts.clone())?;
    match &endpoint {
        Some(e) => info!(vm = %opts.vm, addr = %e.local_addr()?, "standby listening"),
        None => info!(vm = %opts.vm, "standby serving the VM"),
    }
    let mut rcfg = ReceiverConfig::new(opts.site.clone(), opts.vm.clone());
    rcfg.max_epoch_size = opts.max_epoch_bytes;
    let (handle, mut events) = spawn_receiver(listener, rcfg, standby.committed());
    let mut told = standby.report();
    handle.set_report(told).await;
    let mut takeover = takeover.map(|mut t| {
        t.arbiter.set_replica_ready(standby.stats.consistent);
        if let Some(a) = &mut t.addresses {
            a.set_role(Role::Standby, 0);
        }
        Some(t)
    });
    tokio::pin!(shutdown);
    let mut last_log = Instant::now();
    // After a takeover: the task running the VM, and how to stop it.
    let mut active: Option<ActiveTask> = None;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let end = loop {
        let promoted = active.is_some();
        let failover_event = async {
            match &mut takeover {
                Some(Some(t)) if !promoted => t.events.recv().await,
                _ => std::future::pending().await,
            }
        };
        let replication = async {
            if promoted {
                std::future::pending().await
            } else {
                events.recv().await
            }
        };
        let running = async {
            match &mut active {
                Some((task, _)) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break None,
            _ = check.tick(), if !promoted => publish(&standby.stats, handle.fec()),
            ended = running => {
                active = None;
                break Some(ended.map_err(|e| e.to_string()).and_then(|r| r));
            }
            ev = failover_event => {
                let Some(ev) = ev else { break None };
                if let Event::Promote { token } = ev {
                    let Some(t) = takeover.as_mut().and_then(Option::take) else { continue };
                    handle.close().await;
                    match promote(&opts, &mut standby, t, token) {
                        Ok((task, stop)) => active = Some((task, stop)),
                        Err(e) => {
                            // Nothing runs here: the lease lapses and the
                            // witness can grant it elsewhere.
                            error!(vm = %opts.vm, error = %e, "takeover failed");
                            return Err(StandbyError::Activation(e));
                        }
                    }
                }
            }
            ev = replication => {
                let Some(ev) = ev else { break None };
                match ev {
                    ReceiverEvent::Hello { site, vm_id, last_committed } => {
                        info!(peer = %site, vm = %vm_id, last_committed, "primary connected");
                    }
                    ReceiverEvent::Epoch { epoch, kind, payload } => {
                        let applied = if crate::faults::point("standby.apply") {
                            Err(format!("epoch {epoch} refused by fault injection"))
                        } else {
                            standby.apply(epoch, kind, &payload)
                        };
                        publish(&standby.stats, handle.fec());
                        match applied {
                            Ok(()) => {
                                crate::faults::point("standby.committed");
                                if standby.stats.consistent && standby.target.resync.is_none() {
                                    if let Some(c) = crate::faults::corruption_due() {
                                        standby.corrupt_for_test(&c);
                                    }
                                }
                                if let Some(Some(t)) = &takeover {
                                    if standby.stats.consistent {
                                        t.arbiter.set_replica_ready(true);
                                    }
                                }
                                if handle.commit(epoch).await.is_err() {
                                    break None;
                                }
                            }
                            Err(e) => handle.reject(epoch, &e).await,
                        }
                        let now = standby.report();
                        if now != told {
                            told = now;
                            handle.set_report(now).await;
                        }
                        if last_log.elapsed() > Duration::from_secs(10) {
                            last_log = Instant::now();
                            info!(vm = %opts.vm, stats = ?standby.stats, "standby progress");
                        }
                    }
                    ReceiverEvent::Close { error } => {
                        warn!(vm = %opts.vm, %error, "replication connection closed");
                    }
                    ReceiverEvent::DiskSync(d) => {
                        if let Some(r) = standby.disk_sync(d) {
                            handle.disk_report(r).await;
                        }
                    }
                    ReceiverEvent::Verify(req) => {
                        let r = tokio::task::block_in_place(|| standby.verify(&req));
                        handle.verify_result(r).await;
                    }
                }
            }
        }
    };
    handle.close().await;
    if let Some((task, stop)) = active.take() {
        info!(vm = %opts.vm, "stopping the VM");
        let _ = stop.send(());
        // Longer than the hooks' exit wait (netops.hook_exit_wait_s, 30 s
        // by default), which the VM's protector honours as it stops.
        match tokio::time::timeout(Duration::from_secs(45), task).await {
            Ok(Ok(Err(e))) => warn!(vm = %opts.vm, error = %e, "the VM did not stop cleanly"),
            Err(_) => warn!(vm = %opts.vm, "the VM did not stop within 45 s"),
            _ => {}
        }
    }
    if let Some(Some(t)) = takeover {
        if let Some(a) = t.addresses {
            a.shutdown().await;
        }
    }
    if let Some(e) = endpoint {
        e.close();
    }
    match end {
        Some(Err(e)) => Err(StandbyError::Activation(e)),
        Some(Ok(ActiveEnd::Superseded { token })) => Err(StandbyError::Superseded { token }),
        _ => Ok(standby.stats.clone()),
    }
}

type ActiveTask = (
    tokio::task::JoinHandle<Result<ActiveEnd, String>>,
    tokio::sync::oneshot::Sender<()>,
);

/// Takes the VM over: announces its addresses under `token`, resumes it
/// from the replica's last committed epoch, runs the hooks.
fn promote(
    opts: &StandbyOptions,
    standby: &mut Standby,
    t: Takeover,
    token: u64,
) -> Result<ActiveTask, String> {
    let granted = Instant::now();
    let snap = t.arbiter.snapshot();
    let Some(store) = standby.replica() else {
        return Err("no replica to resume".into());
    };
    let epoch = store.meta().epoch;
    let Takeover {
        arbiter,
        events,
        activate,
        mut addresses,
    } = t;
    let announce = match &mut addresses {
        Some(a) => {
            let d = a.set_role(Role::Active, token);
            a.point_dns_here();
            a.spawn_hooks(
                HookEvent::Promote,
                token,
                Some(&opts.primary),
                Some(&opts.site),
            );
            d
        }
        None => Duration::ZERO,
    };
    let (stop, shutdown) = tokio::sync::oneshot::channel();
    let run = tokio::task::block_in_place(|| {
        activate(
            store,
            Activation {
                arbiter,
                events,
                addresses,
                shutdown,
            },
        )
    })?;
    // The VM runs from the replica now (its disk is the VM's disk): a
    // standby restarted on this folder must not offer it as a committed
    // epoch.
    if let Some(live) = standby.target.live.as_mut() {
        if let Err(e) = live.mark_diverged() {
            warn!(vm = %opts.vm, error = %e, "could not mark the replica as in use by the running VM");
        }
    }
    let activation = granted.elapsed();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let detection = match (snap.peer_heard, snap.candidate_since) {
        (Some(h), Some(c)) => Some(c.saturating_duration_since(h)),
        _ => None,
    };
    let arbitration = snap
        .candidate_since
        .map(|c| granted.saturating_duration_since(c));
    info!(
        vm = %opts.vm,
        token,
        epoch = ?epoch,
        detection_ms = ms(detection),
        arbitration_ms = ms(arbitration),
        activation_ms = ms(Some(activation)),
        announce_ms = ms(Some(announce)),
        "takeover complete: the VM runs here from the last committed epoch"
    );
    Ok((tokio::spawn(run), stop))
}

/// Where the replica of a full resync is built, beside the live one.
fn resync_dir_of(replica_dir: &Path) -> PathBuf {
    let mut name = replica_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".resync");
    replica_dir.with_file_name(name)
}

/// Finishes or undoes a resync swap that a crash interrupted. With no live
/// replica: a consistent resynchronised replica becomes the live one (the
/// crash came between the two renames); failing that, the previous live
/// replica, set aside as `.old`, comes back. A leftover `.old` beside a
/// live replica is removed.
pub fn recover_interrupted_swap(replica_dir: &Path) -> Result<(), StandbyError> {
    let old = replica_dir.with_extension("old");
    let resync = resync_dir_of(replica_dir);
    let present = |d: &Path| d.join("meta.json").exists();
    if !present(replica_dir) {
        let resync_ready =
            present(&resync) && ReplicaStore::open(&resync).is_ok_and(|s| s.meta().consistent);
        if resync_ready {
            warn!(dir = %replica_dir.display(), "finishing a resync swap interrupted by a crash: the resynchronised replica is the live one");
            std::fs::rename(&resync, replica_dir).map_err(StandbyError::Swap)?;
        } else if present(&old) {
            warn!(dir = %replica_dir.display(), "undoing a resync swap interrupted by a crash: the previous replica is the live one again");
            std::fs::rename(&old, replica_dir).map_err(StandbyError::Swap)?;
        }
    }
    if present(replica_dir) && old.exists() {
        std::fs::remove_dir_all(&old).map_err(StandbyError::Swap)?;
    }
    Ok(())
}

/// Where a VM's replica lives under the standby's state folder.
pub fn replica_dir(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join("replicas").join(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(dir: &Path, consistent: bool, epoch_marker: u8) {
        let mut s = ReplicaStore::create(dir, "web1", 4096, 4, 0).expect("create");
        if consistent {
            s.set_consistent().expect("consistent");
        }
        std::fs::write(dir.join("marker"), [epoch_marker]).expect("marker");
    }

    fn marker(dir: &Path) -> Option<u8> {
        std::fs::read(dir.join("marker")).ok().map(|m| m[0])
    }

    /// Every crash point of the swap recovers to one whole replica.
    #[test]
    fn an_interrupted_swap_is_finished_or_undone() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = root.path().join("web1");
        let old = live.with_extension("old");
        let resync = resync_dir_of(&live);

        // Crash after live -> .old, resync complete: finished.
        replica(&old, true, 1);
        replica(&resync, true, 2);
        recover_interrupted_swap(&live).expect("recover");
        assert_eq!(marker(&live), Some(2));
        assert!(!old.exists() && !resync.exists());

        // Crash after live -> .old, resync not consistent: undone.
        std::fs::remove_dir_all(&live).unwrap();
        replica(&old, true, 1);
        replica(&resync, false, 2);
        recover_interrupted_swap(&live).expect("recover");
        assert_eq!(marker(&live), Some(1));
        assert!(!old.exists());
        assert!(
            resync.exists(),
            "an unfinished resync is left for the next full epoch to replace"
        );

        // Crash after both renames, before .old was removed: cleaned up.
        std::fs::remove_dir_all(&resync).unwrap();
        replica(&old, true, 1);
        recover_interrupted_swap(&live).expect("recover");
        assert_eq!(marker(&live), Some(1));
        assert!(!old.exists());

        // Nothing to do.
        recover_interrupted_swap(&live).expect("recover");
        assert_eq!(marker(&live), Some(1));
    }
}
