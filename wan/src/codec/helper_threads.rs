//! Helper threads kept for an encoder's or decoder's lifetime, lent to one
//! epoch at a time.
//!
//! Threads scoped to one epoch cost a spawn and a join per epoch: 15-30 µs
//! before a new thread runs here, on epochs of 0.5-2 ms (recorded traces
//! with two threads), and at the end the epoch must wait for a helper the
//! scheduler has not run yet, on a loaded machine up to a time slice, only
//! to see it find nothing left. These threads wait on a condition variable
//! between epochs. Each epoch is a round: the calling thread offers a job
//! to some of them and runs its own part; at its end it withdraws the
//! offer, so a thread that has not started by then never does, and waits
//! only for threads that did start (they hold real work).
//!
//! The job borrows the epoch's data (its pages, its queue), as a scoped
//! thread's closure would: [`HelperThreads::run`] does not return, nor
//! unwind, before every thread that took the job has left it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A round's job with its lifetime erased: see the safety note in
/// [`HelperThreads::run`].
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync + 'static));

// SAFETY: the pointee is `Sync` (shared by reference between threads), and
// it is only called while `run` keeps it alive.
unsafe impl Send for JobPtr {}

#[derive(Default)]
struct State {
    /// The current round's job; `None` between rounds.
    job: Option<JobPtr>,
    /// Round number, so that a thread takes at most one slot per round.
    round: u64,
    /// Slots of the current round not yet taken, and the next slot's index.
    slots_left: usize,
    next_slot: usize,
    /// Threads inside the job.
    running: usize,
    /// Jobs that panicked (the epoch's own bookkeeping recovers their work).
    panics: u64,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when a round starts or the threads must leave.
    offer: Condvar,
    /// Signalled when the last running thread leaves the job.
    left: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent; the job runs
        // outside the lock (and under `catch_unwind`).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Up to `max` threads, started on first use.
pub(crate) struct HelperThreads {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    max: usize,
    name: &'static str,
}

impl HelperThreads {
    pub(crate) fn new(max: usize, name: &'static str) -> Self {
        HelperThreads {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                offer: Condvar::new(),
                left: Condvar::new(),
            }),
            threads: Vec::new(),
            max,
            name,
        }
    }

    /// Runs `main` on the calling thread while up to `helpers` threads each
    /// call `job(slot)`, with a distinct `slot` in `0..helpers`. Returns
    /// `main`'s result once `main` has returned and every thread that
    /// started `job` has returned from it; the slots not started by then
    /// are not started at all. `main` must not depend on any helper
    /// starting: a thread may not be scheduled in time, or not exist
    /// (returns how many were offered the job, for the caller to size its
    /// work; it can be fewer than asked).
    pub(crate) fn run<R>(
        &mut self,
        helpers: usize,
        job: &(dyn Fn(usize) + Sync),
        main: impl FnOnce(usize) -> R,
    ) -> R {
        let helpers = self.start(helpers.min(self.max));
        if helpers == 0 {
            return main(0);
        }
        // SAFETY: the pointer is only dereferenced by a thread that took a
        // slot while `state.job` held it, and such a thread counts itself in
        // `running` until it has returned from the call. `Round::drop`,
        // which runs before this function returns or unwinds, clears
        // `state.job` and waits for `running` to reach zero: no call
        // outlives the borrow of `job`.
        let erased: *const (dyn Fn(usize) + Sync + '_) = job;
        let erased: *const (dyn Fn(usize) + Sync + 'static) =
            unsafe { std::mem::transmute(erased) };
        {
            let mut st = self.inner.lock();
            st.job = Some(JobPtr(erased));
            st.round = st.round.wrapping_add(1);
            st.slots_left = helpers;
            st.next_slot = 0;
        }
        self.inner.offer.notify_all();
        let _round = Round(&self.inner);
        main(helpers)
    }

    /// Jobs that panicked so far.
    #[cfg(test)]
    pub(crate) fn panics(&self) -> u64 {
        self.inner.lock().panics
    }

    /// Starts threads up to `want`; returns how many there are, at most `want`.
    fn start(&mut self, want: usize) -> usize {
        while self.threads.len() < want {
            let inner = Arc::clone(&self.inner);
            match std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || serve(&inner))
            {
                Ok(t) => self.threads.push(t),
                // Fewer threads; the calling thread does their share.
                Err(_) => break,
            }
        }
        self.threads.len().min(want)
    }
}

/// Ends a round: no slot is taken after it, and the threads in the job
/// have left it.
struct Round<'a>(&'a Inner);

impl Drop for Round<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.job = None;
        st.slots_left = 0;
        while st.running > 0 {
            st = self.0.left.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A helper thread: one slot per round until shutdown.
fn serve(inner: &Inner) {
    let mut last_round = 0;
    loop {
        let (job, slot) = {
            let mut st = inner.lock();
            loop {
                if st.shutdown {
                    return;
                }
                match st.job {
                    Some(job) if st.slots_left > 0 && st.round != last_round => {
                        last_round = st.round;
                        st.slots_left -= 1;
                        st.running += 1;
                        let slot = st.next_slot;
                        st.next_slot += 1;
                        break (job, slot);
                    }
                    _ => st = inner.offer.wait(st).unwrap_or_else(|e| e.into_inner()),
                }
            }
        };
        // SAFETY: see `HelperThreads::run`: the job is alive until this
        // thread leaves `running`, below.
        let ok = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)(slot) })).is_ok();
        let mut st = inner.lock();
        st.running -= 1;
        st.panics += u64::from(!ok);
        if st.running == 0 {
            inner.left.notify_all();
        }
    }
}

impl Drop for HelperThreads {
    fn drop(&mut self) {
        self.inner.lock().shutdown = true;
        self.inner.offer.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn each_slot_runs_at_most_once_per_round_on_borrowed_data() {
        let mut h = HelperThreads::new(3, "test-helper");
        for round in 0..200usize {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            let data = [round; 8];
            let job = |slot: usize| {
                assert_eq!(data[slot], round);
                hits[slot].fetch_add(1, Ordering::Relaxed);
            };
            let offered = h.run(3, &job, |n| n);
            assert_eq!(offered, 3);
            // Whatever ran has finished: the borrow of `data` is over.
            assert!(hits.iter().all(|c| c.load(Ordering::Relaxed) <= 1));
        }
        assert_eq!(h.panics(), 0);
    }

    #[test]
    fn run_waits_for_started_helpers() {
        let mut h = HelperThreads::new(2, "test-helper");
        let started = Barrier::new(3);
        let finished = AtomicUsize::new(0);
        let job = |_| {
            started.wait();
            // Still running when main returns: run must wait for it.
            std::thread::yield_now();
            finished.fetch_add(1, Ordering::SeqCst);
        };
        h.run(2, &job, |_| {
            started.wait();
        });
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panicking_job_is_counted_and_the_threads_serve_on() {
        let mut h = HelperThreads::new(1, "test-helper");
        let ran = AtomicUsize::new(0);
        let gate = Barrier::new(2);
        let bad = |_| {
            gate.wait();
            panic!("job failed");
        };
        h.run(1, &bad, |_| {
            gate.wait();
        });
        assert_eq!(h.panics(), 1);
        let good = |_| {
            gate.wait();
            ran.fetch_add(1, Ordering::SeqCst);
        };
        h.run(1, &good, |_| {
            gate.wait();
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn no_threads_means_main_alone() {
        let mut h = HelperThreads::new(0, "test-helper");
        let job = |_| unreachable!("no helper exists");
        assert_eq!(h.run(4, &job, |n| n), 0);
    }
}
