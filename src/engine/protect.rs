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

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypervisor::kvm::devices::block::WriteHook;
use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::Seams;
use hypervisor::{Checkpoint, FrameReader, ProtectedGuest};
use tracing::{error, info, warn};
use wan::codec::{Encoder, EncoderConfig};
use wan::session::{EpochKind, SenderConfig, SenderEvent};
use wan::transport::replication::{spawn_sender, QuicDialer, SenderHandle};
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

use super::blockmap::{BlockMap, BLOCK_SIZE};
use super::disksync::choose_mode;
use super::output_commit::OutputBuffer;
use super::pacer::{Decision, Pacer};
use super::precopy::{
    ChecksumCursor, DiskCursor, DiskSource, MapCursor, PreCopy, Step, PRECOPY_DISK_BYTES,
    PRECOPY_IN_FLIGHT, PRECOPY_PAGES,
};
use super::release_gate::{Release, ReleaseGate};
use super::verify::{self, VerifyRun};
use crate::addresses::Addresses;
use crate::arbiter::ArbiterHandle;
use crate::metrics::{ControlRequest, VerifyTotals};
use failover::Event;
use netops::config::HookEvent;
use netops::policy::Role;
use wan::session::wire::VerifyRegion;
use wan::session::wire::{DiskReport, DiskSync, DiskSyncMode, SyncBegin};

/// A switchover not done by then is aborted: the backup did not commit
/// the final epoch, or the witness did not move the lease.
const SWITCHOVER_DEADLINE: Duration = Duration::from_secs(20);

/// The first wait after a replication error; doubled up to the maximum.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

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
    /// How far held output may go (commits of checkpoints, or at once
    /// while the VM serves with no replica anywhere).
    gate: ReleaseGate,
    control: Option<tokio::sync::mpsc::Receiver<ControlRequest>>,
    switchover: Option<Switchover>,
    /// The VM now runs elsewhere (switchover done): protection ends.
    finished: bool,
    /// Where replication stands (sync, checkpoints, recovery).
    phase: Phase,
    /// Replication errors in a row (for the backoff).
    errors_in_a_row: u32,
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

/// One piece of replication work the loop decided to do now.
#[derive(Debug, Clone, Copy)]
enum Work {
    EndBackoff(bool),
    Resync,
    PreCopy,
    Checkpoint,
}

/// Where the replication of the VM stands.
#[derive(Debug)]
enum Phase {
    /// Waiting for the backup's standby to answer before a full sync: the
    /// VM already serves (resumed at takeover), or the session was
    /// restarted after an error.
    AwaitPeer,
    /// A full synchronisation by pre-copy, one step per epoch.
    PreCopy(Box<PreCopy>),
    /// Checkpoints, every interval.
    Checkpointing,
    /// After an error the guest runs on, output held as the rules say,
    /// nothing is sent until `until`; then a full resync (over a new
    /// session when `new_session`).
    Backoff { until: Instant, new_session: bool },
}

/// A planned move in progress: the guest is paused after its final epoch.
struct Switchover {
    final_epoch: u64,
    started: Instant,
    committed_reported: bool,
    reply: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
}

/// The failover side of a protected VM: the arbiter's verdicts and the
/// means to move the VM's addresses.
struct Failover {
    arbiter: ArbiterHandle,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    addresses: Option<Addresses>,
    /// Paused because this site may not release output (lost both the
    /// backup and the witness).
    fenced: bool,
    /// The backup is unreachable: output leaves without waiting for it.
    unprotected: bool,
    /// Output has been allowed at least once (addresses announced).
    started: bool,
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
            gate: ReleaseGate::new(),
            control: None,
            switchover: None,
            finished: false,
            phase: Phase::PreCopy(Box::new(PreCopy::new(None))),
            errors_in_a_row: 0,
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
        self.phase = Phase::AwaitPeer;
        self.buffer_captured_writes(false);
        self.gate = ReleaseGate::serving_unreplicated();
        if let Some(f) = &mut self.failover {
            f.started = true;
        }
    }

    /// True when held output leaves without waiting for the backup (it
    /// was declared lost, or it holds no replica of a VM that serves).
    fn releases_at_once(&self) -> bool {
        let lost = self.failover.as_ref().is_some_and(|f| f.unprotected);
        self.gate.release(lost) == Release::All
    }

    /// The state to show once nothing transient (sync, switchover) is on.
    fn steady_state(&self) -> &'static str {
        if self.failover.as_ref().is_some_and(|f| f.fenced) {
            "fenced"
        } else if self.releases_at_once() {
            "unprotected"
        } else {
            "protected"
        }
    }

    /// Takes operator requests (`remus-wan switchover`) from `control`.
    pub fn accept_control(&mut self, control: tokio::sync::mpsc::Receiver<ControlRequest>) {
        self.control = Some(control);
    }

    /// Starts a planned switchover: final checkpoint, guest paused; the
    /// lease moves once the backup has committed that epoch.
    async fn begin_switchover(
        &mut self,
        vm: String,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    ) -> Result<(), ProtectError> {
        let refusal = match &self.failover {
            _ if vm != self.opts.vm => {
                Some(format!("this process protects {}, not {vm}", self.opts.vm))
            }
            None => Some("switchover needs a [witness] in the configuration".into()),
            Some(_) if self.switchover.is_some() => Some("a switchover is already under way".into()),
            Some(_) if !matches!(self.phase, Phase::Checkpointing) => Some(format!(
                "{} is synchronising or recovering its replica; retry once `remus-wan status` says protected",
                self.opts.site
            )),
            Some(f)
                if f.fenced
                    || f.unprotected
                    || !self.gate.waits_for_commits()
                    || !f.arbiter.may_release() =>
            {
                Some(format!(
                    "{} is not in a state to hand over (fenced, unprotected or without a lease): see `remus-wan status`",
                    self.opts.site
                ))
            }
            Some(_)
                if self.gate.committed_checkpoint() + 1
                    < self.next_epoch.saturating_sub(self.opts.max_in_flight as u64) =>
            {
                Some("the backup is far behind; retry when it has caught up".into())
            }
            Some(_) => None,
        };
        if let Some(why) = refusal {
            let _ = reply.send(Err(why));
            return Ok(());
        }
        info!(vm = %self.opts.vm, to = %self.opts.backup, "switchover: final checkpoint, then the lease moves");
        let started = Instant::now();
        // The final checkpoint and the pause come before the failover
        // state machine hears of the switchover: if either fails, nothing
        // was started there and the VM runs on.
        let final_epoch = match self.checkpoint().await {
            Ok(e) => e,
            Err(e) => {
                let _ = reply.send(Err(format!("the final checkpoint failed: {e}")));
                return Err(e);
            }
        };
        if let Err(e) = tokio::task::block_in_place(|| self.guest.pause()) {
            let _ = reply.send(Err(format!("pausing the guest failed: {e}")));
            return Err(e.into());
        }
        if let Some(f) = &self.failover {
            f.arbiter.start_switchover();
        }
        self.set_state("switching over");
        self.switchover = Some(Switchover {
            final_epoch,
            started,
            committed_reported: false,
            reply: Some(reply),
        });
        self.check_switchover();
        Ok(())
    }

    /// Abandons a switchover past its deadline. Before the witness was
    /// asked, the guest resumes at once under the lease; after, it stays
    /// paused with output held until the witness answers (Unfence resumes
    /// it; if the lease had moved, the switchover ends as done).
    fn abort_switchover(&mut self) -> Result<(), ProtectError> {
        let Some(mut sw) = self.switchover.take() else {
            return Ok(());
        };
        let why = if sw.committed_reported {
            "the witness did not move the lease"
        } else {
            "the backup did not commit the final epoch"
        };
        warn!(vm = %self.opts.vm, after = ?sw.started.elapsed(), why, "switchover aborted: the VM stays here");
        if let Some(reply) = sw.reply.take() {
            let _ = reply.send(Err(format!(
                "switchover aborted after {} s: {why}; {} keeps running {}",
                SWITCHOVER_DEADLINE.as_secs(),
                self.opts.site,
                self.opts.vm
            )));
        }
        if let Some(f) = &mut self.failover {
            f.arbiter.abort_switchover();
            if sw.committed_reported {
                f.fenced = true;
                self.set_state("fenced");
                return Ok(());
            }
        }
        tokio::task::block_in_place(|| self.guest.resume())?;
        self.set_state(self.steady_state());
        Ok(())
    }

    /// Once the final epoch is committed (and its output released), the
    /// failover state machine asks the witness to move the lease.
    fn check_switchover(&mut self) {
        let committed = self.gate.committed_checkpoint();
        let (Some(sw), Some(f)) = (&mut self.switchover, &self.failover) else {
            return;
        };
        if !sw.committed_reported && committed >= sw.final_epoch {
            sw.committed_reported = true;
            info!(vm = %self.opts.vm, epoch = sw.final_epoch, "switchover: final epoch committed at the backup; handing the lease over");
            f.arbiter.final_epoch_committed();
        }
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
            fenced: false,
            unprotected: false,
            started: false,
        });
    }

    /// Where to publish figures for `/metrics` and `/status`.
    pub fn publish_to(&mut self, published: crate::metrics::Published) {
        self.published = Some(published);
    }

    fn publish(&mut self, pacer: &Pacer, status: &wan::transport::replication::SenderStatus) {
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
            interval_ms: pacer.interval().as_millis() as u64,
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

    /// Starts a full synchronisation (at start, on the backup's request,
    /// or after an error): the backup builds a new replica from nothing,
    /// beside the one it has until this one is consistent.
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

    fn begin_sync(&mut self, why: &str) -> Result<(), ProtectError> {
        // From here writes travel again: after the sync's disk reads.
        self.buffer_captured_writes(true);
        self.gate.resync_started();
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
        self.phase = Phase::PreCopy(Box::new(PreCopy::new(disk)));
        self.set_state("synchronising");
        Ok(())
    }

    /// Whether the link has room for another pre-copy epoch (a session
    /// that waits for a full image takes only the first one).
    fn precopy_has_room(&self) -> bool {
        let Phase::PreCopy(pc) = &self.phase else {
            return false;
        };
        let st = self.sender.status();
        st.connected
            && st.in_flight < PRECOPY_IN_FLIGHT
            && (!st.resync_pending || pc.kind() == EpochKind::Full)
            && !pc.idle()
    }

    /// Chooses how the sync fills the replica's disk, now that the standby
    /// said what it holds; returns the DISK_SYNC frame that goes before
    /// the sync's first (full) epoch.
    fn resolve_disk_source(&mut self, epoch: u64) -> Result<Option<DiskSync>, ProtectError> {
        let Phase::PreCopy(pc) = &mut self.phase else {
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
        let Phase::PreCopy(pc) = &mut self.phase else {
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
        let Phase::PreCopy(pc) = &mut self.phase else {
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
        let Phase::PreCopy(pc) = &mut self.phase else {
            return Ok(());
        };
        let prelude = if pc.epochs == 0 {
            let epoch = self.next_epoch;
            self.resolve_disk_source(epoch)?
        } else {
            None
        };
        let Phase::PreCopy(pc) = &mut self.phase else {
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
        let Phase::PreCopy(pc) = &mut self.phase else {
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
        let Phase::PreCopy(pc) = &mut self.phase else {
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
                self.phase = Phase::Checkpointing;
                self.checkpoint().await?;
                self.set_state(self.steady_state());
            }
        }
        Ok(())
    }

    /// A replication error: the guest runs on (output held as the rules
    /// say), and after a backoff a full resync starts, over a new session
    /// when the old one cannot go on. Only a demotion, or a guest that is
    /// gone, ends protection.
    fn recover(&mut self, e: ProtectError) -> Result<(), ProtectError> {
        match e {
            ProtectError::Demoted { .. }
            | ProtectError::Guest(hypervisor::GuestError::NotRunning) => return Err(e),
            _ => {}
        }
        let new_session = matches!(&e, ProtectError::SessionEnded(_));
        self.errors_in_a_row = self.errors_in_a_row.saturating_add(1);
        let wait = RETRY_FIRST
            .saturating_mul(1 << self.errors_in_a_row.min(8).saturating_sub(1))
            .min(RETRY_MAX);
        if let Ok(mut st) = self.stats.lock() {
            st.replication_errors += 1;
        }
        error!(vm = %self.opts.vm, error = %e, retry_in = ?wait, new_session, "replication error: the guest runs on, output waits; full resync after the backoff");
        self.phase = Phase::Backoff {
            until: Instant::now() + wait,
            new_session,
        };
        self.buffer_captured_writes(false);
        self.set_state("recovering");
        Ok(())
    }

    /// The backoff is over: a new session if needed, then a full resync.
    fn end_backoff(&mut self, fresh_session: bool) -> Result<(), ProtectError> {
        if fresh_session {
            let (sender, events) = new_session(&self.opts, &self.endpoint, self.next_epoch);
            let old = std::mem::replace(&mut self.sender, sender);
            self.events = events;
            self.events_open = true;
            tokio::spawn(async move { old.close().await });
            self.phase = Phase::AwaitPeer;
            self.set_state("synchronising");
            return Ok(());
        }
        self.begin_sync("after a replication error")
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
            Some(v) if !v.is_finished() && matches!(self.phase, Phase::Checkpointing) => {
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
        self.gate.checkpoint_taken(epoch);
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

    /// The backup acknowledged every epoch up to `epoch`.
    fn on_committed(&mut self, epoch: u64) {
        self.encoder.acknowledge(epoch);
        if self.gate.committed(epoch) {
            self.errors_in_a_row = 0;
            let c = self.gate.committed_checkpoint();
            if let Ok(mut st) = self.stats.lock() {
                st.committed = st.committed.max(c);
            }
        }
        self.flush_output();
        self.check_switchover();
    }

    /// Releases what may leave now, while this site may release output:
    /// what the release gate allows (committed checkpoints' frames, or
    /// everything while the VM runs unprotected).
    fn flush_output(&mut self) {
        let (allowed, lost) = match &self.failover {
            None => (true, false),
            Some(f) => (f.arbiter.may_release() && !f.fenced, f.unprotected),
        };
        if !allowed {
            return;
        }
        let frames = match (self.capture.io.lock(), self.gate.release(lost)) {
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

    /// Acts on a verdict of the failover state machine.
    fn on_failover_event(&mut self, ev: Event) -> Result<(), ProtectError> {
        let Some(f) = &mut self.failover else {
            return Ok(());
        };
        let token = f.arbiter.token();
        let vm = self.opts.vm.clone();
        match ev {
            Event::Fence if self.switchover.is_some() => {
                // The hand-over was asked of the witness: output is held
                // (the guest is already paused) until it answers. Not a
                // fence: no hooks, the addresses move with the outcome.
                f.fenced = true;
                info!(vm = %vm, token, "switchover: output held while the witness moves the lease");
            }
            Event::Fence => {
                if !f.fenced && f.started {
                    f.fenced = true;
                    warn!(vm = %vm, token, "fenced: this site reaches neither the backup nor the witness; guest paused, output held");
                    if let Some(a) = &mut f.addresses {
                        a.set_role(Role::Down, token);
                        a.spawn_hooks(HookEvent::Fence, token, None, None);
                    }
                    tokio::task::block_in_place(|| self.guest.pause())?;
                    self.set_state("fenced");
                }
            }
            Event::Unfence => {
                let was_fenced = std::mem::replace(&mut f.fenced, false);
                if !f.started {
                    f.started = true;
                    info!(vm = %vm, token, "this site may release the VM's output: announcing its addresses");
                    if let Some(a) = &mut f.addresses {
                        a.set_role(Role::Active, token);
                        a.point_dns_here();
                    }
                } else if was_fenced {
                    info!(vm = %vm, token, "unfenced: guest resumed");
                    if let Some(a) = &mut f.addresses {
                        a.set_role(Role::Active, token);
                    }
                    tokio::task::block_in_place(|| self.guest.resume())?;
                    self.set_state(self.steady_state());
                }
                self.flush_output();
            }
            Event::ProtectionLost => {
                f.unprotected = true;
                warn!(vm = %vm, token, "protection lost: the backup site is unreachable; the VM runs unprotected (output no longer waits for it)");
                if let Some(a) = &f.addresses {
                    a.spawn_hooks(HookEvent::ProtectionLost, token, None, None);
                }
                if !f.fenced {
                    self.set_state("unprotected");
                }
                self.flush_output();
            }
            Event::ProtectionRestored => {
                f.unprotected = false;
                info!(vm = %vm, token, "protection restored: the backup site is back");
                if let Some(a) = &f.addresses {
                    a.spawn_hooks(HookEvent::ProtectionRestored, token, None, None);
                }
                if !f.fenced && self.switchover.is_none() {
                    self.set_state(self.steady_state());
                }
            }
            Event::Demote { token } => {
                if let Some(reply) = self.switchover.as_mut().and_then(|s| s.reply.take()) {
                    let _ = reply.send(Err(format!(
                        "demoted under token {token} during the switchover"
                    )));
                }
                error!(vm = %vm, token, "demoted: {} runs the VM under a newer fencing token; stopping it here", self.opts.backup);
                if let Some(a) = &mut f.addresses {
                    a.set_role(Role::Down, token);
                    a.spawn_hooks(
                        HookEvent::Demote,
                        token,
                        Some(&self.opts.site),
                        Some(&self.opts.backup),
                    );
                }
                let _ = tokio::task::block_in_place(|| self.guest.pause());
                self.set_state("demoted");
                return Err(ProtectError::Demoted {
                    site: self.opts.backup.clone(),
                    token,
                });
            }
            Event::SwitchoverDone { token } => {
                let took = self
                    .switchover
                    .as_ref()
                    .map(|s| s.started.elapsed())
                    .unwrap_or_default();
                info!(vm = %vm, token, took_ms = took.as_millis() as u64, "switchover done: {} runs the VM", self.opts.backup);
                if let Some(a) = &mut f.addresses {
                    a.set_role(Role::Down, token);
                    a.spawn_hooks(
                        HookEvent::Demote,
                        token,
                        Some(&self.opts.site),
                        Some(&self.opts.backup),
                    );
                }
                if let Some(reply) = self.switchover.as_mut().and_then(|s| s.reply.take()) {
                    let _ = reply.send(Ok(format!(
                        "{vm} handed over to {} under fencing token {token} in {} ms",
                        self.opts.backup,
                        took.as_millis()
                    )));
                }
                self.set_state("handed over");
                self.finished = true;
            }
            Event::Promote { .. } => {}
        }
        Ok(())
    }

    /// Protects until `shutdown` (or until the guest exits, or a newer
    /// token demotes this site). Replication errors do not end it: the
    /// guest runs on and a full resync follows (see [`Self::recover`]).
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
        if matches!(self.phase, Phase::AwaitPeer) {
            self.set_state("unprotected");
            warn!(vm = %self.opts.vm, peer = %self.opts.backup, "running unprotected until a standby at the other site answers");
        } else {
            let r = self.begin_sync("protection starts");
            if !self.survive(r)? {
                return Ok(());
            }
        }
        let mut pacer = Pacer::new(self.opts.interval, self.opts.max_in_flight, Instant::now());
        let mut last_report = Instant::now();
        loop {
            if self.finished {
                break;
            }
            let status = self.sender.status();
            let in_flight = status.in_flight as u32;
            let held = match self.capture.io.lock() {
                Ok(io) => io.output.held_bytes(),
                Err(_) => 0,
            };
            let pressure = held * 2 > self.opts.output_limit;
            // A fenced guest, or one paused for a switchover, has nothing
            // to send.
            let paused =
                self.failover.as_ref().is_some_and(|f| f.fenced) || self.switchover.is_some();
            let now = Instant::now();
            let mut wake = tokio::time::Instant::now() + self.opts.interval;
            if let Some(sw) = &self.switchover {
                let deadline = sw.started + SWITCHOVER_DEADLINE;
                if now >= deadline {
                    let r = self.abort_switchover();
                    if !self.survive(r)? {
                        break;
                    }
                    continue;
                }
                wake = wake.min(tokio::time::Instant::from_std(deadline));
            }
            if matches!(self.phase, Phase::PreCopy(_)) && !paused {
                let r = self.pump_hash_requests().await;
                if !self.survive(r)? {
                    break;
                }
            }
            let mut step = None;
            match &self.phase {
                _ if paused => {}
                Phase::AwaitPeer => {}
                Phase::Backoff { until, new_session } => {
                    if now >= *until {
                        step = Some(Work::EndBackoff(*new_session));
                    } else {
                        wake = wake.min(tokio::time::Instant::from_std(*until));
                    }
                }
                // Room is made by acknowledgements, which wake the loop.
                Phase::PreCopy(_) if self.precopy_has_room() => step = Some(Work::PreCopy),
                Phase::PreCopy(_) => {}
                Phase::Checkpointing if status.resync_pending => step = Some(Work::Resync),
                Phase::Checkpointing => match pacer.decide(now, in_flight, pressure) {
                    Decision::Checkpoint => step = Some(Work::Checkpoint),
                    Decision::WaitUntil(t) => wake = tokio::time::Instant::from_std(t),
                    Decision::WaitForAck => {}
                },
            }
            if let Some(work) = step {
                if matches!(work, Work::PreCopy | Work::Checkpoint) && !self.guest.is_running() {
                    warn!(vm = %self.opts.vm, "guest stopped: protection ends");
                    break;
                }
                let r = match work {
                    Work::EndBackoff(new_session) => self.end_backoff(new_session),
                    Work::Resync => self.begin_sync("the backup needs a full resync"),
                    Work::PreCopy => self.precopy_step().await,
                    Work::Checkpoint => {
                        let r = self.checkpoint().await.map(|_| ());
                        if r.is_ok() {
                            let backlog = status
                                .link
                                .as_ref()
                                .map(|l| {
                                    Duration::from_secs_f64(l.rtt.as_secs_f64() * in_flight as f64)
                                })
                                .unwrap_or_default();
                            pacer.checkpoint_taken(Instant::now(), in_flight, backlog);
                        }
                        r
                    }
                };
                if !self.survive(r)? {
                    break;
                }
                continue;
            }
            if self.releases_at_once() {
                // Unprotected: output leaves without waiting for a commit,
                // a couple of milliseconds after the guest sent it.
                self.flush_output();
                wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(2));
            }
            self.publish(&pacer, &status);
            if last_report.elapsed() >= self.opts.report_every {
                last_report = Instant::now();
                self.report(&pacer, &status);
            }
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
                        let r = self.begin_switchover(vm, reply).await;
                        if !self.survive(r)? {
                            break;
                        }
                    }
                    None => self.control = None,
                },
                ev = failover_event => {
                    let Some(ev) = ev else {
                        return Err(ProtectError::Session("failover task stopped".into()));
                    };
                    self.on_failover_event(ev)?;
                }
                ev = replication => {
                    let r = self.on_sender_event(ev);
                    if !self.survive(r)? {
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
            SenderEvent::Committed { epoch } => self.on_committed(epoch),
            SenderEvent::DiskReport(r) => return self.on_disk_report(r),
            SenderEvent::ResyncRequired { reason, .. } => {
                warn!(vm = %self.opts.vm, reason, "backup needs a full resync");
                // A seeded sync whose opening epoch the standby refused
                // (it could not seed): the next one sends the whole disk.
                if let Phase::PreCopy(pc) = &self.phase {
                    let seeded = pc
                        .disk
                        .as_ref()
                        .and_then(DiskSource::mode)
                        .is_some_and(|m| m != DiskSyncMode::Full);
                    if seeded && reason.contains("rejected") {
                        self.force_full = true;
                    }
                }
                if let Ok(mut st) = self.stats.lock() {
                    st.resyncs += 1;
                }
                if !matches!(self.phase, Phase::Backoff { .. }) {
                    return self.begin_sync("the backup needs a full resync");
                }
            }
            SenderEvent::Connected {
                peer_site,
                receiver_committed,
                ..
            } => {
                info!(vm = %self.opts.vm, peer = %peer_site, receiver_committed, "backup connected");
                if matches!(self.phase, Phase::AwaitPeer) {
                    info!(vm = %self.opts.vm, peer = %peer_site, "a standby answers: synchronising the running VM to it");
                    return self.begin_sync("a standby answers");
                }
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
                if let Phase::PreCopy(pc) = &mut self.phase {
                    if let Some(DiskSource::Checksum(c)) = &mut pc.disk {
                        c.sync.connection_lost();
                    }
                }
                if let Some(v) = &mut self.verify {
                    // Requests on that connection may be lost: asked again.
                    v.lost_all();
                }
                if self.releases_at_once() {
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

    /// Ok(true) to go on, Ok(false) when the guest is gone (protection
    /// ends), Err for a demotion; any other error is recovered from.
    fn survive(&mut self, r: Result<(), ProtectError>) -> Result<bool, ProtectError> {
        match r {
            Ok(()) => Ok(true),
            Err(ProtectError::Guest(hypervisor::GuestError::NotRunning)) => {
                warn!(vm = %self.opts.vm, "guest stopped: protection ends");
                Ok(false)
            }
            Err(e) => self.recover(e).map(|()| true),
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

    fn report(&self, pacer: &Pacer, status: &wan::transport::replication::SenderStatus) {
        let held = self
            .capture
            .io
            .lock()
            .map(|io| io.output.held_bytes())
            .unwrap_or(0);
        if let Ok(mut st) = self.stats.lock() {
            st.interval_ms = pacer.interval().as_millis() as u64;
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
