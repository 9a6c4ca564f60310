//! Checkpoint pause time of the micro-VM for dirty sets of 1k, 10k and 100k
//! pages, split into its parts (vCPU stop, dirty-log read, page copy, state
//! capture), beside a plain memcpy of the same number of bytes measured in
//! the same run (with the guest paused, as during the checkpoint's own
//! copy). Also reports whether this KVM offers the dirty ring.
//!
//! `cargo bench -p hypervisor --bench checkpoint` (root and /dev/kvm needed).
//! The guest is the counter guest in mode 5: it rewrites one u64 in every
//! page of its set, pass after pass; a checkpoint is taken after at least
//! one whole pass since the previous one, so the whole set is dirty.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hypervisor::kvm::{Seams, Vm, VmSpec, Workload};
use hypervisor::vm_memory::{Bytes, GuestAddress};
use hypervisor::{Checkpoint, PauseTimings, ProtectedGuest};

const MEMORY_MIB: u64 = 1024;
const SIZES: [u64; 3] = [1_000, 10_000, 100_000];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn signed_us(a: Duration, b: Duration) -> String {
    format!("{:+.0}", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
}

fn passes(vm: &Vm) -> u64 {
    let addr = GuestAddress((MEMORY_MIB << 20) / 2 - 8);
    vm.memory().read_obj::<u64>(addr).unwrap_or(0)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if hypervisor::kvm::available().is_err() || unsafe { libc::geteuid() } != 0 {
        eprintln!("checkpoint bench: needs root and /dev/kvm; nothing measured");
        return;
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-build");
    let images = hypervisor::guest_build::from_env_or_build(&target).expect("guest images");
    let kvm = kvm_ioctls::Kvm::new().expect("kvm");
    // KVM_CAP_DIRTY_LOG_RING (192), KVM_CAP_DIRTY_LOG_RING_ACQ_REL (223).
    println!(
        "dirty ring offered by this KVM: {} (max bytes per vCPU), acq/rel: {}",
        kvm.check_extension_raw(192),
        kvm.check_extension_raw(223)
    );
    println!(
        "\n| dirty set | pages copied | vCPU stop | dirty log | page copy | state | pause total | memcpy same bytes | pause - memcpy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &set in &SIZES {
        let samples = if set >= 100_000 { 9 } else { 21 };
        let spec = VmSpec::new("ckpt-bench", &images.counter)
            .memory_mib(MEMORY_MIB)
            .guest_arg(5)
            .workload(Workload {
                dirty_set_pages: set,
                dirty_pages_per_ms: 0,
            });
        let mut vm = Vm::start(&spec, Seams::default()).expect("start");
        vm.wait_ready(Duration::from_secs(120)).expect("ready");
        // The full image goes out through pre-copy rounds of 64 MiB.
        let mut cp = Checkpoint::default();
        for _ in 0..1000 {
            vm.precopy_round(16_384, &mut cp).expect("pre-copy");
            if cp.frames.len() < 16_384 {
                break;
            }
        }
        vm.checkpoint(&mut cp, &mut || {}).expect("checkpoint");
        let mut rows: Vec<(usize, PauseTimings, Duration)> = Vec::new();
        let mut src = Vec::new();
        let mut dst = Vec::new();
        for _ in 0..samples {
            let p0 = passes(&vm);
            let deadline = Instant::now() + Duration::from_secs(60);
            while passes(&vm) < p0 + 2 {
                assert!(Instant::now() < deadline, "guest made no progress");
                std::thread::sleep(Duration::from_millis(1));
            }
            vm.checkpoint(&mut cp, &mut || {}).expect("checkpoint");
            let bytes = cp.pages.len();
            src.resize(bytes, 1u8);
            dst.resize(bytes, 0u8);
            // Measured with the guest paused too, so both copies see the
            // same machine (the running guest competes for cores and
            // memory bandwidth).
            vm.pause().expect("pause");
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            let memcpy = t.elapsed();
            vm.resume().expect("resume");
            std::hint::black_box(&dst);
            if std::env::var_os("CHECKPOINT_BENCH_VERBOSE").is_some() {
                eprintln!("{set}: {:?} memcpy {memcpy:?}", cp.timings);
            }
            rows.push((cp.frames.len(), cp.timings, memcpy));
        }
        vm.shutdown().expect("stop");
        let m =
            |f: &dyn Fn(&PauseTimings) -> Duration| median(rows.iter().map(|r| f(&r.1)).collect());
        let copied = {
            let mut c: Vec<usize> = rows.iter().map(|r| r.0).collect();
            c.sort();
            c[c.len() / 2]
        };
        let total = m(&|t| t.total);
        let memcpy = median(rows.iter().map(|r| r.2).collect());
        println!(
            "| {set} | {copied} | {} | {} | {} | {} | {} | {} | {} |",
            us(m(&|t| t.stop)),
            us(m(&|t| t.dirty_log)),
            us(m(&|t| t.copy)),
            us(m(&|t| t.state)),
            us(total),
            us(memcpy),
            signed_us(total, memcpy),
        );
    }
    println!("\n(times in µs, medians; guest RAM {MEMORY_MIB} MiB, 1 vCPU)");
}
