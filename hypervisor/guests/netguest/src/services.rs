//! The three TCP services and the dirtying workload.

use alloc::vec;
use alloc::vec::Vec;

use guest_rt::time;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use crate::kvstore::{take_lines, KvStore};

/// Echo port.
pub const ECHO: u16 = 7;
/// Counter-stream port.
pub const COUNTER: u16 = 9000;
/// Key-value port.
pub const KV: u16 = 7000;
const PER_SERVICE: usize = 4;
const MAX_LINE: usize = 1024;

struct Conn {
    handle: SocketHandle,
    port: u16,
    /// Counter: bytes of the stream sent so far.
    sent: u64,
    /// Key-value: partial request line.
    line: Vec<u8>,
}

/// All listening sockets and their per-connection state.
pub struct Services {
    conns: Vec<Conn>,
    kv: KvStore,
}

fn socket(rx: usize, tx: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; rx]),
        tcp::SocketBuffer::new(vec![0; tx]),
    )
}

impl Services {
    /// Creates and opens the sockets.
    pub fn new(sockets: &mut SocketSet<'static>, kv: KvStore) -> Services {
        let mut conns = Vec::new();
        for port in [ECHO, COUNTER, KV] {
            for _ in 0..PER_SERVICE {
                let tx = if port == COUNTER {
                    256 * 1024
                } else {
                    64 * 1024
                };
                let mut sock = socket(64 * 1024, tx);
                let _ = sock.listen(port);
                let handle = sockets.add(sock);
                conns.push(Conn {
                    handle,
                    port,
                    sent: 0,
                    line: Vec::new(),
                });
            }
        }
        Services { conns, kv }
    }

    /// Serves every socket once; `true` if anything moved.
    pub fn serve(&mut self, sockets: &mut SocketSet<'static>) -> bool {
        let mut busy = false;
        for c in &mut self.conns {
            let s = sockets.get_mut::<tcp::Socket>(c.handle);
            if !s.is_open() {
                c.sent = 0;
                c.line.clear();
                let _ = s.listen(c.port);
                continue;
            }
            if s.may_recv() || s.may_send() {
                busy |= match c.port {
                    ECHO => echo(s),
                    COUNTER => counter(s, &mut c.sent),
                    _ => kv(s, &mut c.line, &mut self.kv),
                };
            }
            if !s.may_recv() && s.state() == tcp::State::CloseWait {
                s.close();
            }
        }
        busy
    }
}

fn echo(s: &mut tcp::Socket) -> bool {
    let mut moved = false;
    while s.can_recv() && s.send_capacity() > s.send_queue() {
        let room = s.send_capacity() - s.send_queue();
        let mut buf = [0u8; 4096];
        let n = room.min(buf.len());
        match s.recv_slice(&mut buf[..n]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = s.send_slice(&buf[..n]);
                moved = true;
            }
        }
    }
    moved
}

fn counter(s: &mut tcp::Socket, sent: &mut u64) -> bool {
    // Discard anything the client sends.
    while s.can_recv() {
        if s.recv(|b| (b.len(), ())).is_err() {
            break;
        }
    }
    let mut moved = false;
    while s.can_send() {
        let start = *sent;
        let n = s
            .send(|buf| {
                for (i, b) in buf.iter_mut().enumerate() {
                    let pos = start + i as u64;
                    *b = (pos / 8).to_be_bytes()[(pos % 8) as usize];
                }
                (buf.len(), buf.len())
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        *sent += n as u64;
        moved = true;
    }
    moved
}

fn kv(s: &mut tcp::Socket, line: &mut Vec<u8>, store: &mut KvStore) -> bool {
    let mut moved = false;
    while s.can_recv() {
        let mut buf = [0u8; 1024];
        match s.recv_slice(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                moved = true;
            }
        }
    }
    for req in take_lines(line) {
        let reply = store.handle(&req);
        let _ = s.send_slice(reply.as_bytes());
    }
    if line.len() > MAX_LINE {
        line.clear();
        let _ = s.send_slice(b"ERR line too long\n");
    }
    moved
}

/// Writes pages of a working set at a steady rate.
pub struct Workload {
    pages: Vec<u8>,
    per_ms: u64,
    done: u64,
    start_ms: u64,
}

impl Workload {
    /// `set_pages` pages, `per_ms` page writes per millisecond.
    pub fn new(set_pages: u64, per_ms: u64) -> Workload {
        let pages = if set_pages > 0 && per_ms > 0 {
            vec![0u8; (set_pages * 4096) as usize]
        } else {
            Vec::new()
        };
        Workload {
            pages,
            per_ms,
            done: 0,
            start_ms: time::millis(),
        }
    }

    /// Whether there is a workload.
    pub fn active(&self) -> bool {
        !self.pages.is_empty()
    }

    /// Catches up with the rate (bounded per call).
    pub fn run(&mut self) {
        if self.pages.is_empty() {
            return;
        }
        let n_pages = self.pages.len() as u64 / 4096;
        let due = (time::millis() - self.start_ms) * self.per_ms;
        let todo = due.saturating_sub(self.done).min(10_000);
        for _ in 0..todo {
            let page = (self.done % n_pages) as usize;
            let off = page * 4096 + ((self.done / n_pages) % 512) as usize * 8;
            self.pages[off..off + 8].copy_from_slice(&self.done.to_le_bytes());
            self.done += 1;
        }
    }
}
