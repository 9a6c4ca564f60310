//! Assembles a micro-VM from a [`VmSpec`]: checks, memory, image, devices,
//! vCPUs, threads, in that order.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::abi::{self, BootInfo, MmioWindow};
use super::arch::{cpuid, gdt, layout, paging, regs};
use super::devices::block::Block;
use super::devices::bus::MmioBus;
use super::devices::console::Console;
use super::devices::doorbell::Doorbell;
use super::devices::net::{self, FrameSink, Net};
use super::devices::tap::Tap;
use super::devices::virtio::mmio::MmioTransport;
use super::devices::virtio::{TYPE_BLOCK, TYPE_NET};
use super::error::{Error, Result};
use super::kick;
use super::loader;
use super::memory::{self, GuestMemoryMmap};
use super::spec::{Seams, VmSpec};
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

fn setup_vcpu(kvm: &Kvm, vm: &VmFd, index: u8, entry: u64, stack_top: u64) -> Result<VcpuFd> {
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
    Ok(vcpu)
}

/// Builds the VM described by `spec` and starts its vCPUs.
pub fn start(spec: &VmSpec, seams: Seams) -> Result<Vm> {
    let started = Instant::now();
    let ram = validate(spec)?;
    kick::install().map_err(Error::io("installing the vCPU kick signal handler"))?;

    let kvm = Kvm::new().map_err(Error::KvmUnavailable)?;
    let vm_fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    // Needed by Intel hosts for any guest; three pages above the MMIO windows.
    vm_fd
        .set_tss_address(0xfffb_d000)
        .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    let mem = memory::create(&vm_fd, ram)?;
    write_fixed_area(&mem)?;
    let image = loader::load(&spec.guest_image, &mem, ram)?;
    let stacks = u64::from(spec.vcpus) * abi::STACK_SIZE;
    if image.end + MIN_HEAP > ram - stacks {
        return Err(Error::Spec(format!(
            "memory_mib {} is too small for the image ({:#x} bytes) plus heap and {} stacks",
            spec.memory_mib, image.end, spec.vcpus
        )));
    }

    let console = Console::new(
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
    let mut add_window = |device_id: u32, transport: MmioTransport, bus: &mut MmioBus| {
        let base = next_window;
        next_window += abi::MMIO_SIZE;
        bus.insert(base, abi::MMIO_SIZE, Arc::new(Mutex::new(transport)))
            .map_err(Error::Spec)?;
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
        tap_dev = Some(tap);
    }
    let mut block_dev = None;
    if let Some(path) = &spec.disk {
        let mut blk = Block::open(path).map_err(|source| Error::DiskImage {
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
    for i in 0..spec.vcpus {
        let top = ram - u64::from(i) * abi::STACK_SIZE;
        vcpus.push(setup_vcpu(&kvm, &vm_fd, i, image.entry, top)?);
    }
    let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);

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
    mem.write_obj(BootInfoBytes(info), GuestAddress(abi::BOOT_INFO))
        .map_err(|e| Error::Memory(e.to_string()))?;

    let shared = Arc::new(Shared::new(mem, bus, console, vcpus.len()));
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
        started,
    };
    for (i, fd) in vcpus.into_iter().enumerate() {
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu-{}-{i}", spec.name))
            .spawn(move || {
                sh.register_thread(i);
                vcpu::run(i, fd, sh);
            })
            .map_err(Error::io("spawning a vCPU thread"))?;
        vm.vcpu_threads.push(t);
    }
    tracing::info!(vm = %spec.name, ram, vcpus = spec.vcpus, entry = image.entry, "micro-VM started");
    Ok(vm)
}
