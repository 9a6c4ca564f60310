//! Operator hooks: executables run on failover events with the event in
//! `REMUS_WAN_*` environment variables. A hook never blocks a takeover: it
//! runs with a timeout, is killed when it overruns, and its failure is
//! logged and returned as a [`HookOutcome`], never as an error.
//!
//! Environment of a hook:
//!
//! | variable | value |
//! |---|---|
//! | `REMUS_WAN_EVENT` | `promote`, `demote`, `fence`, `protection-lost`, `protection-restored` |
//! | `REMUS_WAN_VM` | the VM's name |
//! | `REMUS_WAN_OLD_SITE` | site that was active before (empty if unknown) |
//! | `REMUS_WAN_NEW_SITE` | site active after (empty if none) |
//! | `REMUS_WAN_FENCING_TOKEN` | the witness lease's fencing token |
//! | `REMUS_WAN_LOCAL_SITE` | the site running the hook |
//!
//! A long-lived owner runs hooks in the background with a [`HookRunner`]
//! and, before its process exits, waits for them with
//! [`HookRunner::finish`]: bounded, killing (with their process groups)
//! the hooks still running at the bound.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::{HookEvent, HookSettings};

/// One failover event, as the hooks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookContext {
    pub event: HookEvent,
    pub vm: String,
    pub old_site: Option<String>,
    pub new_site: Option<String>,
    pub fencing_token: u64,
    pub local_site: String,
}

/// How one hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookResult {
    Success,
    /// Exited with a non-zero status (or was killed by a signal: `None`).
    Failed {
        code: Option<i32>,
    },
    TimedOut,
    /// Still running when its owner stopped and its wait ran out
    /// ([`HookRunner::finish`]): killed.
    Killed,
    /// Could not be started.
    SpawnError(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    pub command: PathBuf,
    pub result: HookResult,
    /// The first 4 KiB of stdout and stderr, for the log.
    pub output: String,
}

impl HookOutcome {
    pub fn ok(&self) -> bool {
        self.result == HookResult::Success
    }
}

/// Runs the hooks configured for `ctx.event` concurrently and reports how
/// each ended. Never fails.
pub async fn run_hooks(hooks: &[HookSettings], ctx: &HookContext) -> Vec<HookOutcome> {
    // A stop signal that never comes.
    let (_never, stop) = watch::channel(false);
    run_hooks_until(hooks, ctx, stop).await
}

/// [`run_hooks`], killing the hooks still running once `stop` turns true.
async fn run_hooks_until(
    hooks: &[HookSettings],
    ctx: &HookContext,
    stop: watch::Receiver<bool>,
) -> Vec<HookOutcome> {
    // Run concurrently (one slow hook does not delay the others); report in
    // configuration order.
    let handles: Vec<_> = hooks
        .iter()
        .filter(|h| h.event == ctx.event)
        .map(|h| {
            let (h, ctx, stop) = (h.clone(), ctx.clone(), stop.clone());
            let command = h.command.clone();
            (
                command,
                tokio::spawn(async move { run_one(&h, &ctx, stop).await }),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for (command, handle) in handles {
        out.push(handle.await.unwrap_or_else(|e| HookOutcome {
            command,
            result: HookResult::SpawnError(format!("hook task failed: {e}")),
            output: String::new(),
        }));
    }
    out
}

/// Runs hooks in the background for a long-lived owner, which waits for
/// them before its process exits ([`HookRunner::finish`]); without that
/// wait, the end of the process would cut them off.
#[derive(Debug)]
pub struct HookRunner {
    hooks: Vec<HookSettings>,
    tasks: Mutex<JoinSet<()>>,
    stop: watch::Sender<bool>,
}

impl HookRunner {
    pub fn new(hooks: Vec<HookSettings>) -> Self {
        Self {
            hooks,
            tasks: Mutex::new(JoinSet::new()),
            stop: watch::channel(false).0,
        }
    }

    /// Whether any hook is configured for `event`.
    pub fn has_hooks_for(&self, event: HookEvent) -> bool {
        self.hooks.iter().any(|h| h.event == event)
    }

    /// Starts the hooks of `ctx.event` in the background (each bounded by
    /// its `timeout_s`; failures are logged). Needs a tokio runtime.
    pub fn spawn(&self, ctx: HookContext) {
        if !self.has_hooks_for(ctx.event) {
            return;
        }
        let hooks = self.hooks.clone();
        let stop = self.stop.subscribe();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the events whose hooks have ended.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            // run_one logs each hook's end.
            run_hooks_until(&hooks, &ctx, stop).await;
        });
    }

    /// Events whose hooks still run.
    pub fn running(&self) -> usize {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.len()
    }

    /// Waits for the hooks still running, at most `bound`; those still
    /// running then are killed with their process groups and logged.
    /// Returns how many events' hooks had to be killed.
    pub async fn finish(&self, bound: Duration) -> usize {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        if tasks.is_empty() {
            return 0;
        }
        info!(
            events = tasks.len(),
            bound_s = bound.as_secs_f64(),
            "waiting for hooks still running before exiting"
        );
        let waited =
            tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} }).await;
        if waited.is_ok() {
            return 0;
        }
        let killed = tasks.len();
        warn!(
            events = killed,
            bound_s = bound.as_secs_f64(),
            "hooks still running at exit after the wait: killing them"
        );
        let _ = self.stop.send(true);
        // Killing takes a moment (SIGKILL, then reaping); never hang here.
        if tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tasks.abort_all();
        }
        killed
    }
}

async fn run_one(
    h: &HookSettings,
    ctx: &HookContext,
    mut stop: watch::Receiver<bool>,
) -> HookOutcome {
    let mut cmd = tokio::process::Command::new(&h.command);
    cmd.args(&h.args)
        .env("REMUS_WAN_EVENT", ctx.event.as_str())
        .env("REMUS_WAN_VM", &ctx.vm)
        .env("REMUS_WAN_OLD_SITE", ctx.old_site.as_deref().unwrap_or(""))
        .env("REMUS_WAN_NEW_SITE", ctx.new_site.as_deref().unwrap_or(""))
        .env("REMUS_WAN_FENCING_TOKEN", ctx.fencing_token.to_string())
        .env("REMUS_WAN_LOCAL_SITE", &ctx.local_site)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so a timeout kills what it started too.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(command = %h.command.display(), error = %e, "hook could not be started");
            return HookOutcome {
                command: h.command.clone(),
                result: HookResult::SpawnError(e.to_string()),
                output: String::new(),
            };
        }
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_all = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(4096).read_to_end(&mut out).await;
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(4096).read_to_end(&mut err).await;
        }
        (out, err)
    };
    let timeout = Duration::from_secs(h.timeout_s.max(1) as u64);
    let waited = tokio::select! {
        w = tokio::time::timeout(timeout, async {
            let (o, e) = read_all.await;
            let status = child.wait().await;
            (o, e, status)
        }) => w.map_err(|_| HookResult::TimedOut),
        // Only a stop sent, not a dropped runner, kills the hook.
        Ok(_) = stop.wait_for(|s| *s) => Err(HookResult::Killed),
    };
    let (result, output) = match waited {
        Err(why) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the process group we created for it.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                }
            }
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            (why, String::new())
        }
        Ok((o, e, status)) => {
            let mut text = String::from_utf8_lossy(&o).into_owned();
            text.push_str(&String::from_utf8_lossy(&e));
            let r = match status {
                Ok(s) if s.success() => HookResult::Success,
                Ok(s) => HookResult::Failed { code: s.code() },
                Err(e) => HookResult::SpawnError(e.to_string()),
            };
            (r, text)
        }
    };
    match &result {
        HookResult::Success => {
            info!(command = %h.command.display(), event = ctx.event.as_str(), "hook succeeded")
        }
        HookResult::Killed => {
            warn!(command = %h.command.display(), event = ctx.event.as_str(), "hook killed: still running when the process stopped")
        }
        r => {
            warn!(command = %h.command.display(), event = ctx.event.as_str(), result = ?r, output = %output, "hook failed")
        }
    }
    HookOutcome {
        command: h.command.clone(),
        result,
        output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn hook(event: HookEvent, command: PathBuf, timeout_s: u32) -> HookSettings {
        HookSettings {
            event,
            command,
            args: vec!["arg1".into()],
            timeout_s,
        }
    }

    fn ctx() -> HookContext {
        HookContext {
            event: HookEvent::Promote,
            vm: "web1".into(),
            old_site: Some("dc1".into()),
            new_site: Some("dc2".into()),
            fencing_token: 42,
            local_site: "dc2".into(),
        }
    }

    #[tokio::test]
    async fn hooks_get_the_event_in_their_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env.txt");
        let ok = script(
            dir.path(),
            "ok.sh",
            &format!(
                "echo \"$REMUS_WAN_EVENT $REMUS_WAN_VM $REMUS_WAN_OLD_SITE $REMUS_WAN_NEW_SITE \
                 $REMUS_WAN_FENCING_TOKEN $REMUS_WAN_LOCAL_SITE $1\" > {}\necho done",
                out.display()
            ),
        );
        let other = script(dir.path(), "other.sh", "exit 0");
        let hooks = vec![
            hook(HookEvent::Promote, ok.clone(), 10),
            hook(HookEvent::Fence, other, 10),
        ];
        let res = run_hooks(&hooks, &ctx()).await;
        assert_eq!(res.len(), 1, "only the hooks of this event run");
        assert!(res[0].ok(), "{res:?}");
        assert!(res[0].output.contains("done"));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "promote web1 dc1 dc2 42 dc2 arg1"
        );
    }

    #[tokio::test]
    async fn failures_and_timeouts_are_reported_not_raised() {
        let dir = tempfile::tempdir().unwrap();
        let fail = script(dir.path(), "fail.sh", "echo oops >&2\nexit 3");
        let slow = script(dir.path(), "slow.sh", "sleep 600 &\nsleep 600");
        let ok = script(dir.path(), "ok.sh", "exit 0");
        let hooks = vec![
            hook(HookEvent::Promote, fail.clone(), 10),
            hook(HookEvent::Promote, slow, 1),
            hook(HookEvent::Promote, dir.path().join("missing"), 10),
            hook(HookEvent::Promote, ok, 10),
        ];
        let res = run_hooks(&hooks, &ctx()).await;
        assert_eq!(res.len(), 4);
        assert_eq!(res[0].result, HookResult::Failed { code: Some(3) });
        assert!(res[0].output.contains("oops"));
        assert_eq!(res[1].result, HookResult::TimedOut);
        assert!(matches!(res[2].result, HookResult::SpawnError(_)));
        assert!(res[3].ok());
    }

    #[tokio::test]
    async fn a_runner_waits_for_its_hooks_and_kills_them_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        let pids = dir.path().join("pids");
        let slow = script(
            dir.path(),
            "slow.sh",
            &format!("sleep 0.5\necho ok > {}", done.display()),
        );
        // Hangs, with a grandchild in its process group.
        let hang = script(
            dir.path(),
            "hang.sh",
            &format!(
                "sleep 600 &\necho $! > {p}\necho $$ >> {p}\nwait",
                p = pids.display()
            ),
        );
        let runner = HookRunner::new(vec![
            hook(HookEvent::Demote, slow, 30),
            hook(HookEvent::Fence, hang, 600),
        ]);
        let ctx = |event| HookContext { event, ..ctx() };
        runner.spawn(ctx(HookEvent::Demote));
        assert_eq!(runner.running(), 1);
        // The process stops at once: the hook still completes.
        assert_eq!(runner.finish(Duration::from_secs(10)).await, 0);
        assert_eq!(std::fs::read_to_string(&done).unwrap().trim(), "ok");
        assert_eq!(runner.running(), 0);

        let runner = HookRunner::new(vec![hook(
            HookEvent::Fence,
            dir.path().join("hang.sh"),
            600,
        )]);
        runner.spawn(ctx(HookEvent::Fence));
        // Let it start its grandchild.
        for _ in 0..100 {
            if std::fs::read_to_string(&pids)
                .unwrap_or_default()
                .lines()
                .count()
                == 2
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let start = std::time::Instant::now();
        assert_eq!(runner.finish(Duration::from_millis(300)).await, 1);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        for pid in std::fs::read_to_string(&pids).unwrap().lines() {
            let pid: i32 = pid.trim().parse().unwrap();
            // Reaped or a zombie: either way no longer running. A killed
            // process may still be on its way out on a busy machine (its
            // SIGKILL is handled when it next runs): wait for that state,
            // bounded.
            let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let running = |state: &str| {
                state
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while running(&stat()) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let state = stat();
            assert!(
                !running(&state),
                "process {pid} of the hook survived: {state}"
            );
        }
    }
}
