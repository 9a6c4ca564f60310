//! The receive thread: frames from the tap into the guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Net;
use crate::kvm::devices::doorbell::Doorbell;
use crate::kvm::devices::tap::Tap;

/// Moves frames from the tap into the device until `stop` is set, ringing
/// `doorbell` whenever the guest got something.
pub fn spawn_rx_pump(
    tap: Tap,
    net: Arc<Mutex<Net>>,
    doorbell: Doorbell,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("net-rx-{}", tap.name()))
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            let lock = || net.lock().unwrap_or_else(|e| e.into_inner());
            while !stop.load(Ordering::Relaxed) {
                let waiting = lock().has_pending();
                let timeout = Duration::from_millis(if waiting { 1 } else { 100 });
                let delivered = match tap.recv_timeout(&mut buf, timeout) {
                    Ok(Some(n)) => lock().receive(&buf[..n]),
                    Ok(None) => waiting && lock().flush_pending(),
                    Err(e) => {
                        tracing::warn!(tap = %tap.name(), "tap read failed, receive path stops: {e}");
                        return;
                    }
                };
                if delivered {
                    doorbell.ring();
                }
            }
        })
}
