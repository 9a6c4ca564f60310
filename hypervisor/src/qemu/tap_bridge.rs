//! A QEMU guest's NIC (whose backend is remus-wan, see [`super::netdev`])
//! on a host tap: what arrives on the tap goes to the guest at once; what
//! the guest sends reaches the tap only through [`TapBridge::sink`], which
//! the engine calls when the frame's epoch has committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::error::{Error, Result};
use super::netdev::GuestPort;
use crate::kvm::devices::tap::Tap;
use crate::seams::FrameSink;

pub struct TapBridge {
    tap: Tap,
    stop: Arc<AtomicBool>,
    rx: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TapBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapBridge")
            .field("tap", &self.tap.name())
            .finish()
    }
}

impl TapBridge {
    /// Opens (creating if needed) tap `name` and starts forwarding its
    /// frames to the guest behind `port`.
    pub fn start(name: &str, port: GuestPort) -> Result<TapBridge> {
        let tap = Tap::open(name).map_err(Error::io(format!("opening tap {name}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let rx = {
            let (tap, stop) = (tap.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("tap-rx-{name}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(Some(n)) = tap.recv_timeout(&mut buf, Duration::from_millis(50)) {
                            // A guest gone (or stopping) drops the frame:
                            // the sender retransmits, as over a lossy link.
                            let _ = port.send(&buf[..n]);
                        }
                    }
                })
                .map_err(Error::io("starting the tap reader thread"))?
        };
        Ok(TapBridge {
            tap,
            stop,
            rx: Some(rx),
        })
    }

    /// Where the engine writes the guest's released frames.
    pub fn sink(&self) -> Box<dyn FrameSink> {
        Box::new(self.tap.clone())
    }
}

impl Drop for TapBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.rx.take() {
            let _ = t.join();
        }
    }
}
