//! One site endpoint for every VM the site serves, two kinds of incoming
//! stream: replication sessions (a primary's epochs) and failover control
//! streams (a primary's heartbeats). A control stream opens with
//! [`CONTROL_MAGIC`]; a replication stream opens with a session frame,
//! which never does.
//!
//! Streams are routed to their VM by what they carry first, so the
//! protocols need no routing header of their own: the VM name of the
//! first failover message, or the `vm_id` of the session's HELLO. Every
//! byte read to decide is handed back in front of the stream. A stream
//! for a VM this site does not serve, or from a site that is not that VM's
//! peer, is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use wan::session::wire::{ControlFrame, Decoder, Item};
use wan::transport::replication::{BoxFuture, BoxRead, BoxWrite, Link, Listener};
use wan::transport::{Connection, Endpoint, RecvStream, SendStream, TransportError};

/// First bytes of a failover control stream between two sites.
pub const CONTROL_MAGIC: [u8; 4] = *b"RWFO";

/// How long a new stream may take to say which VM it is for.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many bytes of a replication stream may come before its HELLO
/// (a HELLO is well under 1 KiB).
const MAX_HELLO_BYTES: usize = 64 << 10;

/// An ordered stream of failover messages with a peer site.
pub struct ControlStream {
    pub read: BoxRead,
    pub write: BoxWrite,
    pub peer: String,
    /// Keeps the connection open while the stream is in use.
    pub conn: Connection,
}

/// The replication side of one VM's route, for
/// [`wan::transport::replication::spawn_receiver`].
pub struct ReplicationListener {
    links: mpsc::Receiver<Link>,
}

impl Listener for ReplicationListener {
    fn accept(&mut self) -> BoxFuture<'_, Result<Link, TransportError>> {
        Box::pin(async move { self.links.recv().await.ok_or(TransportError::Closed) })
    }
}

/// Where one VM's streams go.
struct Route {
    /// The only site allowed to send this VM's streams.
    peer: String,
    links: mpsc::Sender<Link>,
    control: mpsc::Sender<ControlStream>,
}

/// The VMs a site endpoint serves, each with its streams' destination.
/// VMs come and go while the endpoint runs.
#[derive(Clone, Default)]
pub struct Router {
    routes: Arc<Mutex<HashMap<String, Route>>>,
}

/// Why a stream was not delivered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no VM {0:?} is served here")]
    UnknownVm(String),
    #[error("VM {vm:?} is replicated from site {expected:?}, not from {got:?}")]
    WrongPeer {
        vm: String,
        expected: String,
        got: String,
    },
    #[error("VM {0:?} is being removed")]
    Gone(String),
}

/// What a stream turned out to be.
enum Kind {
    Control,
    Replication,
}

impl Router {
    /// Accepts connections on `endpoint` until it closes, routing their
    /// streams to the VMs added with [`Router::add`].
    pub fn serve(endpoint: Endpoint) -> Router {
        let router = Router::default();
        let r = router.clone();
        tokio::spawn(async move {
            loop {
                match endpoint.accept().await {
                    Ok(conn) => {
                        tokio::spawn(r.clone().sort(conn, endpoint.clone()));
                    }
                    Err(TransportError::Closed) => break,
                    // A refused peer (wrong CA, site or version) was logged.
                    Err(e) => debug!(error = %e, "connection refused"),
                }
            }
        });
        router
    }

    /// Routes the streams of `vm`, coming from site `peer`, to the returned
    /// listener and control-stream receiver (replacing any earlier route of
    /// `vm`).
    pub fn add(
        &self,
        vm: &str,
        peer: &str,
    ) -> (ReplicationListener, mpsc::Receiver<ControlStream>) {
        let (links, link_rx) = mpsc::channel(4);
        let (control, ctl_rx) = mpsc::channel(4);
        self.lock().insert(
            vm.to_owned(),
            Route {
                peer: peer.to_owned(),
                links,
                control,
            },
        );
        (ReplicationListener { links: link_rx }, ctl_rx)
    }

    /// Stops routing `vm`: its listener and control receiver end, and new
    /// streams for it are refused.
    pub fn remove(&self, vm: &str) {
        self.lock().remove(vm);
    }

    /// The VMs routed now, sorted.
    pub fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The destination of a stream for `vm` from site `from`.
    fn route(&self, vm: &str, from: Option<&str>, kind: &Kind) -> Result<RouteTarget, RouteError> {
        let routes = self.lock();
        let r = routes
            .get(vm)
            .ok_or_else(|| RouteError::UnknownVm(vm.to_owned()))?;
        if from != Some(r.peer.as_str()) {
            return Err(RouteError::WrongPeer {
                vm: vm.to_owned(),
                expected: r.peer.clone(),
                got: from.unwrap_or("(unnamed)").to_owned(),
            });
        }
        Ok(match kind {
            Kind::Control => RouteTarget::Control(r.control.clone()),
            Kind::Replication => RouteTarget::Replication(r.links.clone()),
        })
    }

    /// Accepts every stream of `conn` (a primary may carry several VMs'
    /// streams on one connection) and routes each.
    async fn sort(self, conn: Connection, endpoint: Endpoint) {
        let peer = conn
            .peer_site()
            .map(|s| format!("site {s} at {}", conn.remote_address()))
            .unwrap_or_else(|| conn.remote_address().to_string());
        let mut first = true;
        loop {
            let accepted = if first {
                // A connection that never opens a stream is dropped.
                match tokio::time::timeout(ROUTE_TIMEOUT, conn.accept_bi()).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(peer, "connection opened no stream within 10 s");
                        return;
                    }
                }
            } else {
                conn.accept_bi().await
            };
            first = false;
            let (send, recv) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    debug!(peer, error = %e, "connection ended");
                    return;
                }
            };
            tokio::spawn(self.clone().sort_stream(
                endpoint.clone(),
                conn.clone(),
                peer.clone(),
                send,
                recv,
            ));
        }
    }

    async fn sort_stream(
        self,
        endpoint: Endpoint,
        conn: Connection,
        peer: String,
        send: SendStream,
        mut recv: RecvStream,
    ) {
        let opened = tokio::time::timeout(ROUTE_TIMEOUT, read_route(&mut recv)).await;
        let (kind, vm, consumed) = match opened {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(peer, error = %e, "stream refused");
                return;
            }
            Err(_) => {
                warn!(peer, "stream did not say which VM it is for within 10 s");
                return;
            }
        };
        let target = match self.route(&vm, conn.peer_site(), &kind) {
            Ok(t) => t,
            Err(e) => {
                warn!(peer, error = %e, "stream refused");
                return;
            }
        };
        let delivered = match target {
            RouteTarget::Control(tx) => tx
                .send(ControlStream {
                    read: Box::new(std::io::Cursor::new(consumed).chain(recv)),
                    write: Box::new(send),
                    peer,
                    conn,
                })
                .await
                .is_ok(),
            // The endpoint's replication link: with FEC (when configured)
            // from the first byte after those read to route the stream.
            RouteTarget::Replication(tx) => tx
                .send(endpoint.replication_link_after(conn, send, recv, consumed, peer))
                .await
                .is_ok(),
        };
        if !delivered {
            warn!(error = %RouteError::Gone(vm), "stream refused");
        }
    }
}

enum RouteTarget {
    Control(mpsc::Sender<ControlStream>),
    Replication(mpsc::Sender<Link>),
}

/// Why a stream's first bytes named no VM.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error("reading the stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("first failover message: {0}")]
    Failover(#[from] crate::witness::frame::FrameError),
    #[error("replication stream: {0}")]
    Session(String),
    #[error("replication stream sent {0} bytes without a HELLO")]
    NoHello(usize),
    #[error("stream ended before naming its VM")]
    Ended,
}

/// Reads a stream's first bytes: its kind, its VM, and the bytes to hand
/// back in front of it (a control stream's magic is not handed back: its
/// readers start after it).
async fn read_route<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<(Kind, String, Vec<u8>), HeadError> {
    let mut head = [0u8; 4];
    recv.read_exact(&mut head).await?;
    if head == CONTROL_MAGIC {
        let mut len = [0u8; 2];
        recv.read_exact(&mut len).await?;
        let n = usize::from(u16::from_le_bytes(len));
        if n > failover::wire::MAX_MESSAGE_LEN {
            return Err(crate::witness::frame::FrameError::TooLong(n).into());
        }
        let mut body = vec![0u8; n];
        recv.read_exact(&mut body).await?;
        let (vm, _) = failover::wire::decode(&body)
            .map_err(|e| HeadError::Failover(crate::witness::frame::FrameError::Wire(e)))?;
        let mut consumed = len.to_vec();
        consumed.extend_from_slice(&body);
        return Ok((Kind::Control, vm, consumed));
    }
    let mut consumed = head.to_vec();
    let mut decoder = Decoder::new();
    decoder.push(&head);
    let mut buf = vec![0u8; 4096];
    loop {
        match decoder.next_item() {
            Ok(Some(Item::Control(ControlFrame::Hello(h)))) => {
                return Ok((Kind::Replication, h.vm_id, consumed))
            }
            Ok(Some(other)) => {
                return Err(HeadError::Session(format!(
                    "first frame is not HELLO ({})",
                    item_name(&other)
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(HeadError::Session(e.to_string())),
        }
        if consumed.len() > MAX_HELLO_BYTES {
            return Err(HeadError::NoHello(consumed.len()));
        }
        let n = recv.read(&mut buf).await?;
        if n == 0 {
            return Err(HeadError::Ended);
        }
        decoder.push(&buf[..n]);
        consumed.extend_from_slice(&buf[..n]);
    }
}

fn item_name(item: &Item) -> &'static str {
    match item {
        Item::Control(c) => c.name(),
        _ => "epoch data",
    }
}
