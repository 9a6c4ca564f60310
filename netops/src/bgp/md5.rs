//! RFC 2385 TCP-MD5 signatures on BGP sessions (Linux `TCP_MD5SIG`).
//!
//! The key is set per peer address, on the connecting socket before
//! `connect()` and on the listening socket before the peer connects.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// Linux `TCP_MD5SIG_MAXKEYLEN`.
pub const MAX_KEY_LEN: usize = 80;

/// Linux `struct tcp_md5sig` (include/uapi/linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_KEY_LEN],
}

/// Sets (or, with an empty key, removes) the TCP-MD5 key for `peer` on
/// `socket`.
pub fn set_md5_key(socket: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TCP-MD5 password longer than {MAX_KEY_LEN} bytes"),
        ));
    }
    // SAFETY: all-zero is a valid value for this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let sa = socket2::SockAddr::from(std::net::SocketAddr::new(peer, 0));
    // SAFETY: `sa` holds at most a sockaddr_storage worth of bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr() as *const u8,
            &mut sig.addr as *mut libc::sockaddr_storage as *mut u8,
            sa.len() as usize,
        );
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: valid fd, pointer and size of a properly initialised struct.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            &sig as *const TcpMd5Sig as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("setting the TCP-MD5 key for {peer} failed: {e} (kernel without CONFIG_TCP_MD5SIG?)"),
        ));
    }
    Ok(())
}
