//! Optional CPU placement: the vCPU threads get a core of their own and the
//! rest of the process (replication: encoder, sender, the VM's device
//! workers) is kept off it, so a guest is not slowed by waiting for a CPU
//! behind its own protection. Off unless [`ENV_VCPU_CPU`] names a CPU: on a
//! small shared host, taking a core away from everything else can cost more
//! than it gives.

/// The CPU the vCPU threads run on (e.g. `1`); unset: no placement.
pub const ENV_VCPU_CPU: &str = "REMUS_WAN_VCPU_CPU";

/// The CPU named by [`ENV_VCPU_CPU`], if it is one this process may use.
pub fn vcpu_cpu() -> Option<usize> {
    let v = std::env::var(ENV_VCPU_CPU).ok()?;
    let cpu: usize = match v.trim().parse() {
        Ok(c) => c,
        Err(_) => {
            tracing::warn!("{ENV_VCPU_CPU}={v:?} is not a CPU number; no placement");
            return None;
        }
    };
    let allowed = current(0)?;
    // SAFETY: CPU_ISSET only reads the set; cpu is bounds-checked first.
    if cpu >= libc::CPU_SETSIZE as usize || !unsafe { libc::CPU_ISSET(cpu, &allowed) } {
        tracing::warn!("{ENV_VCPU_CPU}={cpu}: not a CPU this process may use; no placement");
        return None;
    }
    Some(cpu)
}

fn current(tid: libc::pid_t) -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain bits; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size passed is that of `set`, which the kernel fills.
    let r = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
    (r == 0).then_some(set)
}

fn set(tid: libc::pid_t, set: &libc::cpu_set_t) -> bool {
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) == 0 }
}

/// Moves every thread of this process off `cpu` (threads they start later
/// inherit that); a thread that ends meanwhile is skipped.
pub fn keep_others_off(cpu: usize) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(mut s) = current(tid) {
            // SAFETY: cpu < CPU_SETSIZE (checked by `vcpu_cpu`).
            unsafe { libc::CPU_CLR(cpu, &mut s) };
            // An empty set (only `cpu` allowed) is refused by the kernel
            // and the thread keeps its placement.
            set(tid, &s);
        }
    }
}

/// Pins the calling thread (a vCPU thread) to `cpu`.
pub fn pin_current(cpu: usize) {
    // SAFETY: cpu_set_t is plain bits; zeroed is the empty set.
    let mut s: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE (checked by `vcpu_cpu`).
    unsafe { libc::CPU_SET(cpu, &mut s) };
    if !set(0, &s) {
        tracing::warn!(
            "cannot pin the vCPU thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}
