//! A doorbell devices ring when they have put something in guest memory the
//! guest may be waiting for (a received frame), so an idle vCPU wakes up.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Cloneable doorbell; a generation counter makes rings never lost.
#[derive(Clone, Default, Debug)]
pub struct Doorbell(Arc<(Mutex<u64>, Condvar)>);

impl Doorbell {
    /// Rings: every waiter wakes.
    pub fn ring(&self) {
        let (m, cv) = &*self.0;
        *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    /// Waits until a ring newer than `seen` or `timeout`; updates `seen`.
    /// Returns at once if a ring happened since `seen`.
    pub fn wait(&self, seen: &mut u64, timeout: Duration, stop: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        while *g == *seen && !stop() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Short slices so a stop request is seen promptly.
            let slice = (deadline - now).min(Duration::from_millis(20));
            g = cv
                .wait_timeout(g, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *seen = *g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_before_the_wait_is_not_lost() {
        let d = Doorbell::default();
        let mut seen = 0;
        d.ring();
        let t = Instant::now();
        d.wait(&mut seen, Duration::from_secs(5), || false);
        assert_eq!(seen, 1);
        assert!(t.elapsed() < Duration::from_secs(5));
        d.wait(&mut seen, Duration::from_millis(1), || false);
        assert_eq!(seen, 1);
    }
}
