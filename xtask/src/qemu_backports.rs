//! QEMU from Debian's backports suite.
//!
//! The qemu backend's COLO mode takes its dirty pages from QEMU's own
//! migration dirty tracking. Under TCG, QEMU before 9.0 loses pages there
//! (the bitmap sync clears dirty bits without re-arming the TLB, so writes
//! through cached TLB entries are never logged again), and Debian 12 ships
//! QEMU 7.2. Its backports suite has QEMU 10.0: this module adds that suite
//! (on the same archive the machine's own sources name, so no host is
//! spelt here), pins QEMU's packages to it and installs them.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::deps::{is_root, run};

/// Oldest QEMU whose TCG dirty tracking is sound.
pub const MIN_QEMU: (u32, u32) = (9, 0);

const SOURCES_FILE: &str = "/etc/apt/sources.list.d/remus-wan-backports.sources";
const PIN_FILE: &str = "/etc/apt/preferences.d/remus-wan-qemu";
/// QEMU's binary packages that must come from one suite together.
const QEMU_PACKAGES: &[&str] = &["qemu-system-x86"];

/// The installed `qemu-system-x86_64`'s (major, minor), if it runs.
pub fn installed_version() -> Option<(u32, u32)> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// "QEMU emulator version 10.0.2 (Debian ...)" → (10, 0).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Makes sure QEMU >= [`MIN_QEMU`] is installed, from `<codename>-backports`
/// when the release's own QEMU is older. Idempotent; needs no network when
/// a recent QEMU is already there.
pub fn ensure() -> Result<()> {
    if installed_version().is_some_and(|v| v >= MIN_QEMU) && Path::new(PIN_FILE).exists() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "QEMU {}.{} or newer is needed (Debian 12's backports suite has 10.0); \
             run as root so that xtask can install it",
            MIN_QEMU.0,
            MIN_QEMU.1
        );
    }
    let codename = os_codename()?;
    let suite = format!("{codename}-backports");
    let source = archive_source(&codename)?;
    std::fs::write(
        SOURCES_FILE,
        format!(
            "# Added by remus-wan's xtask: QEMU >= {}.{} for the qemu backend.\n\
             Types: deb\nURIs: {}\nSuites: {suite}\nComponents: main\n{}",
            MIN_QEMU.0,
            MIN_QEMU.1,
            source.uri,
            source
                .signed_by
                .as_deref()
                .map(|k| format!("Signed-By: {k}\n"))
                .unwrap_or_default()
        ),
    )
    .with_context(|| format!("writing {SOURCES_FILE}"))?;
    std::fs::write(
        PIN_FILE,
        format!(
            "# Added by remus-wan's xtask: QEMU from {suite} (see docs/qemu-backend.md).\n\
             Package: qemu-*\nPin: release n={suite}\nPin-Priority: 990\n"
        ),
    )
    .with_context(|| format!("writing {PIN_FILE}"))?;
    eprintln!("xtask: installing QEMU from {suite}");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            &suite,
        ])
        .args(QEMU_PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    match installed_version() {
        Some(v) if v >= MIN_QEMU => {
            eprintln!("xtask: QEMU {}.{} installed", v.0, v.1);
            Ok(())
        }
        other => bail!(
            "after installing from {suite}, qemu-system-x86_64 reports {other:?}; \
             {}.{} or newer is needed",
            MIN_QEMU.0,
            MIN_QEMU.1
        ),
    }
}

fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME")
}

/// The Debian archive the machine already uses for its release.
#[derive(Debug, PartialEq, Eq)]
struct ArchiveSource {
    uri: String,
    signed_by: Option<String>,
}

fn archive_source(codename: &str) -> Result<ArchiveSource> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, t));
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let deb822 = p.extension().is_some_and(|e| e == "sources");
            let list = p.extension().is_some_and(|e| e == "list");
            if (deb822 || list) && p != Path::new(SOURCES_FILE) {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    texts.push((deb822, t));
                }
            }
        }
    }
    texts
        .iter()
        .find_map(|(deb822, t)| {
            if *deb822 {
                find_deb822(t, codename)
            } else {
                find_one_line(t, codename)
            }
        })
        .with_context(|| {
            format!("no APT source for suite {codename} found in /etc/apt: cannot add {codename}-backports")
        })
}

/// A deb822 stanza with `Types: deb` whose suites include `codename`.
fn find_deb822(text: &str, codename: &str) -> Option<ArchiveSource> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_owned())
            })
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let has_suite =
            field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == codename));
        let enabled = field("Enabled").is_none_or(|e| e != "no");
        if is_deb && has_suite && enabled {
            let uri = field("URIs")?.split_whitespace().next()?.to_owned();
            return Some(ArchiveSource {
                uri,
                signed_by: field("Signed-By"),
            });
        }
    }
    None
}

/// A one-line `deb [options] URI codename components` entry.
fn find_one_line(text: &str, codename: &str) -> Option<ArchiveSource> {
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let (opts, after) = opts.split_once(']')?;
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_owned);
            rest = after.trim();
        }
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        if words.next() == Some(codename) {
            return Some(ArchiveSource {
                uri: uri.to_owned(),
                signed_by,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"),
            Some((7, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2~bpo12+1)"),
            Some((10, 0))
        );
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn deb822_source_of_the_release_is_found() {
        let text = "Types: deb\nURIs: http://archive.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n\nTypes: deb\nURIs: http://archive.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            find_deb822(text, "bookworm"),
            Some(ArchiveSource {
                uri: "http://archive.example/debian".into(),
                signed_by: Some("/usr/share/keyrings/k.gpg".into())
            })
        );
        assert_eq!(find_deb822(text, "trixie"), None);
    }

    #[test]
    fn one_line_source_of_the_release_is_found() {
        let text = "# comment\ndeb-src http://a.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main\n";
        assert_eq!(
            find_one_line(text, "bookworm"),
            Some(ArchiveSource {
                uri: "http://a.example/debian".into(),
                signed_by: Some("/k.gpg".into())
            })
        );
    }
}
