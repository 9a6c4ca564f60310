//! Disk space of the build: printed between the phases of `cargo xtask test`
//! so a CI log shows which phase used it, and checked before the phases
//! that write gigabytes so a full disk fails with a sentence, not with a
//! linker's bus error half-way through the test build.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

const GIB: u64 = 1 << 30;

/// Bytes free to an unprivileged writer on the file system holding `path`.
fn available(path: &Path) -> Result<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .context("running df")?;
    if !out.status.success() {
        bail!("df {} failed: {}", path.display(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("df printed no figure: {text:?}"))
}

/// Bytes used under `path` (0 when it does not exist yet).
fn used(path: &Path) -> u64 {
    if !path.exists() {
        return 0;
    }
    Command::new("du")
        .args(["-s", "-B1"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB as f64)
}

/// Prints the free space and what `target/` holds after `phase`.
pub fn report(target: &Path, phase: &str) {
    match available(target.parent().unwrap_or(target)) {
        Ok(free) => eprintln!(
            "xtask: disk after {phase}: {} free, target/ holds {}",
            gib(free),
            gib(used(target))
        ),
        Err(e) => eprintln!("xtask: disk after {phase}: unknown ({e:#})"),
    }
}

/// Fails when fewer than `need_gib` GiB are free for `phase`, naming what
/// uses the space, instead of letting the build die on a full disk.
pub fn require(target: &Path, phase: &str, need_gib: u64) -> Result<()> {
    let free = available(target.parent().unwrap_or(target))?;
    if free < need_gib * GIB {
        bail!(
            "{phase} needs about {need_gib} GiB of free disk and {} are free \
             (target/ holds {}); free some space (for example `cargo clean`, \
             or remove other checkouts' target directories) and run again",
            gib(free),
            gib(used(target))
        );
    }
    Ok(())
}
