//! A WAN link between two UDP endpoints, controlled from stdin.
//!
//!     cargo run -p wan --example wan_emulator -- --listen 127.0.0.1:7000 \
//!         --upstream 127.0.0.1:4433 --rtt-ms 50 --jitter-ms 2 --loss 0.5 --rate-mbit 200
//!
//! Commands on stdin: `cut`, `heal`, `stats`, `quit`. Stops by itself
//! after --max-secs (default 600).

use std::io::BufRead;
use std::time::Duration;

use wan::emulator::{Emulator, EmulatorConfig, LinkParams};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: f64) -> f64 {
    arg(args, name).map_or(default, |v| {
        v.parse().unwrap_or_else(|_| {
            eprintln!("{name} expects a number, got {v:?}");
            std::process::exit(2)
        })
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(upstream) = arg(&args, "--upstream").and_then(|s| s.parse().ok()) else {
        eprintln!("usage: wan_emulator --upstream HOST:PORT [--listen 127.0.0.1:0] [--rtt-ms N] [--jitter-ms N] [--loss PERCENT] [--corrupt PERCENT] [--rate-mbit N] [--queue-kib N] [--seed N] [--max-secs N]");
        std::process::exit(2);
    };
    let mut cfg = EmulatorConfig::new(upstream);
    if let Some(l) = arg(&args, "--listen") {
        cfg.listen = l.parse().expect("--listen HOST:PORT");
    }
    let rate = num(&args, "--rate-mbit", 0.0);
    let mut p = LinkParams::symmetric(
        Duration::from_secs_f64(num(&args, "--rtt-ms", 0.0) / 1000.0),
        num(&args, "--loss", 0.0) / 100.0,
        (rate > 0.0).then_some((rate * 1e6) as u64),
    );
    p.jitter = Duration::from_secs_f64(num(&args, "--jitter-ms", 0.0) / 1000.0);
    p.corrupt = num(&args, "--corrupt", 0.0) / 100.0;
    if let Some(q) = arg(&args, "--queue-kib") {
        p.queue_bytes = q.parse::<usize>().expect("--queue-kib N") * 1024;
    }
    cfg = cfg.with_link(p);
    cfg.seed = num(&args, "--seed", 1.0) as u64;
    cfg.max_lifetime = Duration::from_secs_f64(num(&args, "--max-secs", 600.0));
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let emu = rt.block_on(Emulator::start(cfg)).expect("start emulator");
    println!("relaying {} -> {upstream}: {p:?}", emu.local_addr());
    let h = emu.handle();
    for line in std::io::stdin().lock().lines().take(100_000) {
        match line.as_deref().map(str::trim) {
            Ok("cut") => h.cut(),
            Ok("heal") => h.heal(),
            Ok("stats") => println!("{:?}", h.stats()),
            Ok("quit") | Err(_) => break,
            Ok("") => {}
            Ok(other) => println!("unknown command {other:?}: cut, heal, stats, quit"),
        }
    }
    drop(emu);
}
