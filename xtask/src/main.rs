//! Project tasks: `cargo xtask test`, `cargo xtask demo`, `cargo xtask fuzz`.
//!
//! Each task installs what it needs first (idempotently: Debian packages
//! with apt-get, tools with cargo install), so a fresh machine needs nothing
//! but these commands.

mod demo;
mod deps;
mod disk;
mod linux_guest;
mod qemu_backports;
mod tasks;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  test [--no-lint] [--fuzz-seconds N]
                 install test dependencies, lint (fmt, clippy), run a bounded
                 fuzz pass when the nightly toolchain is present, then every
                 test of the workspace (cargo nextest); ends with the
                 runner's summary line
  demo           build everything, show the codec on synthetic traces, then
                 protect a micro-VM between two local sites and pull the plug
  guest-image [--linux]
                 build the micro-VM guest programs into target/guest/; with
                 --linux, also the Linux guest of the qemu backend (Debian
                 kernel + busybox initramfs) into target/guest/linux/
  fuzz [--seconds N]
                 run every cargo-fuzz target for N seconds (default 60)
  deps           only install the test dependencies";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match task.as_str() {
        "test" => tasks::test(rest),
        "demo" => tasks::demo(rest),
        "fuzz" => tasks::fuzz(rest),
        "deps" => deps::install_test_deps(),
        "guest-image" => tasks::guest_image_task(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("unknown task {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
