//! TCP 7100: a shop front that keeps its own order book and records every
//! order in a key-value database on another VM (the `kv` service, TCP 7000,
//! of a second guest). It exists to test consistency groups: a client's
//! request to this VM makes this VM write to the other one, so after a
//! takeover the database must hold exactly the orders this VM confirmed.
//!
//! Protocol, one line each:
//! * `DB a.b.c.d` — the database's address (this VM connects to its
//!   port 7000); answered `OK`.
//! * `ORDER <key>` — this VM numbers the order (its own counter, one more
//!   than the last order it took), sends `SET <key> <number>` to the
//!   database and, once the database answered `OK`, replies
//!   `OK <key> <number>`. Orders may be pipelined; replies keep their order.
//! * `TOTAL` — `TOTAL <orders taken>` (only with no order in flight).
//!
//! The order counter lives in this VM's memory, the orders in the
//! database's: after a takeover from one consistency-group checkpoint both
//! agree, the client's same connection goes on, and every order the client
//! was told about is in the database under its number.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, Ipv4Address};

use crate::kvstore::take_lines;

/// The port.
pub const PORT: u16 = 7100;
/// The database's port (the kv service of the other guest).
const DB_PORT: u16 = 7000;
const CONNECTIONS: usize = 2;
const MAX_LINE: usize = 256;
/// First local port of connections to the database.
const EPHEMERAL: u16 = 49152;

/// The connection to the database of one client connection.
struct Upstream {
    handle: SocketHandle,
    /// Requests not yet in the socket (it may still be connecting).
    out: Vec<u8>,
    /// Partial reply line.
    line: Vec<u8>,
}

struct Conn {
    handle: SocketHandle,
    line: Vec<u8>,
    db: Option<Ipv4Address>,
    upstream: Option<Upstream>,
    /// Orders sent to the database, waiting for its `OK`, in order.
    pending: VecDeque<(String, u64)>,
}

/// The listening sockets, their connections and the order book.
pub struct Front {
    conns: Vec<Conn>,
    /// Orders taken so far (this VM's state).
    orders: u64,
    next_port: u16,
}

fn socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 16 * 1024]),
        tcp::SocketBuffer::new(vec![0; 16 * 1024]),
    )
}

impl Front {
    /// Opens the listening sockets.
    pub fn new(sockets: &mut SocketSet<'static>) -> Front {
        let conns = (0..CONNECTIONS)
            .map(|_| {
                let mut s = socket();
                let _ = s.listen(PORT);
                Conn {
                    handle: sockets.add(s),
                    line: Vec::new(),
                    db: None,
                    upstream: None,
                    pending: VecDeque::new(),
                }
            })
            .collect();
        Front {
            conns,
            orders: 0,
            next_port: EPHEMERAL,
        }
    }

    /// Serves every connection once; `true` if anything moved.
    pub fn serve(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'static>) -> bool {
        let mut busy = false;
        for i in 0..self.conns.len() {
            busy |= self.serve_one(i, iface, sockets);
        }
        busy
    }

    fn serve_one(
        &mut self,
        i: usize,
        iface: &mut Interface,
        sockets: &mut SocketSet<'static>,
    ) -> bool {
        let c = &mut self.conns[i];
        let s = sockets.get_mut::<tcp::Socket>(c.handle);
        if !s.is_open() {
            // The client is gone: forget its database connection too.
            if let Some(up) = c.upstream.take() {
                sockets.get_mut::<tcp::Socket>(up.handle).abort();
                sockets.remove(up.handle);
            }
            c.line.clear();
            c.db = None;
            c.pending.clear();
            let _ = sockets.get_mut::<tcp::Socket>(c.handle).listen(PORT);
            return false;
        }
        if !s.may_recv() && s.state() == tcp::State::CloseWait {
            s.close();
        }
        let mut busy = false;
        while s.can_recv() {
            let mut buf = [0u8; 1024];
            match s.recv_slice(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    c.line.extend_from_slice(&buf[..n]);
                    busy = true;
                }
            }
        }
        let mut replies = String::new();
        for req in take_lines(&mut c.line) {
            let req = req.trim_end_matches('\r');
            let mut parts = req.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("DB"), Some(addr), None) => match parse_v4(addr) {
                    Some(a) if c.upstream.is_none() => {
                        c.db = Some(a);
                        replies.push_str("OK\n");
                    }
                    Some(_) => replies.push_str("ERR database already chosen\n"),
                    None => replies.push_str("ERR usage: DB a.b.c.d\n"),
                },
                (Some("ORDER"), Some(key), None) if !key.is_empty() => match c.db {
                    Some(db) => {
                        if c.upstream.is_none() {
                            let mut up = socket();
                            let port = self.next_port;
                            self.next_port = self.next_port.checked_add(1).unwrap_or(EPHEMERAL);
                            if up
                                .connect(iface.context(), (IpAddress::Ipv4(db), DB_PORT), port)
                                .is_err()
                            {
                                replies.push_str("ERR cannot connect to the database\n");
                                continue;
                            }
                            c.upstream = Some(Upstream {
                                handle: sockets.add(up),
                                out: Vec::new(),
                                line: Vec::new(),
                            });
                        }
                        self.orders += 1;
                        let n = self.orders;
                        if let Some(up) = &mut c.upstream {
                            up.out
                                .extend_from_slice(format!("SET {key} {n}\n").as_bytes());
                        }
                        c.pending.push_back((key.into(), n));
                    }
                    None => replies.push_str("ERR no database (send DB a.b.c.d first)\n"),
                },
                (Some("TOTAL"), None, None) => {
                    replies.push_str(&format!("TOTAL {}\n", self.orders));
                }
                _ => replies.push_str("ERR usage: DB a.b.c.d | ORDER key | TOTAL\n"),
            }
        }
        if c.line.len() > MAX_LINE {
            c.line.clear();
            replies.push_str("ERR line too long\n");
        }
        if let Some(up) = &mut c.upstream {
            let us = sockets.get_mut::<tcp::Socket>(up.handle);
            if !up.out.is_empty() && us.can_send() {
                if let Ok(n) = us.send_slice(&up.out) {
                    up.out.drain(..n);
                    busy = true;
                }
            }
            while us.can_recv() {
                let mut buf = [0u8; 1024];
                match us.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        up.line.extend_from_slice(&buf[..n]);
                        busy = true;
                    }
                }
            }
            for reply in take_lines(&mut up.line) {
                match (reply.trim_end_matches('\r'), c.pending.pop_front()) {
                    ("OK", Some((key, n))) => replies.push_str(&format!("OK {key} {n}\n")),
                    (other, Some((key, _))) => {
                        replies.push_str(&format!("ERR database on {key}: {other}\n"))
                    }
                    (_, None) => {}
                }
            }
            if !us.is_open() {
                // The database went away: the orders in flight fail.
                for (key, _) in c.pending.drain(..) {
                    replies.push_str(&format!("ERR database closed before {key}\n"));
                }
                let handle = up.handle;
                c.upstream = None;
                sockets.remove(handle);
            }
        }
        if !replies.is_empty() {
            let _ = sockets
                .get_mut::<tcp::Socket>(c.handle)
                .send_slice(replies.as_bytes());
            busy = true;
        }
        busy
    }
}

fn parse_v4(s: &str) -> Option<Ipv4Address> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        *o = parts.next()?.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Address::new(octets[0], octets[1], octets[2], octets[3]))
}
