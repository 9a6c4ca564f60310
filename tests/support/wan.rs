//! The WAN between two sites in a test: the WAN emulator (a UDP relay with
//! delay) on a thread of its own, optionally inside a named network
//! namespace, stopped and joined when dropped.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wan::emulator::{Emulator, EmulatorConfig, EmulatorHandle, LinkParams};

/// Where the relay listens and what it forwards to.
pub struct WanSpec {
    /// Named namespace (`/var/run/netns/NAME`) to run in; None: the
    /// caller's namespace.
    pub netns: Option<String>,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub rtt: Duration,
}

/// A running relay.
pub struct Wan {
    pub handle: EmulatorHandle,
    /// Where it listens (the port chosen when `listen` had port 0).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Wan {
    /// Starts the relay; panics with the reason if it cannot.
    pub fn start(spec: WanSpec) -> Wan {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // A new thread starts in its creator's namespace: with no name
        // given, the relay runs where the caller runs.
        let thread = std::thread::spawn(move || {
            if let Some(ns) = &spec.netns {
                if let Err(e) = enter(ns) {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let mut cfg = EmulatorConfig::new(spec.upstream)
                    .with_link(LinkParams::symmetric(spec.rtt, 0.0, None));
                cfg.listen = spec.listen;
                cfg.max_lifetime = super::HARD_LIMIT;
                let emu = match Emulator::start(cfg).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(format!("WAN emulator: {e}")));
                        return;
                    }
                };
                let _ = tx.send(Ok((emu.handle(), emu.local_addr())));
                let deadline = Instant::now() + super::HARD_LIMIT;
                while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                drop(emu);
            });
        });
        let (handle, addr) = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("WAN emulator did not start: {e}"),
        };
        Wan {
            handle,
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

/// Moves this thread into the named namespace.
fn enter(ns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns on this thread only, with a valid namespace fd.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.handle.stop();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
