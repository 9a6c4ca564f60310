//! Named fault points, for tests that must kill a process at an exact
//! moment of the pipeline (while the guest is paused, while an epoch is
//! being sent, while the backup applies one) rather than at a random time.
//!
//! `REMUS_WAN_FAULT=<point>@<n>` makes the process SIGKILL itself the n-th
//! time it reaches `<point>`; `REMUS_WAN_FAULT=<point>@<n>:sleep=<ms>`
//! makes it stall there instead (so a test can kill another process while
//! this one is at that point). Unset (always, in production), a point costs
//! one load of an initialised `OnceLock`.
//!
//! Points: `protect.paused` (guest paused, epoch being closed),
//! `protect.sent` (epoch handed to the transport, not yet acknowledged),
//! `standby.journaled` (epoch staged and journaled, commit rename not yet
//! done), `standby.committed` (committed, not yet acknowledged),
//! `standby.swap` (a resync swap between its two renames).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug)]
struct Fault {
    point: String,
    at: u64,
    sleep: Option<Duration>,
    error: bool,
    seen: AtomicU64,
}

fn parse(spec: &str) -> Option<Fault> {
    let (point, rest) = spec.split_once('@')?;
    let (rest, error) = match rest.strip_suffix(":error") {
        Some(n) => (n, true),
        None => (rest, false),
    };
    let (at, sleep) = match rest.split_once(":sleep=") {
        Some((n, ms)) => (n, Some(Duration::from_millis(ms.parse().ok()?))),
        None => (rest, None),
    };
    Some(Fault {
        point: point.to_owned(),
        at: at.parse().ok()?,
        sleep,
        error,
        seen: AtomicU64::new(0),
    })
}

fn fault() -> Option<&'static Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    FAULT
        .get_or_init(|| {
            let spec = std::env::var("REMUS_WAN_FAULT").ok()?;
            let f = parse(&spec);
            match &f {
                Some(f) => tracing::warn!(point = %f.point, at = f.at, "fault injection armed (REMUS_WAN_FAULT)"),
                None => tracing::warn!(spec, "REMUS_WAN_FAULT not understood: expected <point>@<n>[:sleep=<ms>]"),
            }
            f
        })
        .as_ref()
}

/// Reaching a named point of the pipeline.
pub fn point(name: &str) -> bool {
    let Some(f) = fault() else { return false };
    if f.point != name {
        return false;
    }
    let n = f.seen.fetch_add(1, Ordering::Relaxed) + 1;
    if n != f.at {
        return false;
    }
    if f.error {
        tracing::warn!(point = name, n, "fault point reached: failing");
        return true;
    }
    match f.sleep {
        Some(d) => {
            tracing::warn!(
                point = name,
                n,
                ms = d.as_millis() as u64,
                "fault point reached: stalling"
            );
            std::thread::sleep(d);
        }
        None => {
            // Log to stderr unbuffered, then die the way a power cut would.
            eprintln!("fault point {name} reached ({n}): SIGKILL");
            // SAFETY: sending a signal to ourselves.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let f = parse("protect.paused@40").unwrap();
        assert_eq!(
            (f.point.as_str(), f.at, f.sleep),
            ("protect.paused", 40, None)
        );
        let f = parse("standby.journaled@3:sleep=800").unwrap();
        assert_eq!(f.sleep, Some(Duration::from_millis(800)));
        assert!(parse("nonsense").is_none());
        assert!(parse("a@x").is_none());
    }
}
