//! The tokio shell: a replication [`Link`] over one QUIC bidirectional
//! stream, with the stream protected by FEC datagrams in both directions.
//!
//! * Writing: bytes go to the stream as usual; the [`Encoder`] sees what the
//!   stream accepted and, at each flush (the replication shell flushes when
//!   its queue runs dry: a burst end), its repair / mirror datagrams go out
//!   with `send_datagram`. quinn sends datagrams ahead of queued stream
//!   data, so repairs for an epoch travel with it, not after it.
//! * Reading: a task reads the stream *unordered* (`read_chunk(_, false)`)
//!   and the connection's datagrams, feeds the [`Reassembly`] and hands the
//!   in-order bytes to [`FecRead`]. A refused datagram or chunk closes the
//!   connection with [`CLOSE_FEC_ERROR`](crate::transport::CLOSE_FEC_ERROR)
//!   and the reader sees the error.
//!
//! One replication stream per connection (what [`super::super::replication::QuicDialer`]
//! opens): the connection's datagrams belong to it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::wire::{Datagram, KIND_HELLO, KIND_MIRROR};
use super::{Encoder, FecParams, Limits, Reassembly, ReassemblyStats};
use crate::transport::replication::Link;
use crate::transport::{Connection, CLOSE_FEC_ERROR};

/// HELLOs sent at most, one every [`HELLO_INTERVAL`], until a FEC datagram
/// from the peer shows that it heard one (a HELLO can be lost too).
const HELLOS: u32 = 10;
const HELLO_INTERVAL: Duration = Duration::from_millis(250);
/// Largest chunk taken from quinn at once.
const READ_CHUNK: usize = 256 * 1024;

/// FEC counters of one link, or of every link of an endpoint, for status,
/// metrics and benchmarks.
#[derive(Debug, Default)]
pub struct FecCounters {
    datagrams_sent: AtomicU64,
    redundant_bytes_sent: AtomicU64,
    send_failures: AtomicU64,
    stream_bytes_written: AtomicU64,
    recovered_shards: AtomicU64,
    decoded_windows: AtomicU64,
    mirrored_bytes: AtomicU64,
    duplicate_bytes: AtomicU64,
    unused_repairs: AtomicU64,
}

/// A snapshot of [`FecCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FecTotals {
    /// Repair and mirror datagrams sent, and their payload bytes.
    pub datagrams_sent: u64,
    pub redundant_bytes_sent: u64,
    /// Datagrams quinn would not take (too large for the path, closed).
    pub send_failures: u64,
    /// Stream bytes the protected links wrote.
    pub stream_bytes_written: u64,
    /// Data shards rebuilt from recovery shards, in this many windows.
    pub recovered_shards: u64,
    pub decoded_windows: u64,
    /// Stream bytes first received from a mirror.
    pub mirrored_bytes: u64,
    /// Bytes received twice (retransmissions of what FEC rebuilt).
    pub duplicate_bytes: u64,
    /// Repairs that arrived too late or over the memory caps.
    pub unused_repairs: u64,
}

impl std::ops::AddAssign for FecTotals {
    fn add_assign(&mut self, o: FecTotals) {
        self.datagrams_sent += o.datagrams_sent;
        self.redundant_bytes_sent += o.redundant_bytes_sent;
        self.send_failures += o.send_failures;
        self.stream_bytes_written += o.stream_bytes_written;
        self.recovered_shards += o.recovered_shards;
        self.decoded_windows += o.decoded_windows;
        self.mirrored_bytes += o.mirrored_bytes;
        self.duplicate_bytes += o.duplicate_bytes;
        self.unused_repairs += o.unused_repairs;
    }
}

/// Where a link's counts go: its own counters (its VM's figures) and its
/// endpoint's (all links together).
#[derive(Debug, Clone)]
struct Tally([Arc<FecCounters>; 2]);

impl Tally {
    fn add(&self, field: fn(&FecCounters) -> &AtomicU64, n: u64) {
        for c in &self.0 {
            field(c).fetch_add(n, Ordering::Relaxed);
        }
    }

    fn add_receiver(&self, now: &ReassemblyStats, before: &ReassemblyStats) {
        for c in &self.0 {
            c.add_receiver(now, before);
        }
    }
}

impl FecCounters {
    pub fn totals(&self) -> FecTotals {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FecTotals {
            datagrams_sent: g(&self.datagrams_sent),
            redundant_bytes_sent: g(&self.redundant_bytes_sent),
            send_failures: g(&self.send_failures),
            stream_bytes_written: g(&self.stream_bytes_written),
            recovered_shards: g(&self.recovered_shards),
            decoded_windows: g(&self.decoded_windows),
            mirrored_bytes: g(&self.mirrored_bytes),
            duplicate_bytes: g(&self.duplicate_bytes),
            unused_repairs: g(&self.unused_repairs),
        }
    }

    fn add_receiver(&self, now: &ReassemblyStats, before: &ReassemblyStats) {
        let add = |a: &AtomicU64, n: u64, b: u64| {
            a.fetch_add(n.saturating_sub(b), Ordering::Relaxed);
        };
        add(
            &self.recovered_shards,
            now.recovered_shards,
            before.recovered_shards,
        );
        add(
            &self.decoded_windows,
            now.decoded_windows,
            before.decoded_windows,
        );
        add(
            &self.mirrored_bytes,
            now.mirrored_bytes,
            before.mirrored_bytes,
        );
        add(
            &self.duplicate_bytes,
            now.duplicate_bytes,
            before.duplicate_bytes,
        );
        add(
            &self.unused_repairs,
            now.late_repairs + now.dropped_repairs,
            before.late_repairs + before.dropped_repairs,
        );
    }
}

/// How an endpoint's FEC links are made: the sender's redundancy, the
/// receiver's bounds, and the endpoint's counters (each link also keeps
/// its own).
pub struct FecSetup {
    pub params: FecParams,
    pub limits: Limits,
    pub counters: Arc<FecCounters>,
}

/// Makes a FEC-protected [`Link`] of a QUIC stream pair. `already_read`
/// bytes of `recv` were read (in order) before: the link's reader starts
/// after them.
pub fn quic_link(
    conn: Connection,
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    already_read: u64,
    peer: String,
    setup: FecSetup,
) -> Link {
    let FecSetup {
        params,
        limits,
        counters,
    } = setup;
    let peer_decodes = Arc::new(AtomicBool::new(false));
    let own = Arc::new(FecCounters::default());
    let counters = Tally([own.clone(), counters]);
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(read_task(
        conn.quinn().clone(),
        recv,
        Reassembly::starting_at(limits, already_read),
        tx,
        peer_decodes.clone(),
        counters.clone(),
    ));
    Link {
        read: Box::new(FecRead {
            rx,
            cur: Bytes::new(),
            err: None,
            task,
        }),
        write: Box::new(FecWrite {
            send,
            conn: conn.quinn().clone(),
            enc: Encoder::new(params),
            peer_decodes,
            out: Vec::new(),
            counters,
        }),
        quic: Some(conn),
        peer,
        fec: Some(own),
    }
}

/// A mirror is sent twice, the second copy this long after the first
/// (see [`FecWrite::send_out`]).
const MIRROR_AGAIN_AFTER: Duration = Duration::from_millis(3);

/// Whether a datagram is a MIRROR (sent twice).
fn is_mirror(d: &[u8]) -> bool {
    d.first() == Some(&KIND_MIRROR)
}

/// Sends one FEC datagram, best effort (the stream still carries every
/// byte), and counts it.
fn send_counted(conn: &quinn::Connection, counters: &Tally, d: Bytes) {
    let n = d.len() as u64;
    match conn.send_datagram(d) {
        Ok(()) => {
            counters.add(|c| &c.datagrams_sent, 1);
            counters.add(|c| &c.redundant_bytes_sent, n);
        }
        Err(e) => {
            debug!(error = %e, "FEC datagram not sent");
            counters.add(|c| &c.send_failures, 1);
        }
    }
}

/// The write half: the stream, plus redundancy at each flush.
struct FecWrite {
    send: quinn::SendStream,
    conn: quinn::Connection,
    enc: Encoder,
    peer_decodes: Arc<AtomicBool>,
    out: Vec<Bytes>,
    counters: Tally,
}

impl FecWrite {
    /// Room for one datagram now; `None` before the peer said it decodes
    /// them (the encoder then only keeps count of the offsets).
    fn max_datagram(&self) -> Option<usize> {
        if self.peer_decodes.load(Ordering::Relaxed) {
            self.conn.max_datagram_size()
        } else {
            None
        }
    }

    fn send_out(&mut self) {
        for d in self.out.drain(..) {
            if is_mirror(&d) {
                // quinn packs DATAGRAM frames and then STREAM frames into
                // the same packet: a commit message and its mirror usually
                // share one UDP packet, and one loss takes both (then the
                // commit waits for quinn's probe timeout, ~100 ms at
                // 50 ms RTT: the isolated slow epochs of the benchmark).
                // A second copy a few milliseconds later travels in a
                // packet of its own.
                let conn = self.conn.clone();
                let counters = self.counters.clone();
                let again = d.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(MIRROR_AGAIN_AFTER).await;
                    send_counted(&conn, &counters, again);
                });
            }
            send_counted(&self.conn, &self.counters, d);
        }
    }

    /// End of a burst: protect what was written since the last one.
    fn end_burst(&mut self) {
        let s = self.conn.stats();
        self.enc
            .observe_path(s.path.sent_packets, s.path.lost_packets);
        let max = self.max_datagram();
        self.enc.flush(max, &mut self.out);
        self.send_out();
    }
}

impl AsyncWrite for FecWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.send).poll_write(cx, buf))?;
        let max = this.max_datagram();
        this.enc.record(&buf[..n], max, &mut this.out);
        this.counters.add(|c| &c.stream_bytes_written, n as u64);
        this.send_out();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.end_burst();
        Pin::new(&mut this.send).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.end_burst();
        Pin::new(&mut this.send).poll_shutdown(cx)
    }
}

/// The read half: in-order bytes from the reassembly task.
struct FecRead {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    /// An error that came after bytes already handed out in the same read.
    err: Option<io::Error>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FecRead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AsyncRead for FecRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Fill the buffer with everything queued, not one chunk per call:
        // a recovered epoch is released at once as hundreds of packet-sized
        // pieces, and a read per piece costs the session loop a round each.
        let this = self.get_mut();
        if let Some(e) = this.err.take() {
            return Poll::Ready(Err(e));
        }
        let mut copied = false;
        while buf.remaining() > 0 {
            if !this.cur.is_empty() {
                let n = this.cur.len().min(buf.remaining());
                buf.put_slice(&this.cur.split_to(n));
                copied = true;
                continue;
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(b))) => this.cur = b,
                Poll::Ready(Some(Err(e))) if copied => {
                    this.err = Some(e);
                    break;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => break,
                Poll::Pending if copied => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

async fn read_task(
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    mut r: Reassembly,
    tx: mpsc::Sender<io::Result<Bytes>>,
    peer_decodes: Arc<AtomicBool>,
    counters: Tally,
) {
    let hello = Datagram::Hello.encode();
    let mut hellos = 0;
    let mut hello_timer = tokio::time::interval(HELLO_INTERVAL);
    let mut heard_fec = false;
    let mut datagrams_open = true;
    let mut published = ReassemblyStats::default();
    loop {
        let step = tokio::select! {
            chunk = recv.read_chunk(READ_CHUNK, false) => match chunk {
                Ok(Some(c)) => r.on_stream_chunk(c.offset, c.bytes).map(|()| true),
                Ok(None) => Ok(false),
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other(e))).await;
                    return;
                }
            },
            d = conn.read_datagram(), if datagrams_open => match d {
                Ok(d) if d.first() == Some(&KIND_HELLO) && d.len() == 1 => {
                    peer_decodes.store(true, Ordering::Relaxed);
                    Ok(true)
                }
                Ok(d) => {
                    heard_fec = true;
                    r.on_datagram(d).map(|()| true)
                }
                // The stream read reports the connection's end.
                Err(_) => {
                    datagrams_open = false;
                    Ok(true)
                }
            },
            _ = hello_timer.tick(), if hellos < HELLOS && !heard_fec => {
                hellos += 1;
                let _ = conn.send_datagram(hello.clone());
                Ok(true)
            }
        };
        let more = match step {
            Ok(more) => more,
            Err(e) => {
                warn!(error = %e, "FEC: refusing the peer's data, closing the connection");
                conn.close(CLOSE_FEC_ERROR.into(), e.to_string().as_bytes());
                let _ = tx
                    .send(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
                    .await;
                return;
            }
        };
        // Counted before the bytes go out, so whoever has read them sees
        // the shards that rebuilt them.
        let now = r.stats();
        if now != published {
            counters.add_receiver(&now, &published);
            published = now;
        }
        while let Some(b) = r.poll_output() {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        if !more {
            // End of stream: everything was read and handed out; dropping
            // `tx` is the reader's EOF.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mirrors_are_sent_twice() {
        let mirror = Datagram::Mirror {
            offset: 7,
            bytes: Bytes::from_static(b"commit"),
        }
        .encode();
        assert!(is_mirror(&mirror));
        assert!(!is_mirror(&Datagram::Hello.encode()));
        assert!(!is_mirror(&[]));
        assert!(!is_mirror(&[super::super::wire::KIND_REPAIR, 0, 0]));
        // The second copy must leave well after quinn has sent the first
        // (and the stream frame it would share a packet with), and add
        // little to a commit that needed it.
        assert!(MIRROR_AGAIN_AFTER >= Duration::from_millis(1));
        assert!(MIRROR_AGAIN_AFTER <= Duration::from_millis(10));
    }
}
