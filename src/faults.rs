//! Named fault points, for tests that must kill a process at an exact
//! moment of the pipeline (while the guest is paused, while an epoch is
//! being sent, while the backup applies one) rather than at a random time.
//!
//! `REMUS_WAN_FAULT=<point>@<n>` makes the process SIGKILL itself the n-th
//! time it reaches `<point>`; `REMUS_WAN_FAULT=<point>@<n>:sleep=<ms>`
//! makes it stall there instead (so a test can kill another process while
//! this one is at that point); `<point>@<n>:hold=<path>` makes it stall
//! there until the file `<path>` exists (at most [`HOLD_LIMIT`]), so that a
//! test decides when it goes on instead of racing a fixed delay;
//! `<point>@<n>:error` makes the point report
//! a failure instead, at points that can fail (`standby.apply`: the n-th
//! epoch is rejected as if it did not decode). Unset (always, in production), a point costs
//! one load of an initialised `OnceLock`.
//!
//! Points: `protect.paused` (guest paused, epoch being closed),
//! `protect.sent` (epoch handed to the transport, not yet acknowledged),
//! `standby.journaled` (epoch staged and journaled, commit rename not yet
//! done), `standby.committed` (committed, not yet acknowledged),
//! `standby.swap` (a resync swap between its two renames),
//! `standby.apply` (an epoch arrived, before it is applied; `:error`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest a `:hold=` fault waits for its file: a test that never creates
/// it must not leave the process stuck.
pub const HOLD_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug)]
struct Fault {
    point: String,
    at: u64,
    sleep: Option<Duration>,
    hold: Option<PathBuf>,
    error: bool,
    seen: AtomicU64,
}

fn parse(spec: &str) -> Option<Fault> {
    let (point, rest) = spec.split_once('@')?;
    let (rest, hold) = match rest.split_once(":hold=") {
        Some((n, path)) if !path.is_empty() => (n, Some(PathBuf::from(path))),
        Some(_) => return None,
        None => (rest, None),
    };
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
        hold,
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
                None => tracing::warn!(spec, "REMUS_WAN_FAULT not understood: expected <point>@<n>[:sleep=<ms>|:hold=<path>|:error]"),
            }
            f
        })
        .as_ref()
}

/// Reaching a named point of the pipeline. True when the armed fault
/// says this point must fail now (`:error`).
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
    if let Some(path) = &f.hold {
        tracing::warn!(
            point = name,
            n,
            until = %path.display(),
            "fault point reached: stalling"
        );
        let limit = Instant::now() + HOLD_LIMIT;
        while !path.exists() && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        return false;
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

/// Environment variable of the test-only replica corruption:
/// `memory:<byte offset>@<n>` or `disk:<byte offset>@<n>` flips one byte
/// of the standby's replica after its n-th committed consistent epoch
/// (once), so a test can show that `remus-wan verify` finds it.
pub const CORRUPT_ENV: &str = "REMUS_WAN_TEST_CORRUPT";

/// A replica corruption to make (see [`CORRUPT_ENV`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub region: wan::session::wire::VerifyRegion,
    pub offset: u64,
    pub after: u64,
}

fn parse_corruption(spec: &str) -> Option<Corruption> {
    use wan::session::wire::VerifyRegion;
    let (what, at) = spec.split_once('@')?;
    let (region, offset) = what.split_once(':')?;
    let region = match region {
        "memory" => VerifyRegion::Memory,
        "disk" => VerifyRegion::Disk,
        _ => return None,
    };
    Some(Corruption {
        region,
        offset: offset.parse().ok()?,
        after: at.parse().ok()?,
    })
}

/// The corruption due now, if one is armed and this is its n-th call.
pub fn corruption_due() -> Option<Corruption> {
    static SPEC: OnceLock<Option<(Corruption, AtomicU64)>> = OnceLock::new();
    let (c, seen) = SPEC
        .get_or_init(|| {
            let spec = std::env::var(CORRUPT_ENV).ok()?;
            let c = parse_corruption(&spec);
            match &c {
                Some(c) => tracing::warn!(
                    ?c,
                    "replica corruption armed ({CORRUPT_ENV}): for tests only"
                ),
                None => tracing::warn!(
                    spec,
                    "{CORRUPT_ENV} not understood: expected memory|disk:<offset>@<n>"
                ),
            }
            c.map(|c| (c, AtomicU64::new(0)))
        })
        .as_ref()?;
    let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
    (n == c.after).then(|| c.clone())
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
        let f = parse("standby.apply@1:hold=/tmp/x:y").unwrap();
        assert_eq!(
            (f.at, f.hold.as_deref()),
            (1, Some(std::path::Path::new("/tmp/x:y")))
        );
        assert!(parse("standby.apply@1:hold=").is_none());
        let f = parse("standby.apply@7:error").unwrap();
        assert_eq!((f.at, f.error, f.sleep), (7, true, None));
        assert!(parse("nonsense").is_none());
        assert!(parse("a@x").is_none());
        let c = parse_corruption("memory:4096@5").unwrap();
        assert_eq!((c.offset, c.after), (4096, 5));
        assert!(parse_corruption("cpu:1@1").is_none());
    }
}
