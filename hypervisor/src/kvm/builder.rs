//! Assembles a micro-VM from a [`VmSpec`]: checks, memory, image, devices,
//! vCPUs, threads, in that order.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::abi::{self, BootInfo, MmioWindow};
use super::affinity;
use super::arch::{cpuid, gdt, layout, paging, regs, snapshot};
use super::checkpoint::Tracker;
use super::devices::block::Block;
use super::devices::bus::MmioBus;
use super::devices::console::Console;
use super::devices::doorbell::Doorbell;
use super::devices::net::{self, FrameSink, Net};
use super::devices::tap::Tap;
use super::devices::virtio::mmio::MmioTransport;
use super::devices::virtio::{TYPE_BLOCK, TYPE_NET};
use super::error::{Error, Result};
use super::hot_pages;
use super::kick;
use super::loader;
use super::memory::{self, GuestMemoryMmap};
use super::spec::{Seams, VmSpec};
use super::state::{VcpuState, VmState};
use super::vcpu;
use super::vm::{Shared, Vm};

/// Most vCPUs a micro-VM may have.
pub const MAX_VCPUS: u8 = 64;
/// Least heap the guest gets between its image and its stacks.
const MIN_HEAP: u64 = 4 << 20;

#[derive(Clone, Copy)]
struct BootInfoBytes(#[allow(dead_code)] BootInfo);
// SAFETY: BootInfo is repr(C), made of integers and arrays of integers, with
// explicit padding fields, so every byte pattern is valid.
unsafe impl ByteValued for BootInfoBytes {}

fn validate(spec: &VmSpec) -> Result<u64> {
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(Error::Spec(format!(
            "vcpus must be 1..={MAX_VCPUS}, got {}",
            spec.vcpus
        )));
    }
    let size = spec
        .memory_mib
        .checked_mul(1 << 20)
        .filter(|s| (layout::MIN_RAM..=layout::MAX_RAM).contains(s))
        .ok_or_else(|| {
            Error::Spec(format!(
                "memory_mib must be {}..={}, got {}",
                layout::MIN_RAM >> 20,
                layout::MAX_RAM >> 20,
                spec.memory_mib
            ))
        })?;
    if !spec.guest_image.is_file() {
        return Err(Error::GuestImage {
            path: spec.guest_image.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    if let Some(d) = &spec.disk {
        std::fs::metadata(d).map_err(|source| Error::DiskImage {
            path: d.clone(),
            source,
        })?;
    }
    Ok(size)
}

fn write_fixed_area(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    for (addr, entries) in paging::tables() {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        w(addr, &bytes)?;
    }
    let gdt: Vec<u8> = gdt::gdt_entries()
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    w(layout::GDT, &gdt)?;
    w(layout::TSS, &gdt::tss_bytes())
}

fn setup_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    index: u8,
    entry: u64,
    stack_top: u64,
) -> Result<(VcpuFd, Vec<kvm_bindings::kvm_cpuid_entry2>)> {
    let vcpu = vm
        .create_vcpu(u64::from(index))
        .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
    let cpuid = cpuid::for_vcpu(kvm, index).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("KVM_SET_CPUID2"))?;
    let sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&regs::sregs(sregs))
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs::regs(
        entry,
        stack_top,
        abi::BOOT_INFO,
        u64::from(index),
    ))
    .map_err(Error::kvm("KVM_SET_REGS"))?;
    vcpu.set_fpu(&regs::fpu())
        .map_err(Error::kvm("KVM_SET_FPU"))?;
    vcpu.set_xcrs(&regs::xcrs(cpuid::xcr0(&cpuid)))
        .map_err(Error::kvm("KVM_SET_XCRS"))?;
    Ok((vcpu, cpuid.as_slice().to_vec()))
}

/// How the VM's memory and vCPUs get their first contents.
enum Boot<'a> {
    /// Load the guest image and enter it.
    Fresh,
    /// Continue a checkpointed VM: its full memory image and state.
    Restore {
        memory: &'a [u8],
        state: &'a VmState,
    },
}

/// Builds the VM described by `spec` and starts its vCPUs.
pub fn start(spec: &VmSpec, seams: Seams) -> Result<Vm> {
    build(spec, seams, Boot::Fresh)
}

/// Builds a VM from a committed replica and runs it: `memory_image` is the
/// guest's whole RAM (`memory.img`), `state` the blob of the same
/// checkpoint (`state.bin`), and `spec` the VM's description on this site
/// (its disk is the replica's `disk.img`; its tap is created or attached in
/// the calling thread's network namespace). The blob is decoded and checked
/// against `spec` and the image before anything is created: a corrupt,
/// truncated or mismatched blob is an error ([`Error::State`] or
/// [`Error::Restore`]) and nothing was touched.
pub fn restore(spec: &VmSpec, memory_image: &[u8], state: &[u8], seams: Seams) -> Result<Vm> {
    let state = VmState::decode(state)?;
    let ram = validate(spec)?;
    let mismatch = |what: String| Err(Error::Restore(what));
    if memory_image.len() as u64 != ram || state.mem_size != ram {
        return mismatch(format!(
            "memory image has {} bytes, state says {}, the VM has {ram}",
            memory_image.len(),
            state.mem_size
        ));
    }
    if state.vcpus.len() != usize::from(spec.vcpus) {
        return mismatch(format!(
            "state has {} vCPUs, the VM has {}",
            state.vcpus.len(),
            spec.vcpus
        ));
    }
    if state.net.is_some() != spec.network.is_some() || state.block.is_some() != spec.disk.is_some()
    {
        return mismatch("the saved devices differ from the VM's (network, disk)".into());
    }
    build(
        spec,
        seams,
        Boot::Restore {
            memory: memory_image,
            state: &state,
        },
    )
}

fn restore_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    s: &VcpuState,
) -> Result<(VcpuFd, Vec<kvm_bindings::kvm_cpuid_entry2>)> {
    let index = s.index as u8;
    let vcpu = vm
        .create_vcpu(u64::from(index))
        .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
    let supported = cpuid::for_vcpu(kvm, index).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    // The guest keeps the CPUID it was given (if this host can offer it);
    // a state without one gets this host's.
    let cpuid = if s.cpuid.is_empty() {
        supported
    } else {
        snapshot::check_cpuid(&s.cpuid, &supported).map_err(Error::Restore)?
    };
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("KVM_SET_CPUID2"))?;
    snapshot::apply(&vcpu, s)?;
    Ok((vcpu, cpuid.as_slice().to_vec()))
}

/// Turns on manual dirty-log protection when the hot-page policy wants it
/// and KVM has it; otherwise says why the VM keeps the plain log (every
/// reported page write-protected again at each read).
fn manual_protection(vm_fd: &VmFd, spec: &VmSpec) -> bool {
    if !spec.hot_pages.enabled {
        tracing::info!(vm = %spec.name, "hot pages off ({}): every dirty page is write-protected again at each checkpoint", hot_pages::ENV_ENABLE);
        return false;
    }
    match memory::enable_manual_protect(vm_fd) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(vm = %spec.name, "hot pages unavailable, every dirty page is write-protected again at each checkpoint: {why}");
            false
        }
    }
}

fn build(spec: &VmSpec, seams: Seams, boot: Boot<'_>) -> Result<Vm> {
    let started = Instant::now();
    let ram = validate(spec)?;
    kick::install().map_err(Error::io("installing the vCPU kick signal handler"))?;

    let kvm = Kvm::new().map_err(Error::KvmUnavailable)?;
    let vm_fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    // Needed by Intel hosts for any guest; three pages above the MMIO windows.
    vm_fd
        .set_tss_address(0xfffb_d000)
        .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    let manual = manual_protection(&vm_fd, spec);
    let mem = memory::create(&vm_fd, ram)?;
    let entry = match boot {
        Boot::Fresh => {
            write_fixed_area(&mem)?;
            let image = loader::load(&spec.guest_image, &mem, ram)?;
            let stacks = u64::from(spec.vcpus) * abi::STACK_SIZE;
            if image.end + MIN_HEAP > ram - stacks {
                return Err(Error::Spec(format!(
                    "memory_mib {} is too small for the image ({:#x} bytes) plus heap and {} stacks",
                    spec.memory_mib, image.end, spec.vcpus
                )));
            }
            image.entry
        }
        Boot::Restore { memory, .. } => {
            mem.write_slice(memory, GuestAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))?;
            0
        }
    };

    let mut console = Console::new(
        &spec.name,
        spec.console.log_file.as_deref(),
        spec.console.to_terminal,
    )
    .map_err(Error::io("opening the console log"))?;

    let Seams {
        frame_sink,
        write_hook,
    } = seams;
    let mut bus = MmioBus::default();
    let mut windows = Vec::new();
    let mut next_window = abi::MMIO_BASE;
    let mut transports = Vec::new();
    let mut add_window = |device_id: u32, transport: MmioTransport, bus: &mut MmioBus| {
        let base = next_window;
        next_window += abi::MMIO_SIZE;
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(base, abi::MMIO_SIZE, transport.clone())
            .map_err(Error::Spec)?;
        transports.push((device_id, transport));
        windows.push(MmioWindow {
            base,
            size: abi::MMIO_SIZE,
            device_id,
            _pad: 0,
        });
        Ok::<(), Error>(())
    };

    let mut net_dev = None;
    let mut tap_dev = None;
    let mut tap_for_vm = None;
    if let Some(n) = &spec.network {
        let tap = Tap::open(&n.tap).map_err(|source| Error::Tap {
            name: n.tap.clone(),
            source,
        })?;
        let sink: Box<dyn FrameSink> = match frame_sink {
            Some(s) => s,
            None => Box::new(tap.clone()),
        };
        let dev = Arc::new(Mutex::new(Net::new(n.mac, sink)));
        add_window(
            TYPE_NET,
            MmioTransport::new(dev.clone(), mem.clone()),
            &mut bus,
        )?;
        net_dev = Some(dev);
        tap_for_vm = Some(tap.clone());
        tap_dev = Some(tap);
    }
    let mut block_dev = None;
    if let Some(path) = &spec.disk {
        let opened = match spec.disk_window {
            Some((base, len)) => Block::open_window(path, base, len),
            None => Block::open(path),
        };
        let mut blk = opened.map_err(|source| Error::DiskImage {
            path: path.clone(),
            source,
        })?;
        blk.set_write_hook(write_hook);
        let dev = Arc::new(Mutex::new(blk));
        add_window(
            TYPE_BLOCK,
            MmioTransport::new(dev.clone(), mem.clone()),
            &mut bus,
        )?;
        block_dev = Some(dev);
    }

    let mut vcpus = Vec::new();
    let mut cpuids = Vec::new();
    let mut parked = vec![false; usize::from(spec.vcpus)];
    let tsc_khz;
    match boot {
        Boot::Fresh => {
            for i in 0..spec.vcpus {
                let top = ram - u64::from(i) * abi::STACK_SIZE;
                let (fd, c) = setup_vcpu(&kvm, &vm_fd, i, entry, top)?;
                vcpus.push(fd);
                cpuids.push(c);
            }
            tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
        }
        Boot::Restore { state, .. } => {
            restore_devices(state, &mem, &mut console, &transports, &net_dev, &block_dev)
                .map_err(Error::Restore)?;
            for s in &state.vcpus {
                let (fd, c) = restore_vcpu(&kvm, &vm_fd, s)?;
                vcpus.push(fd);
                cpuids.push(c);
                parked[s.index as usize] = s.parked;
            }
            if let Some(c) = state.clock {
                let clock = kvm_bindings::kvm_clock_data {
                    clock: c.clock,
                    ..Default::default()
                };
                if let Err(e) = vm_fd.set_clock(&clock) {
                    tracing::debug!("KVM clock not restored: {e}");
                }
            }
            tsc_khz = state.tsc_khz;
        }
    }
    let msrs = snapshot::readable_msrs(&kvm, &vcpus[0])?;

    let mut info = BootInfo {
        magic: abi::BOOT_MAGIC,
        version: abi::BOOT_VERSION,
        vcpus: u32::from(spec.vcpus),
        mem_size: ram,
        tsc_khz: u64::from(tsc_khz),
        dirty_set_pages: spec.workload.dirty_set_pages,
        dirty_pages_per_ms: spec.workload.dirty_pages_per_ms,
        arg: spec.guest_arg,
        mmio_count: windows.len() as u64,
        ..Default::default()
    };
    info.mmio[..windows.len()].copy_from_slice(&windows);
    if let Some(n) = &spec.network {
        info.mac = n.mac;
        info.has_ipv4 = 1;
        info.ipv4 = n.address.octets();
        info.prefix_len = n.prefix_len;
        if let Some(g) = n.gateway {
            info.gateway = g.octets();
            info.has_gateway = 1;
        }
    }
    if let Boot::Fresh = boot {
        mem.write_obj(BootInfoBytes(info), GuestAddress(abi::BOOT_INFO))
            .map_err(|e| Error::Memory(e.to_string()))?;
    }

    let shared = Arc::new(Shared::new(mem, bus, console, vcpus.len(), msrs, cpuids));
    if let Boot::Restore { state, .. } = boot {
        if state.ready {
            shared.set_ready();
        }
    }
    let mut io_threads = Vec::new();
    if let (Some(tap), Some(dev)) = (tap_dev, &net_dev) {
        if spec.tx_worker {
            let kick = Doorbell::default();
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_tx_worker(kick.clone());
            io_threads.push(
                net::spawn_tx_worker(
                    dev.clone(),
                    kick,
                    shared.doorbell.clone(),
                    shared.stop_flag(),
                )
                .map_err(Error::io("spawning the network transmit thread"))?,
            );
        }
        io_threads.push(
            net::spawn_rx_pump(
                tap,
                dev.clone(),
                shared.doorbell.clone(),
                shared.stop_flag(),
            )
            .map_err(Error::io("spawning the network receive thread"))?,
        );
    }
    let mut vm = Vm {
        name: spec.name.clone(),
        shared: shared.clone(),
        vm_fd,
        vcpu_threads: Vec::new(),
        io_threads,
        net: net_dev,
        block: block_dev,
        transports,
        tap: tap_for_vm,
        tsc_khz,
        started,
        tracker: Tracker::new(manual, spec.hot_pages, ram / memory::PAGE_SIZE as u64),
    };
    let pin = affinity::vcpu_cpu();
    if let Some(cpu) = pin {
        tracing::info!(vm = %spec.name, cpu, "vCPU threads pinned, the rest of the process kept off that CPU ({})", affinity::ENV_VCPU_CPU);
        affinity::keep_others_off(cpu);
    }
    for (i, fd) in vcpus.into_iter().enumerate() {
        let sh = shared.clone();
        let parked = parked[i];
        let t = std::thread::Builder::new()
            .name(format!("vcpu-{}-{i}", spec.name))
            .spawn(move || {
                if let Some(cpu) = pin {
                    affinity::pin_current(cpu);
                }
                sh.register_thread(i);
                vcpu::run(i, fd, sh, parked);
            })
            .map_err(Error::io("spawning a vCPU thread"))?;
        vm.vcpu_threads.push(t);
    }
    tracing::info!(vm = %spec.name, ram, vcpus = spec.vcpus, entry, restored = matches!(boot, Boot::Restore { .. }), "micro-VM started");
    Ok(vm)
}

/// Puts the saved device states into the freshly built devices.
fn restore_devices(
    state: &VmState,
    mem: &GuestMemoryMmap,
    console: &mut Console,
    transports: &[(u32, Arc<Mutex<MmioTransport>>)],
    net: &Option<Arc<Mutex<Net>>>,
    block: &Option<Arc<Mutex<Block>>>,
) -> std::result::Result<(), String> {
    console.restore(&state.console);
    if state.transports.len() != transports.len()
        || state
            .transports
            .iter()
            .zip(transports)
            .any(|(s, (t, _))| s.device_type != *t)
    {
        return Err("the saved virtio-mmio devices differ from the VM's".into());
    }
    for (s, (_, t)) in state.transports.iter().zip(transports) {
        t.lock().unwrap_or_else(|e| e.into_inner()).restore(s.regs);
    }
    if let (Some(s), Some(n)) = (&state.net, net) {
        n.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(s, mem)
            .map_err(|e| format!("virtio-net: {e}"))?;
    }
    if let (Some(s), Some(b)) = (&state.block, block) {
        b.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(s, mem)
            .map_err(|e| format!("virtio-blk: {e}"))?;
    }
    Ok(())
}
