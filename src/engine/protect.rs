//! `remus-wan protect`: continuous replication of a running guest with
//! output commit.
//!
//! One epoch: pause the guest, close the epoch (its transmitted frames and
//! disk writes are set aside under its number), copy dirty pages and state,
//! resume; encode against what was sent before; hand the bytes to the
//! replication session. When the backup acknowledges epoch N, the frames
//! the guest sent during N leave through the tap.
//!
//! Initial synchronisation is iterative pre-copy: the whole memory and disk
//! while the guest runs, then rounds of what it dirtied meanwhile, until a
//! round is small (or five rounds have passed); then the first checkpoint.
//! Pre-copy epochs carry no state (the standby knows them by that) and no
//! output; what the guest sends meanwhile waits for the first checkpoint.
//!
//! The decisions (what to do next and when, the lifecycle under the
//! failover rules, how far output may go) are the sans-IO
//! [`ProtectCore`] in `protect/machine.rs`; this file is its tokio driver:
//! it owns the guest, the encoder, the session and the addresses, feeds
//! the core what they report and executes its actions.

mod action;
mod lifecycle;
mod machine;
#[cfg(test)]
mod tests;

pub use action::{Action, ArbiterCall, Finish};
pub use lifecycle::{Lifecycle, Phase, Switchover};
pub use machine::{CoreConfig, Observed, ProtectCore};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypervisor::kvm::devices::block::WriteHook;
use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::Seams;
use hypervisor::{Checkpoint, FrameReader, ProtectedGuest};
use tracing::{info, warn};
use wan::codec::{Encoder, EncoderConfig};
use wan::session::{EpochKind, SenderConfig, SenderEvent};
use wan::transport::replication::{spawn_sender, QuicDialer, SenderHandle, SenderStatus};
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

use super::blockmap::{BlockMap, BLOCK_SIZE};
use super::disksync::choose_mode;
use super::output_commit::OutputBuffer;
use super::precopy::{
    ChecksumCursor, DiskCursor, DiskSource, MapCursor, PreCopy, Step, PRECOPY_DISK_BYTES,
    PRECOPY_IN_FLIGHT, PRECOPY_PAGES,
};
use super::release_gate::Release;
use super::verify::{self, VerifyRun};
use crate::addresses::Addresses;
use crate::arbiter::ArbiterHandle;
use crate::metrics::{ControlRequest, VerifyTotals};
use failover::Event;
use wan::session::wire::VerifyRegion;
use wan::session::wire::{DiskReport, DiskSync, DiskSyncMode, SyncBegin};

#[derive(Debug, Clone)]
pub struct ProtectOptions {
    pub site: String,
    pub backup: String,
    pub vm: String,
    /// The backup's replication endpoint.
    pub backup_addr: std::net::SocketAddr,
    /// Local address for our endpoint (port 0 is fine).
    pub bind: std::net::SocketAddr,
    /// The site daemon's endpoint, shared by all its VMs (one UDP port;
    /// each VM's session is a connection of its own on it); `None` binds
    /// one at `bind` for this VM alone.
    pub endpoint: Option<Endpoint>,
    pub tls: TlsPaths,
    pub interval: Duration,
    pub max_in_flight: u32,
    pub zstd_level: i32,
    pub cache_bytes: usize,
    /// Bytes of transmitted frames held at most while waiting for acks.
    pub output_limit: usize,
    pub max_epoch_bytes: u64,
    /// The guest's disk image, sent whole during the initial sync.
    pub disk: Option<PathBuf>,
    /// How often a progress line is logged.
    pub report_every: Duration,
}

/// Transmitted frames and disk writes, attributed to epochs.
#[derive(Debug)]
pub struct EpochIo {
    pub output: OutputBuffer,
    pub disk: Vec<(u64, Vec<u8>)>,
    /// The disk's written-block map (see `blockmap.rs`), when tracked.
    pub map: Option<BlockMap>,
    /// The epoch the writes captured now travel in (the map records it).
    pub open_epoch: u64,
    /// Whether captured writes are kept to travel with an epoch. Off while
    /// no epoch can leave (waiting for a peer, backing off): a sync always
    /// follows, and it reads the disk itself (the whole disk, the blocks
    /// the map recorded, or the blocks whose hashes differ), so keeping
    /// the writes would only grow memory for as long as the outage lasts.
    pub buffering: bool,
}

impl EpochIo {
    /// The captured writes leave in `epoch`: later ones travel in the next.
    pub fn drain_disk(&mut self, epoch: u64) -> Vec<(u64, Vec<u8>)> {
        self.open_epoch = epoch + 1;
        if let Some(m) = &mut self.map {
            m.note_epoch(epoch);
        }
        std::mem::take(&mut self.disk)
    }
}

/// Frames the guest transmits go into the output buffer.
struct HoldFrames {
    io: Arc<Mutex<EpochIo>>,
    dropped: Arc<AtomicU64>,
}

impl FrameSink for HoldFrames {
    fn send(&mut self, frame: &[u8]) {
        let full = match self.io.lock() {
            Ok(mut io) => io.output.hold(frame.to_vec()).is_err(),
            Err(_) => true,
        };
        if full {
            // Like a NIC with a full queue: TCP retransmits it. Never
            // released early.
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Disk writes of the running epoch, replicated with it.
struct CaptureWrites {
    io: Arc<Mutex<EpochIo>>,
}

impl WriteHook for CaptureWrites {
    fn on_write(&mut self, offset: u64, data: &[u8]) {
        if let Ok(mut io) = self.io.lock() {
            // The hook runs before the write reaches the image: the map
            // entry is never behind the disk (see blockmap.rs).
            let epoch = io.open_epoch;
            if let Some(m) = &mut io.map {
                m.record(offset, data.len(), epoch);
            }
            if io.buffering {
                io.disk.push((offset, data.to_vec()));
            }
        }
    }
}

/// What the engine shares with the VM it protects.
#[derive(Clone)]
pub struct Capture {
    pub io: Arc<Mutex<EpochIo>>,
    pub dropped_frames: Arc<AtomicU64>,
}

impl Capture {
    pub fn new(output_limit: usize) -> Self {
        Self {
            io: Arc::new(Mutex::new(EpochIo {
                output: OutputBuffer::new(1, output_limit),
                disk: Vec::new(),
                map: None,
                open_epoch: 1,
                buffering: true,
            })),
            dropped_frames: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Tracks the blocks the guest writes to `disk` in its block map
    /// (`<disk>.blockmap`). Call it before the guest starts, so no write
    /// escapes the map.
    pub fn track_disk(&self, disk: &std::path::Path) -> Result<(), ProtectError> {
        let len = std::fs::metadata(disk)
            .map_err(|source| ProtectError::Disk {
                path: disk.to_owned(),
                source,
            })?
            .len();
        let path = super::blockmap::map_path(disk);
        let (map, fresh) = BlockMap::open_or_create(&path, len)
            .map_err(|e| ProtectError::Session(e.to_string()))?;
        info!(map = %path.display(), lineage = format!("{:016x}", map.lineage()), fresh, max_epoch = map.max_epoch(), "written-block map");
        if let Ok(mut io) = self.io.lock() {
            io.open_epoch = map.max_epoch() + 1;
            io.map = Some(map);
        }
        Ok(())
    }

    /// The seams to build the protected VM with.
    pub fn seams(&self) -> Seams {
        Seams {
            frame_sink: Some(Box::new(HoldFrames {
                io: self.io.clone(),
                dropped: self.dropped_frames.clone(),
            })),
            write_hook: Some(Box::new(CaptureWrites {
                io: self.io.clone(),
            })),
        }
    }
}

/// Figures of a protected VM (status, metrics, benchmark).
#[derive(Debug, Clone, Default)]
pub struct ProtectStats {
    pub state: &'static str,
    pub epochs: u64,
    pub committed: u64,
    pub precopy_epochs: u64,
    pub resyncs: u64,
    pub pause_us: Vec<u64>,
    pub dirty_pages: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub output_held_bytes: usize,
    pub output_released_frames: u64,
    pub output_dropped_frames: u64,
    pub interval_ms: u64,
    pub rtt_ms: Option<f64>,
    /// Replication errors survived (session failures, refused epochs,
    /// failed checkpoints): each one ends in a full resync.
    pub replication_errors: u64,
    /// Synchronisations finished, and the last one's disk figures: its
    /// mode, the disk bytes and blocks it sent (not counting the writes
    /// captured meanwhile), the blocks it compared by hash.
    pub syncs: u64,
    pub sync_mode: &'static str,
    pub sync_disk_bytes: u64,
    pub sync_disk_blocks: u64,
    pub sync_blocks_compared: u64,
    /// Disk bytes sent by all synchronisations.
    pub sync_disk_bytes_total: u64,
    /// The sync under way: disk bytes gone through and in all.
    pub sync_progress: Option<(u64, u64)>,
    /// The last (or running) online verify, and totals over all runs.
    pub verify: Option<verify::VerifyProgress>,
    pub verify_totals: VerifyTotals,
}

impl ProtectStats {
    /// Percentile of recent pause times, in microseconds.
    pub fn pause_percentile(&self, p: f64) -> Option<u64> {
        if self.pause_us.is_empty() {
            return None;
        }
        let mut v = self.pause_us.clone();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        v.get(i).copied()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Transport(#[from] wan::transport::TransportError),
    #[error("guest: {0}")]
    Guest(#[from] hypervisor::GuestError),
    #[error("codec: {0}")]
    Codec(#[from] wan::codec::CodecError),
    #[error("replication session: {0}")]
    Session(String),
    /// The session cannot go on (its task ended, or it failed for good):
    /// a new one is needed.
    #[error("replication session ended: {0}")]
    SessionEnded(String),
    #[error("site {site} took the VM over under fencing token {token}: stopped here for good")]
    Demoted { site: String, token: u64 },
    #[error("reading the disk image {path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The tokio driver of a protected VM: it feeds the [`ProtectCore`] what
/// the guest, the replication session, the failover state machine and the
/// operator report, and executes the core's actions.
pub struct Protector<G: ProtectedGuest> {
    opts: ProtectOptions,
    guest: G,
    release: Option<Box<dyn FrameSink>>,
    capture: Capture,
    encoder: Encoder,
    sender: SenderHandle,
    events: tokio::sync::mpsc::UnboundedReceiver<SenderEvent>,
    next_epoch: u64,
    staging: Checkpoint,
    pub stats: Arc<Mutex<ProtectStats>>,
    endpoint: Endpoint,
    published: Option<crate::metrics::Published>,
    last_publish: (Instant, u64),
    failover: Option<Failover>,
    control: Option<tokio::sync::mpsc::Receiver<ControlRequest>>,
    /// The operator waiting for the switchover under way.
    switchover_reply: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
    /// The decisions: lifecycle, replication phase, pacing, output rule.
    core: ProtectCore,
    /// The cursors of the synchronisation under way (the core's phase
    /// says whether there is one).
    sync: Option<Box<PreCopy>>,
    /// The session's event channel is open (closed: its task ended).
    events_open: bool,
    /// The next sync sends the whole disk (a seeded one was refused).
    force_full: bool,
    /// Progress lines (and bar, on a terminal) of a synchronisation.
    progress: super::progress::SyncProgress,
    /// Online verify (`remus-wan verify`): the current or last run.
    verify: Option<VerifyRun>,
    /// Figures of the finished runs.
    verify_done: VerifyTotals,
    /// Guest memory, read at the pause (None: the backend cannot).
    frame_reader: Option<FrameReader>,
}

/// The failover side of a protected VM: the arbiter (its verdicts go to
/// the core) and the means to move the VM's addresses.
struct Failover {
    arbiter: ArbiterHandle,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    addresses: Option<Addresses>,
}

/// How a batch of actions ended.
enum Settled {
    /// Done; `recovered` when an error was turned into a backoff on the way.
    Done { recovered: bool },
    /// Protection ends (handed over, guest gone).
    Finished,
}

impl<G: ProtectedGuest> Protector<G> {
    /// Connects (lazily: the session dials and redials on its own) to the
    /// backup. `release` is where committed frames go (the tap).
    pub fn new(
        opts: ProtectOptions,
        guest: G,
        capture: Capture,
        release: Option<Box<dyn FrameSink>>,
    ) -> Result<Self, ProtectError> {
        let endpoint = match &opts.endpoint {
            Some(e) => e.clone(),
            None => Endpoint::bind(opts.bind, TransportConfig::new(opts.tls.clone()))?,
        };
        if let Some(disk) = &opts.disk {
            let tracked = capture.io.lock().map(|io| io.map.is_some()).unwrap_or(true);
            if !tracked {
                // Late (the guest may have written already): those writes
                // travel in the first sync, which is full or by checksum
                // for a fresh map, so the replica gets them anyway.
                capture.track_disk(disk)?;
            }
        }
        // Numbering continues above every epoch the block map has seen
        // (a restarted protect), so its entries compare with the standby's.
        let first = capture
            .io
            .lock()
            .map(|io| io.map.as_ref().map_or(1, |m| m.max_epoch() + 1))
            .unwrap_or(1);
        let (sender, events) = new_session(&opts, &endpoint, first);
        let frame_reader = guest.frame_reader();
        let encoder = Encoder::new(EncoderConfig {
            vm_id: vm_id(&opts.vm),
            page_size: guest.page_size(),
            cache_budget_bytes: opts.cache_bytes,
            zstd_level: opts.zstd_level,
            ..EncoderConfig::default()
        })?;
        let core = ProtectCore::new(
            CoreConfig {
                vm: opts.vm.clone(),
                site: opts.site.clone(),
                backup: opts.backup.clone(),
                interval: opts.interval,
                max_in_flight: opts.max_in_flight,
            },
            Instant::now(),
        );
        Ok(Self {
            opts,
            guest,
            release,
            capture,
            encoder,
            sender,
            events,
            next_epoch: first,
            staging: Checkpoint::default(),
            stats: Arc::new(Mutex::new(ProtectStats {
                state: "starting",
                ..ProtectStats::default()
            })),
            endpoint,
            published: None,
            last_publish: (Instant::now(), 0),
            failover: None,
            control: None,
            switchover_reply: None,
            core,
            sync: Some(Box::new(PreCopy::new(None))),
            events_open: true,
            force_full: false,
            progress: super::progress::SyncProgress::new(),
            verify: None,
            verify_done: VerifyTotals::default(),
            frame_reader,
        })
    }

    /// For a VM resumed at takeover: no synchronisation until the other
    /// site (the old primary, now holding a standby) connects; until the
    /// first checkpoint of that synchronisation the VM serves unprotected
    /// under this site's lease (there is no replica to commit to), and
    /// from its pause on output waits for commits again.
    pub fn protect_when_peer_returns(&mut self) {
        self.core.serve_until_peer_returns();
        self.buffer_captured_writes(false);
    }

    /// Takes operator requests (`remus-wan switchover`) from `control`.
    pub fn accept_control(&mut self, control: tokio::sync::mpsc::Receiver<ControlRequest>) {
        self.control = Some(control);
    }

    /// Puts protection under the failover rules: output leaves only while
    /// `arbiter` allows it, the guest pauses when this site fences itself,
    /// and `addresses` follow (announced while allowed, withdrawn when
    /// fenced or demoted). Without this, output leaves on commit alone (a
    /// deployment without a witness).
    pub fn with_failover(
        &mut self,
        arbiter: ArbiterHandle,
        events: tokio::sync::mpsc::UnboundedReceiver<Event>,
        addresses: Option<Addresses>,
    ) {
        self.failover = Some(Failover {
            arbiter,
            events,
            addresses,
        });
        self.core.with_witness();
    }

    /// Where to publish figures for `/metrics` and `/status`.
    pub fn publish_to(&mut self, published: crate::metrics::Published) {
        self.published = Some(published);
    }

    /// Whether the failover rules let this site release output now (no
    /// witness: always).
    fn lease_ok(&self) -> bool {
        self.failover
            .as_ref()
            .is_none_or(|f| f.arbiter.may_release())
    }

    /// The synchronisation's cursors, while the core is in pre-copy.
    fn sync_mut(&mut self) -> Option<&mut PreCopy> {
        if self.core.phase() != Phase::PreCopy {
            return None;
        }
        self.sync.as_deref_mut()
    }

    /// Executes the core's actions until there are none left. An action
    /// that fails ends the batch with its error (the core has not heard of
    /// it yet); `Some` when protection ends.
    async fn execute(&mut self) -> Result<Option<Finish>, ProtectError> {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::BeginSync { why } => self.begin_sync(why)?,
                Action::PreCopyStep => {
                    if !self.guest.is_running() {
                        self.core.handle_guest_stopped();
                        continue;
                    }
                    self.precopy_step().await?;
                }
                Action::PumpHashRequests => self.pump_hash_requests().await?,
                Action::Checkpoint { paced } => {
                    if paced && !self.guest.is_running() {
                        self.core.handle_guest_stopped();
                        continue;
                    }
                    self.checkpoint().await?;
                    if paced {
                        self.core.handle_checkpoint_sent(Instant::now());
                    }
                }
                Action::NewSession => {
                    let (sender, events) = new_session(&self.opts, &self.endpoint, self.next_epoch);
                    let old = std::mem::replace(&mut self.sender, sender);
                    self.events = events;
                    self.events_open = true;
                    tokio::spawn(async move { old.close().await });
                }
                Action::BufferWrites(on) => self.buffer_captured_writes(on),
                Action::Flush => self.flush_output(),
                Action::PauseGuest => tokio::task::block_in_place(|| self.guest.pause())?,
                Action::ResumeGuest => tokio::task::block_in_place(|| self.guest.resume())?,
                Action::HaltGuest => {
                    let _ = tokio::task::block_in_place(|| self.guest.pause());
                }
                Action::SetRole { role, token } => {
                    if let Some(a) = self.failover.as_mut().and_then(|f| f.addresses.as_mut()) {
                        a.set_role(role, token);
                    }
                }
                Action::PointDnsHere => {
                    if let Some(a) = self.failover.as_mut().and_then(|f| f.addresses.as_mut()) {
                        a.point_dns_here();
                    }
                }
                Action::Hooks {
                    event,
                    token,
                    sites,
                } => {
                    if let Some(a) = self.failover.as_ref().and_then(|f| f.addresses.as_ref()) {
                        let (from, to) = if sites {
                            (
                                Some(self.opts.site.as_str()),
                                Some(self.opts.backup.as_str()),
                            )
                        } else {
                            (None, None)
                        };
                        a.spawn_hooks(event, token, from, to);
                    }
                }
                Action::FinalCheckpoint => self.final_checkpoint().await?,
                Action::Arbiter(call) => {
                    if let Some(f) = &self.failover {
                        match call {
                            ArbiterCall::StartSwitchover => f.arbiter.start_switchover(),
                            ArbiterCall::FinalEpochCommitted => f.arbiter.final_epoch_committed(),
                            ArbiterCall::AbortSwitchover => f.arbiter.abort_switchover(),
                        }
                    }
                }
                Action::ReplySwitchover(r) => {
                    if let Some(reply) = self.switchover_reply.take() {
                        let _ = reply.send(r);
                    }
                }
                Action::ShowState(s) => self.set_state(s),
                Action::Finish(f) => return Ok(Some(f)),
            }
        }
        Ok(None)
    }

    /// Runs the core's actions after `first` (the outcome of what the
    /// driver just did), turning replication errors into a backoff (see
    /// [`ProtectCore::handle_error`]). Err only for a demotion.
    async fn settle(&mut self, first: Result<(), ProtectError>) -> Result<Settled, ProtectError> {
        let mut recovered = false;
        let mut r = first;
        loop {
            if let Err(e) = r {
                self.survive(e)?;
                recovered = true;
            }
            match self.execute().await {
                Ok(None) => return Ok(Settled::Done { recovered }),
                Ok(Some(f)) => return finish(f, &self.opts).map(|()| Settled::Finished),
                Err(e) => r = Err(e),
            }
        }
    }

    /// Hands an error to the core: a demotion ends protection (Err), a
    /// guest that is gone too (by an action); any other error is
    /// recovered from, the guest running on.
    fn survive(&mut self, e: ProtectError) -> Result<(), ProtectError> {
        match e {
            ProtectError::Demoted { .. } => return Err(e),
            ProtectError::Guest(hypervisor::GuestError::NotRunning) => {
                self.core.handle_guest_stopped()
            }
            e => {
                if let Ok(mut st) = self.stats.lock() {
                    st.replication_errors += 1;
                }
                let new_session = matches!(&e, ProtectError::SessionEnded(_));
                self.core.handle_error(Instant::now(), new_session, &e);
            }
        }
        if self.core.phase() != Phase::PreCopy {
            self.sync = None;
        }
        Ok(())
    }

    /// What the core needs to know of the session and the output buffer
    /// to decide the next step.
    fn observe(&self, st: &SenderStatus) -> Observed {
        let held = match self.capture.io.lock() {
            Ok(io) => io.output.held_bytes(),
            Err(_) => 0,
        };
        let in_flight = st.in_flight as u32;
        // A session that waits for a full image takes only the first
        // pre-copy epoch.
        let precopy_room = self.core.phase() == Phase::PreCopy
            && self.sync.as_ref().is_some_and(|pc| {
                st.connected
                    && st.in_flight < PRECOPY_IN_FLIGHT
                    && (!st.resync_pending || pc.kind() == EpochKind::Full)
                    && !pc.idle()
            });
        Observed {
            in_flight,
            resync_pending: st.resync_pending,
            output_pressure: held * 2 > self.opts.output_limit,
            backlog: st
                .link
                .as_ref()
                .map(|l| Duration::from_secs_f64(l.rtt.as_secs_f64() * in_flight as f64))
                .unwrap_or_default(),
            precopy_room,
        }
    }

    /// Protects until `shutdown` (or until the guest exits, or a newer
    /// token demotes this site). Replication errors do not end it: the
    /// guest runs on and a full resync follows (see
    /// [`ProtectCore::handle_error`]).
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<ProtectStats, ProtectError> {
        let r = self.run_loop(shutdown).await;
        // Every way out (a demotion too) withdraws the addresses and waits,
        // bounded, for the hooks it started.
        let stats = self.stop().await;
        r.map(|()| stats)
    }

    async fn run_loop(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ProtectError> {
        tokio::pin!(shutdown);
        self.core.handle_start(Instant::now());
        if let Settled::Finished = self.settle(Ok(())).await? {
            return Ok(());
        }
        let mut last_report = Instant::now();
        loop {
            let status = self.sender.status();
            let observed = self.observe(&status);
            let busy = self.core.handle_timeout(Instant::now(), observed);
            match self.settle(Ok(())).await? {
                Settled::Finished => break,
                // A step was taken (or failed): decide again before waiting.
                Settled::Done { recovered } if busy || recovered => continue,
                Settled::Done { .. } => {}
            }
            self.publish(&status);
            if last_report.elapsed() >= self.opts.report_every {
                last_report = Instant::now();
                self.report(&status);
            }
            let wake = match self.core.poll_timeout() {
                Some(t) => tokio::time::Instant::from_std(t),
                None => tokio::time::Instant::now() + self.opts.interval,
            };
            let failover_event = async {
                match &mut self.failover {
                    Some(f) => f.events.recv().await,
                    None => std::future::pending().await,
                }
            };
            let control = async {
                match &mut self.control {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            };
            let replication = async {
                if self.events_open {
                    self.events.recv().await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep_until(wake) => {}
                req = control => match req {
                    Some(ControlRequest::Verify { vm, scope, repair, reply }) => {
                        let r = self.begin_verify(&vm, scope, repair);
                        let _ = reply.send(r);
                    }
                    Some(ControlRequest::Switchover { vm, reply }) => {
                        let lease_ok = self.lease_ok();
                        match self.core.handle_switchover_request(&vm, lease_ok, self.next_epoch) {
                            Err(why) => {
                                let _ = reply.send(Err(why));
                            }
                            Ok(()) => {
                                self.switchover_reply = Some(reply);
                                if let Settled::Finished = self.settle(Ok(())).await? {
                                    break;
                                }
                            }
                        }
                    }
                    None => self.control = None,
                },
                ev = failover_event => {
                    let Some(ev) = ev else {
                        return Err(ProtectError::Session("failover task stopped".into()));
                    };
                    let token = self.failover.as_ref().map_or(0, |f| f.arbiter.token());
                    self.core.handle_failover(Instant::now(), ev, token);
                    // Failing to pause or resume the guest here is fatal.
                    if let Some(f) = self.execute().await? {
                        finish(f, &self.opts)?;
                        break;
                    }
                }
                ev = replication => {
                    let r = self.on_sender_event(ev);
                    if let Settled::Finished = self.settle(r).await? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// What the replication session reports.
    fn on_sender_event(&mut self, ev: Option<SenderEvent>) -> Result<(), ProtectError> {
        let Some(ev) = ev else {
            self.events_open = false;
            return Err(ProtectError::SessionEnded(
                "the replication task stopped".into(),
            ));
        };
        match ev {
            SenderEvent::Committed { epoch } => {
                self.encoder.acknowledge(epoch);
                self.core.handle_committed(epoch);
                let c = self.core.committed_checkpoint();
                if let Ok(mut st) = self.stats.lock() {
                    st.committed = st.committed.max(c);
                }
            }
            SenderEvent::DiskReport(r) => return self.on_disk_report(r),
            SenderEvent::ResyncRequired { reason, .. } => {
                warn!(vm = %self.opts.vm, reason, "backup needs a full resync");
                // A seeded sync whose opening epoch the standby refused
                // (it could not seed): the next one sends the whole disk.
                let seeded = self.sync_mut().is_some_and(|pc| {
                    pc.disk
                        .as_ref()
                        .and_then(DiskSource::mode)
                        .is_some_and(|m| m != DiskSyncMode::Full)
                });
                if seeded && reason.contains("rejected") {
                    self.force_full = true;
                }
                if let Ok(mut st) = self.stats.lock() {
                    st.resyncs += 1;
                }
                self.core.handle_resync_required();
            }
            SenderEvent::Connected {
                peer_site,
                receiver_committed,
                ..
            } => {
                info!(vm = %self.opts.vm, peer = %peer_site, receiver_committed, "backup connected");
                self.core.handle_connected(&peer_site);
            }
            SenderEvent::VerifyResult(r) => {
                if let Some(v) = &mut self.verify {
                    if v.on_result(&r) == verify::Action::Finished {
                        self.verify_finished();
                    }
                    self.publish_verify();
                }
            }
            SenderEvent::Disconnected { error, retry_in } => {
                if let Some(pc) = self.sync_mut() {
                    if let Some(DiskSource::Checksum(c)) = &mut pc.disk {
                        c.sync.connection_lost();
                    }
                }
                if let Some(v) = &mut self.verify {
                    // Requests on that connection may be lost: asked again.
                    v.lost_all();
                }
                if self.core.releases_at_once() {
                    warn!(vm = %self.opts.vm, %error, ?retry_in, "backup unreachable (the VM runs unprotected meanwhile)");
                } else {
                    warn!(vm = %self.opts.vm, %error, ?retry_in, "backup unreachable: output is held until it is back or declared lost");
                }
            }
            SenderEvent::Failed { error } => {
                return Err(ProtectError::SessionEnded(format!("it failed: {error}")));
            }
            _ => {}
        }
        Ok(())
    }

    /// A switchover's first half: the final checkpoint and the pause come
    /// before the failover state machine hears of it: if either fails,
    /// nothing was started there and the VM runs on.
    async fn final_checkpoint(&mut self) -> Result<(), ProtectError> {
        let started = Instant::now();
        let final_epoch = match self.checkpoint().await {
            Ok(e) => e,
            Err(e) => {
                self.reply_switchover(Err(format!("the final checkpoint failed: {e}")));
                return Err(e);
            }
        };
        if let Err(e) = tokio::task::block_in_place(|| self.guest.pause()) {
            self.reply_switchover(Err(format!("pausing the guest failed: {e}")));
            return Err(e.into());
        }
        self.core.handle_switchover_paused(final_epoch, started);
        Ok(())
    }

    fn reply_switchover(&mut self, r: Result<String, String>) {
        if let Some(reply) = self.switchover_reply.take() {
            let _ = reply.send(r);
        }
    }
    fn publish(&mut self, status: &wan::transport::replication::SenderStatus) {
        let Some(p) = &self.published else { return };
        let now = Instant::now();
        let dt = now.duration_since(self.last_publish.0);
        if dt < Duration::from_millis(500) {
            return;
        }
        let held = self
            .capture
            .io
            .lock()
            .map(|io| io.output.held_bytes())
            .unwrap_or(0);
        let Ok(st) = self.stats.lock() else { return };
        let n = st.epochs.max(1) as f64;
        let v = crate::metrics::VmStatus {
            vm: self.opts.vm.clone(),
            role: "primary".into(),
            state: st.state.into(),
            peer: self.opts.backup.clone(),
            epochs: st.epochs,
            committed_epoch: st.committed,
            epoch_rate_hz: (st.epochs - self.last_publish.1) as f64 / dt.as_secs_f64(),
            pause_p50_us: st.pause_percentile(0.5),
            pause_p99_us: st.pause_percentile(0.99),
            dirty_pages_per_epoch: st.dirty_pages as f64 / n,
            raw_bytes_per_epoch: st.raw_bytes as f64 / n,
            wire_bytes_per_epoch: st.wire_bytes as f64 / n,
            compression_ratio: st.raw_bytes as f64 / st.wire_bytes.max(1) as f64,
            lag_epochs: (self.next_epoch - 1).saturating_sub(st.committed),
            rtt_ms: status.link.as_ref().map(|l| l.rtt.as_secs_f64() * 1e3),
            output_held_bytes: held as u64,
            output_dropped_frames: self.capture.dropped_frames.load(Ordering::Relaxed),
            epochs_rejected: 0,
            interval_ms: self.core.interval().as_millis() as u64,
            failover: self
                .failover
                .as_ref()
                .map(|f| crate::metrics::FailoverStatus::from_snapshot(&f.arbiter.snapshot())),
            verify: st.verify.clone(),
            verify_totals: st.verify_totals.clone(),
            members: Vec::new(),
        };
        self.last_publish = (now, st.epochs);
        drop(st);
        crate::metrics::publish_vm(p, v);
    }

    fn set_state(&self, s: &'static str) {
        if let Ok(mut st) = self.stats.lock() {
            st.state = s;
        }
    }

    async fn push(&mut self, kind: EpochKind, bytes: Vec<u8>) -> Result<u64, ProtectError> {
        self.push_with(kind, bytes, None).await
    }

    /// Pushes an epoch, preceded on the stream by `prelude` (the DISK_SYNC
    /// frame of a sync's opening epoch).
    async fn push_with(
        &mut self,
        kind: EpochKind,
        bytes: Vec<u8>,
        prelude: Option<DiskSync>,
    ) -> Result<u64, ProtectError> {
        let want = self.next_epoch;
        let pushed = match prelude {
            Some(p) => {
                self.sender
                    .push_epoch_with_prelude(kind, Bytes::from(bytes), p)
                    .await
            }
            None => self.sender.push_epoch(kind, Bytes::from(bytes)).await,
        };
        let got = pushed.map_err(|e| ProtectError::Session(e.to_string()))?;
        if got != want {
            // The session renumbered (its backup is ahead of what this
            // process produced: a restart on either side). The epoch went
            // out under a number the encoder did not write: follow the
            // session's numbering and start over with a full resync.
            self.next_epoch = got + 1;
            return Err(ProtectError::Session(format!(
                "session numbered epoch {got}, the encoder made epoch {want}: resynchronising"
            )));
        }
        self.next_epoch += 1;
        Ok(got)
    }

    /// Keeps (or drops, and stops keeping) the guest's captured disk
    /// writes; see [`EpochIo::buffering`].
    fn buffer_captured_writes(&self, on: bool) {
        if let Ok(mut io) = self.capture.io.lock() {
            io.buffering = on;
            if !on {
                io.disk = Vec::new();
            }
        }
    }

    /// The input/output of a full synchronisation's start (the core
    /// decided it and reset the release rule): the backup builds a new
    /// replica from nothing, beside the one it has until this one is
    /// consistent.
    fn begin_sync(&mut self, why: &str) -> Result<(), ProtectError> {
        // From here writes travel again: after the sync's disk reads.
        self.buffer_captured_writes(true);
        if let Some(v) = &mut self.verify {
            // Hashes in flight are answered against a replica being
            // rebuilt: they are asked again once it is consistent.
            v.lost_all();
        }
        self.encoder.reset();
        self.guest.restart_sync();
        // Follow the session's numbering (it may have moved past ours).
        self.next_epoch = self.next_epoch.max(self.sender.status().next_epoch);
        let disk = match &self.opts.disk {
            Some(path) => {
                let len = std::fs::metadata(path)
                    .map_err(|source| ProtectError::Disk {
                        path: path.clone(),
                        source,
                    })?
                    .len();
                Some(DiskSource::Pending(path.clone(), len))
            }
            None => None,
        };
        info!(vm = %self.opts.vm, pages = self.guest.frame_count(), disk_bytes = disk.as_ref().map(|d| d.progress().1), why, "full synchronisation: pre-copy while the guest runs");
        self.sync = Some(Box::new(PreCopy::new(disk)));
        Ok(())
    }

    /// Chooses how the sync fills the replica's disk, now that the standby
    /// said what it holds; returns the DISK_SYNC frame that goes before
    /// the sync's first (full) epoch.
    fn resolve_disk_source(&mut self, epoch: u64) -> Result<Option<DiskSync>, ProtectError> {
        let Some(pc) = self
            .sync
            .as_deref_mut()
            .filter(|_| self.core.phase() == Phase::PreCopy)
        else {
            return Ok(None);
        };
        let Some(DiskSource::Pending(path, len)) = &pc.disk else {
            return Ok(None);
        };
        let (path, len) = (path.clone(), *len);
        let report = self.sender.status().peer_report;
        let lineage = self
            .capture
            .io
            .lock()
            .ok()
            .and_then(|io| io.map.as_ref().map(|m| m.lineage()));
        let (mode, base) = choose_mode(report.as_ref(), lineage, len, self.force_full);
        let err = |source| ProtectError::Disk {
            path: path.clone(),
            source,
        };
        let source = match mode {
            DiskSyncMode::Full => DiskSource::Full(DiskCursor::open(&path).map_err(err)?),
            DiskSyncMode::Incremental => {
                DiskSource::Incremental(MapCursor::open(&path, len, base).map_err(err)?)
            }
            DiskSyncMode::Checksum => {
                let mut c = ChecksumCursor::open(&path, len).map_err(err)?;
                c.opening_epoch = Some(epoch);
                DiskSource::Checksum(c)
            }
        };
        let written = match (mode, self.capture.io.lock()) {
            (DiskSyncMode::Incremental, Ok(io)) => {
                io.map.as_ref().map(|m| m.count_written_after(base))
            }
            _ => None,
        };
        info!(vm = %self.opts.vm, mode = mode.name(), base, blocks_written_since = written, standby = ?report, "disk synchronisation mode");
        pc.disk = Some(source);
        self.progress.start(len, mode.name());
        Ok(Some(DiskSync::Begin(SyncBegin {
            epoch,
            lineage: lineage.unwrap_or(0),
            mode,
            base,
            block_size: BLOCK_SIZE as u32,
            disk_bytes: len,
        })))
    }

    /// Asks the standby for the next hash batches of a checksum resync,
    /// once the sync's opening epoch is committed (it seeds the replica).
    async fn pump_hash_requests(&mut self) -> Result<(), ProtectError> {
        let committed = self.sender.status().committed;
        let Some(pc) = self
            .sync
            .as_deref_mut()
            .filter(|_| self.core.phase() == Phase::PreCopy)
        else {
            return Ok(());
        };
        let Some(DiskSource::Checksum(c)) = &mut pc.disk else {
            return Ok(());
        };
        if c.opening_epoch.is_none_or(|e| committed < e) {
            return Ok(());
        }
        // Bounded by the window of HASH_BATCHES_AHEAD batches.
        while let Some((first_block, count)) = c.sync.poll_request() {
            let sent = self
                .sender
                .send_disk_sync(DiskSync::HashRequest { first_block, count })
                .await
                .map_err(|e| ProtectError::SessionEnded(e.to_string()))?;
            if !sent {
                c.sync.unsent(first_block);
                break;
            }
        }
        Ok(())
    }

    /// The standby's answer to a hash request.
    fn on_disk_report(&mut self, r: DiskReport) -> Result<(), ProtectError> {
        let Some(pc) = self
            .sync
            .as_deref_mut()
            .filter(|_| self.core.phase() == Phase::PreCopy)
        else {
            return Ok(());
        };
        let Some(DiskSource::Checksum(c)) = &mut pc.disk else {
            return Ok(());
        };
        match r {
            DiskReport::Hashes {
                first_block,
                hashes,
            } => c
                .sync
                .on_hashes(first_block, hashes)
                .map_err(|e| ProtectError::Session(format!("checksum resync: {e}"))),
            DiskReport::NoSeed { first_block } => {
                self.force_full = true;
                Err(ProtectError::Session(format!(
                    "checksum resync: the standby has no seeded replica to hash (block {first_block}); a full one follows"
                )))
            }
            DiskReport::Replica(_) => Ok(()),
        }
    }

    /// One pre-copy epoch: pages dirtied (all of them at first), a share of
    /// the disk and the writes captured meanwhile; at the end of the last
    /// round, the first checkpoint.
    async fn precopy_step(&mut self) -> Result<(), ProtectError> {
        let Some(pc) = self
            .sync
            .as_deref_mut()
            .filter(|_| self.core.phase() == Phase::PreCopy)
        else {
            return Ok(());
        };
        let prelude = if pc.epochs == 0 {
            let epoch = self.next_epoch;
            self.resolve_disk_source(epoch)?
        } else {
            None
        };
        let Some(pc) = self
            .sync
            .as_deref_mut()
            .filter(|_| self.core.phase() == Phase::PreCopy)
        else {
            return Ok(());
        };
        let read = match &mut pc.disk {
            None | Some(DiskSource::Pending(..)) => Ok(Vec::new()),
            Some(DiskSource::Full(d)) => d.next_chunks(PRECOPY_DISK_BYTES),
            Some(DiskSource::Incremental(m)) => match self.capture.io.lock() {
                Ok(io) => match &io.map {
                    Some(map) => m.next_blocks(map, PRECOPY_DISK_BYTES),
                    None => Ok(Vec::new()),
                },
                Err(_) => Ok(Vec::new()),
            },
            Some(DiskSource::Checksum(c)) => c.next_blocks(PRECOPY_DISK_BYTES),
        };
        let mut disk = read.map_err(|source| ProtectError::Disk {
            path: self.opts.disk.clone().unwrap_or_default(),
            source,
        })?;
        pc.disk_sent_bytes += disk.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        pc.disk_sent_blocks += disk.len() as u64;
        if let Some(d) = &pc.disk {
            let (done, total) = d.progress();
            self.progress.update(done, total, pc.disk_sent_bytes);
            if let Ok(mut st) = self.stats.lock() {
                st.sync_progress = Some((done, total));
            }
        }
        let mut cp = std::mem::take(&mut self.staging);
        tokio::task::block_in_place(|| self.guest.precopy_round(PRECOPY_PAGES, &mut cp))?;
        // Captured writes after the chunks (see precopy.rs).
        if let Ok(mut io) = self.capture.io.lock() {
            disk.append(&mut io.drain_disk(self.next_epoch));
        }
        let n = cp.frames.len();
        let disk_bytes: usize = disk.iter().map(|(_, d)| d.len()).sum();
        let Some(pc) = self
            .sync
            .as_deref_mut()
            .filter(|_| self.core.phase() == Phase::PreCopy)
        else {
            return Ok(());
        };
        let send = pc.worth_sending(n, disk_bytes);
        let kind = pc.kind();
        if send {
            let pages: Vec<(u64, &[u8])> = cp.page_slices(self.guest.page_size()).collect();
            let dw: Vec<(u64, &[u8])> = disk.iter().map(|(o, d)| (*o, &d[..])).collect();
            let epoch = self.next_epoch;
            let bytes =
                tokio::task::block_in_place(|| self.encoder.encode(epoch, &pages, &[], &dw));
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    self.staging = cp;
                    return Err(e.into());
                }
            };
            self.account(
                n as u64,
                (n * self.guest.page_size() + disk_bytes) as u64,
                bytes.len() as u64,
                None,
            );
            let pushed = self.push_with(kind, bytes, prelude).await;
            self.staging = cp;
            pushed?;
            if let Ok(mut st) = self.stats.lock() {
                st.precopy_epochs += 1;
            }
        } else {
            self.staging = cp;
        }
        // A VM that already serves keeps serving while its standby fills.
        self.flush_output();
        let Some(pc) = self
            .sync
            .as_deref_mut()
            .filter(|_| self.core.phase() == Phase::PreCopy)
        else {
            return Ok(());
        };
        match pc.stepped(n, send) {
            Step::More => {}
            Step::RoundDone { round, pages } => {
                info!(vm = %self.opts.vm, round, pages, sent_pages = pc.sent_pages, "pre-copy round done");
            }
            Step::Finished { round, pages } => {
                info!(vm = %self.opts.vm, round, pages, sent_pages = pc.sent_pages, epochs = pc.epochs, "pre-copy done: first checkpoint");
                if let Some(d) = &pc.disk {
                    let mode = d.mode().map_or("none", DiskSyncMode::name);
                    let compared = match d {
                        DiskSource::Checksum(c) => c.sync.compared,
                        _ => 0,
                    };
                    let (_, total) = d.progress();
                    info!(
                        vm = %self.opts.vm,
                        mode,
                        disk_bytes = total,
                        sent_bytes = pc.disk_sent_bytes,
                        sent_blocks = pc.disk_sent_blocks,
                        compared_blocks = compared,
                        took_ms = pc.started.elapsed().as_millis() as u64,
                        "disk synchronised"
                    );
                    if let Ok(mut st) = self.stats.lock() {
                        st.syncs += 1;
                        st.sync_mode = mode;
                        st.sync_disk_bytes = pc.disk_sent_bytes;
                        st.sync_disk_blocks = pc.disk_sent_blocks;
                        st.sync_blocks_compared = compared;
                        st.sync_disk_bytes_total += pc.disk_sent_bytes;
                        st.sync_progress = None;
                    }
                    if d.mode() == Some(DiskSyncMode::Full) {
                        self.force_full = false;
                    }
                    self.progress.finish();
                    if let Ok(io) = self.capture.io.lock() {
                        if let Some(m) = &io.map {
                            m.flush_async();
                        }
                    }
                }
                // The first checkpoint follows, as the core's action.
                self.core.handle_precopy_finished();
            }
        }
        if self.core.phase() != Phase::PreCopy {
            self.sync = None;
        }
        Ok(())
    }

    fn account(&self, pages: u64, raw: u64, wire: u64, pause: Option<Duration>) {
        if let Ok(mut st) = self.stats.lock() {
            st.epochs += 1;
            st.dirty_pages += pages;
            st.raw_bytes += raw;
            st.wire_bytes += wire;
            if let Some(p) = pause {
                if st.pause_us.len() >= 1024 {
                    st.pause_us.remove(0);
                }
                st.pause_us.push(p.as_micros() as u64);
            }
        }
    }

    /// One checkpoint: pause, close the epoch, copy, resume, encode, send.
    async fn checkpoint(&mut self) -> Result<u64, ProtectError> {
        let epoch = self.next_epoch;
        let io = self.capture.io.clone();
        let mut disk = Vec::new();
        let mut cp = std::mem::take(&mut self.staging);
        // Online verify: what to resend and what to hash at this pause.
        let (repairs, slice, layout) = match &mut self.verify {
            Some(v) if !v.is_finished() && self.core.phase() == Phase::Checkpointing => {
                (v.take_repairs(), v.next_slice(), Some(*v.layout()))
            }
            _ => (Vec::new(), None, None),
        };
        let reader = self.frame_reader.clone();
        let disk_path = self.opts.disk.clone();
        let mut at_pause = verify::AtPause::default();
        tokio::task::block_in_place(|| {
            self.guest.checkpoint(&mut cp, &mut || {
                if let Ok(mut io) = io.lock() {
                    io.output.close_epoch_as(epoch);
                    disk = io.drain_disk(epoch);
                }
                crate::faults::point("protect.paused");
                if let Some(l) = &layout {
                    // The guest is paused and its writes of this epoch
                    // are captured: memory and disk are exactly what the
                    // replica will hold at the commit of this epoch.
                    at_pause =
                        verify::at_pause(l, reader.as_ref(), disk_path.as_deref(), &repairs, slice);
                }
            })
        })?;
        self.core.handle_checkpoint_taken(epoch);
        let ps = self.guest.page_size();
        let mut pages: Vec<(u64, &[u8])> = cp.page_slices(ps).collect();
        if !at_pause.pages.is_empty() {
            // Resent whole: the replica's copy is not what was sent.
            let frames: Vec<u64> = at_pause.pages.iter().map(|(f, _)| *f).collect();
            self.encoder.forget_frames(&frames);
            for (f, data) in &at_pause.pages {
                if cp.frames.binary_search(f).is_err() {
                    pages.push((*f, &data[..]));
                }
            }
            pages.sort_unstable_by_key(|(f, _)| *f);
        }
        // Blocks resent come after the epoch's writes: read at the pause,
        // they already include them.
        let dw: Vec<(u64, &[u8])> = disk
            .iter()
            .chain(&at_pause.blocks)
            .map(|(o, d)| (*o, &d[..]))
            .collect();
        let disk_bytes: usize = disk.iter().map(|(_, d)| d.len()).sum();
        let bytes =
            tokio::task::block_in_place(|| self.encoder.encode(epoch, &pages, &cp.state, &dw))?;
        self.account(
            cp.frames.len() as u64,
            (cp.pages.len() + cp.state.len() + disk_bytes) as u64,
            bytes.len() as u64,
            Some(cp.timings.total),
        );
        self.staging = cp;
        let sent = self.push(EpochKind::Delta, bytes).await;
        crate::faults::point("protect.sent");
        if sent.is_ok() && layout.is_some() {
            self.verify_sent(epoch, &repairs, slice, at_pause).await;
        }
        sent
    }

    /// After epoch `epoch` went to the session: the verify request that
    /// follows it, and the bookkeeping of repairs.
    async fn verify_sent(
        &mut self,
        epoch: u64,
        repairs: &[(VerifyRegion, u64)],
        slice: Option<verify::Slice>,
        at_pause: verify::AtPause,
    ) {
        let Some(v) = &mut self.verify else { return };
        if let Some(e) = at_pause.error {
            warn!(vm = %self.opts.vm, error = %e, "verify: reading the primary failed; run stopped");
            v.abort(&e);
            self.verify_finished();
            self.publish_verify();
            return;
        }
        for &(region, unit) in repairs {
            v.repair_sent(region, unit);
        }
        if !repairs.is_empty() {
            info!(vm = %self.opts.vm, epoch, units = repairs.len(), "verify: differing pages/blocks resent whole");
        }
        if let (Some(s), Some(h)) = (slice, at_pause.hashes) {
            let req = v.hashed(s, epoch, h);
            let id = req.id;
            if !matches!(self.sender.push_verify(req).await, Ok(true)) {
                if let Some(v) = &mut self.verify {
                    v.lost(id);
                }
            }
        }
        self.publish_verify();
    }

    /// `remus-wan verify`: starts a run (answered at once with its number).
    fn begin_verify(
        &mut self,
        vm: &str,
        scope: verify::Scope,
        repair: bool,
    ) -> Result<String, String> {
        if vm != self.opts.vm {
            return Err(format!("this process protects {}, not {vm}", self.opts.vm));
        }
        if let Some(v) = self.verify.as_ref().filter(|v| !v.is_finished()) {
            return Err(format!(
                "verify run {} is under way: wait for it (remus-wan status)",
                v.progress().run
            ));
        }
        if scope.memory && self.frame_reader.is_none() {
            return Err(
                "this guest backend cannot read guest memory at the pause: use --disk-only".into(),
            );
        }
        let disk_bytes = match &self.opts.disk {
            Some(p) if scope.disk => std::fs::metadata(p)
                .map_err(|e| format!("cannot read the disk image {}: {e}", p.display()))?
                .len(),
            _ => 0,
        };
        if scope.disk && !scope.memory && disk_bytes == 0 {
            return Err(format!("{vm} has no disk to verify"));
        }
        let run = self.verify_done.runs + 1;
        let layout = verify::Layout {
            page_size: self.guest.page_size() as u32,
            frames: if scope.memory {
                self.guest.frame_count()
            } else {
                0
            },
            disk_bytes,
        };
        let v = VerifyRun::new(run, layout, scope, repair);
        let total = v.progress().slices_total;
        info!(vm = %self.opts.vm, run, slices = total, frames = layout.frames, disk_bytes, repair, "verify: run starts (one slice per checkpoint)");
        self.verify_done.runs = run;
        self.verify = Some(v);
        if self.verify.as_ref().is_some_and(|v| v.is_finished()) {
            self.verify_finished();
        }
        self.publish_verify();
        Ok(format!("verify run {run} started: {total} slices"))
    }

    /// A run ended: its figures join the totals, a summary is logged.
    fn verify_finished(&mut self) {
        let Some(v) = &self.verify else { return };
        let p = v.progress();
        let t = &mut self.verify_done;
        t.pages_checked += p.pages_checked;
        t.blocks_checked += p.blocks_checked;
        t.mismatches += p.mismatches;
        t.repaired += p.repaired;
        if p.state == "failed" {
            warn!(vm = %self.opts.vm, run = p.run, error = ?p.error, "verify failed");
        } else if p.mismatches == 0 {
            info!(vm = %self.opts.vm, run = p.run, pages = p.pages_checked, blocks = p.blocks_checked, "verify done: the replica is identical");
        } else {
            warn!(vm = %self.opts.vm, run = p.run, pages = p.pages_checked, blocks = p.blocks_checked, differences = p.mismatches, repaired = p.repaired, "verify done: the replica differed");
        }
    }

    /// Puts the verify figures where status and metrics read them.
    fn publish_verify(&self) {
        let Some(v) = &self.verify else { return };
        let p = v.progress();
        let mut totals = self.verify_done.clone();
        if !v.is_finished() {
            totals.pages_checked += p.pages_checked;
            totals.blocks_checked += p.blocks_checked;
            totals.mismatches += p.mismatches;
            totals.repaired += p.repaired;
        }
        if let Ok(mut st) = self.stats.lock() {
            st.verify = Some(p.clone());
            st.verify_totals = totals;
        }
    }

    /// Releases what may leave now, while this site may release output:
    /// what the core allows (committed checkpoints' frames, or everything
    /// while the VM runs unprotected).
    fn flush_output(&mut self) {
        let Some(release) = self.core.release_now(self.lease_ok()) else {
            return;
        };
        let frames = match (self.capture.io.lock(), release) {
            (Ok(mut io), Release::All) => io.output.release_all(),
            (Ok(mut io), Release::Through(n)) => io.output.release_through(n),
            (Err(_), _) => Vec::new(),
        };
        if frames.is_empty() {
            return;
        }
        if let Some(tap) = &mut self.release {
            for f in &frames {
                tap.send(f);
            }
        }
        if let Ok(mut st) = self.stats.lock() {
            st.output_released_frames += frames.len() as u64;
        }
    }

    /// Ends protection: addresses shut down, session closed.
    async fn stop(mut self) -> ProtectStats {
        self.set_state("stopped");
        if let Some(f) = self.failover.take() {
            if let Some(a) = f.addresses {
                a.shutdown().await;
            }
        }
        self.sender.close().await;
        if self.opts.endpoint.is_none() {
            // Ours alone; a daemon's shared endpoint outlives its VMs.
            self.endpoint.close();
        }
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn report(&self, status: &wan::transport::replication::SenderStatus) {
        let held = self
            .capture
            .io
            .lock()
            .map(|io| io.output.held_bytes())
            .unwrap_or(0);
        if let Ok(mut st) = self.stats.lock() {
            st.interval_ms = self.core.interval().as_millis() as u64;
            st.output_held_bytes = held;
            st.output_dropped_frames = self.capture.dropped_frames.load(Ordering::Relaxed);
            st.rtt_ms = status.link.as_ref().map(|l| l.rtt.as_secs_f64() * 1e3);
            info!(
                vm = %self.opts.vm,
                epochs = st.epochs,
                committed = st.committed,
                pause_p50_us = st.pause_percentile(0.5),
                pause_p99_us = st.pause_percentile(0.99),
                ratio = format!("{:.1}", st.raw_bytes as f64 / st.wire_bytes.max(1) as f64),
                held_bytes = held,
                interval_ms = st.interval_ms,
                "protecting"
            );
        }
    }
}

/// What an end of protection means for the caller: a demotion is an
/// error, the other ends are not.
fn finish(f: Finish, opts: &ProtectOptions) -> Result<(), ProtectError> {
    match f {
        Finish::HandedOver | Finish::GuestStopped => Ok(()),
        Finish::Demoted { token } => Err(ProtectError::Demoted {
            site: opts.backup.clone(),
            token,
        }),
    }
}

/// A replication session towards the backup, numbering from `first`; it
/// dials (and redials) on its own.
fn new_session(
    opts: &ProtectOptions,
    endpoint: &Endpoint,
    first: u64,
) -> (
    SenderHandle,
    tokio::sync::mpsc::UnboundedReceiver<SenderEvent>,
) {
    let mut scfg = SenderConfig::new(opts.site.clone(), opts.vm.clone());
    scfg.max_in_flight = opts.max_in_flight as usize;
    scfg.max_epoch_size = opts.max_epoch_bytes;
    spawn_sender(
        QuicDialer {
            endpoint: endpoint.clone(),
            addr: opts.backup_addr,
            peer_site: opts.backup.clone(),
        },
        scfg,
        first,
    )
}

/// A stable numeric id for a VM name (carried in every epoch header).
pub fn vm_id(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}
