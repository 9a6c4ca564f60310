//! The micro-VM's checkpoint state: every vCPU's registers and every
//! device's saved struct, and the versioned, self-describing blob they
//! travel in (to the backup site, over the WAN, into `state.bin`).
//!
//! Blob layout (all integers little-endian):
//!
//! ```text
//! magic      8 bytes  "RWVMSTAT"
//! format     u16      FORMAT_VERSION (1)
//! sections   u16      number of sections (<= MAX_SECTIONS)
//! reserved   u32      0
//! table      sections x { kind u16, version u16, length u32 }
//! bodies     the sections, in table order, back to back
//! checksum   u64      xxh3-64 of every byte before it
//! ```
//!
//! Section kinds, each with its own version (all 1 today): `VM` (vCPU
//! count, RAM size, TSC kHz, KVM clock, ready flag), `VCPU` (one per vCPU:
//! regs, sregs, FPU, XSAVE area, XCRs, debug registers, vCPU events, MP
//! state, MSRs, CPUID, whether the guest parked it), `CONSOLE`, `TRANSPORT` (one
//! per virtio-mmio window), `NET` (incl. received frames not yet
//! delivered), `BLOCK`. KVM structs are stored as their bytes in the Linux
//! x86_64 KVM ABI (a stable ABI; little-endian; zerocopy proves they have
//! no implicit padding). The decoder refuses bad magic, unknown format or
//! section versions, unknown section kinds, checksum mismatches, truncated
//! or oversize fields and trailing bytes, with a [`StateError`]; it never
//! panics (fuzzed: `hypervisor/fuzz`, target `decode_state`).

mod wire;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs,
};
use virtio_queue::QueueState;

use super::devices::block::BlockState;
use super::devices::console::ConsoleState;
use super::devices::net::NetState;
use super::devices::virtio::mmio::MmioTransportState;
use wire::{Reader, Writer};

/// First bytes of every state blob.
pub const MAGIC: [u8; 8] = *b"RWVMSTAT";
/// Blob format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Most sections a blob may have.
pub const MAX_SECTIONS: usize = 128;
/// Size of the legacy XSAVE area (`struct kvm_xsave`).
pub const XSAVE_SIZE: usize = 4096;

const HEADER: usize = 16;
const TRAILER: usize = 8;

const KIND_VM: u16 = 1;
const KIND_VCPU: u16 = 2;
const KIND_CONSOLE: u16 = 3;
const KIND_TRANSPORT: u16 = 4;
const KIND_NET: u16 = 5;
const KIND_BLOCK: u16 = 6;

const MAX_VCPUS: usize = 64;
const MAX_MSRS: usize = 1024;
const MAX_CPUID: usize = 256;
const MAX_QUEUES: usize = 16;
const MAX_TRANSPORTS: usize = 8;
const MAX_CONSOLE_PARTIAL: usize = 64 * 1024;
const MAX_PENDING_FRAMES: usize = 4096;
const MAX_FRAME: usize = 65536;

/// Why a state blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("not a micro-VM state blob (bad magic)")]
    BadMagic,
    #[error("state blob format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("state blob checksum mismatch (corrupted)")]
    Checksum,
    #[error("state blob truncated in {0}")]
    Truncated(&'static str),
    #[error("unknown state section kind {0}")]
    UnknownSection(u16),
    #[error("state section {kind} has version {version}, not supported")]
    UnsupportedSectionVersion { kind: u16, version: u16 },
    #[error("malformed state section {section}: {what}")]
    Malformed { section: &'static str, what: String },
}

/// The KVM clock of the VM (`KVM_GET_CLOCK`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockState {
    pub clock: u64,
    pub flags: u32,
}

/// Everything KVM keeps about one vCPU that the guest can observe.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuState {
    /// vCPU index (0-based, dense).
    pub index: u32,
    /// The guest parked this vCPU (`PORT_PARK`): it stays parked.
    pub parked: bool,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// The legacy XSAVE area (x87, SSE, AVX, header).
    pub xsave: Vec<u8>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// `(index, value)` of every MSR KVM lists that could be read.
    pub msrs: Vec<(u32, u64)>,
    /// The CPUID the guest was given (what it may have based decisions
    /// on: the replica must offer the same).
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// One virtio-mmio transport, in window order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportState {
    /// Virtio device id behind it.
    pub device_type: u32,
    pub regs: MmioTransportState,
}

/// A whole micro-VM, except its RAM and disk contents.
#[derive(Debug, Clone, PartialEq)]
pub struct VmState {
    /// Bytes of RAM.
    pub mem_size: u64,
    /// TSC frequency the guest was told (kHz).
    pub tsc_khz: u32,
    /// The guest had reported ready.
    pub ready: bool,
    pub clock: Option<ClockState>,
    pub vcpus: Vec<VcpuState>,
    pub console: ConsoleState,
    pub transports: Vec<TransportState>,
    pub net: Option<NetState>,
    pub block: Option<BlockState>,
}

fn put_queue(w: &mut Writer, q: &QueueState) {
    w.u16(q.max_size);
    w.u16(q.next_avail);
    w.u16(q.next_used);
    w.u8(u8::from(q.event_idx_enabled));
    w.u16(q.size);
    w.u8(u8::from(q.ready));
    w.u64(q.desc_table);
    w.u64(q.avail_ring);
    w.u64(q.used_ring);
}

fn get_queue(r: &mut Reader) -> Result<QueueState, StateError> {
    Ok(QueueState {
        max_size: r.u16()?,
        next_avail: r.u16()?,
        next_used: r.u16()?,
        event_idx_enabled: r.bool()?,
        size: r.u16()?,
        ready: r.bool()?,
        desc_table: r.u64()?,
        avail_ring: r.u64()?,
        used_ring: r.u64()?,
    })
}

fn put_queues(w: &mut Writer, qs: &[QueueState]) {
    w.u32(qs.len() as u32);
    for q in qs {
        put_queue(w, q);
    }
}

fn get_queues(r: &mut Reader) -> Result<Vec<QueueState>, StateError> {
    let n = r.count(MAX_QUEUES)?;
    (0..n).map(|_| get_queue(r)).collect()
}

fn put_fpu(w: &mut Writer, f: &kvm_fpu) {
    for reg in &f.fpr {
        w.bytes(reg);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u8(f.pad1);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for reg in &f.xmm {
        w.bytes(reg);
    }
    w.u32(f.mxcsr);
    w.u32(f.pad2);
}

fn get_fpu(r: &mut Reader) -> Result<kvm_fpu, StateError> {
    let mut f = kvm_fpu::default();
    for reg in &mut f.fpr {
        *reg = r.bytes()?;
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.u8()?;
    f.pad1 = r.u8()?;
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for reg in &mut f.xmm {
        *reg = r.bytes()?;
    }
    f.mxcsr = r.u32()?;
    f.pad2 = r.u32()?;
    Ok(f)
}

fn put_vcpu(w: &mut Writer, v: &VcpuState) {
    w.u32(v.index);
    w.u8(u8::from(v.parked));
    w.pod(&v.regs);
    w.pod(&v.sregs);
    put_fpu(w, &v.fpu);
    w.blob(&v.xsave);
    w.pod(&v.xcrs);
    w.pod(&v.debugregs);
    w.pod(&v.events);
    w.pod(&v.mp_state);
    w.u32(v.msrs.len() as u32);
    for &(i, d) in &v.msrs {
        w.u32(i);
        w.u64(d);
    }
    w.u32(v.cpuid.len() as u32);
    for e in &v.cpuid {
        w.pod(e);
    }
}

fn get_vcpu(r: &mut Reader) -> Result<VcpuState, StateError> {
    let index = r.u32()?;
    let parked = r.bool()?;
    let regs = r.pod()?;
    let sregs = r.pod()?;
    let fpu = get_fpu(r)?;
    let xsave = r.blob(XSAVE_SIZE)?;
    if xsave.len() != XSAVE_SIZE {
        return Err(r.malformed(format!("XSAVE area of {} bytes", xsave.len())));
    }
    let xsave = xsave.to_vec();
    let xcrs: kvm_xcrs = r.pod()?;
    if xcrs.nr_xcrs as usize > xcrs.xcrs.len() {
        return Err(r.malformed(format!("{} XCRs", xcrs.nr_xcrs)));
    }
    let debugregs = r.pod()?;
    let events = r.pod()?;
    let mp_state = r.pod()?;
    let n = r.count(MAX_MSRS)?;
    let mut msrs = Vec::with_capacity(n);
    for _ in 0..n {
        msrs.push((r.u32()?, r.u64()?));
    }
    let n = r.count(MAX_CPUID)?;
    let mut cpuid = Vec::with_capacity(n);
    for _ in 0..n {
        cpuid.push(r.pod()?);
    }
    Ok(VcpuState {
        index,
        parked,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        events,
        mp_state,
        msrs,
        cpuid,
    })
}

fn put_net(w: &mut Writer, n: &NetState) {
    w.bytes(&n.mac);
    w.u64(n.acked_features);
    w.u8(u8::from(n.activated));
    put_queues(w, &n.queues);
    w.u32(n.pending_rx.len() as u32);
    for f in &n.pending_rx {
        w.blob(f);
    }
}

fn get_net(r: &mut Reader) -> Result<NetState, StateError> {
    let mac = r.bytes()?;
    let acked_features = r.u64()?;
    let activated = r.bool()?;
    let queues = get_queues(r)?;
    let n = r.count(MAX_PENDING_FRAMES)?;
    let mut pending_rx = Vec::with_capacity(n);
    for _ in 0..n {
        pending_rx.push(r.blob(MAX_FRAME)?.to_vec());
    }
    Ok(NetState {
        mac,
        acked_features,
        queues,
        activated,
        pending_rx,
    })
}

fn put_block(w: &mut Writer, b: &BlockState) {
    w.u64(b.capacity);
    w.u64(b.acked_features);
    w.u8(u8::from(b.activated));
    put_queues(w, &b.queues);
}

fn get_block(r: &mut Reader) -> Result<BlockState, StateError> {
    Ok(BlockState {
        capacity: r.u64()?,
        acked_features: r.u64()?,
        activated: r.bool()?,
        queues: get_queues(r)?,
    })
}

fn put_transport(w: &mut Writer, t: &TransportState) {
    w.u32(t.device_type);
    let s = &t.regs;
    for v in [
        s.features_select,
        s.acked_features_select,
        s.queue_select,
        s.device_status,
        s.config_generation,
        s.interrupt_status,
    ] {
        w.u32(v);
    }
}

fn get_transport(r: &mut Reader) -> Result<TransportState, StateError> {
    Ok(TransportState {
        device_type: r.u32()?,
        regs: MmioTransportState {
            features_select: r.u32()?,
            acked_features_select: r.u32()?,
            queue_select: r.u32()?,
            device_status: r.u32()?,
            config_generation: r.u32()?,
            interrupt_status: r.u32()?,
        },
    })
}

impl VmState {
    /// Appends the blob to `out` (which it clears first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut sections: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut section = |kind: u16, f: &dyn Fn(&mut Writer)| {
            let mut body = Vec::new();
            f(&mut Writer(&mut body));
            sections.push((kind, body));
        };
        section(KIND_VM, &|w| {
            w.u32(self.vcpus.len() as u32);
            w.u64(self.mem_size);
            w.u32(self.tsc_khz);
            w.u8(u8::from(self.ready));
            match &self.clock {
                Some(c) => {
                    w.u8(1);
                    w.u64(c.clock);
                    w.u32(c.flags);
                }
                None => w.u8(0),
            }
        });
        for v in &self.vcpus {
            section(KIND_VCPU, &|w| put_vcpu(w, v));
        }
        section(KIND_CONSOLE, &|w| w.blob(&self.console.partial));
        for t in &self.transports {
            section(KIND_TRANSPORT, &|w| put_transport(w, t));
        }
        if let Some(n) = &self.net {
            section(KIND_NET, &|w| put_net(w, n));
        }
        if let Some(b) = &self.block {
            section(KIND_BLOCK, &|w| put_block(w, b));
        }
        out.clear();
        let mut w = Writer(out);
        w.bytes(&MAGIC);
        w.u16(FORMAT_VERSION);
        w.u16(sections.len() as u16);
        w.u32(0);
        for (kind, body) in &sections {
            w.u16(*kind);
            w.u16(1);
            w.u32(body.len() as u32);
        }
        for (_, body) in &sections {
            w.bytes(body);
        }
        let sum = xxhash_rust::xxh3::xxh3_64(out);
        out.extend_from_slice(&sum.to_le_bytes());
    }

    /// The blob as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes and checks a blob.
    pub fn decode(blob: &[u8]) -> Result<VmState, StateError> {
        if blob.len() < MAGIC.len() || blob[..MAGIC.len()] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let mut r = Reader::new(&blob[MAGIC.len()..], "header");
        let version = r.u16()?;
        if version != FORMAT_VERSION {
            return Err(StateError::UnsupportedVersion(version));
        }
        if blob.len() < HEADER + TRAILER {
            return Err(StateError::Truncated("header"));
        }
        let (body, sum) = blob.split_at(blob.len() - TRAILER);
        let mut sum_bytes = [0u8; 8];
        sum_bytes.copy_from_slice(sum);
        if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(sum_bytes) {
            return Err(StateError::Checksum);
        }
        let mut r = Reader::new(&body[MAGIC.len() + 2..], "header");
        let count = usize::from(r.u16()?);
        if count > MAX_SECTIONS {
            return Err(r.malformed(format!("{count} sections")));
        }
        if r.u32()? != 0 {
            return Err(r.malformed("reserved field is not zero".into()));
        }
        let mut table = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = r.u16()?;
            let version = r.u16()?;
            let len = r.u32()? as usize;
            if !(KIND_VM..=KIND_BLOCK).contains(&kind) {
                return Err(StateError::UnknownSection(kind));
            }
            if version != 1 {
                return Err(StateError::UnsupportedSectionVersion { kind, version });
            }
            table.push((kind, len));
        }
        let total: usize = table.iter().map(|&(_, l)| l).sum();
        if total != r.remaining() {
            return Err(r.malformed(format!(
                "sections add up to {total} bytes, blob has {}",
                r.remaining()
            )));
        }
        let mut vm: Option<(usize, u64, u32, bool, Option<ClockState>)> = None;
        let mut vcpus = Vec::new();
        let mut console = None;
        let mut transports = Vec::new();
        let mut net = None;
        let mut block = None;
        for (kind, len) in table {
            let body = r.take(len)?;
            match kind {
                KIND_VM => {
                    let mut s = Reader::new(body, "vm");
                    if vm.is_some() {
                        return Err(s.malformed("two VM sections".into()));
                    }
                    let n = s.count(MAX_VCPUS)?;
                    let mem = s.u64()?;
                    let tsc = s.u32()?;
                    let ready = s.bool()?;
                    let clock = if s.bool()? {
                        Some(ClockState {
                            clock: s.u64()?,
                            flags: s.u32()?,
                        })
                    } else {
                        None
                    };
                    s.finish()?;
                    vm = Some((n, mem, tsc, ready, clock));
                }
                KIND_VCPU => {
                    let mut s = Reader::new(body, "vcpu");
                    let v = get_vcpu(&mut s)?;
                    s.finish()?;
                    if v.index as usize != vcpus.len() || vcpus.len() >= MAX_VCPUS {
                        return Err(StateError::Malformed {
                            section: "vcpu",
                            what: format!("vCPU {} out of order", v.index),
                        });
                    }
                    vcpus.push(v);
                }
                KIND_CONSOLE => {
                    let mut s = Reader::new(body, "console");
                    if console.is_some() {
                        return Err(s.malformed("two console sections".into()));
                    }
                    let partial = s.blob(MAX_CONSOLE_PARTIAL)?.to_vec();
                    s.finish()?;
                    console = Some(ConsoleState { partial });
                }
                KIND_TRANSPORT => {
                    let mut s = Reader::new(body, "transport");
                    if transports.len() >= MAX_TRANSPORTS {
                        return Err(s.malformed("too many transports".into()));
                    }
                    let t = get_transport(&mut s)?;
                    s.finish()?;
                    transports.push(t);
                }
                KIND_NET => {
                    let mut s = Reader::new(body, "net");
                    if net.is_some() {
                        return Err(s.malformed("two net sections".into()));
                    }
                    let n = get_net(&mut s)?;
                    s.finish()?;
                    net = Some(n);
                }
                _ => {
                    let mut s = Reader::new(body, "block");
                    if block.is_some() {
                        return Err(s.malformed("two block sections".into()));
                    }
                    let b = get_block(&mut s)?;
                    s.finish()?;
                    block = Some(b);
                }
            }
        }
        let Some((n, mem_size, tsc_khz, ready, clock)) = vm else {
            return Err(StateError::Malformed {
                section: "vm",
                what: "missing".into(),
            });
        };
        if n != vcpus.len() || n == 0 {
            return Err(StateError::Malformed {
                section: "vm",
                what: format!("{n} vCPUs announced, {} present", vcpus.len()),
            });
        }
        let Some(console) = console else {
            return Err(StateError::Malformed {
                section: "console",
                what: "missing".into(),
            });
        };
        Ok(VmState {
            mem_size,
            tsc_khz,
            ready,
            clock,
            vcpus,
            console,
            transports,
            net,
            block,
        })
    }
}

/// Recomputes the trailing checksum of a blob in place (for tests and the
/// fuzzer, to reach the checks behind it); too short a blob is left alone.
pub fn seal_checksum(blob: &mut [u8]) {
    if blob.len() < HEADER + TRAILER {
        return;
    }
    let n = blob.len() - TRAILER;
    let sum = xxhash_rust::xxh3::xxh3_64(&blob[..n]);
    blob[n..].copy_from_slice(&sum.to_le_bytes());
}

#[cfg(test)]
mod tests;
