//! The benches' client side: a TCP connection to a guest's service with a
//! small receive window, read on a thread of its own.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// The client's requested receive buffer, as in the end-to-end tests (the
/// kernel doubles it): what the old site can have had in flight to the
/// client at a kill is bounded by it, so values read after a takeover come
/// from the resumed guest.
const CLIENT_RCVBUF: u32 = 32 * 1024;

/// Connects to `addr`, retrying until `limit` (the guest may still be
/// starting), and returns the blocking socket with `read_timeout` set and
/// its receive buffer as the kernel reports it (SO_RCVBUF).
pub(super) fn connect_small_window(
    addr: SocketAddr,
    limit: Duration,
    read_timeout: Duration,
) -> Result<(TcpStream, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + limit;
    let (sock, rcvbuf) = loop {
        let attempt = rt.block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.set_recv_buffer_size(CLIENT_RCVBUF)?;
            let rcvbuf = s.recv_buffer_size()?;
            match tokio::time::timeout(Duration::from_secs(2), s.connect(addr)).await {
                Ok(r) => r.map(|c| (c, rcvbuf)),
                Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            }
        });
        match attempt {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => bail!("{addr} never answered within {limit:?}: {e}"),
        }
    };
    let sock: TcpStream = sock.into_std()?;
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(read_timeout))?;
    Ok((sock, u64::from(rcvbuf)))
}

/// A client connection read by `read` on a thread of its own into state
/// `S` the bench inspects; the thread is stopped and joined on drop.
pub(super) struct ClientThread<S> {
    state: Arc<Mutex<S>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// The socket's receive buffer as the kernel reports it (SO_RCVBUF:
    /// twice the size asked for).
    pub rcvbuf: u64,
}

impl<S: Send + 'static> ClientThread<S> {
    /// Connects as [`connect_small_window`] does and starts `read` on the
    /// socket, thread `name`.
    pub fn connect(
        name: &str,
        addr: SocketAddr,
        limit: Duration,
        read_timeout: Duration,
        state: S,
        read: fn(TcpStream, &Mutex<S>, &AtomicBool),
    ) -> Result<Self> {
        let (sock, rcvbuf) = connect_small_window(addr, limit, read_timeout)?;
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || read(sock, &state, &stop))?
        };
        Ok(Self {
            state,
            stop,
            reader: Some(reader),
            rcvbuf,
        })
    }
}

impl<S> ClientThread<S> {
    /// Runs `f` on the state (a reader that panicked leaves it usable).
    pub fn with<T>(&self, f: impl FnOnce(&mut S) -> T) -> T {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

impl<S> Drop for ClientThread<S> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
