//! The failover message links of one site: a dialed link (to the witness,
//! and from the primary to the backup) and an accepted link (the backup's
//! end of the primary's control stream). Both keep one ordered stream open
//! and re-establish it when it breaks. Messages queued while no stream is
//! open are dropped when one opens: heartbeats and lease requests are
//! periodic, and a stale one carries nothing a fresh one does not.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failover::{Message, SiteId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use wan::transport::replication::{BoxRead, BoxWrite};
use wan::transport::Endpoint;

use super::demux::{ControlStream, CONTROL_MAGIC};
use crate::witness::frame::{read_message, write_message};

/// Where incoming messages go: (sender, message).
pub type Inbox = mpsc::UnboundedSender<(SiteId, Message)>;

/// How a link reaches its party.
// Built once per link: the size of the dialing variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum LinkKind {
    /// Dial `addr` and prove it is `name`; `control` links open with
    /// [`CONTROL_MAGIC`] (site to site), witness links do not.
    Dial {
        endpoint: Endpoint,
        addr: SocketAddr,
        name: String,
        control: bool,
    },
    /// Streams the peer opened towards us (from the endpoint demux).
    Accept(mpsc::Receiver<ControlStream>),
    /// The witness is an etcd cluster: site `me`'s messages to the witness
    /// become etcd operations, and their answers come back as the
    /// witness's (see [`super::etcd`]).
    #[cfg(feature = "etcd")]
    Etcd {
        link: super::etcd::EtcdLink,
        me: SiteId,
    },
}

/// Starts a link to party `from`; returns where to queue messages for it.
pub fn spawn(
    kind: LinkKind,
    vm: String,
    from: SiteId,
    inbox: Inbox,
    up: Arc<AtomicBool>,
    retry: Duration,
) -> mpsc::UnboundedSender<Message> {
    let (tx, rx) = mpsc::unbounded_channel();
    match kind {
        LinkKind::Dial {
            endpoint,
            addr,
            name,
            control,
        } => {
            tokio::spawn(dial_loop(
                endpoint, addr, name, control, vm, from, inbox, up, rx, retry,
            ));
        }
        LinkKind::Accept(streams) => {
            tokio::spawn(accept_loop(streams, vm, from, inbox, up, rx));
        }
        #[cfg(feature = "etcd")]
        LinkKind::Etcd { link, me } => {
            tokio::spawn(super::etcd::etcd_loop(
                link, vm, me, from, inbox, up, rx, retry,
            ));
        }
    }
    tx
}

/// Reads messages for `vm` into the inbox until the stream ends.
fn spawn_reader(mut read: BoxRead, vm: String, from: SiteId, inbox: Inbox) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match read_message(&mut read).await {
                Ok(Some((v, msg))) if v == vm => {
                    if inbox.send((from, msg)).is_err() {
                        return;
                    }
                }
                Ok(Some((v, _))) => debug!(vm = %v, "failover message for another VM ignored"),
                Ok(None) => return,
                Err(e) => {
                    warn!(error = %e, "failover link: bad message, dropping the stream");
                    return;
                }
            }
        }
    })
}

/// Writes queued messages until the stream or the reader fails.
async fn pump(
    write: &mut BoxWrite,
    reader: &mut JoinHandle<()>,
    vm: &str,
    out: &mut mpsc::UnboundedReceiver<Message>,
) -> bool {
    loop {
        tokio::select! {
            m = out.recv() => {
                let Some(m) = m else { return false };
                if write_message(write, vm, &m).await.is_err() {
                    return true;
                }
            }
            _ = &mut *reader => return true,
        }
    }
}

fn drain(out: &mut mpsc::UnboundedReceiver<Message>) {
    while out.try_recv().is_ok() {}
}

#[allow(clippy::too_many_arguments)]
async fn dial_loop(
    endpoint: Endpoint,
    addr: SocketAddr,
    name: String,
    control: bool,
    vm: String,
    from: SiteId,
    inbox: Inbox,
    up: Arc<AtomicBool>,
    mut out: mpsc::UnboundedReceiver<Message>,
    retry: Duration,
) {
    let mut logged_down = false;
    loop {
        let dialed = tokio::time::timeout(Duration::from_secs(5), async {
            let conn = endpoint.connect(addr, &name).await?;
            let (mut send, recv) = conn.open_bi().await?;
            if control {
                send.write_all(&CONTROL_MAGIC)
                    .await
                    .map_err(|e| wan::transport::TransportError::Timeout(e.to_string()))?;
            }
            Ok::<_, wan::transport::TransportError>((conn, send, recv))
        })
        .await;
        match dialed {
            Ok(Ok((conn, send, recv))) => {
                info!(party = %name, %addr, "failover link up");
                logged_down = false;
                up.store(true, Ordering::Relaxed);
                drain(&mut out);
                let mut reader = spawn_reader(Box::new(recv), vm.clone(), from, inbox.clone());
                let mut write: BoxWrite = Box::new(send);
                if !control {
                    // Introduce ourselves and the VM at once (a witness
                    // ignores heartbeats): a standby asks the witness for
                    // nothing, yet must receive a lease handed over to it.
                    let hello = Message::Heartbeat {
                        seq: 0,
                        token: 0,
                        stance: failover::Stance::Idle,
                    };
                    let _ = write_message(&mut write, &vm, &hello).await;
                }
                let go_on = pump(&mut write, &mut reader, &vm, &mut out).await;
                reader.abort();
                up.store(false, Ordering::Relaxed);
                conn.close(0, b"failover link reset");
                if !go_on {
                    return;
                }
                warn!(party = %name, %addr, "failover link down");
            }
            Ok(Err(e)) if !logged_down => {
                warn!(party = %name, %addr, error = %e, "failover link: cannot connect (retrying)");
                logged_down = true;
            }
            Err(_) if !logged_down => {
                warn!(party = %name, %addr, "failover link: no answer (retrying)");
                logged_down = true;
            }
            _ => {}
        }
        if inbox.is_closed() {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}

async fn accept_loop(
    mut streams: mpsc::Receiver<ControlStream>,
    vm: String,
    from: SiteId,
    inbox: Inbox,
    up: Arc<AtomicBool>,
    mut out: mpsc::UnboundedReceiver<Message>,
) {
    let Some(mut next) = streams.recv().await else {
        return;
    };
    loop {
        info!(peer = %next.peer, "failover link up");
        up.store(true, Ordering::Relaxed);
        drain(&mut out);
        let ControlStream {
            read,
            mut write,
            peer,
            conn,
        } = next;
        let mut reader = spawn_reader(read, vm.clone(), from, inbox.clone());
        // A new stream from the peer (it reconnected) replaces this one.
        let replaced = tokio::select! {
            go_on = pump(&mut write, &mut reader, &vm, &mut out) => {
                if !go_on {
                    reader.abort();
                    return;
                }
                None
            }
            s = streams.recv() => s,
        };
        reader.abort();
        conn.close(0, b"failover link replaced");
        up.store(false, Ordering::Relaxed);
        next = match replaced {
            Some(s) => s,
            None => {
                warn!(peer = %peer, "failover link down");
                // Messages for a peer with no stream are dropped.
                loop {
                    tokio::select! {
                        s = streams.recv() => match s {
                            Some(s) => break s,
                            None => return,
                        },
                        m = out.recv() => if m.is_none() { return },
                    }
                }
            }
        };
    }
}
