//! Dirty bitmap vs dirty ring, measured on the same guest in the same run:
//! a 1 GiB micro-VM (counter guest, mode 5: one write to every page of a
//! set, pass after pass) is paused after each whole pass and its dirty
//! pages collected either with `KVM_GET_DIRTY_LOG` (the bitmap, what
//! `kvm::Vm` uses) or by harvesting the vCPU's dirty ring
//! (`KVM_CAP_DIRTY_LOG_RING`, 64 Ki entries) and `KVM_RESET_DIRTY_RINGS`.
//! Also counts how often the ring filled up in mid-epoch (the vCPU then
//! stops until the VMM harvests).
//!
//! `cargo bench -p hypervisor --bench dirty_tracking` (root and /dev/kvm).
//! kvm-ioctls has no dirty-ring API, so this bench builds its VM by hand
//! from the crate's public pieces (arch, loader, memory, kick).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::kvm::abi::{self, BootInfo};
use hypervisor::kvm::arch::{cpuid, gdt, layout, paging, regs};
use hypervisor::kvm::{kick, loader, memory};
use hypervisor::vm_memory::{Bytes, GuestAddress};
use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};

const MEMORY: u64 = 1 << 30;
const RING_BYTES: u64 = 1 << 20; // 65 536 entries of 16 bytes
const CAP_DIRTY_LOG_RING: u32 = 192;
const EXIT_DIRTY_RING_FULL: u32 = 31;
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
const DIRTY: u32 = 1;
const RESET: u32 = 2;

#[repr(C)]
struct DirtyGfn {
    flags: u32,
    slot: u32,
    offset: u64,
}

struct Ring {
    base: *mut DirtyGfn,
    entries: u64,
    fetch: u64,
}

// SAFETY: the ring is a shared mapping of the vCPU fd, used by one thread
// at a time (the measuring thread).
unsafe impl Send for Ring {}

impl Ring {
    /// Harvests every dirty entry; returns how many.
    fn harvest(&mut self) -> u64 {
        let mut n = 0;
        loop {
            // SAFETY: index within the mapping; KVM publishes entries with
            // release semantics on `flags` (x86: plain loads suffice).
            let e = unsafe { self.base.add((self.fetch % self.entries) as usize) };
            let flags = unsafe { std::ptr::addr_of!((*e).flags).read_volatile() };
            if flags & DIRTY == 0 {
                break;
            }
            std::sync::atomic::fence(Ordering::Acquire);
            unsafe { std::ptr::addr_of_mut!((*e).flags).write_volatile(RESET) };
            self.fetch += 1;
            n += 1;
        }
        n
    }
}

struct TestVm {
    vm: VmFd,
    mem: memory::GuestMemoryMmap,
    ring: Option<Ring>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    full_exits: Arc<AtomicU64>,
    tid: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy)]
struct BootInfoBytes(#[allow(dead_code)] BootInfo);
// SAFETY: BootInfo is repr(C) integers with explicit padding fields.
unsafe impl hypervisor::vm_memory::ByteValued for BootInfoBytes {}

fn build(image: &Path, set: u64, ring: bool) -> TestVm {
    kick::install().unwrap();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    if ring {
        let mut cap = kvm_enable_cap {
            cap: CAP_DIRTY_LOG_RING,
            ..Default::default()
        };
        cap.args[0] = RING_BYTES;
        vm.enable_cap(&cap).expect("enable the dirty ring");
    }
    let mem = memory::create(&vm, MEMORY).unwrap();
    for (addr, entries) in paging::tables() {
        let b: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&b, GuestAddress(addr)).unwrap();
    }
    let g: Vec<u8> = gdt::gdt_entries()
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    mem.write_slice(&g, GuestAddress(layout::GDT)).unwrap();
    mem.write_slice(&gdt::tss_bytes(), GuestAddress(layout::TSS))
        .unwrap();
    let img = loader::load(image, &mem, MEMORY).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let c = cpuid::for_vcpu(&kvm, 0).unwrap();
    vcpu.set_cpuid2(&c).unwrap();
    vcpu.set_sregs(&regs::sregs(vcpu.get_sregs().unwrap()))
        .unwrap();
    vcpu.set_regs(&regs::regs(img.entry, MEMORY, abi::BOOT_INFO, 0))
        .unwrap();
    vcpu.set_fpu(&regs::fpu()).unwrap();
    vcpu.set_xcrs(&regs::xcrs(cpuid::xcr0(&c))).unwrap();
    let info = BootInfo {
        magic: abi::BOOT_MAGIC,
        version: abi::BOOT_VERSION,
        vcpus: 1,
        mem_size: MEMORY,
        tsc_khz: u64::from(vcpu.get_tsc_khz().unwrap_or(0)),
        dirty_set_pages: set,
        arg: 5,
        ..Default::default()
    };
    mem.write_obj(BootInfoBytes(info), GuestAddress(abi::BOOT_INFO))
        .unwrap();
    let ring = ring.then(|| {
        // SAFETY: maps the vCPU's ring (KVM_DIRTY_LOG_PAGE_OFFSET = 64).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_BYTES as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                64 * 4096,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the dirty ring");
        Ring {
            base: p.cast(),
            entries: RING_BYTES / 16,
            fetch: 0,
        }
    });
    let pause = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let full_exits = Arc::new(AtomicU64::new(0));
    let tid = Arc::new(AtomicU64::new(0));
    let (p, pd, st, fe, t) = (
        pause.clone(),
        paused.clone(),
        stop.clone(),
        full_exits.clone(),
        tid.clone(),
    );
    let thread = std::thread::spawn(move || {
        let mut vcpu = vcpu;
        // SAFETY: pthread_self has no preconditions.
        t.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
        kick::register_current(vcpu.get_kvm_run());
        while !st.load(Ordering::SeqCst) {
            if p.load(Ordering::SeqCst) {
                vcpu.set_kvm_immediate_exit(1);
            }
            match vcpu.run() {
                Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                    // The ring is full: the vCPU waits for a harvest.
                    fe.fetch_add(1, Ordering::SeqCst);
                    p.store(true, Ordering::SeqCst);
                }
                Ok(other) => panic!("unexpected exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    if p.load(Ordering::SeqCst) {
                        pd.store(true, Ordering::SeqCst);
                        while p.load(Ordering::SeqCst) && !st.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        pd.store(false, Ordering::SeqCst);
                    }
                }
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
        kick::register_current(std::ptr::null_mut());
    });
    while tid.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    TestVm {
        vm,
        mem,
        ring,
        pause,
        paused,
        stop,
        full_exits,
        tid,
        thread: Some(thread),
    }
}

impl TestVm {
    fn passes(&self) -> u64 {
        self.mem
            .read_obj::<u64>(GuestAddress(MEMORY / 2 - 8))
            .unwrap_or(0)
    }
    fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        kick::kick(self.tid.load(Ordering::SeqCst) as libc::pthread_t);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.paused.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "vCPU did not pause");
            std::thread::yield_now();
        }
    }
    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
    /// Collects and resets the dirty pages; returns how many.
    fn collect(&mut self) -> u64 {
        match &mut self.ring {
            Some(r) => {
                let n = r.harvest();
                // SAFETY: a VM ioctl without argument.
                let reset = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
                assert!(
                    reset >= 0,
                    "KVM_RESET_DIRTY_RINGS: {}",
                    std::io::Error::last_os_error()
                );
                n
            }
            None => {
                let log = self.vm.get_dirty_log(0, MEMORY as usize).unwrap();
                memory::count_dirty(&log) as u64
            }
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        kick::kick(self.tid.load(Ordering::SeqCst) as libc::pthread_t);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Median collection time, pages per collection, mid-epoch ring-full stops.
fn measure(image: &Path, set: u64, ring: bool, samples: usize) -> (Duration, u64, u64) {
    let mut vm = build(image, set, ring);
    let deadline = Instant::now() + Duration::from_secs(120);
    let wait_passes = |vm: &mut TestVm, n: u64| {
        let p0 = vm.passes();
        while vm.passes() < p0 + n {
            assert!(Instant::now() < deadline, "guest made no progress");
            if vm.pause.load(Ordering::SeqCst) && vm.paused.load(Ordering::SeqCst) {
                // Ring full in mid-epoch: harvest so the guest can go on.
                vm.collect();
                vm.resume();
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    wait_passes(&mut vm, 2);
    vm.pause();
    vm.collect();
    vm.resume();
    vm.full_exits.store(0, Ordering::SeqCst);
    let mut times = Vec::new();
    let mut pages = Vec::new();
    for _ in 0..samples {
        wait_passes(&mut vm, 2);
        vm.pause();
        let t = Instant::now();
        let n = vm.collect();
        times.push(t.elapsed());
        vm.resume();
        pages.push(n);
    }
    times.sort();
    pages.sort();
    (
        times[times.len() / 2],
        pages[pages.len() / 2],
        vm.full_exits.load(Ordering::SeqCst),
    )
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if hypervisor::kvm::available().is_err() || unsafe { libc::geteuid() } != 0 {
        eprintln!("dirty_tracking bench: needs root and /dev/kvm; nothing measured");
        return;
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest-build");
    let images = hypervisor::guest_build::from_env_or_build(&target).expect("guest images");
    println!(
        "| dirty set | bitmap: collect | pages | ring: harvest + reset | pages | ring-full stops |"
    );
    println!("|---|---|---|---|---|---|");
    for set in [1_000u64, 10_000, 60_000, 100_000] {
        let samples = if set >= 60_000 { 7 } else { 15 };
        let (bt, bp, _) = measure(&images.counter, set, false, samples);
        let (rt, rp, full) = measure(&images.counter, set, true, samples);
        println!(
            "| {set} | {:.0} µs | {bp} | {:.0} µs | {rp} | {full} in {samples} epochs |",
            bt.as_secs_f64() * 1e6,
            rt.as_secs_f64() * 1e6
        );
    }
    println!("\n(medians; 1 GiB guest, 1 vCPU, ring of 65 536 entries; the ring's page counts can fall short when it filled in mid-epoch, those pages were harvested then)");
}
