//! One site endpoint, two kinds of incoming connection: replication
//! sessions (the primary's epochs) and failover control streams (the
//! primary's heartbeats). A control stream opens with [`CONTROL_MAGIC`]; a
//! replication stream opens with a session frame, which never does. The
//! bytes read to tell them apart are handed back in front of the stream.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use wan::transport::replication::{BoxFuture, BoxRead, BoxWrite, Link, Listener};
use wan::transport::{Connection, Endpoint, TransportError};

/// First bytes of a failover control stream between two sites.
pub const CONTROL_MAGIC: [u8; 4] = *b"RWFO";

/// An ordered stream of failover messages with a peer site.
pub struct ControlStream {
    pub read: BoxRead,
    pub write: BoxWrite,
    pub peer: String,
    /// Keeps the connection open while the stream is in use.
    pub conn: Connection,
}

/// The replication side of a demultiplexed endpoint, for
/// [`wan::transport::replication::spawn_receiver`].
pub struct ReplicationListener {
    links: mpsc::Receiver<Link>,
}

impl Listener for ReplicationListener {
    fn accept(&mut self) -> BoxFuture<'_, Result<Link, TransportError>> {
        Box::pin(async move { self.links.recv().await.ok_or(TransportError::Closed) })
    }
}

/// Accepts connections on `endpoint` until it closes, sorting their first
/// stream into replication links and control streams.
pub fn split(endpoint: Endpoint) -> (ReplicationListener, mpsc::Receiver<ControlStream>) {
    let (link_tx, link_rx) = mpsc::channel(4);
    let (ctl_tx, ctl_rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            match endpoint.accept().await {
                Ok(conn) => {
                    tokio::spawn(sort(conn, link_tx.clone(), ctl_tx.clone()));
                }
                Err(TransportError::Closed) => break,
                // A refused peer (wrong CA, site or version) was logged.
                Err(e) => debug!(error = %e, "connection refused"),
            }
        }
    });
    (ReplicationListener { links: link_rx }, ctl_rx)
}

async fn sort(conn: Connection, links: mpsc::Sender<Link>, control: mpsc::Sender<ControlStream>) {
    let peer = conn
        .peer_site()
        .map(|s| format!("site {s} at {}", conn.remote_address()))
        .unwrap_or_else(|| conn.remote_address().to_string());
    let opened = tokio::time::timeout(Duration::from_secs(10), async {
        let (send, mut recv) = conn.accept_bi().await?;
        let mut head = [0u8; 4];
        recv.read_exact(&mut head)
            .await
            .map_err(|e| TransportError::Timeout(format!("reading the stream header: {e}")))?;
        Ok::<_, TransportError>((send, recv, head))
    })
    .await;
    let (send, recv, head) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(peer, error = %e, "connection opened no usable stream");
            return;
        }
        Err(_) => {
            warn!(peer, "connection opened no stream within 10 s");
            return;
        }
    };
    if head == CONTROL_MAGIC {
        let _ = control
            .send(ControlStream {
                read: Box::new(recv),
                write: Box::new(send),
                peer,
                conn,
            })
            .await;
    } else {
        let read = std::io::Cursor::new(head.to_vec()).chain(recv);
        let _ = links
            .send(Link {
                read: Box::new(read),
                write: Box::new(send),
                peer,
                quic: Some(conn),
            })
            .await;
    }
}
