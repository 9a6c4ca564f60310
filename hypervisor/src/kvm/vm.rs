//! A running micro-VM: its vCPU threads, devices and the state they share.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};

use super::arch::snapshot;
use super::checkpoint::Tracker;
use super::devices::block::{Block, BlockStats};
use super::devices::bus::MmioBus;
use super::devices::console::Console;
use super::devices::doorbell::Doorbell;
use super::devices::net::{Net, NetStats};
use super::devices::tap::Tap;
use super::devices::virtio::mmio::MmioTransport;
use super::error::{Error, Result};
use super::kick;
use super::memory::{self, GuestMemoryMmap};
use super::state::VcpuState;

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The guest wrote its exit code to the exit port.
    Guest(u32),
    /// The VM was stopped from outside (`Vm::shutdown`, a signal).
    Stopped,
}

/// Exits to the VMM since start (all vCPUs).
#[derive(Debug, Default)]
pub(crate) struct ExitCounters {
    pub(crate) io: AtomicU64,
    pub(crate) mmio: AtomicU64,
}

/// Exit counts, for figures and diagnosis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O exits (console, idle, events).
    pub io: u64,
    /// MMIO exits (virtio registers and notifications).
    pub mmio: u64,
}

/// What a vCPU reports when it stops.
#[derive(Debug)]
pub(crate) enum Outcome {
    Exited(u32),
    Failed(Error),
}

#[derive(Debug, Default)]
struct Status {
    ready_at: Option<Instant>,
    outcome: Option<Outcome>,
    running: usize,
    threads: Vec<Option<libc::pthread_t>>,
    /// vCPU threads waiting at the pause point.
    paused: usize,
    /// While a capture is wanted: one slot per vCPU, filled by the vCPU
    /// thread itself (it owns its fd).
    capture: Option<Vec<Option<Result<VcpuState>>>>,
    /// Longest time one vCPU took to read its state (last capture).
    capture_time: Duration,
}

/// Why the vCPUs could not be paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PauseFail {
    /// The VM ended (or is stopping).
    NotRunning,
    /// Some vCPU did not reach the pause point in time.
    Timeout,
}

/// State shared by the vCPU threads and the `Vm` handle.
pub(crate) struct Shared {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) bus: MmioBus,
    pub(crate) doorbell: Doorbell,
    pub(crate) counters: ExitCounters,
    console: Mutex<Console>,
    stop: Arc<AtomicBool>,
    pause: AtomicBool,
    /// MSRs saved with each vCPU (those KVM lists that read back).
    pub(crate) msrs: Vec<u32>,
    /// The CPUID each vCPU was given.
    pub(crate) cpuid: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    status: Mutex<Status>,
    changed: Condvar,
}

impl Shared {
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        bus: MmioBus,
        console: Console,
        vcpus: usize,
        msrs: Vec<u32>,
        cpuid: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    ) -> Self {
        Shared {
            mem,
            bus,
            doorbell: Doorbell::default(),
            counters: ExitCounters::default(),
            console: Mutex::new(console),
            stop: Arc::new(AtomicBool::new(false)),
            pause: AtomicBool::new(false),
            msrs,
            cpuid,
            status: Mutex::new(Status {
                running: vcpus,
                threads: vec![None; vcpus],
                ..Default::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn console(&self) -> MutexGuard<'_, Console> {
        self.console.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self) {
        let mut s = self.status();
        s.ready_at.get_or_insert_with(Instant::now);
        self.changed.notify_all();
    }

    pub(crate) fn register_thread(&self, index: usize) {
        // SAFETY: pthread_self has no preconditions.
        let tid = unsafe { libc::pthread_self() };
        self.status().threads[index] = Some(tid);
    }

    /// Sets the stop flag and kicks every vCPU still running.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.doorbell.ring();
        let s = self.status();
        for tid in s.threads.iter().flatten() {
            // The thread clears its entry (under this lock) before it ends,
            // so every tid here is alive.
            kick::kick(*tid);
        }
        self.changed.notify_all();
    }

    pub(crate) fn vcpu_done(&self, index: usize, outcome: Option<Outcome>) {
        let ends_vm = outcome.is_some();
        {
            let mut s = self.status();
            s.threads[index] = None;
            s.running -= 1;
            if s.outcome.is_none() {
                s.outcome = outcome;
            }
        }
        if ends_vm {
            self.request_stop();
        }
        self.changed.notify_all();
    }

    /// Waits (a vCPU the guest parked) until the VM stops or a pause is
    /// requested.
    pub(crate) fn wait_parked(&self) {
        let mut s = self.status();
        while !self.stopping() && !self.pause_requested() {
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.status().ready_at.is_some()
    }

    pub(crate) fn is_running(&self) -> bool {
        let s = self.status();
        !self.stopping() && s.outcome.is_none() && s.running > 0
    }

    pub(crate) fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Asks every vCPU to stop at its pause point (kicks them out of
    /// KVM_RUN, wakes idle and parked ones). With `capture`, each vCPU
    /// thread reads its own state on the way in (it is running anyway; a
    /// second wake-up would cost a scheduling round on a loaded host).
    pub(crate) fn request_pause(&self, capture: bool) {
        let mut s = self.status();
        if capture {
            s.capture = Some((0..s.threads.len()).map(|_| None).collect());
            s.capture_time = Duration::ZERO;
        }
        self.pause.store(true, Ordering::Release);
        self.doorbell.ring();
        for tid in s.threads.iter().flatten() {
            kick::kick(*tid);
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Waits until every running vCPU is at its pause point.
    pub(crate) fn wait_paused(&self, timeout: Duration) -> std::result::Result<(), PauseFail> {
        let deadline = Instant::now() + timeout;
        let mut s = self.status();
        loop {
            if self.stopping() || s.outcome.is_some() || s.running == 0 {
                return Err(PauseFail::NotRunning);
            }
            if s.paused == s.running {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PauseFail::Timeout);
            }
            s = self
                .changed
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(20)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets paused vCPUs run again.
    pub(crate) fn resume_vcpus(&self) {
        self.pause.store(false, Ordering::Release);
        let mut s = self.status();
        s.capture = None;
        self.changed.notify_all();
    }

    /// The vCPU states read at this pause (asking the paused vCPUs for them
    /// if the pause was requested without capture), in vCPU index order,
    /// and the longest time one vCPU took to read its own.
    pub(crate) fn capture_vcpus(&self, timeout: Duration) -> Result<(Vec<VcpuState>, Duration)> {
        let deadline = Instant::now() + timeout;
        let mut s = self.status();
        if s.capture.is_none() {
            s.capture = Some((0..s.threads.len()).map(|_| None).collect());
            s.capture_time = Duration::ZERO;
            self.changed.notify_all();
        }
        loop {
            let done = s
                .capture
                .as_ref()
                .is_some_and(|c| c.iter().all(Option::is_some));
            if done {
                let slots = s.capture.take().unwrap_or_default();
                let states = slots.into_iter().flatten().collect::<Result<Vec<_>>>()?;
                return Ok((states, s.capture_time));
            }
            if self.stopping() {
                return Err(Error::VcpuFailed {
                    vcpu: 0,
                    what: "VM stopped during state capture".into(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                s.capture = None;
                return Err(Error::VcpuFailed {
                    vcpu: 0,
                    what: format!("vCPU state capture did not finish within {timeout:?}"),
                });
            }
            s = self
                .changed
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(20)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A vCPU thread waits here while the VM is paused, out of KVM_RUN with
    /// no I/O pending completion; it reads its own state when asked.
    pub(crate) fn pause_point(&self, index: usize, vcpu: &VcpuFd, parked: bool) {
        let mut s = self.status();
        let mut counted = false;
        while self.pause_requested() && !self.stopping() {
            let wanted = s
                .capture
                .as_ref()
                .is_some_and(|c| c.get(index).is_some_and(Option::is_none));
            if wanted {
                drop(s);
                let t = Instant::now();
                let cpuid = self.cpuid.get(index).map_or(&[][..], Vec::as_slice);
                let state = snapshot::capture(vcpu, index as u32, parked, &self.msrs, cpuid);
                let took = t.elapsed();
                s = self.status();
                if let Some(slot) = s.capture.as_mut().and_then(|c| c.get_mut(index)) {
                    *slot = Some(state);
                    s.capture_time = s.capture_time.max(took);
                }
                self.changed.notify_all();
                continue;
            }
            if !counted {
                counted = true;
                s.paused += 1;
                self.changed.notify_all();
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if counted {
            s.paused -= 1;
        }
        self.changed.notify_all();
    }
}

/// A running micro-VM. Dropping it stops it.
pub struct Vm {
    // Field order is drop order: the VM fd (and with it the memslots) goes
    // before the guest memory the slots point into.
    pub(crate) vm_fd: VmFd,
    pub(crate) name: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) vcpu_threads: Vec<JoinHandle<()>>,
    pub(crate) io_threads: Vec<JoinHandle<()>>,
    pub(crate) net: Option<Arc<Mutex<Net>>>,
    pub(crate) block: Option<Arc<Mutex<Block>>>,
    /// The virtio-mmio transports, in window order, with their device ids.
    pub(crate) transports: Vec<(u32, Arc<Mutex<MmioTransport>>)>,
    pub(crate) tap: Option<Tap>,
    pub(crate) tsc_khz: u32,
    pub(crate) started: Instant,
    /// Dirty tracking across checkpoints and pre-copy rounds.
    pub(crate) tracker: Tracker,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("name", &self.name).finish()
    }
}

impl Vm {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until the guest reports ready; returns the time from start.
    /// Fails if the VM ends first or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> std::result::Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.status();
        loop {
            if let Some(t) = s.ready_at {
                return Ok(t - self.started);
            }
            if let Some(o) = &s.outcome {
                return Err(format!("VM ended before it was ready: {o:?}"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("guest not ready after {timeout:?}"));
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` for the VM to end by itself; `true` if it did.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.status();
        loop {
            if s.outcome.is_some() || s.running == 0 || self.shared.stopping() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A handle that stops the VM from another thread or a signal watcher.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// Stops the VM (if still running), joins its threads and says how it
    /// ended; a guest fault or KVM failure is an error.
    pub fn shutdown(mut self) -> Result<Exit> {
        self.stop_and_join();
        let outcome = self.shared.status().outcome.take();
        match outcome {
            None => Ok(Exit::Stopped),
            Some(Outcome::Exited(code)) => Ok(Exit::Guest(code)),
            Some(Outcome::Failed(e)) => Err(e),
        }
    }

    fn stop_and_join(&mut self) {
        self.shared.request_stop();
        for t in self.vcpu_threads.drain(..).chain(self.io_threads.drain(..)) {
            let _ = t.join();
        }
    }

    /// Console lines printed so far.
    pub fn console_lines(&self) -> Vec<String> {
        self.shared.console().lines()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.shared.mem
    }

    /// Takes and clears the dirty-page log (guest and VMM writes). For
    /// tests and tools: the log it clears is the one checkpoints read, so a
    /// protected VM must not be asked for it between checkpoints.
    pub fn take_dirty_log(&self) -> Result<Vec<u64>> {
        // Hot pages cleared here are found cleared at the next checkpoint
        // and turn cold (`HotPages::drop_unreported`).
        memory::take_dirty_log(&self.vm_fd, &self.shared.mem, self.tracker.manual())
    }

    /// The tap of the network device: where the engine writes transmitted
    /// frames once their epoch has committed.
    pub fn tap(&self) -> Option<Tap> {
        self.tap.clone()
    }

    /// Exits to the VMM so far.
    pub fn exit_counts(&self) -> ExitCounts {
        ExitCounts {
            io: self.shared.counters.io.load(Ordering::Relaxed),
            mmio: self.shared.counters.mmio.load(Ordering::Relaxed),
        }
    }

    /// Counters of the network device.
    pub fn net_stats(&self) -> Option<NetStats> {
        self.net
            .as_ref()
            .map(|n| n.lock().unwrap_or_else(|e| e.into_inner()).stats())
    }

    /// Counters of the block device.
    pub fn block_stats(&self) -> Option<BlockStats> {
        self.block
            .as_ref()
            .map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).stats())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Stops a VM from elsewhere.
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Requests the stop; `Vm::wait` then returns and `Vm::shutdown` joins.
    pub fn stop(&self) {
        self.0.request_stop();
    }
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopper")
    }
}
