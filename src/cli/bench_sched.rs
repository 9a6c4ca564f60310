//! Scheduler figures of processes and threads from `/proc` (Linux's
//! `schedstat`: nanoseconds on a CPU and nanoseconds runnable but waiting on
//! a run queue), for `bench protect`: they tell whether a stalled guest was
//! waiting for a CPU (contention) or not runnable at all (paused).

use std::path::Path;

/// Nanoseconds a task ran and waited to run, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedTimes {
    pub run_ns: u64,
    pub wait_ns: u64,
}

impl SchedTimes {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: SchedTimes) -> SchedTimes {
        SchedTimes {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
        }
    }

    fn add(self, o: SchedTimes) -> SchedTimes {
        SchedTimes {
            run_ns: self.run_ns + o.run_ns,
            wait_ns: self.wait_ns + o.wait_ns,
        }
    }
}

/// Parses a `schedstat` file's text ("run_ns wait_ns timeslices").
fn parse(text: &str) -> Option<SchedTimes> {
    let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    Some(SchedTimes {
        run_ns: it.next()??,
        wait_ns: it.next()??,
    })
}

fn read(path: &Path) -> Option<SchedTimes> {
    parse(&std::fs::read_to_string(path).ok()?)
}

/// A process's threads split in two: those whose name starts with
/// `prefix` (e.g. the vCPU threads, named `vcpu-<vm>-<n>`) and the rest.
/// `None` if the process is gone.
pub fn split_threads(pid: u32, prefix: &str) -> Option<(SchedTimes, SchedTimes)> {
    let dir = format!("/proc/{pid}/task");
    let mut matching = SchedTimes::default();
    let mut rest = SchedTimes::default();
    for entry in std::fs::read_dir(&dir).ok()?.flatten() {
        let task = entry.path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let Some(t) = read(&task.join("schedstat")) else {
            continue; // the thread ended meanwhile
        };
        if name.starts_with(prefix) {
            matching = matching.add(t);
        } else {
            rest = rest.add(t);
        }
    }
    Some((matching, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat_and_rejects_garbage() {
        assert_eq!(
            parse("123 456 7\n"),
            Some(SchedTimes {
                run_ns: 123,
                wait_ns: 456
            })
        );
        assert_eq!(parse("123"), None);
        assert_eq!(parse("x 1 2"), None);
    }

    #[test]
    fn our_own_threads_are_found() {
        let (main, _) = split_threads(std::process::id(), "").expect("own process");
        assert!(main.run_ns > 0);
        let later = SchedTimes {
            run_ns: main.run_ns + 5,
            wait_ns: main.wait_ns,
        };
        assert_eq!(later.since(main).run_ns, 5);
    }
}
