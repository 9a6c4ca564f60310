//! A measurement, not a check (ignored by default): the counter guest's
//! write rate under checkpoints every 25 ms with hot pages on and off, and
//! without checkpoints, interleaved in rounds in one process so the host's
//! other load hits all three alike. No encoder, network or standby: only
//! what the dirty log costs the guest (write faults, pauses, copies).
//!
//! ```text
//! cargo nextest run -p hypervisor --run-ignored only -E 'test(hot_pages_speed)' --no-capture
//! ```
//!
//! Environment: `HOT_SPEED_SETS=256,4096,16384` (working sets in pages),
//! `HOT_SPEED_ROUNDS=3`, `HOT_SPEED_MS=2000` (per mode per round),
//! `HOT_SPEED_EPOCH_MS=25`.

mod common;

use std::time::{Duration, Instant};

use hypervisor::kvm::{HotPagesConfig, Vm, VmSpec, Workload};
use hypervisor::vm_memory::{Bytes, GuestAddress};
use hypervisor::{Checkpoint, ProtectedGuest};

const MEMORY_MIB: u64 = 128;
const SET_BASE: u64 = (MEMORY_MIB << 20) / 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn start(set_pages: u64, enabled: bool) -> Vm {
    let spec = VmSpec::new("hot-speed", &common::images().counter)
        .memory_mib(MEMORY_MIB)
        .guest_arg(5)
        .workload(Workload {
            dirty_set_pages: set_pages,
            dirty_pages_per_ms: 0,
        })
        .hot_pages(HotPagesConfig {
            enabled,
            ..HotPagesConfig::default()
        });
    let vm = Vm::start(&spec, Default::default()).expect("start");
    vm.wait_ready(Duration::from_secs(60)).expect("ready");
    vm
}

fn passes(vm: &Vm) -> u64 {
    vm.memory()
        .read_obj::<u64>(GuestAddress(SET_BASE - 8))
        .expect("pass counter")
}

#[derive(Default)]
struct Totals {
    writes: f64,
    secs: f64,
    checkpoints: u64,
    pages: u64,
    pause: Duration,
}

impl Totals {
    fn rate(&self) -> f64 {
        self.writes / self.secs.max(1e-9)
    }
}

/// Runs `vm` (resumed) for `ms`, with a checkpoint every `epoch` if given.
fn window(vm: &mut Vm, set_pages: u64, ms: u64, epoch: Option<Duration>, t: &mut Totals) {
    let mut cp = Checkpoint::default();
    vm.resume().expect("resume");
    // The first checkpoint sends the full image: not part of the window.
    if epoch.is_some() {
        vm.checkpoint(&mut cp, &mut || {}).expect("checkpoint");
    }
    let p0 = passes(vm);
    let t0 = Instant::now();
    let end = t0 + Duration::from_millis(ms);
    while Instant::now() < end {
        match epoch {
            Some(e) => {
                std::thread::sleep(e);
                vm.checkpoint(&mut cp, &mut || {}).expect("checkpoint");
                t.checkpoints += 1;
                t.pages += cp.frames.len() as u64;
                t.pause += cp.timings.total;
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let done = passes(vm) - p0;
    vm.pause().expect("pause");
    t.writes += (done * set_pages) as f64;
    t.secs += secs;
}

#[test]
#[ignore = "a measurement: run it on purpose (see the file's comment)"]
fn hot_pages_speed() {
    if !common::require_kvm_root() {
        return;
    }
    let sets: Vec<u64> = std::env::var("HOT_SPEED_SETS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![256, 4096, 16384]);
    let rounds: usize = env_or("HOT_SPEED_ROUNDS", 3);
    let ms: u64 = env_or("HOT_SPEED_MS", 2000);
    let epoch = Duration::from_millis(env_or("HOT_SPEED_EPOCH_MS", 25));
    println!(
        "| set | unprotected M writes/s | hot off: M writes/s (slowdown) | pages/cp | pause | hot on: M writes/s (slowdown) | pages/cp | pause | hot pages |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &set in &sets {
        let mut off = start(set, false);
        off.pause().expect("pause");
        let mut on = start(set, true);
        on.pause().expect("pause");
        let (mut base, mut t_off, mut t_on) =
            (Totals::default(), Totals::default(), Totals::default());
        for _ in 0..rounds {
            window(&mut off, set, ms, None, &mut base);
            window(&mut off, set, ms, Some(epoch), &mut t_off);
            window(&mut on, set, ms, Some(epoch), &mut t_on);
        }
        let hot = on.hot_pages().map_or(0, |s| s.hot);
        let slow = |t: &Totals| (1.0 - t.rate() / base.rate()) * 100.0;
        let per = |t: &Totals| t.pages as f64 / t.checkpoints.max(1) as f64;
        let pause = |t: &Totals| t.pause.as_secs_f64() * 1e3 / t.checkpoints.max(1) as f64;
        println!(
            "| {} KiB | {:.1} | {:.2} ({:.0} %) | {:.0} | {:.2} ms | {:.2} ({:.0} %) | {:.0} | {:.2} ms | {hot} |",
            set * 4,
            base.rate() / 1e6,
            t_off.rate() / 1e6,
            slow(&t_off),
            per(&t_off),
            pause(&t_off),
            t_on.rate() / 1e6,
            slow(&t_on),
            per(&t_on),
            pause(&t_on),
        );
        drop(off);
        drop(on);
    }
}
