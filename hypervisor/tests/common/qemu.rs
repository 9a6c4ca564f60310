//! Helpers of the qemu backend's tests: specs, bounded waits on the
//! guest's console, the console ticker's values.

use std::time::{Duration, Instant};

use hypervisor::qemu::{Accel, LinuxImage, QemuGuest, QemuSpec};

/// How long the guest may take to boot under TCG on a busy 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A TCG spec with its sockets and logs in `dir`.
pub fn spec(image: LinuxImage, dir: &std::path::Path, mib: u64) -> QemuSpec {
    QemuSpec::new("t", image, dir)
        .memory_mib(mib)
        .accel(Accel::Tcg)
}

/// Polls the console until `pred` holds, for at most `timeout`; panics
/// with the console's end and QEMU's state otherwise.
pub fn wait_console(
    g: &QemuGuest,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let c = g.console();
        if pred(&c) {
            return c;
        }
        if Instant::now() > deadline {
            let tail: String = c
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}; QEMU running: {}; console ends with:\n{tail}",
                hypervisor::ProtectedGuest::is_running(g)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the guest's init says it is ready.
pub fn wait_ready(g: &QemuGuest) {
    wait_console(g, "the guest to boot", BOOT_TIMEOUT, |c| {
        c.contains("remus-wan guest ready")
    });
}

/// The ticker's values on complete console lines ("tick N\n").
pub fn ticks(console: &str) -> Vec<u64> {
    let complete = match console.rfind('\n') {
        Some(i) => &console[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}
