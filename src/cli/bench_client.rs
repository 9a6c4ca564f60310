//! The benches' client side: a TCP connection to a guest's service with a
//! small receive window.

use std::net::{SocketAddr, TcpStream};
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
