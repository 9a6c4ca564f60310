//! The vCPU thread: KVM_RUN, then dispatch each exit to the console ports
//! or the MMIO bus.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::abi;
use super::error::Error;
use super::kick;
use super::vm::{Outcome, Shared};

/// What the run loop does after an exit.
enum Control {
    Continue,
    Exit(u32),
    Park,
    Pause,
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn port_out(shared: &Shared, port: u16, data: &[u8], seen: &mut u64) -> Control {
    match port {
        abi::PORT_CONSOLE_BYTE => shared.console().write(&data[..data.len().min(1)]),
        abi::PORT_CONSOLE_FLUSH => {
            let len = (le_u32(data) as usize).min(abi::CONSOLE_BUF_SIZE);
            let mut buf = vec![0u8; len];
            if shared
                .mem
                .read_slice(&mut buf, GuestAddress(abi::CONSOLE_BUF))
                .is_ok()
            {
                shared.console().write(&buf);
            }
        }
        abi::PORT_EXIT => return Control::Exit(le_u32(data)),
        abi::PORT_PARK => return Control::Park,
        abi::PORT_IDLE => {
            let us = le_u32(data).min(abi::MAX_IDLE_US);
            shared
                .doorbell
                .wait(seen, Duration::from_micros(u64::from(us)), || {
                    shared.stopping() || shared.pause_requested()
                });
        }
        abi::PORT_EVENT => {
            if le_u32(data) == abi::EVENT_READY {
                shared.set_ready();
            }
        }
        _ => tracing::trace!("out to unknown port {port:#x}"),
    }
    Control::Continue
}

fn fault(vcpu: &VcpuFd, index: usize) -> Error {
    let (rip, rsp) = vcpu.get_regs().map(|r| (r.rip, r.rsp)).unwrap_or((0, 0));
    let cr2 = vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
    // With no IDT every exception escalates to a triple fault; KVM keeps the
    // vector of the first one in the exception slot of the vCPU events.
    match vcpu.get_vcpu_events() {
        Ok(ev) => Error::GuestFault {
            vcpu: index,
            vector: ev.exception.nr,
            error_code: if ev.exception.has_error_code != 0 {
                ev.exception.error_code
            } else {
                0
            },
            rip,
            rsp,
            cr2,
        },
        Err(_) => Error::VcpuFailed {
            vcpu: index,
            what: format!("guest shut down (triple fault) at rip {rip:#x}, rsp {rsp:#x}"),
        },
    }
}

/// Runs vCPU `index` until the VM stops; records the outcome. `parked`:
/// the guest had parked this vCPU (a restored VM), so it only waits.
pub fn run(index: usize, mut vcpu: VcpuFd, shared: Arc<Shared>, parked: bool) {
    kick::register_current(vcpu.get_kvm_run());
    let outcome = run_loop(index, &mut vcpu, &shared, parked);
    kick::register_current(std::ptr::null_mut());
    shared.vcpu_done(index, outcome);
}

fn run_loop(index: usize, vcpu: &mut VcpuFd, shared: &Shared, mut parked: bool) -> Option<Outcome> {
    // Doorbell generation this vCPU has seen (see PORT_IDLE).
    let mut seen = 0;
    loop {
        if shared.stopping() {
            return None;
        }
        if parked {
            shared.wait_parked();
            if shared.pause_requested() && !shared.stopping() {
                shared.pause_point(index, vcpu, true);
            }
            continue;
        }
        // A pause: re-enter KVM_RUN with immediate_exit set, so KVM
        // completes the I/O of the last exit (the register state is only
        // consistent after that) and returns EINTR without running guest
        // code; then wait at the pause point.
        if shared.pause_requested() {
            vcpu.set_kvm_immediate_exit(1);
        }
        let control = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.counters.io.fetch_add(1, Ordering::Relaxed);
                port_out(shared, port, data, &mut seen)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                tracing::trace!("in from unknown port {port:#x}");
                data.fill(0xff);
                Control::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.counters.mmio.fetch_add(1, Ordering::Relaxed);
                if !shared.bus.read(addr, data) {
                    tracing::debug!("vCPU {index}: MMIO read of unmapped {addr:#x}");
                    data.fill(0xff);
                }
                Control::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.counters.mmio.fetch_add(1, Ordering::Relaxed);
                if !shared.bus.write(addr, data) {
                    tracing::debug!("vCPU {index}: MMIO write to unmapped {addr:#x}");
                }
                Control::Continue
            }
            Ok(VcpuExit::Intr) => Control::Continue,
            Ok(VcpuExit::Shutdown) => return Some(Outcome::Failed(fault(vcpu, index))),
            Ok(VcpuExit::Hlt) => {
                return Some(Outcome::Failed(Error::VcpuFailed {
                    vcpu: index,
                    what: "guest halted with no interrupt source".into(),
                }))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(Outcome::Failed(Error::VcpuFailed {
                    vcpu: index,
                    what: format!("KVM could not enter the guest: hardware reason {reason:#x} on host cpu {cpu}"),
                }))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason says the `internal` member is valid.
                let sub = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                return Some(Outcome::Failed(Error::VcpuFailed {
                    vcpu: index,
                    what: format!("KVM internal error, suberror {sub}"),
                }));
            }
            Ok(other) => {
                return Some(Outcome::Failed(Error::VcpuFailed {
                    vcpu: index,
                    what: format!("unexpected exit {other:?}"),
                }))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if shared.pause_requested() {
                    Control::Pause
                } else {
                    Control::Continue
                }
            }
            Err(e) => {
                return Some(Outcome::Failed(Error::Kvm {
                    what: "KVM_RUN",
                    source: e,
                }))
            }
        };
        match control {
            Control::Continue => {}
            Control::Exit(code) => return Some(Outcome::Exited(code)),
            Control::Pause => shared.pause_point(index, vcpu, false),
            Control::Park => {
                // Complete the `out` (rip moves past it) so a state captured
                // while parked is clean, then only wait from now on.
                vcpu.set_kvm_immediate_exit(1);
                let _ = vcpu.run();
                vcpu.set_kvm_immediate_exit(0);
                parked = true;
            }
        }
    }
}
