//! The interface between the replication engine and a guest backend.
//!
//! The engine never touches KVM (or QEMU, or Xen) directly: it drives a
//! [`ProtectedGuest`] on the primary site and calls a backend's restore
//! function on the replica side. Transmitted frames and disk writes do not
//! go through this trait: the engine hands the backend a frame sink and a
//! write hook when it builds the VM (see `seams::Seams`), and attributes what
//! they see to the epoch that is open at the time. [`ProtectedGuest::checkpoint`]
//! calls back at the instant the guest is quiescent, which is where the
//! engine closes one epoch and opens the next.

use std::time::Duration;

/// Where a checkpoint's pause time went (what the benchmark and `status`
/// report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PauseTimings {
    /// From the pause request until no vCPU or device worker runs.
    pub stop: Duration,
    /// Reading and resetting the dirty log.
    pub dirty_log: Duration,
    /// Copying dirty pages into the staging buffer.
    pub copy: Duration,
    /// Capturing vCPU and device state.
    pub state: Duration,
    /// Pause to resume, all included.
    pub total: Duration,
}

/// One checkpoint's worth of guest memory and state, copied out while the
/// guest was paused (so the guest resumes at once and the engine encodes
/// from this staging copy). Buffers are reused across epochs.
#[derive(Debug, Default, Clone)]
pub struct Checkpoint {
    /// Frames written since the previous checkpoint (guest and VMM
    /// writes alike), ascending.
    pub frames: Vec<u64>,
    /// Their contents: `frames.len() * page_size` bytes, in `frames` order.
    pub pages: Vec<u8>,
    /// Versioned, self-describing vCPU + VM + device state blob.
    pub state: Vec<u8>,
    pub timings: PauseTimings,
}

impl Checkpoint {
    pub fn clear(&mut self) {
        self.frames.clear();
        self.pages.clear();
        self.state.clear();
        self.timings = PauseTimings::default();
    }

    /// `(frame, content)` pairs, as the codec takes them.
    pub fn page_slices(&self, page_size: usize) -> impl Iterator<Item = (u64, &[u8])> {
        self.frames
            .iter()
            .zip(self.pages.chunks_exact(page_size))
            .map(|(&f, p)| (f, p))
    }
}

/// Errors a backend reports to the engine.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest is not running (it exited or was stopped)")]
    NotRunning,
    #[error("guest did not stop within {0:?}")]
    PauseTimeout(Duration),
    #[error("guest backend failure: {0}")]
    Backend(String),
}

/// A running guest the engine protects (primary side).
pub trait ProtectedGuest: Send {
    fn page_size(&self) -> usize;
    /// Guest memory size in pages.
    fn frame_count(&self) -> u64;

    /// One pre-copy round while the guest keeps running: the frames
    /// written since the previous round (all frames on the first call)
    /// and their current contents. Contents may be torn by concurrent
    /// guest writes; such frames are dirty again in the next round, and
    /// the final [`ProtectedGuest::checkpoint`] carries their settled
    /// contents. `max_frames` bounds one round's copy.
    fn precopy_round(&mut self, max_frames: usize, out: &mut Checkpoint) -> Result<(), GuestError>;

    /// A full resynchronisation starts: the backup builds a new replica
    /// from nothing, so the next pre-copy round (or checkpoint) carries
    /// every frame again, not only those written since the last one.
    fn restart_sync(&mut self);

    /// Pauses the guest (vCPUs and device workers), calls `at_pause` (the
    /// epoch boundary: nothing the guest does after it belongs to the
    /// closing epoch), copies dirty pages and state into `out`, resumes.
    fn checkpoint(
        &mut self,
        out: &mut Checkpoint,
        at_pause: &mut dyn FnMut(),
    ) -> Result<(), GuestError>;

    /// Pauses the guest until [`ProtectedGuest::resume`] (fencing,
    /// switchover, backpressure).
    fn pause(&mut self) -> Result<(), GuestError>;
    fn resume(&mut self) -> Result<(), GuestError>;

    /// Whether the guest is still running (it may exit on its own).
    fn is_running(&self) -> bool;

    /// Read access to guest memory for online verify and repair, used only
    /// while the guest is paused (inside [`ProtectedGuest::checkpoint`]'s
    /// `at_pause`). `None` (the default): this backend cannot give it, and
    /// verify covers the disk only.
    fn frame_reader(&self) -> Option<FrameReader> {
        None
    }
}

/// Copies guest frames `first..` into the buffer (a whole number of
/// pages). Consistent only while the guest is paused.
pub type FrameReader =
    std::sync::Arc<dyn Fn(u64, &mut [u8]) -> Result<(), GuestError> + Send + Sync>;
