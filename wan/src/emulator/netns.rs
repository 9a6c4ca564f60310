//! The same link model for kernel TCP: two network namespaces joined by a
//! TUN device each, with a user-space relay between the two TUN devices
//! applying the [`Shaper`] per direction.
//!
//! A UDP relay cannot carry kernel TCP (a TCP proxy would hide the RTT and
//! losses from the sender's congestion control), so the WAN benchmark puts
//! both QUIC and the TCP + TLS baseline through this IP-level relay, which
//! treats both alike. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and
//! iproute2's `ip`; addresses live only inside the namespaces it creates
//! and deletes.
//!
//! ```text
//! netns A: 10.77.0.1/24 dev rwtun ─┐                  ┌─ netns B: 10.77.0.2/24 dev rwtun
//!                                  └─ relay: Shaper ──┘
//! ```

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{maybe_corrupt, Direction, EmulatorHandle, LinkParams, Shaper, Shared, Verdict};

/// Address of side A inside its namespace.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Address of side B inside its namespace.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Two namespaces joined through the emulated link. Dropping it stops the
/// relay and deletes the namespaces.
#[derive(Debug)]
pub struct NetnsLink {
    a: String,
    b: String,
    handle: EmulatorHandle,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets
/// it creates stay in that namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let nsfile = File::open(format!("/var/run/netns/{ns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd; affects only this thread.
            let r = unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    })
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

fn open_tun(name: &str) -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: plain open(2) of a constant path.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn poll_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

impl NetnsLink {
    /// Creates the namespaces and TUN devices and starts the relay with
    /// `params` in both directions.
    pub fn create(params: LinkParams, seed: u64) -> io::Result<Self> {
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let a = format!("rwan{pid}-{id}a");
        let b = format!("rwan{pid}-{id}b");
        ip(&["netns", "add", &a])?;
        if let Err(e) = ip(&["netns", "add", &b]) {
            let _ = ip(&["netns", "del", &a]);
            return Err(e);
        }
        let shared = Arc::new(Shared {
            partitioned: Default::default(),
            stopped: Default::default(),
            params: [params.into(), params.into()],
            counters: Default::default(),
        });
        let mut link = Self {
            a,
            b,
            handle: EmulatorHandle {
                shared: shared.clone(),
            },
            threads: Vec::new(),
        };
        let tun_a = link.setup_side(&link.a.clone(), ADDR_A)?;
        let tun_b = link.setup_side(&link.b.clone(), ADDR_B)?;
        let tun_a = Arc::new(tun_a);
        let tun_b = Arc::new(tun_b);
        link.threads.extend(relay(
            tun_a.clone(),
            tun_b.clone(),
            shared.clone(),
            Direction::Forward,
            seed,
        ));
        link.threads.extend(relay(
            tun_b,
            tun_a,
            shared,
            Direction::Backward,
            seed ^ 0x5555_5555,
        ));
        info!(a = %link.a, b = %link.b, "netns WAN link up");
        Ok(link)
    }

    fn setup_side(&self, ns: &str, addr: Ipv4Addr) -> io::Result<OwnedFd> {
        let fd = in_netns(ns, || open_tun("rwtun"))??;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "rwtun", "mtu", "1500"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "rwtun",
        ])?;
        ip(&["-n", ns, "link", "set", "rwtun", "up"])?;
        Ok(fd)
    }

    /// Namespace of side A (the primary in the benchmark).
    pub fn ns_a(&self) -> &str {
        &self.a
    }

    /// Namespace of side B.
    pub fn ns_b(&self) -> &str {
        &self.b
    }

    /// Run-time control (conditions, partition, counters), as for the UDP relay.
    pub fn handle(&self) -> EmulatorHandle {
        self.handle.clone()
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        self.handle.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.a, &self.b] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                warn!(error = %e, "deleting network namespace");
            }
        }
    }
}

/// Reader (shaping) and writer (timed delivery) threads for one direction.
fn relay(
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    sh: Arc<Shared>,
    dir: Direction,
    seed: u64,
) -> Vec<std::thread::JoinHandle<()>> {
    let (tx, rx) = std_mpsc::channel::<(Instant, Vec<u8>)>();
    let sh2 = sh.clone();
    let reader = std::thread::spawn(move || {
        let mut shaper = Shaper::new(seed);
        let mut buf = vec![0u8; 65536];
        let c = &sh.counters[dir as usize];
        while !sh.stopped.load(Ordering::Relaxed) {
            if !poll_readable(from.as_raw_fd(), 100) {
                continue;
            }
            loop {
                // SAFETY: reading into a buffer we own.
                let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                let n = n as usize;
                if sh.partitioned.load(Ordering::Relaxed) {
                    c.partition_drops.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let p = *sh.params[dir as usize].lock().expect("params lock");
                let now = tokio::time::Instant::now();
                match shaper.admit(&p, n, now) {
                    Verdict::Lost => {
                        c.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::QueueFull => {
                        c.queue_drops.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::Deliver(at) => {
                        // Corruption flips a bit anywhere in the IP packet;
                        // the kernel's IP/UDP/TCP checksums then drop it.
                        let mut pkt = buf[..n].to_vec();
                        maybe_corrupt(&mut shaper, &p, &mut pkt, c);
                        if tx.send((at.into_std(), pkt)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    let writer = std::thread::spawn(move || {
        let sh = sh2;
        let c = &sh.counters[dir as usize];
        loop {
            let (at, pkt) = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(x) => x,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if sh.stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            };
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if sh.partitioned.load(Ordering::Relaxed) {
                c.partition_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // SAFETY: writing a buffer we own to the TUN fd.
            let n = unsafe { libc::write(to.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
            if n > 0 {
                c.packets.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                c.max_packet.fetch_max(pkt.len() as u64, Ordering::Relaxed);
            }
        }
    });
    vec![reader, writer]
}
