//! The transmit worker: serves the transmit queue off the vCPU thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Net;
use crate::kvm::devices::doorbell::Doorbell;

/// How long the transmit worker keeps polling the ring after the last frame
/// before it turns the guest's notifications back on.
pub const TX_POLL: Duration = Duration::from_micros(50);

/// Serves the transmit queue off the vCPU thread, vhost style: a guest
/// notification wakes the worker, which turns further notifications off,
/// drains the ring, keeps polling for [`TX_POLL`], then turns them on again
/// and re-checks. A guest sending a burst exits once, not once per frame.
/// `wake` is rung after each drained batch (a guest waiting for transmit
/// buffers idles on it).
pub fn spawn_tx_worker(
    net: Arc<Mutex<Net>>,
    kick: Doorbell,
    wake: Doorbell,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("net-tx".into())
        .spawn(move || {
            let lock = || net.lock().unwrap_or_else(|e| e.into_inner());
            let stopping = || stop.load(Ordering::Relaxed);
            let mut seen = 0;
            while !stopping() {
                kick.wait(&mut seen, Duration::from_millis(100), stopping);
                let mut last = std::time::Instant::now();
                while !stopping() {
                    let n = {
                        let mut dev = lock();
                        dev.set_tx_notify(false);
                        dev.process_tx()
                    };
                    if n > 0 {
                        wake.ring();
                        last = std::time::Instant::now();
                    } else if last.elapsed() < TX_POLL {
                        std::thread::yield_now();
                    } else if !lock().set_tx_notify(true) {
                        break;
                    }
                }
            }
        })
}
