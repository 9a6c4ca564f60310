//! The tokio shell around one VM's [`failover::Site`]: feeds it the
//! messages of its two links and its timers, queues what it sends, hands
//! its events to the engine, and publishes until when this site may release
//! the VM's output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failover::{Event, Output, Site, SiteId, Stance, Timers};
use tokio::sync::mpsc;
use tracing::info;

use super::link::{self, LinkKind};

/// This site's role for the VM when the process starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAs {
    Primary,
    Backup,
}

pub struct ArbiterOptions {
    pub vm: String,
    /// Ids in the witness's numbering: `SiteId(i + 1)` is the i-th
    /// configured site.
    pub me: SiteId,
    pub peer: SiteId,
    pub start_as: StartAs,
    pub timers: Timers,
    pub to_witness: LinkKind,
    pub to_peer: LinkKind,
}

/// The witness's id inside a site (never on the wire: messages do not
/// name their sender, links do).
const WITNESS: SiteId = SiteId(0);

/// What the engine reads of the failover state.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub stance: Stance,
    pub token: u64,
    /// Output may be released until then (checked against the clock at
    /// every release, so a late timer cannot stretch a lease).
    pub release_until: Option<Instant>,
    pub peer_link_up: bool,
    pub witness_link_up: bool,
    /// Last time anything arrived from the peer site.
    pub peer_heard: Option<Instant>,
    /// When this site last started asking the witness for the lease.
    pub candidate_since: Option<Instant>,
}

// Commands are rare: the size of the redirect variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Reach the peer another way from now on (a promoted backup dials the
    /// old primary, which now holds the replica).
    RedirectPeer(LinkKind),
    ReplicaReady(bool),
    StartSwitchover,
    FinalEpochCommitted,
    AbortSwitchover,
}

/// The engine's handle on the failover shell.
#[derive(Clone)]
pub struct ArbiterHandle {
    cmds: mpsc::UnboundedSender<Command>,
    snap: Arc<Mutex<Snapshot>>,
    peer_up: Arc<AtomicBool>,
    witness_up: Arc<AtomicBool>,
}

impl ArbiterHandle {
    /// Whether output may leave now.
    pub fn may_release(&self) -> bool {
        self.snapshot()
            .release_until
            .is_some_and(|t| Instant::now() < t)
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = self
            .snap
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        s.peer_link_up = self.peer_up.load(Ordering::Relaxed);
        s.witness_link_up = self.witness_up.load(Ordering::Relaxed);
        s
    }

    pub fn token(&self) -> u64 {
        self.snapshot().token
    }

    /// The backup holds (or no longer holds) a replica it could resume.
    pub fn set_replica_ready(&self, ready: bool) {
        let _ = self.cmds.send(Command::ReplicaReady(ready));
    }

    /// Reaches the peer through `link` from now on.
    pub fn redirect_peer(&self, link: LinkKind) {
        let _ = self.cmds.send(Command::RedirectPeer(link));
    }

    pub fn start_switchover(&self) {
        let _ = self.cmds.send(Command::StartSwitchover);
    }

    pub fn final_epoch_committed(&self) {
        let _ = self.cmds.send(Command::FinalEpochCommitted);
    }

    /// Abandons a switchover that did not end in time (see
    /// [`failover::Site::abort_switchover`]).
    pub fn abort_switchover(&self) {
        let _ = self.cmds.send(Command::AbortSwitchover);
    }
}

/// Starts the shell; events come out of the returned receiver. The shell
/// stops when the handle and the receiver are dropped.
pub fn spawn(opts: ArbiterOptions) -> (ArbiterHandle, mpsc::UnboundedReceiver<Event>) {
    let now = Instant::now();
    let site = match opts.start_as {
        StartAs::Primary => Site::primary(opts.me, opts.peer, WITNESS, opts.timers, now),
        StartAs::Backup => Site::backup(opts.me, opts.peer, WITNESS, opts.timers, now),
    };
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
    let peer_up = Arc::new(AtomicBool::new(false));
    let witness_up = Arc::new(AtomicBool::new(false));
    let retry = opts
        .timers
        .heartbeat_interval
        .max(Duration::from_millis(100));
    let to_peer = link::spawn(
        opts.to_peer,
        opts.vm.clone(),
        opts.peer,
        inbox_tx.clone(),
        peer_up.clone(),
        retry,
    );
    let to_witness = link::spawn(
        opts.to_witness,
        opts.vm.clone(),
        WITNESS,
        inbox_tx.clone(),
        witness_up.clone(),
        retry,
    );
    let snap = Arc::new(Mutex::new(Snapshot {
        stance: site.stance(),
        token: site.token(),
        release_until: None,
        peer_link_up: false,
        witness_link_up: false,
        peer_heard: None,
        candidate_since: None,
    }));
    let (cmd_tx, cmds) = mpsc::unbounded_channel();
    let (ev_tx, events) = mpsc::unbounded_channel();
    tokio::spawn(run(Shell {
        vm: opts.vm,
        site,
        peer: opts.peer,
        inbox,
        cmds,
        events: ev_tx,
        to_peer,
        to_witness,
        snap: snap.clone(),
        inbox_tx,
        peer_up: peer_up.clone(),
        retry,
    }));
    (
        ArbiterHandle {
            cmds: cmd_tx,
            snap,
            peer_up,
            witness_up,
        },
        events,
    )
}

struct Shell {
    vm: String,
    site: Site,
    peer: SiteId,
    inbox: mpsc::UnboundedReceiver<(SiteId, failover::Message)>,
    cmds: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    to_peer: mpsc::UnboundedSender<failover::Message>,
    to_witness: mpsc::UnboundedSender<failover::Message>,
    snap: Arc<Mutex<Snapshot>>,
    inbox_tx: link::Inbox,
    peer_up: Arc<AtomicBool>,
    retry: Duration,
}

async fn run(mut sh: Shell) {
    loop {
        let now = Instant::now();
        while let Some(o) = sh.site.poll_output() {
            match o {
                Output::Send { to, msg } if to == sh.peer => {
                    let _ = sh.to_peer.send(msg);
                }
                Output::Send { msg, .. } => {
                    let _ = sh.to_witness.send(msg);
                }
                Output::Event(e) => {
                    info!(vm = %sh.vm, event = ?e, "failover event");
                    if sh.events.send(e).is_err() {
                        return;
                    }
                }
            }
        }
        if let Ok(mut s) = sh.snap.lock() {
            if sh.site.stance() == Stance::Candidate && s.stance != Stance::Candidate {
                s.candidate_since = Some(now);
            }
            s.stance = sh.site.stance();
            s.token = sh.site.token();
            s.release_until = sh.site.release_allowed_until(now);
        }
        let wake = tokio::time::Instant::from_std(sh.site.poll_timeout());
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => sh.site.handle_timeout(Instant::now()),
            m = sh.inbox.recv() => {
                let Some((from, msg)) = m else { return };
                let now = Instant::now();
                if from == sh.peer {
                    if let Ok(mut s) = sh.snap.lock() {
                        s.peer_heard = Some(now);
                    }
                }
                sh.site.handle_message(from, msg, now);
            }
            c = sh.cmds.recv() => {
                let now = Instant::now();
                match c {
                    Some(Command::RedirectPeer(kind)) => {
                        // Dropping the old sender ends the old link.
                        sh.to_peer = link::spawn(
                            kind,
                            sh.vm.clone(),
                            sh.peer,
                            sh.inbox_tx.clone(),
                            sh.peer_up.clone(),
                            sh.retry,
                        );
                    }
                    Some(Command::ReplicaReady(r)) => {
                        if r != sh.site.replica_ready() {
                            sh.site.set_replica_ready(r, now);
                        }
                    }
                    Some(Command::StartSwitchover) => {
                        sh.site.start_switchover();
                    }
                    Some(Command::FinalEpochCommitted) => sh.site.final_epoch_committed(now),
                    Some(Command::AbortSwitchover) => {
                        sh.site.abort_switchover(now);
                    }
                    None => return,
                }
            }
        }
    }
}
