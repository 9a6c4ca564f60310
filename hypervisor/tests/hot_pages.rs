//! Hot pages (manual dirty-log protection, `hypervisor::kvm::hot_pages`)
//! against the checkpoint's invariant: after every checkpoint the replica
//! (pages applied) equals the guest memory at the pause, whether the pages
//! the guest writes are hot, cooling, over the budget, or the policy is off.
//!
//! The counter guest in mode 5 rewrites one u64 in each page of its set,
//! pass after pass, and counts passes in the u64 below the set; between two
//! checkpoints the tests wait until the guest has made a whole pass (so
//! every page of the set was written in the epoch), not for a duration.

mod common;

use std::time::{Duration, Instant};

use hypervisor::kvm::hot_pages::HotStats;
use hypervisor::kvm::{HotPagesConfig, Vm, VmSpec, Workload};
use hypervisor::vm_memory::{Bytes, GuestAddress};
use hypervisor::{Checkpoint, ProtectedGuest};

const MEMORY_MIB: u64 = 32;
const SET_PAGES: u64 = 64;
/// Where mode 5 puts its set (half of RAM), and its pass counter (the u64
/// just below).
const SET_BASE: u64 = (MEMORY_MIB << 20) / 2;
const FIRST_SET_FRAME: u64 = SET_BASE / 4096;

fn spec(hot: HotPagesConfig) -> VmSpec {
    VmSpec::new("hot", &common::images().counter)
        .memory_mib(MEMORY_MIB)
        .guest_arg(5)
        .workload(Workload {
            dirty_set_pages: SET_PAGES,
            dirty_pages_per_ms: 0,
        })
        .hot_pages(hot)
}

fn set_frames() -> impl Iterator<Item = u64> {
    FIRST_SET_FRAME..FIRST_SET_FRAME + SET_PAGES
}

/// A VM under checkpoints, with the replica they build.
struct Harness {
    vm: Vm,
    replica: Vec<u8>,
    at_pause: Vec<u8>,
    cp: Checkpoint,
    epochs: usize,
    /// Passes done when the last pre-copy round had read the log.
    precopy_mark: u64,
}

impl Harness {
    fn start(hot: HotPagesConfig) -> Harness {
        let vm = Vm::start(&spec(hot), Default::default()).expect("start");
        vm.wait_ready(Duration::from_secs(60)).expect("ready");
        let replica = vec![0u8; vm.frame_count() as usize * vm.page_size()];
        Harness {
            vm,
            replica,
            at_pause: Vec::new(),
            cp: Checkpoint::default(),
            epochs: 0,
            precopy_mark: 0,
        }
    }

    fn passes(&self) -> u64 {
        self.vm
            .memory()
            .read_obj::<u64>(GuestAddress(SET_BASE - 8))
            .expect("pass counter")
    }

    /// Waits (bounded) until the guest has made a whole pass over its set
    /// since the last checkpoint's pause and the last pre-copy round (which
    /// cleared the pages it found).
    fn wait_for_a_pass(&self) {
        let at_pause = self
            .at_pause
            .get(SET_BASE as usize - 8..SET_BASE as usize)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
        let since = at_pause.max(self.precopy_mark);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.passes() < since + 2 {
            assert!(Instant::now() < deadline, "the guest stopped making passes");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One checkpoint; checks the replica against the guest at the pause.
    fn checkpoint(&mut self) {
        let mem = self.vm.memory().clone();
        let at_pause = &mut self.at_pause;
        self.vm
            .checkpoint(&mut self.cp, &mut || {
                common::snapshot_memory(&mem, at_pause);
            })
            .expect("checkpoint");
        self.apply_and_check("checkpoint");
        self.epochs += 1;
    }

    fn apply_and_check(&mut self, what: &str) {
        let ps = self.vm.page_size();
        assert!(self.cp.frames.windows(2).all(|w| w[0] < w[1]));
        common::apply_pages(&mut self.replica, &self.cp, ps);
        if let Some(p) = common::first_difference(&self.replica, &self.at_pause, ps) {
            panic!(
                "{what} {}: replica page {p} differs from the guest's ({} pages sent, {:?})",
                self.epochs,
                self.cp.frames.len(),
                self.vm.hot_pages()
            );
        }
    }

    /// A pre-copy round while the guest runs (contents may be torn; the
    /// next checkpoint settles them).
    fn precopy(&mut self) {
        let mut pre = Checkpoint::default();
        self.vm.precopy_round(1000, &mut pre).expect("pre-copy");
        self.precopy_mark = self.passes();
        common::apply_pages(&mut self.replica, &pre, self.vm.page_size());
    }

    fn hot(&self) -> HotStats {
        self.vm
            .hot_pages()
            .expect("this host's KVM has no manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
    }

    fn sent(&self, frame: u64) -> bool {
        self.cp.frames.binary_search(&frame).is_ok()
    }

    /// Checkpoints (after a whole pass each) until `done`; at most `max`.
    fn until(&mut self, max: usize, mut done: impl FnMut(&Harness) -> bool) -> usize {
        for i in 0..max {
            self.wait_for_a_pass();
            self.checkpoint();
            if done(self) {
                return i + 1;
            }
        }
        panic!(
            "not reached in {max} checkpoints: {:?}",
            self.vm.hot_pages()
        );
    }
}

#[test]
fn a_page_written_every_epoch_stays_hot_and_is_captured_at_every_checkpoint() {
    if !common::require_kvm_root() {
        return;
    }
    let mut h = Harness::start(HotPagesConfig::default());
    h.checkpoint();
    assert_eq!(
        h.cp.frames.len() as u64,
        h.vm.frame_count(),
        "full image first"
    );
    let n = h.until(20, |h| h.hot().hot as u64 >= SET_PAGES);
    eprintln!("whole set hot after {n} checkpoints: {:?}", h.hot());
    for i in 0..40 {
        if i % 5 == 2 {
            h.precopy();
        }
        h.wait_for_a_pass();
        h.checkpoint();
        for f in set_frames() {
            assert!(
                h.sent(f),
                "hot frame {f} not sent at checkpoint {}",
                h.epochs
            );
        }
        assert!(h.hot().hot as u64 >= SET_PAGES, "{:?}", h.hot());
    }
    assert_eq!(h.hot().cooled, 0, "pages rewritten every epoch never cool");
    // A resynchronisation starts over: everything is sent and cold.
    h.vm.restart_sync();
    h.checkpoint();
    assert_eq!(h.cp.frames.len() as u64, h.vm.frame_count());
    assert_eq!(h.hot().hot, 0);
    h.until(20, |h| h.hot().hot as u64 >= SET_PAGES);
    h.vm.shutdown().expect("stop");
}

#[test]
fn a_hot_page_that_stops_changing_cools_down_and_is_then_not_sent() {
    if !common::require_kvm_root() {
        return;
    }
    let mut h = Harness::start(HotPagesConfig::default());
    h.checkpoint();
    h.until(20, |h| h.hot().hot as u64 >= SET_PAGES);
    // The guest stops writing (held paused; checkpoints leave it so).
    h.vm.pause().expect("pause");
    let mut cooled_after = None;
    for i in 0..10 {
        h.checkpoint();
        if h.hot().hot == 0 {
            cooled_after = Some(i + 1);
            break;
        }
        // Still hot: reported and sent although unchanged.
        assert!(set_frames().all(|f| h.sent(f)));
    }
    let n = cooled_after.expect("hot pages never cooled");
    eprintln!("cooled after {n} unchanged checkpoints: {:?}", h.hot());
    assert!(h.hot().cooled >= SET_PAGES);
    // Write-protected again and untouched: nothing more to send.
    h.checkpoint();
    assert!(h.cp.frames.is_empty(), "sent {:?}", h.cp.frames);
    h.checkpoint();
    assert!(h.cp.frames.is_empty(), "sent {:?}", h.cp.frames);
    // Writes resume: they fault, are logged and sent, and the set heats up
    // again.
    h.vm.resume().expect("resume");
    h.until(20, |h| h.hot().hot as u64 >= SET_PAGES);
    h.vm.shutdown().expect("stop");
}

#[test]
fn the_budget_bounds_the_hot_set() {
    if !common::require_kvm_root() {
        return;
    }
    const BUDGET: usize = 16;
    let mut h = Harness::start(HotPagesConfig {
        max_pages: Some(BUDGET as u64),
        ..HotPagesConfig::default()
    });
    h.checkpoint();
    assert_eq!(h.hot().budget, BUDGET);
    h.until(20, |h| h.hot().hot == BUDGET);
    for _ in 0..20 {
        h.wait_for_a_pass();
        h.checkpoint();
        let s = h.hot();
        assert!(s.hot <= BUDGET, "{s:?}");
        // Hot or not, every page of the set was written and is sent.
        assert!(set_frames().all(|f| h.sent(f)));
    }
    assert!(h.hot().refused > 0);
    h.vm.shutdown().expect("stop");
}

#[test]
fn with_hot_pages_off_every_reported_page_is_write_protected_again() {
    if !common::require_kvm_root() {
        return;
    }
    let mut h = Harness::start(HotPagesConfig {
        enabled: false,
        ..HotPagesConfig::default()
    });
    assert!(h.vm.hot_pages().is_none());
    h.checkpoint();
    for i in 0..20 {
        if i % 5 == 2 {
            h.precopy();
        }
        h.wait_for_a_pass();
        h.checkpoint();
        assert!(set_frames().all(|f| h.sent(f)));
    }
    // Paused, nothing written: once the writes made before the pause are
    // sent, the log is empty and a checkpoint sends nothing at all.
    h.vm.pause().expect("pause");
    h.checkpoint();
    h.checkpoint();
    assert!(h.cp.frames.is_empty(), "sent {:?}", h.cp.frames);
    h.vm.resume().expect("resume");
    h.wait_for_a_pass();
    h.checkpoint();
    assert!(set_frames().all(|f| h.sent(f)));
    h.vm.shutdown().expect("stop");
}
