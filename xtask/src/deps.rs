//! Installing what the tests and the demo need, idempotently.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the test suite uses (network namespaces, veth, tap).
pub const TEST_APT_PACKAGES: &[&str] = &[
    "iproute2",
    // netops daemon tests: BGP peers and the DNS server, with their CLIs
    // (birdc ships with bird2, gobgp with gobgpd, kdig with knot-dnsutils).
    "bird2",
    "gobgpd",
    "knot",
    "knot-dnsutils",
    // qemu backend tests: QEMU itself, and what the Linux guest is built
    // from (crate::linux_guest::LINUX_GUEST_APT_PACKAGES, repeated here so
    // one apt-get run installs everything).
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    // etcd as the failover arbiter: the etcd daemon the tests start as a
    // three-member cluster, etcdctl to look at it by hand, and protoc,
    // which the etcd-client crate's build script compiles etcd's API with.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
];

/// Cargo tools the test suite uses.
pub const TEST_CARGO_TOOLS: &[(&str, &str)] = &[("cargo-nextest", "cargo-nextest")];

pub fn install_test_deps() -> Result<()> {
    // First, so that a new machine installs QEMU from backports at once
    // rather than the release's 7.2 and then an upgrade.
    crate::qemu_backports::ensure()?;
    ensure_apt(TEST_APT_PACKAGES)?;
    for (binary, krate) in TEST_CARGO_TOOLS {
        ensure_cargo_tool(binary, krate)?;
    }
    Ok(())
}

/// Installs the Debian packages that are not installed yet; does nothing
/// (and needs no network) when all are present.
pub fn ensure_apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages {} are needed; run as root or install them: apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// `cargo install`s a tool unless its binary already runs.
pub fn ensure_cargo_tool(binary: &str, krate: &str) -> Result<()> {
    let present = Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        || Command::new("cargo")
            .args([binary.trim_start_matches("cargo-"), "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing {krate} with cargo install");
    run(Command::new("cargo").args(["install", "--locked", krate]))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// True when `cargo +nightly` works (cargo-fuzz needs nightly).
pub fn has_nightly() -> bool {
    Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
