//! Thin tokio shells around the sans-IO sessions.
//!
//! [`spawn_sender`] runs a [`Sender`] on the primary: it dials when the
//! session asks, pumps bytes between the session and one ordered stream,
//! fires its timers, and hands engine-facing events ([`SenderEvent`]) out
//! on a channel. [`spawn_receiver`] does the same for a [`Receiver`] on the
//! backup, accepting connections (a new one replaces the old). Both work
//! over any [`Link`]: a QUIC bidirectional stream ([`QuicDialer`],
//! [`QuicListener`]) or TLS over TCP ([`super::tcp`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant as TokioInstant;
use tracing::{debug, warn};

use super::{Connection, Endpoint, LinkStats, TransportError, CLOSE_SESSION_ERROR};
use crate::session::{
    EpochKind, PushError, Receiver, ReceiverConfig, ReceiverEvent, Sender, SenderConfig,
    SenderEvent, SessionError,
};

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One ordered byte stream to the peer, and how to end it.
pub struct Link {
    pub read: BoxRead,
    pub write: BoxWrite,
    /// The QUIC connection (for stats and closing), when there is one.
    pub quic: Option<Connection>,
    /// Peer description for logs.
    pub peer: String,
    /// This link's FEC counters, when it is a FEC link.
    pub fec: Option<Arc<super::fec::link::FecCounters>>,
}

/// Opens links to the peer (primary side).
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self) -> BoxFuture<'static, Result<Link, TransportError>>;
}

/// Accepts links from the peer (backup side).
pub trait Listener: Send + 'static {
    fn accept(&mut self) -> BoxFuture<'_, Result<Link, TransportError>>;
}

/// Dials a peer site over QUIC and opens the replication stream.
#[derive(Clone, Debug)]
pub struct QuicDialer {
    pub endpoint: Endpoint,
    pub addr: std::net::SocketAddr,
    pub peer_site: String,
}

impl Dialer for QuicDialer {
    fn dial(&self) -> BoxFuture<'static, Result<Link, TransportError>> {
        let d = self.clone();
        Box::pin(async move {
            let conn = d.endpoint.connect(d.addr, &d.peer_site).await?;
            let (send, recv) = conn.open_bi().await?;
            let peer = format!("site {} at {}", d.peer_site, d.addr);
            Ok(d.endpoint.replication_link(conn, send, recv, peer))
        })
    }
}

/// Accepts QUIC connections and their replication stream.
#[derive(Debug)]
pub struct QuicListener {
    pub endpoint: Endpoint,
    /// How long a new connection may take to open its stream.
    pub stream_timeout: Duration,
}

impl QuicListener {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            stream_timeout: Duration::from_secs(10),
        }
    }
}

impl Listener for QuicListener {
    fn accept(&mut self) -> BoxFuture<'_, Result<Link, TransportError>> {
        Box::pin(async move {
            let conn = self.endpoint.accept().await?;
            let (send, recv) = tokio::time::timeout(self.stream_timeout, conn.accept_bi())
                .await
                .map_err(|_| {
                    TransportError::Timeout("peer opened no replication stream".into())
                })??;
            let peer = conn
                .peer_site()
                .map(|s| format!("site {s} at {}", conn.remote_address()))
                .unwrap_or_else(|| conn.remote_address().to_string());
            Ok(self.endpoint.replication_link(conn, send, recv, peer))
        })
    }
}

enum Input {
    Data(Bytes),
    Closed(String),
}

enum WriteMsg {
    Data(Bytes),
    /// Write the optional final frame, finish the stream, close.
    Close(Option<Bytes>, String),
}

/// Reader, writer and connection of the current link.
struct Active {
    writer: mpsc::UnboundedSender<WriteMsg>,
    input: mpsc::Receiver<Input>,
    quic: Option<Connection>,
    fec: Option<Arc<super::fec::link::FecCounters>>,
}

fn start_link(link: Link) -> Active {
    let Link {
        mut read,
        mut write,
        quic,
        peer,
        fec,
    } = link;
    let (in_tx, input) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => {
                    let _ = in_tx
                        .send(Input::Closed(format!("{peer} closed the stream")))
                        .await;
                    return;
                }
                Ok(n) => {
                    if in_tx
                        .send(Input::Data(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = in_tx.send(Input::Closed(format!("{peer}: {e}"))).await;
                    return;
                }
            }
        }
    });
    let (writer, mut out_rx) = mpsc::unbounded_channel::<WriteMsg>();
    let q = quic.clone();
    tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            match m {
                WriteMsg::Data(b) => {
                    if let Err(e) = write.write_all(&b).await {
                        debug!(error = %e, "replication stream write failed");
                        break;
                    }
                    // Nothing more queued: the burst (an epoch, a commit)
                    // is written. A FEC link sends its redundancy on flush.
                    if out_rx.is_empty() {
                        if let Err(e) = write.flush().await {
                            debug!(error = %e, "replication stream flush failed");
                            break;
                        }
                    }
                }
                WriteMsg::Close(frame, reason) => {
                    // Best effort, bounded: tell the peer why, then go.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        if let Some(f) = frame {
                            let _ = write.write_all(&f).await;
                        }
                        let _ = write.shutdown().await;
                    })
                    .await;
                    if let Some(c) = &q {
                        // Give the final frame a moment to be acknowledged.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(500), c.quinn().closed())
                                .await;
                        c.close(CLOSE_SESSION_ERROR, reason.as_bytes());
                    }
                    return;
                }
            }
        }
        if let Some(c) = &q {
            c.close(CLOSE_SESSION_ERROR, b"stream closed");
        }
    });
    Active {
        writer,
        input,
        quic,
        fec,
    }
}

/// FEC counts of the links ended (`retired`) and of the current one.
fn fec_figures(
    active: &Option<Active>,
    retired: Option<super::fec::link::FecTotals>,
) -> Option<super::fec::link::FecTotals> {
    match active.as_ref().and_then(|a| a.fec.as_ref()) {
        Some(c) => {
            let mut t = retired.unwrap_or_default();
            t += c.totals();
            Some(t)
        }
        None => retired,
    }
}

/// Ends the current link, keeping its FEC counts in `retired`.
fn retire(
    active: &mut Option<Active>,
    retired: &mut Option<super::fec::link::FecTotals>,
) -> Option<Active> {
    let a = active.take()?;
    if let Some(c) = &a.fec {
        *retired.get_or_insert_with(Default::default) += c.totals();
    }
    Some(a)
}

impl Active {
    fn close(self, error: &SessionError) {
        let _ = self
            .writer
            .send(WriteMsg::Close(error.error_frame(), error.to_string()));
    }
}

async fn recv_input(a: &mut Option<Active>) -> Option<Input> {
    match a {
        Some(a) => a.input.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<std::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(TokioInstant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// A snapshot of the sending side, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct SenderStatus {
    pub connected: bool,
    pub committed: u64,
    pub next_epoch: u64,
    pub in_flight: usize,
    pub window_len: usize,
    pub resync_pending: bool,
    /// What the standby said it holds (DISK_REPORT before HELLO_ACK).
    pub peer_report: Option<crate::session::wire::ReplicaReport>,
    /// Transport statistics of the current QUIC connection (with
    /// `bytes_in_flight` = un-acknowledged epoch bytes).
    pub link: Option<LinkStats>,
    /// FEC counters over every link of this sender (None until a FEC link
    /// was used).
    pub fec: Option<super::fec::link::FecTotals>,
}

enum SenderCmd {
    Push {
        kind: EpochKind,
        payload: Bytes,
        reply: oneshot::Sender<Result<u64, PushError>>,
    },
    Close,
    PushWithPrelude {
        kind: EpochKind,
        payload: Bytes,
        prelude: crate::session::wire::DiskSync,
        reply: oneshot::Sender<Result<u64, PushError>>,
    },
    DiskSync(crate::session::wire::DiskSync, oneshot::Sender<bool>),
    Verify(crate::session::wire::VerifyHashes, oneshot::Sender<bool>),
}

/// The engine's handle on a running sender.
#[derive(Clone, Debug)]
pub struct SenderHandle {
    cmd: mpsc::Sender<SenderCmd>,
    status: Arc<Mutex<SenderStatus>>,
}

/// The sender task has ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Push(#[from] PushError),
    #[error("the replication task has stopped")]
    Stopped,
}

impl SenderHandle {
    /// Queues an epoch; returns its number (see [`Sender::push_epoch`]).
    pub async fn push_epoch(&self, kind: EpochKind, payload: Bytes) -> Result<u64, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(SenderCmd::Push {
                kind,
                payload,
                reply,
            })
            .await
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx.await.map_err(|_| HandleError::Stopped)??)
    }

    /// Sends verify hashes right after the newest epoch (see
    /// [`Sender::push_verify`]); false when they cannot go any more.
    pub async fn push_verify(
        &self,
        v: crate::session::wire::VerifyHashes,
    ) -> Result<bool, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(SenderCmd::Verify(v, reply))
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Queues an epoch preceded, each time it is sent, by a DISK_SYNC frame.
    pub async fn push_epoch_with_prelude(
        &self,
        kind: EpochKind,
        payload: Bytes,
        prelude: crate::session::wire::DiskSync,
    ) -> Result<u64, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(SenderCmd::PushWithPrelude {
                kind,
                payload,
                prelude,
                reply,
            })
            .await
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx.await.map_err(|_| HandleError::Stopped)??)
    }

    /// Sends a DISK_SYNC frame (a hash request) now; false when the
    /// session is not up.
    pub async fn send_disk_sync(
        &self,
        d: crate::session::wire::DiskSync,
    ) -> Result<bool, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(SenderCmd::DiskSync(d, reply))
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Current state of the session and link.
    pub fn status(&self) -> SenderStatus {
        self.status.lock().expect("status lock").clone()
    }

    /// Ends the session (the task stops after telling the peer).
    pub async fn close(&self) {
        let _ = self.cmd.send(SenderCmd::Close).await;
    }
}

/// Runs a [`Sender`] over links from `dialer`. Engine-facing events
/// (everything but `Connect` / `Close`) arrive on the returned channel.
pub fn spawn_sender<D: Dialer>(
    dialer: D,
    cfg: SenderConfig,
    first_epoch: u64,
) -> (SenderHandle, mpsc::UnboundedReceiver<SenderEvent>) {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<SenderCmd>(16);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let status = Arc::new(Mutex::new(SenderStatus::default()));
    let st = status.clone();
    tokio::spawn(async move {
        let mut sess = Sender::new(cfg, first_epoch, std::time::Instant::now());
        let mut active: Option<Active> = None;
        // FEC counts of the links this sender has closed or lost.
        let mut retired_fec: Option<super::fec::link::FecTotals> = None;
        let mut dialing: Option<tokio::task::JoinHandle<Result<Link, TransportError>>> = None;
        let mut closing = false;
        loop {
            let now = std::time::Instant::now();
            // Status first, so whoever sees an event sees a status at least as new.
            {
                let mut s = st.lock().expect("status lock");
                s.connected = sess.is_connected();
                s.committed = sess.committed();
                s.next_epoch = sess.next_epoch();
                s.in_flight = sess.in_flight();
                s.window_len = sess.window_len();
                s.resync_pending = sess.resync_pending();
                s.peer_report = sess.peer_report();
                s.link = active.as_ref().and_then(|a| a.quic.as_ref()).map(|c| {
                    let mut l = c.stats();
                    l.bytes_in_flight = sess.in_flight_bytes();
                    l
                });
                s.fec = fec_figures(&active, retired_fec);
            }
            while let Some(ev) = sess.poll_event() {
                match ev {
                    SenderEvent::Connect => {
                        dialing = Some(tokio::spawn(dialer.dial()));
                    }
                    SenderEvent::Close { error } => {
                        if let Some(a) = retire(&mut active, &mut retired_fec) {
                            a.close(&error);
                        }
                    }
                    SenderEvent::Failed { .. } if closing => {}
                    other => {
                        let _ = ev_tx.send(other);
                    }
                }
            }
            if closing {
                break;
            }
            if let Some(a) = &active {
                while let Some(b) = sess.poll_transmit(now) {
                    let _ = a.writer.send(WriteMsg::Data(b));
                }
            }
            let deadline = sess.poll_timeout();
            tokio::select! {
                cmd = cmd_rx.recv() => match cmd {
                    Some(SenderCmd::Push { kind, payload, reply }) => {
                        let _ = reply.send(sess.push_epoch(kind, payload, std::time::Instant::now()));
                    }
                    Some(SenderCmd::PushWithPrelude { kind, payload, prelude, reply }) => {
                        let _ = reply.send(sess.push_epoch_with_prelude(kind, payload, Some(prelude), std::time::Instant::now()));
                    }
                    Some(SenderCmd::DiskSync(d, reply)) => {
                        let _ = reply.send(sess.send_disk_sync(d, std::time::Instant::now()));
                    }
                    Some(SenderCmd::Verify(v, reply)) => {
                        let _ = reply.send(sess.push_verify(v, std::time::Instant::now()));
                    }
                    Some(SenderCmd::Close) | None => {
                        sess.close();
                        closing = true;
                    }
                },
                res = async { dialing.as_mut().expect("guarded").await }, if dialing.is_some() => {
                    dialing = None;
                    let now = std::time::Instant::now();
                    match res {
                        Ok(Ok(link)) => {
                            retire(&mut active, &mut retired_fec);
                            active = Some(start_link(link));
                            sess.handle_connected(now);
                        }
                        Ok(Err(e)) => {
                            warn!(error = %e, "replication connect failed");
                            sess.handle_connect_failed(now, &e.to_string());
                        }
                        Err(e) => sess.handle_connect_failed(now, &e.to_string()),
                    }
                }
                input = recv_input(&mut active) => {
                    let now = std::time::Instant::now();
                    match input {
                        Some(Input::Data(b)) => sess.handle_input(&b, now),
                        Some(Input::Closed(reason)) => {
                            retire(&mut active, &mut retired_fec);
                            sess.handle_disconnected(now, &reason);
                        }
                        None => {
                            retire(&mut active, &mut retired_fec);
                            sess.handle_disconnected(now, "reader stopped");
                        }
                    }
                }
                _ = sleep_until(deadline) => {
                    sess.handle_timeout(std::time::Instant::now());
                }
            }
        }
        if let Some(d) = dialing {
            d.abort();
        }
    });
    (
        SenderHandle {
            cmd: cmd_tx,
            status,
        },
        ev_rx,
    )
}

enum ReceiverCmd {
    Commit(u64, oneshot::Sender<Result<(), SessionError>>),
    Reject(u64, String),
    Close,
    VerifyResult(crate::session::wire::VerifyResult),
    SetReport(crate::session::wire::ReplicaReport),
    DiskReport(crate::session::wire::DiskReport),
}

/// The engine's handle on a running receiver.
#[derive(Clone, Debug)]
pub struct ReceiverHandle {
    cmd: mpsc::Sender<ReceiverCmd>,
    committed: Arc<Mutex<u64>>,
    fec: Arc<Mutex<Option<super::fec::link::FecTotals>>>,
}

impl ReceiverHandle {
    /// FEC counters over every link of this receiver (shards rebuilt from
    /// the primary's repairs among them); None until a FEC link was used.
    pub fn fec(&self) -> Option<super::fec::link::FecTotals> {
        *self.fec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine applied `epoch` atomically to the replica: acknowledge it.
    pub async fn commit(&self, epoch: u64) -> Result<(), HandleError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(ReceiverCmd::Commit(epoch, tx))
            .await
            .map_err(|_| HandleError::Stopped)?;
        rx.await
            .map_err(|_| HandleError::Stopped)?
            .map_err(|_| HandleError::Stopped)
    }

    /// The engine could not verify or apply `epoch`; the sender resyncs.
    pub async fn reject(&self, epoch: u64, message: &str) {
        let _ = self
            .cmd
            .send(ReceiverCmd::Reject(epoch, message.to_string()))
            .await;
    }

    /// The answer to a [`ReceiverEvent::Verify`].
    pub async fn verify_result(&self, r: crate::session::wire::VerifyResult) {
        let _ = self.cmd.send(ReceiverCmd::VerifyResult(r)).await;
    }

    /// What the standby holds, told to every sender before HELLO_ACK.
    pub async fn set_report(&self, r: crate::session::wire::ReplicaReport) {
        let _ = self.cmd.send(ReceiverCmd::SetReport(r)).await;
    }

    /// The answer to a hash request ([`ReceiverEvent::DiskSync`]).
    pub async fn disk_report(&self, r: crate::session::wire::DiskReport) {
        let _ = self.cmd.send(ReceiverCmd::DiskReport(r)).await;
    }

    /// Last committed epoch.
    pub fn committed(&self) -> u64 {
        *self.committed.lock().expect("lock")
    }

    pub async fn close(&self) {
        let _ = self.cmd.send(ReceiverCmd::Close).await;
    }
}

/// Runs a [`Receiver`] over links accepted by `listener`. The engine gets
/// [`ReceiverEvent`]s (epochs to verify and apply, then commit).
pub fn spawn_receiver<L: Listener>(
    mut listener: L,
    cfg: ReceiverConfig,
    last_committed: u64,
) -> (ReceiverHandle, mpsc::UnboundedReceiver<ReceiverEvent>) {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<ReceiverCmd>(64);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let committed = Arc::new(Mutex::new(last_committed));
    let committed2 = committed.clone();
    let fec = Arc::new(Mutex::new(None));
    let fec2 = fec.clone();
    let (link_tx, mut link_rx) = mpsc::channel::<Link>(4);
    let acceptor = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok(link) => {
                    if link_tx.send(link).await.is_err() {
                        return;
                    }
                }
                Err(TransportError::Closed) => return,
                Err(e) => {
                    warn!(error = %e, "refused a replication connection");
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut sess = Receiver::new(cfg, last_committed, std::time::Instant::now());
        let mut active: Option<Active> = None;
        let mut retired_fec: Option<super::fec::link::FecTotals> = None;
        loop {
            let now = std::time::Instant::now();
            while let Some(ev) = sess.poll_event() {
                if let ReceiverEvent::Close { error } = &ev {
                    if let Some(a) = retire(&mut active, &mut retired_fec) {
                        a.close(error);
                    }
                }
                let _ = ev_tx.send(ev);
            }
            // Published before the ACK leaves, so a peer that saw the ACK
            // never reads an older value here.
            *committed2.lock().expect("lock") = sess.committed();
            *fec2.lock().expect("lock") = fec_figures(&active, retired_fec);
            if let Some(a) = &active {
                while let Some(b) = sess.poll_transmit(now) {
                    let _ = a.writer.send(WriteMsg::Data(b));
                }
            }
            let deadline = sess.poll_timeout();
            tokio::select! {
                cmd = cmd_rx.recv() => {
                    let now = std::time::Instant::now();
                    match cmd {
                        Some(ReceiverCmd::Commit(e, reply)) => {
                            let _ = reply.send(sess.commit(e, now));
                        }
                        Some(ReceiverCmd::Reject(e, m)) => sess.reject(e, &m, now),
                        Some(ReceiverCmd::VerifyResult(r)) => sess.verify_result(r, now),
                        Some(ReceiverCmd::SetReport(r)) => sess.set_report(r),
                        Some(ReceiverCmd::DiskReport(r)) => sess.disk_report(r, now),
                        Some(ReceiverCmd::Close) | None => {
                            if let Some(a) = retire(&mut active, &mut retired_fec) {
                                a.close(&SessionError::LocalClose);
                            }
                            break;
                        }
                    }
                }
                link = link_rx.recv() => {
                    let Some(link) = link else { break };
                    if let Some(old) = retire(&mut active, &mut retired_fec) {
                        old.close(&SessionError::ConnectionLost("replaced by a new connection".into()));
                    }
                    active = Some(start_link(link));
                    sess.handle_connected(std::time::Instant::now());
                }
                input = recv_input(&mut active) => {
                    let now = std::time::Instant::now();
                    match input {
                        Some(Input::Data(b)) => {
                            let _ = sess.handle_input(&b, now);
                        }
                        Some(Input::Closed(reason)) => {
                            retire(&mut active, &mut retired_fec);
                            sess.handle_disconnected(now, &reason);
                        }
                        None => {
                            retire(&mut active, &mut retired_fec);
                            sess.handle_disconnected(now, "reader stopped");
                        }
                    }
                }
                _ = sleep_until(deadline) => {
                    sess.handle_timeout(std::time::Instant::now());
                }
            }
        }
        acceptor.abort();
    });
    (
        ReceiverHandle {
            cmd: cmd_tx,
            committed,
            fec,
        },
        ev_rx,
    )
}
