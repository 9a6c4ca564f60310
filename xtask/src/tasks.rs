//! The tasks themselves.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::deps::{self, run};
use crate::disk;

/// Free disk the workspace's test build needs (about 40 test binaries and
/// their dependencies, debug profile; measured on a fresh clone, with a
/// margin).
const TEST_BUILD_GIB: u64 = 6;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn flag_value(args: &[String], name: &str) -> Result<Option<u64>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{name} needs a number"))?;
            Ok(Some(v.parse().with_context(|| {
                format!("{name}: expected a number, found {v:?}")
            })?))
        }
    }
}

pub fn test(args: &[String]) -> Result<()> {
    let lint = !args.iter().any(|a| a == "--no-lint");
    let fuzz_seconds = flag_value(args, "--fuzz-seconds")?.unwrap_or(20);
    let target = root().join("target");
    disk::report(&target, "start");
    deps::install_test_deps()?;

    if lint {
        eprintln!("xtask: cargo fmt --check");
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        eprintln!("xtask: cargo clippy");
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        disk::report(&target, "lint");
    }

    if fuzz_seconds > 0 {
        fuzz_all(fuzz_seconds)?;
        disk::report(&target, "fuzzing");
    }

    // Built once here rather than by the first test that needs them.
    let guests = guest_image()?;
    linux_guest_image()?;
    disk::report(&target, "guest images");

    eprintln!("xtask: doc tests");
    run(cargo().args(["test", "--workspace", "--doc", "--quiet"]))?;
    disk::require(&target, "the test build", TEST_BUILD_GIB)?;

    // Last, so the final lines are the runner's summary.
    eprintln!("xtask: cargo nextest run --workspace");
    run(cargo()
        .args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--profile",
            "ci",
        ])
        .env(hypervisor::guest_build::GUEST_DIR_ENV, &guests))
    .inspect(|()| disk::report(&target, "the tests"))
}

/// Builds the guest programs the micro-VM runs into `target/guest/`.
pub fn guest_image() -> Result<PathBuf> {
    let out = root().join("target/guest");
    eprintln!("xtask: building the guest images into {}", out.display());
    let images = hypervisor::guest_build::install(&root().join("target/guest-build"), &out)
        .context("building the guest images")?;
    eprintln!(
        "xtask: guest images: {} {}",
        images.net.display(),
        images.counter.display()
    );
    Ok(out)
}

/// Where `guest-image --linux` puts the Linux guest (the qemu backend's
/// tests find it as `$REMUS_WAN_GUEST_DIR/linux`).
fn linux_guest_dir() -> PathBuf {
    root().join("target/guest/linux")
}

/// Builds the Linux guest of the qemu backend into `target/guest/linux/`.
pub fn linux_guest_image() -> Result<PathBuf> {
    let out = linux_guest_dir();
    eprintln!("xtask: building the Linux guest into {}", out.display());
    crate::linux_guest::build(&out).context("building the Linux guest")
}

/// `cargo xtask guest-image [--linux]`.
pub fn guest_image_task(args: &[String]) -> Result<()> {
    for a in args {
        if a != "--linux" {
            bail!("guest-image: unknown option {a:?} (only --linux)");
        }
    }
    guest_image()?;
    if args.iter().any(|a| a == "--linux") {
        linux_guest_image()?;
    }
    Ok(())
}

pub fn demo(_args: &[String]) -> Result<()> {
    deps::install_test_deps()?;
    let guests = guest_image()?;
    eprintln!("xtask: the checkpoint codec on synthetic dirty-page traces (release build)");
    run(cargo().args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "wan",
        "--example",
        "codec_demo",
    ]))?;
    crate::demo::run_two_sites(&root(), &guests)
}

pub fn fuzz(args: &[String]) -> Result<()> {
    let seconds = flag_value(args, "--seconds")?.unwrap_or(60);
    if !deps::has_nightly() {
        bail!("cargo-fuzz needs the nightly toolchain (rustup toolchain install nightly)");
    }
    fuzz_all(seconds)
}

/// Runs each fuzz target for a bounded time. cargo-fuzz needs nightly: where
/// there is none, say so plainly (the decoders' property tests still run in
/// the normal suite).
fn fuzz_all(seconds: u64) -> Result<()> {
    let fuzz_dirs = fuzz_projects();
    if fuzz_dirs.is_empty() {
        return Ok(());
    }
    if !deps::has_nightly() {
        eprintln!(
            "xtask: NOTE: no nightly toolchain, fuzz targets not run (their seed corpora run as tests)"
        );
        return Ok(());
    }
    deps::ensure_cargo_tool("cargo-fuzz", "cargo-fuzz")?;
    for dir in fuzz_dirs {
        let out = Command::new("cargo")
            .args(["+nightly", "fuzz", "list"])
            .current_dir(&dir)
            .output()
            .context("cargo fuzz list")?;
        let targets = String::from_utf8_lossy(&out.stdout).to_string();
        for target in targets.lines().map(str::trim).filter(|t| !t.is_empty()) {
            // libFuzzer is chatty: keep its output in a log, print the verdict.
            let log = root().join("target").join(format!("fuzz-{target}.log"));
            std::fs::create_dir_all(root().join("target"))?;
            eprintln!(
                "xtask: fuzzing {target} in {} for {seconds} s (log: {})",
                dir.display(),
                log.display()
            );
            let out = std::fs::File::create(&log)?;
            // The target's own corpus first (cargo-fuzz's default), then
            // checked-in seeds when the project keeps some.
            let mut corpora = vec![dir.join("fuzz/corpus").join(target)];
            let seeds = dir.join("fuzz/seeds").join(target);
            if seeds.is_dir() {
                corpora.push(seeds);
            }
            std::fs::create_dir_all(&corpora[0])?;
            let status = Command::new("cargo")
                .args(["+nightly", "fuzz", "run", target])
                .arg("--target-dir")
                .arg(fuzz_target_dir())
                .args(&corpora)
                .args(["--", "-rss_limit_mb=2048"])
                .arg(format!("-max_total_time={seconds}"))
                .current_dir(&dir)
                .stdout(out.try_clone()?)
                .stderr(out)
                .status()
                .context("cargo fuzz run")?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if !status.success() {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                bail!("fuzz target {target} failed ({status}):\n{tail}");
            }
            let done = text
                .lines()
                .rev()
                .find(|l| l.starts_with("Done "))
                .unwrap_or("no summary line");
            eprintln!("xtask: fuzz {target}: {done}");
        }
    }
    Ok(())
}

/// One build folder for every fuzz project: they share most of their
/// dependencies (the workspace crates among them), which four folders
/// would each build and store again.
fn fuzz_target_dir() -> PathBuf {
    root().join("target/fuzz")
}

/// Crate folders that hold a cargo-fuzz project (`<crate>/fuzz/Cargo.toml`).
fn fuzz_projects() -> Vec<PathBuf> {
    ["wan", "netops", "failover", "hypervisor"]
        .iter()
        .map(|c| root().join(c))
        .filter(|c| c.join("fuzz/Cargo.toml").exists())
        .collect()
}
