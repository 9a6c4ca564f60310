//! remus-wan as the guest disk's NBD server: QEMU's `-blockdev
//! driver=nbd,server.type=unix,...` connects to our unix socket and every
//! disk request of the guest comes to us, so that writes can be held per
//! epoch like the guest's network output.
//!
//! One raw image file, served under any export name, with the NBD "fixed
//! newstyle" handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_ABORT`; every other option gets `NBD_REP_ERR_UNSUP`, so
//! structured replies are never negotiated and every reply is a simple
//! one). Commands: READ, WRITE (with FUA), FLUSH, DISC; anything else is
//! refused with EINVAL. Protocol: the upstream NBD `proto.md`.
//!
//! Every WRITE goes through the [`WriteHook`] (the engine records it for
//! the running epoch) before it reaches the image and before it is
//! acknowledged, exactly as the micro-VM's virtio-blk does. Requests of one
//! connection are served in order, so a read sees every write acknowledged
//! before it, and a write is in the hook before any later request is read.
//!
//! QEMU drains its block requests when the guest stops (`stop` returns
//! after every request has its reply), and [`NbdServer::quiesce`] makes
//! sure of it from our side: no request is being served and none sits
//! unread in a socket.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::{Error, Result};
use crate::kvm::devices::block::BlockStats;
use crate::seams::WriteHook;

/// "NBDMAGIC", the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server): fixed newstyle, and "no zeroes" after the
/// export information.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags we know; any other bit means a client we cannot serve.
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
/// Option replies.
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const INFO_EXPORT: u16 = 0;
/// Longest option payload we read; longer ones end the connection (an
/// export name is at most 4096 bytes, and we need nothing else).
const MAX_OPTION: u32 = 64 << 10;

/// Transmission flags: flags are valid, FLUSH and FUA are supported.
const T_HAS_FLAGS: u16 = 1 << 0;
const T_SEND_FLUSH: u16 = 1 << 2;
const T_SEND_FUA: u16 = 1 << 3;
/// What we advertise for the export.
pub const TRANSMISSION_FLAGS: u16 = T_HAS_FLAGS | T_SEND_FLUSH | T_SEND_FUA;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write `length` bytes (which follow the header) at `offset`.
pub const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Make every acknowledged write durable.
pub const CMD_FLUSH: u16 = 3;
/// Command flag: this write must be durable before its reply.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// Error values of replies (the NBD protocol's, which are Linux's).
pub const EIO: u32 = 5;
/// Invalid request (bad range for a read, unknown command, too long).
pub const EINVAL: u32 = 22;
/// A write beyond the end of the export.
pub const ENOSPC: u32 = 28;

/// Largest READ or WRITE payload served: the default maximum of the NBD
/// protocol (clients that were told no block size keep under it). A longer
/// READ gets EINVAL; a longer WRITE ends the connection, since its payload
/// is not worth reading.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;

/// How often blocked threads look at the stop flag.
const POLL_MS: i32 = 50;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub kind: u16,
    /// Opaque value the reply echoes.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length of the data, in bytes.
    pub length: u32,
}

/// What the server does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `length` bytes at `offset`.
    Read,
    /// Read the payload, then write it (durably before the reply if `fua`).
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Flush the image.
    Flush,
    /// The client is leaving: close without a reply.
    Disconnect,
    /// Reply with this error; a WRITE's payload is read and dropped first.
    Refuse(u32),
    /// The stream cannot be trusted any more: close it.
    Close,
}

/// Parses a request header; `None` when the magic is wrong (the stream is
/// out of step and must be closed).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return None;
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&b[8..16]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&b[16..24]);
    Some(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(cookie),
        offset: u64::from_be_bytes(offset),
        length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

/// Decides what to do with `r` on an export of `size` bytes. Never
/// panics, whatever the request.
pub fn classify(r: &Request, size: u64) -> Action {
    let in_range = r
        .offset
        .checked_add(u64::from(r.length))
        .is_some_and(|end| end <= size);
    match r.kind {
        CMD_READ if r.length > MAX_PAYLOAD => Action::Refuse(EINVAL),
        CMD_READ if !in_range => Action::Refuse(EINVAL),
        CMD_READ => Action::Read,
        CMD_WRITE if r.length > MAX_PAYLOAD => Action::Close,
        CMD_WRITE if !in_range => Action::Refuse(ENOSPC),
        CMD_WRITE => Action::Write {
            fua: r.flags & CMD_FLAG_FUA != 0,
        },
        CMD_FLUSH => Action::Flush,
        CMD_DISC => Action::Disconnect,
        // TRIM, WRITE_ZEROES, ... were never advertised; none of them
        // carries a payload, so the stream stays in step.
        _ => Action::Refuse(EINVAL),
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which connections are open and whether one is serving a request.
#[derive(Default)]
struct Activity {
    /// Requests being served (header read, reply not yet sent).
    busy: usize,
    /// Open connections, for quiesce (unread bytes) and stop (shutdown).
    /// A connection's thread removes its entry before closing the socket,
    /// under this lock, so an fd here is always the connection's.
    conns: HashMap<u64, RawFd>,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    image: File,
    size: u64,
    /// Also serializes writes, so the hook sees them in the image's order.
    hook: Mutex<Option<Box<dyn WriteHook>>>,
    activity: Mutex<Activity>,
    idle: Condvar,
    stop: AtomicBool,
    stats: Counters,
}

/// The NBD server of one disk image.
pub struct NbdServer {
    shared: Arc<Shared>,
    socket: PathBuf,
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("socket", &self.socket)
            .field("size", &self.shared.size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl NbdServer {
    /// Serves `image` (raw, opened read-write; its length is the export's
    /// size) at the unix socket `socket` (a stale one there is replaced),
    /// passing every write through `hook` first.
    pub fn start(
        image: &Path,
        socket: &Path,
        hook: Option<Box<dyn WriteHook>>,
    ) -> Result<NbdServer> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(image)
            .map_err(Error::io(format!("opening disk image {}", image.display())))?;
        let size = file
            .metadata()
            .map_err(Error::io(format!("size of disk image {}", image.display())))?
            .len();
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(Error::io(format!(
            "NBD server listening at {}",
            socket.display()
        )))?;
        // Non-blocking so the acceptor can notice stop().
        listener
            .set_nonblocking(true)
            .map_err(Error::io("non-blocking NBD listener"))?;
        let shared = Arc::new(Shared {
            image: file,
            size,
            hook: Mutex::new(hook),
            activity: Mutex::new(Activity::default()),
            idle: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: Counters::default(),
        });
        let conns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (shared, conns) = (shared.clone(), conns.clone());
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(listener, shared, conns))
                .map_err(Error::io("starting the NBD acceptor"))?
        };
        Ok(NbdServer {
            shared,
            socket: socket.to_owned(),
            acceptor: Some(acceptor),
            conns,
        })
    }

    /// The unix socket clients connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.size
    }

    /// Replaces the write hook (the engine installs its own once the VM
    /// is protected). Takes effect at the next write.
    pub fn set_write_hook(&self, hook: Option<Box<dyn WriteHook>>) {
        *lock(&self.shared.hook) = hook;
    }

    /// Counters, in the micro-VM disk's terms.
    pub fn stats(&self) -> BlockStats {
        let s = &self.shared.stats;
        BlockStats {
            reads: s.reads.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            flushes: s.flushes.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
        }
    }

    /// Returns `true` once no request is being served and none waits
    /// unread in a socket, `false` if that did not happen within
    /// `timeout`. Call it with the guest stopped: then every write QEMU
    /// sent is through the hook, and the epoch boundary falls after it.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.shared.activity);
        loop {
            // A thread marks itself busy under this lock before it reads a
            // header, so bytes are either still in a socket or counted.
            if g.busy == 0 && g.conns.values().all(|&fd| unread(fd) == 0) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Unread bytes are not signalled, so wake up now and then.
            let wait = (deadline - now).min(Duration::from_millis(1));
            g = match self.shared.idle.wait_timeout(g, wait) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Stops serving: closes every connection, joins the threads and
    /// removes the socket. Also done on drop.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        {
            let g = lock(&self.shared.activity);
            for &fd in g.conns.values() {
                // SAFETY: the fd is open while it is in the map (see
                // Activity); shutdown wakes a thread blocked reading it.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        let handles = std::mem::take(&mut *lock(&self.conns));
        for h in handles {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes waiting unread in socket `fd` (0 if it cannot be asked).
fn unread(fd: RawFd) -> libc::c_int {
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; the caller keeps fd open.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut pending) };
    if r == 0 {
        pending
    } else {
        0
    }
}

/// Waits up to POLL_MS for `fd` to be readable.
fn readable(fd: RawFd) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        match readable(listener.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!("NBD listener: {e}");
                return;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("NBD accept: {e}");
                std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let id = next_id;
        next_id += 1;
        // Registered before the thread starts, so stop() can always reach
        // the socket.
        lock(&shared.activity).conns.insert(id, stream.as_raw_fd());
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let mut stream = stream;
                if let Err(e) = serve_connection(&mut stream, &s) {
                    tracing::debug!("NBD connection {id} ended: {e}");
                }
                // Forget the fd before the stream (and so the fd) closes.
                lock(&s.activity).conns.remove(&id);
                s.idle.notify_all();
                drop(stream);
            });
        let mut handles = lock(&conns);
        // Reap the connections that are over, so a long run does not keep
        // a handle per client ever connected.
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *handles)
            .into_iter()
            .partition(|h| h.is_finished());
        *handles = running;
        for h in done {
            let _ = h.join();
        }
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                tracing::warn!("NBD: cannot start a connection thread: {e}");
                lock(&shared.activity).conns.remove(&id);
            }
        }
    }
}

/// Why a connection ended early (only for the debug log).
type ConnResult = std::io::Result<()>;

fn protocol(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

fn serve_connection(s: &mut UnixStream, shared: &Shared) -> ConnResult {
    if !handshake(s, shared.size)? {
        return Ok(());
    }
    let fd = s.as_raw_fd();
    let mut buf = Vec::new();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !readable(fd)? {
            continue;
        }
        lock(&shared.activity).busy += 1;
        let r = serve_request(s, shared, &mut buf);
        lock(&shared.activity).busy -= 1;
        shared.idle.notify_all();
        if !r? {
            return Ok(());
        }
    }
}

fn reply(s: &mut UnixStream, error: u32, cookie: u64) -> std::io::Result<()> {
    let mut r = [0u8; 16];
    r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..].copy_from_slice(&cookie.to_be_bytes());
    s.write_all(&r)
}

/// Serves one request; `Ok(false)` when the connection is to close.
fn serve_request(s: &mut UnixStream, shared: &Shared, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut hdr = [0u8; REQUEST_LEN];
    match s.read_exact(&mut hdr) {
        Ok(()) => {}
        // The client closed between requests.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let Some(r) = parse_request(&hdr) else {
        shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        return Err(protocol("bad request magic"));
    };
    let stats = &shared.stats;
    match classify(&r, shared.size) {
        Action::Read => {
            buf.resize(r.length as usize, 0);
            match shared.image.read_exact_at(buf, r.offset) {
                Ok(()) => {
                    stats.reads.fetch_add(1, Ordering::Relaxed);
                    reply(s, 0, r.cookie)?;
                    s.write_all(buf)?;
                }
                Err(e) => {
                    tracing::warn!(offset = r.offset, len = r.length, "NBD read: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    reply(s, EIO, r.cookie)?;
                }
            }
        }
        Action::Write { fua } => {
            buf.resize(r.length as usize, 0);
            s.read_exact(buf)?;
            let result = {
                // Held across the write: the hook's order is the image's.
                let mut hook = lock(&shared.hook);
                // An empty write changes nothing: no record for the epoch.
                if let Some(h) = hook.as_mut().filter(|_| !buf.is_empty()) {
                    h.on_write(r.offset, buf);
                }
                shared.image.write_all_at(buf, r.offset).and_then(|_| {
                    if fua {
                        shared.image.sync_data()
                    } else {
                        Ok(())
                    }
                })
            };
            match result {
                Ok(()) => {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                    reply(s, 0, r.cookie)?;
                }
                Err(e) => {
                    tracing::warn!(offset = r.offset, len = r.length, "NBD write: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    reply(s, EIO, r.cookie)?;
                }
            }
        }
        Action::Flush => {
            let result = {
                let mut hook = lock(&shared.hook);
                if let Some(h) = hook.as_mut() {
                    h.on_flush();
                }
                shared.image.sync_data()
            };
            stats.flushes.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(()) => reply(s, 0, r.cookie)?,
                Err(e) => {
                    tracing::warn!("NBD flush: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    reply(s, EIO, r.cookie)?;
                }
            }
        }
        Action::Disconnect => return Ok(false),
        Action::Refuse(error) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            if r.kind == CMD_WRITE {
                // The payload follows the header (its length is under
                // MAX_PAYLOAD here): read it to stay in step.
                buf.resize(r.length as usize, 0);
                s.read_exact(buf)?;
            }
            reply(s, error, r.cookie)?;
        }
        Action::Close => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(protocol("request payload too long"));
        }
    }
    Ok(true)
}

fn read_u32(s: &mut UnixStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut UnixStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)
}

/// Whether an `NBD_OPT_GO`/`NBD_OPT_INFO` payload is well formed: name
/// length, name, number of information requests, the requests.
fn go_payload_ok(data: &[u8]) -> bool {
    let Some(len) = data.get(..4) else {
        return false;
    };
    let name_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let Some(rest) = data.get(4..).and_then(|d| d.get(name_len..)) else {
        return false;
    };
    let Some(n) = rest.get(..2) else {
        return false;
    };
    let n = u16::from_be_bytes([n[0], n[1]]) as usize;
    rest.len() == 2 + 2 * n
}

/// The newstyle handshake; `Ok(true)` when the client entered the
/// transmission phase, `Ok(false)` when it left cleanly.
fn handshake(s: &mut UnixStream, size: u64) -> std::io::Result<bool> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = read_u32(s)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The protocol: a server that does not know a client flag closes.
        return Err(protocol("unknown client flags"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut info = [0u8; 12];
    info[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    info[2..10].copy_from_slice(&size.to_be_bytes());
    info[10..].copy_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    loop {
        if read_u64(s)? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION {
            return Err(protocol("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                // One export, whatever its name. No option reply: the
                // export's size and flags, then (unless the client said
                // no) 124 zero bytes.
                s.write_all(&info[2..])?;
                if !no_zeroes {
                    s.write_all(&[0u8; 124])?;
                }
                return Ok(true);
            }
            OPT_GO | OPT_INFO => {
                if !go_payload_ok(&data) {
                    option_reply(s, option, REP_ERR_INVALID, &[])?;
                    continue;
                }
                // The export's information is the one reply every client
                // gets; the others (name, block size) are optional.
                option_reply(s, option, REP_INFO, &info)?;
                option_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_ABORT => {
                // The client may have gone already; it need not read this.
                let _ = option_reply(s, option, REP_ACK, &[]);
                return Ok(false);
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
        let mut h = [0u8; REQUEST_LEN];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&kind.to_be_bytes());
        h[8..16].copy_from_slice(&7u64.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..].copy_from_slice(&length.to_be_bytes());
        h
    }

    #[test]
    fn classifies_requests() {
        let size = 1 << 20;
        let c = |h: [u8; REQUEST_LEN]| classify(&parse_request(&h).unwrap(), size);
        assert_eq!(c(header(CMD_READ, 0, 0, 512)), Action::Read);
        assert_eq!(c(header(CMD_READ, 0, size - 1, 2)), Action::Refuse(EINVAL));
        assert_eq!(
            c(header(CMD_READ, 0, 0, MAX_PAYLOAD + 1)),
            Action::Refuse(EINVAL)
        );
        assert_eq!(
            c(header(CMD_WRITE, CMD_FLAG_FUA, 512, 512)),
            Action::Write { fua: true }
        );
        assert_eq!(c(header(CMD_WRITE, 0, u64::MAX, 1)), Action::Refuse(ENOSPC));
        assert_eq!(c(header(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)), Action::Close);
        assert_eq!(c(header(CMD_FLUSH, 0, 0, 0)), Action::Flush);
        assert_eq!(c(header(CMD_DISC, 0, 0, 0)), Action::Disconnect);
        assert_eq!(c(header(4, 0, 0, 512)), Action::Refuse(EINVAL));
        let mut bad = header(CMD_READ, 0, 0, 512);
        bad[0] ^= 1;
        assert_eq!(parse_request(&bad), None);
    }

    #[test]
    fn go_payloads() {
        assert!(go_payload_ok(&[0, 0, 0, 0, 0, 0]));
        assert!(go_payload_ok(&[0, 0, 0, 1, b'a', 0, 1, 0, 3]));
        assert!(!go_payload_ok(&[0, 0, 0, 9, b'a', 0, 0]));
        assert!(!go_payload_ok(&[0xff, 0xff, 0xff, 0xff]));
        assert!(!go_payload_ok(&[0, 0, 0, 0, 0, 2, 0, 1]));
        assert!(!go_payload_ok(&[]));
    }
}
