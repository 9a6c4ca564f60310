//! `remus-wan verify VM [--repair] [--memory-only|--disk-only]`: online
//! verify of the replica, asked of the `protect` process running the VM on
//! this host (with its control token, as `switchover`), followed in its
//! `/status` until the run ends. See docs/verify.md.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use super::exit::Code;
use crate::engine::verify::VerifyProgress;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The VM whose replica to verify.
    vm: String,
    /// Resend every differing page or block in the next epoch, then
    /// compare it again.
    #[arg(long)]
    repair: bool,
    /// Compare guest memory only.
    #[arg(long, conflicts_with = "disk_only")]
    memory_only: bool,
    /// Compare the disk only.
    #[arg(long)]
    disk_only: bool,
    /// Control address of the protect process (its --metrics); each is
    /// tried in turn.
    #[arg(long = "control", default_values = ["127.0.0.1:9477", "127.0.0.1:9478"])]
    controls: Vec<std::net::SocketAddr>,
    /// Directory of the processes' control token files (default:
    /// /run/remus-wan as root; the processes must use the same).
    #[arg(long, env = crate::metrics::RUN_DIR_ENV)]
    run_dir: Option<PathBuf>,
    /// Give up waiting for the run after this many seconds (it goes on in
    /// the protect process; `remus-wan status` shows it).
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Print the final figures as JSON.
    #[arg(long)]
    json: bool,
}

impl VerifyArgs {
    pub fn run(self) -> Code {
        let scope = if self.memory_only {
            "memory"
        } else if self.disk_only {
            "disk"
        } else {
            "all"
        };
        let path = format!(
            "/verify/{}?scope={scope}&repair={}",
            self.vm,
            u8::from(self.repair)
        );
        let run_dir = self.run_dir.clone().unwrap_or_else(crate::metrics::run_dir);
        let mut errors = Vec::new();
        let mut denied = false;
        for addr in &self.controls {
            let token = match super::common::control_token(&run_dir, *addr) {
                Ok(t) => t,
                Err(e) => {
                    denied |= e.denied;
                    errors.push(e.message);
                    continue;
                }
            };
            match crate::metrics::post_control(*addr, &path, token.as_deref()) {
                Ok((200, msg)) => {
                    let Some(run) = run_number(&msg) else {
                        eprintln!("error: {addr} answered {msg:?}: no run number");
                        return Code::Failure;
                    };
                    eprintln!("{}", msg.trim());
                    return self.follow(*addr, run);
                }
                Ok((409, msg)) => {
                    eprintln!("error: refused: {}", msg.trim());
                    return Code::Refused;
                }
                Ok((404, msg)) => errors.push(format!("{addr}: {}", msg.trim())),
                Ok((403, msg)) => {
                    denied = true;
                    errors.push(format!("{addr}: refused: {}", msg.trim()));
                }
                Ok((code, msg)) => {
                    eprintln!("error: {addr} answered {code}: {}", msg.trim());
                    return Code::Failure;
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        if denied {
            eprintln!(
                "error: not allowed to control the process protecting {} ({})",
                self.vm,
                errors.join("; ")
            );
            return Code::Refused;
        }
        eprintln!(
            "error: no process protecting {} here ({}): run this on the primary's host",
            self.vm,
            errors.join("; ")
        );
        Code::Failure
    }

    /// Follows run `run` in the process's `/status` until it ends.
    fn follow(&self, addr: std::net::SocketAddr, run: u64) -> Code {
        let deadline = Instant::now() + Duration::from_secs(self.timeout);
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} verify {msg} [{bar:40}] {pos}/{len} slices ({eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        let mut failures = 0;
        let last = loop {
            let p = match crate::metrics::fetch_status(addr) {
                Ok(vms) => {
                    failures = 0;
                    vms.into_iter()
                        .filter(|v| v.vm == self.vm && v.role == "primary")
                        .find_map(|v| v.verify.filter(|p| p.run == run))
                }
                Err(e) => {
                    failures += 1;
                    if failures > 10 {
                        eprintln!("error: {addr} stopped answering: {e}");
                        return Code::Failure;
                    }
                    None
                }
            };
            if let (Some(b), Some(p)) = (&bar, &p) {
                b.set_length(p.slices_total);
                b.set_position(p.slices_done);
                b.set_message(format!(
                    "{} pages, {} blocks, {} differences",
                    p.pages_checked, p.blocks_checked, p.mismatches
                ));
            }
            match p {
                Some(p) if p.state != "running" => break p,
                _ => {}
            }
            if Instant::now() >= deadline {
                if let Some(b) = &bar {
                    b.abandon();
                }
                eprintln!(
                    "error: verify run {run} not done after {} s; it goes on (see remus-wan status)",
                    self.timeout
                );
                return Code::Failure;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&last).unwrap_or_default()
            );
        } else {
            print!("{}", summary(&self.vm, &last));
        }
        outcome(&last)
    }
}

/// The run number in "verify run N started: ...".
fn run_number(msg: &str) -> Option<u64> {
    msg.trim()
        .strip_prefix("verify run ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The exit code a finished run means.
pub fn outcome(p: &VerifyProgress) -> Code {
    if p.state != "done" {
        Code::Failure
    } else if p.mismatches == 0 {
        Code::Success
    } else if p.repair && p.repaired == p.mismatches {
        Code::Repaired
    } else {
        Code::Differences
    }
}

/// What the operator reads at the end.
pub fn summary(vm: &str, p: &VerifyProgress) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let epochs = match (p.first_epoch, p.last_epoch) {
        (Some(a), Some(b)) => format!(" at the commits of epochs {a}..={b}"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "verify run {} of {vm}: {}; {}/{} slices, {} memory pages and {} disk blocks compared{epochs}",
        p.run, p.state, p.slices_done, p.slices_total, p.pages_checked, p.blocks_checked
    );
    if let Some(e) = &p.error {
        let _ = writeln!(out, "error: {e}");
    }
    if p.mismatches == 0 {
        if p.state == "done" {
            let _ = writeln!(out, "the replica is identical to the primary");
        }
        return out;
    }
    let _ = writeln!(
        out,
        "{} differences{}:",
        p.mismatches,
        if p.repair {
            format!(", {} repaired", p.repaired)
        } else {
            String::new()
        }
    );
    for m in &p.listed {
        let what = if m.region == "memory" {
            format!("memory frame {} (guest-physical {:#x})", m.unit, m.offset)
        } else {
            format!("disk block {} (byte offset {})", m.unit, m.offset)
        };
        let _ = writeln!(
            out,
            "  {what}, epoch {}{}",
            m.epoch,
            if m.repaired { ", repaired" } else { "" }
        );
    }
    if (p.listed.len() as u64) < p.mismatches {
        let _ = writeln!(
            out,
            "  ... and {} more",
            p.mismatches - p.listed.len() as u64
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::verify::Mismatch;

    #[test]
    fn exit_codes_and_summary() {
        let mut p = VerifyProgress {
            run: 3,
            state: "done".into(),
            slices_total: 2,
            slices_done: 2,
            pages_checked: 4096,
            blocks_checked: 10,
            ..Default::default()
        };
        assert_eq!(outcome(&p), Code::Success);
        assert!(summary("web1", &p).contains("identical"));
        p.mismatches = 1;
        p.listed.push(Mismatch {
            region: "memory".into(),
            unit: 300,
            offset: 300 * 4096,
            epoch: 42,
            repaired: false,
        });
        assert_eq!(outcome(&p), Code::Differences);
        let s = summary("web1", &p);
        assert!(
            s.contains("memory frame 300 (guest-physical 0x12c000), epoch 42"),
            "{s}"
        );
        p.repair = true;
        p.repaired = 1;
        assert_eq!(outcome(&p), Code::Repaired);
        p.state = "failed".into();
        assert_eq!(outcome(&p), Code::Failure);
        assert_eq!(run_number("verify run 12 started: 3 slices\n"), Some(12));
        assert_eq!(run_number("nonsense"), None);
    }
}
