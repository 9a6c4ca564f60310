//! Kicking a vCPU thread out of KVM_RUN: a real-time signal whose handler
//! (installed without SA_RESTART) sets `immediate_exit` in the thread's
//! `kvm_run`, so a kick that lands just before KVM_RUN is not lost either.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's mmapped kvm_run, registered
        // by `register_current` and cleared before it is unmapped.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler, SA_SIGINFO and no
        // SA_RESTART, so KVM_RUN returns EINTR.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(signal(), &act, std::ptr::null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error());
            }
        }
    });
    result
}

/// Registers the calling thread's `kvm_run` for kicks (null to clear).
pub fn register_current(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// Sends a kick to thread `tid` (which must not have been joined yet).
pub fn kick(tid: libc::pthread_t) {
    // SAFETY: the caller guarantees `tid` names a live, unjoined thread.
    unsafe { libc::pthread_kill(tid, signal()) };
}
