//! CPU time of the calling thread or of the whole process, where the
//! platform tells it: the encoder measures whether its helper threads pay
//! by it, and the codec benchmark reports "MB/s on one core" with it (wall
//! time on a shared machine would measure the neighbours).
//!
//! `clock_gettime` is declared here rather than taken from `libc`, which
//! this crate only links with its network feature (the fuzzers build the
//! codec without it).

use std::time::{Duration, Instant};

/// Time spent by the calling thread since [`Stopwatch::start`]: its CPU
/// time, or the wall time where the platform does not tell CPU time.
/// Read it on the thread that started it.
pub struct Stopwatch {
    cpu: Option<Duration>,
    wall: Instant,
}

impl Stopwatch {
    pub fn start() -> Self {
        Stopwatch {
            cpu: thread_cpu_time(),
            wall: Instant::now(),
        }
    }

    /// CPU time since the start, or wall time without a CPU clock.
    pub fn elapsed(&self) -> Duration {
        match (self.cpu, thread_cpu_time()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => self.wall.elapsed(),
        }
    }

    /// Wall time since the start.
    pub fn wall(&self) -> Duration {
        self.wall.elapsed()
    }
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Option<Duration> {
    clock(3) // CLOCK_THREAD_CPUTIME_ID
}

/// CPU time the whole process has used (every thread).
pub fn process_cpu_time() -> Option<Duration> {
    clock(2) // CLOCK_PROCESS_CPUTIME_ID
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn clock(id: i32) -> Option<Duration> {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the pointed-to struct,
    // which has the C layout of `struct timespec` on 64-bit Linux.
    let rc = unsafe { clock_gettime(id, &mut ts) };
    (rc == 0 && ts.sec >= 0 && (0..1_000_000_000).contains(&ts.nsec))
        .then(|| Duration::new(ts.sec as u64, ts.nsec as u32))
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn clock(_id: i32) -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_advance_with_work() {
        let (Some(t0), Some(p0)) = (thread_cpu_time(), process_cpu_time()) else {
            return; // not measurable on this platform
        };
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time().is_some_and(|t| t >= t0));
        assert!(process_cpu_time().is_some_and(|p| p >= p0));
    }
}
