//! remus-wan as the guest NIC's backend: QEMU's `-netdev stream` connects
//! to our unix socket and every frame travels as a 4-byte big-endian
//! length followed by the Ethernet frame, both ways.
//!
//! Frames the guest transmits go to the engine's [`FrameSink`], which
//! holds them until their epoch commits (output commit); frames for the
//! guest are written at once ([`NetBackend::send_to_guest`]). QEMU sends
//! nothing while the guest is stopped, and [`NetBackend::quiesce`] makes
//! sure every frame it sent before the stop has reached the sink, so the
//! epoch boundary (`at_pause`) falls after them. A frame QEMU still had
//! queued at the stop reaches the sink in the next epoch: it is held
//! longer than needed, never released too early.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::{Error, Result};
use crate::seams::FrameSink;

/// Largest frame accepted from QEMU (a 64 KiB GSO frame plus headers);
/// anything larger means the stream is out of step.
pub const MAX_FRAME: usize = 65536 + 256;

/// A frame sink that drops everything (a guest with a NIC nobody reads).
struct Discard;
impl FrameSink for Discard {
    fn send(&mut self, _frame: &[u8]) {}
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Our socket, before QEMU has connected.
#[derive(Debug)]
pub struct Listening {
    listener: UnixListener,
    path: PathBuf,
}

impl Listening {
    /// Listens at `path` (removed first if a stale one is there). Must be
    /// done before QEMU starts: QEMU connects once, while it starts.
    pub fn bind(path: &Path) -> Result<Listening> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(Error::io(format!("listening at {}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(Error::io("non-blocking listener"))?;
        Ok(Listening {
            listener,
            path: path.to_owned(),
        })
    }

    /// Waits (until `deadline`, asking `alive` between polls) for QEMU to
    /// connect, then starts the reader.
    pub fn accept(
        self,
        deadline: Instant,
        alive: &mut dyn FnMut() -> Result<()>,
        sink: Option<Box<dyn FrameSink>>,
    ) -> Result<NetBackend> {
        let started = Instant::now();
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    alive()?;
                    if Instant::now() > deadline {
                        return Err(Error::Timeout {
                            what: format!(
                                "QEMU connecting its network backend to {}",
                                self.path.display()
                            ),
                            after: started.elapsed(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(Error::io("accepting QEMU's netdev connection")(e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(Error::io("blocking netdev stream"))?;
        let _ = std::fs::remove_file(&self.path);
        NetBackend::start(stream, sink.unwrap_or_else(|| Box::new(Discard)))
    }
}

/// A handle that gives frames to the guest, for another thread (the one
/// reading the tap, say). It stops working when the guest's QEMU is gone.
#[derive(Debug, Clone)]
pub struct GuestPort(Arc<Mutex<UnixStream>>);

impl GuestPort {
    /// Gives `frame` to the guest (received traffic is never held).
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(Error::Spec(format!("frame of {} bytes", frame.len())));
        }
        let mut w = lock(&self.0);
        w.write_all(&(frame.len() as u32).to_be_bytes())
            .and_then(|_| w.write_all(frame))
            .map_err(Error::io("sending a frame to the guest"))
    }
}

/// The connected backend: a reader thread feeding the sink, and a writer
/// for frames to the guest.
pub struct NetBackend {
    writer: GuestPort,
    sink: Arc<Mutex<Box<dyn FrameSink>>>,
    tx_frames: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    fd: i32,
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("tx_frames", &self.tx_frames())
            .finish()
    }
}

impl NetBackend {
    fn start(stream: UnixStream, sink: Box<dyn FrameSink>) -> Result<NetBackend> {
        let reader_stream = stream
            .try_clone()
            .map_err(Error::io("cloning the netdev stream"))?;
        let fd = stream.as_raw_fd();
        let sink = Arc::new(Mutex::new(sink));
        let tx_frames = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (sink, tx, stop) = (sink.clone(), tx_frames.clone(), stop.clone());
            std::thread::Builder::new()
                .name("qemu-netdev-rx".into())
                .spawn(move || reader_loop(reader_stream, sink, tx, stop))
                .map_err(Error::io("starting the netdev reader"))?
        };
        Ok(NetBackend {
            writer: GuestPort(Arc::new(Mutex::new(stream))),
            sink,
            tx_frames,
            stop,
            reader: Some(reader),
            fd,
        })
    }

    /// Frames the guest has transmitted so far.
    pub fn tx_frames(&self) -> u64 {
        self.tx_frames.load(Ordering::Relaxed)
    }

    /// Gives `frame` to the guest (received traffic is never held).
    pub fn send_to_guest(&self, frame: &[u8]) -> Result<()> {
        self.writer.send(frame)
    }

    /// A handle for giving the guest frames from another thread.
    pub fn guest_port(&self) -> GuestPort {
        self.writer.clone()
    }

    /// Returns once every byte QEMU has written is through the sink (or
    /// `timeout` passed). Call it with the guest stopped.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                // The reader holds the sink lock for a whole frame, so
                // with the lock held, unread bytes are all still in the
                // socket.
                let _g = lock(&self.sink);
                let mut pending: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int; fd lives with self.
                let r = unsafe { libc::ioctl(self.fd, libc::FIONREAD, &mut pending) };
                if r != 0 || pending == 0 {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

fn reader_loop(
    mut s: UnixStream,
    sink: Arc<Mutex<Box<dyn FrameSink>>>,
    tx: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut frame = Vec::with_capacity(2048);
    let fd = s.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        // Wait for data without holding the lock (see quiesce).
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 50) };
        if r <= 0 {
            continue;
        }
        let mut g = lock(&sink);
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return; // QEMU is gone
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            tracing::warn!(n, "netdev stream out of step; closing it");
            return;
        }
        frame.resize(n, 0);
        if s.read_exact(&mut frame).is_err() {
            return;
        }
        g.send(&frame);
        tx.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = lock(&self.writer.0).shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);
    impl FrameSink for Collect {
        fn send(&mut self, f: &[u8]) {
            self.0.lock().unwrap().push(f.to_vec());
        }
    }

    /// Plays QEMU: connects, sends length-prefixed frames, reads ours.
    #[test]
    fn frames_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let l = Listening::bind(&path).unwrap();
        let mut qemu = UnixStream::connect(&path).unwrap();
        let sink = Collect::default();
        let nb = l
            .accept(
                Instant::now() + Duration::from_secs(5),
                &mut || Ok(()),
                Some(Box::new(sink.clone())),
            )
            .unwrap();
        for f in [&b"hello"[..], &[7u8; 1500][..]] {
            qemu.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
            qemu.write_all(f).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while nb.tx_frames() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(nb.quiesce(Duration::from_secs(1)));
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got, vec![b"hello".to_vec(), vec![7u8; 1500]]);
        nb.send_to_guest(b"abc").unwrap();
        let mut buf = [0u8; 7];
        qemu.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"\0\0\0\x03abc");
    }
}
