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

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
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
    // Run concurrently (one slow hook does not delay the others); report in
    // configuration order.
    let handles: Vec<_> = hooks
        .iter()
        .filter(|h| h.event == ctx.event)
        .map(|h| {
            let (h, ctx) = (h.clone(), ctx.clone());
            let command = h.command.clone();
            (
                command,
                tokio::spawn(async move { run_one(&h, &ctx).await }),
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

async fn run_one(h: &HookSettings, ctx: &HookContext) -> HookOutcome {
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
    let waited = tokio::time::timeout(timeout, async {
        let (o, e) = read_all.await;
        let status = child.wait().await;
        (o, e, status)
    })
    .await;
    let (result, output) = match waited {
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the process group we created for it.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                }
            }
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            (HookResult::TimedOut, String::new())
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
}
