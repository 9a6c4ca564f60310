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
//! [`ProtectCore`] (`protect/machine.rs`, its states in `lifecycle.rs`,
//! its outputs in `action.rs`, its tests on simulated time in
//! `tests.rs`). This file is its tokio driver, the [`Protector`]: it owns
//! the guest, the encoder, the session and the addresses, feeds the core
//! what they report and executes its actions; the input/output of those
//! actions is in `sync.rs` (pre-copy), `epochs.rs` (checkpoints),
//! `online_verify.rs` and `figures.rs`. What the VM is given to capture its
//! output and disk writes is `capture.rs`.

mod action;
mod capture;
mod epochs;
mod error;
mod figures;
mod lifecycle;
mod machine;
mod online_verify;
mod stats;
mod sync;
#[cfg(test)]
mod tests;

pub use action::{Action, ArbiterCall, Finish};
pub use capture::{Capture, EpochIo};
pub use error::ProtectError;
pub use lifecycle::{Lifecycle, Phase, Switchover};
pub use machine::{CoreConfig, Observed, ProtectCore};
pub use stats::ProtectStats;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::{Checkpoint, FrameReader, ProtectedGuest};
use tracing::{info, warn};
use wan::codec::{Encoder, EncoderConfig};
use wan::session::wire::DiskSyncMode;
use wan::session::{EpochKind, SenderConfig, SenderEvent};
use wan::transport::replication::{spawn_sender, QuicDialer, SenderHandle, SenderStatus};
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

use super::disk_image::DiskImage;
use super::precopy::{DiskSource, PreCopy, PRECOPY_IN_FLIGHT};
use super::release_gate::Release;
use super::verify::{self, VerifyRun};
use crate::addresses::Addresses;
use crate::arbiter::ArbiterHandle;
use crate::metrics::{ControlRequest, VerifyTotals};
use failover::Event;

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
    /// The guest's disk (a group's: its members' images back to back),
    /// sent whole during the initial sync.
    pub disk: Option<DiskImage>,
    /// How often a progress line is logged.
    pub report_every: Duration,
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
            sync: None,
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

    fn reply_switchover(&mut self, r: Result<String, String>) {
        if let Some(reply) = self.switchover_reply.take() {
            let _ = reply.send(r);
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
