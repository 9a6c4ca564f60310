//! Time from the TSC (the guest sees the host TSC).

use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);
static START: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init(khz: u64) {
    if khz != 0 {
        TSC_KHZ.store(khz, Ordering::Relaxed);
    }
    START.store(rdtsc(), Ordering::Relaxed);
}

/// Raw TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Microseconds since start.
pub fn micros() -> u64 {
    let ticks = rdtsc().wrapping_sub(START.load(Ordering::Relaxed));
    (ticks as u128 * 1000 / TSC_KHZ.load(Ordering::Relaxed) as u128) as u64
}

/// Milliseconds since start.
pub fn millis() -> u64 {
    micros() / 1000
}
