//! What the decoder needs from the replica, and a plain in-memory replica.

/// Read access to the replica's committed memory.
pub trait PageSource {
    /// Bytes per page; must equal the epoch's page size.
    fn page_size(&self) -> usize;
    /// Number of guest frames (memory size / page size).
    fn frame_count(&self) -> u64;
    /// The last epoch applied to this replica, `None` for a fresh one.
    fn committed_epoch(&self) -> Option<u64>;
    /// Committed content of `frame`. The decoder only asks for
    /// `frame < frame_count()`.
    fn page(&self, frame: u64) -> &[u8];
}

/// Write access used by [`StagedEpoch::apply`](super::StagedEpoch::apply).
pub trait PageSink {
    /// The page of `frame`, to be changed in place (`frame < frame_count`,
    /// guaranteed by the caller). Sparse deltas are XORed straight into it,
    /// so applying them touches only the changed bytes.
    fn page_mut(&mut self, frame: u64) -> &mut [u8];
    /// Called after all pages of `epoch` are written.
    fn set_committed_epoch(&mut self, epoch: u64);

    /// Replaces the content of `frame` (`data.len() == page_size`).
    fn write_page(&mut self, frame: u64, data: &[u8]) {
        self.page_mut(frame).copy_from_slice(data);
    }
    /// Fills `frame` with zeros.
    fn zero_page(&mut self, frame: u64) {
        self.page_mut(frame).fill(0);
    }
}

/// A guest image held in one contiguous `Vec<u8>`, for tests, benchmarks and
/// the demo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecMemory {
    page_size: usize,
    bytes: Vec<u8>,
    committed: Option<u64>,
}

impl VecMemory {
    /// A zero-filled image of `frames` pages.
    pub fn new(frames: u64, page_size: usize) -> Self {
        VecMemory {
            page_size,
            bytes: vec![0; frames as usize * page_size],
            committed: None,
        }
    }

    /// An image with the given content (its length is rounded down to whole pages).
    pub fn from_bytes(mut bytes: Vec<u8>, page_size: usize) -> Self {
        bytes.truncate(bytes.len() / page_size * page_size);
        VecMemory {
            page_size,
            bytes,
            committed: None,
        }
    }

    pub fn with_committed_epoch(mut self, epoch: Option<u64>) -> Self {
        self.committed = epoch;
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl PageSource for VecMemory {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn frame_count(&self) -> u64 {
        (self.bytes.len() / self.page_size) as u64
    }

    fn committed_epoch(&self) -> Option<u64> {
        self.committed
    }

    fn page(&self, frame: u64) -> &[u8] {
        let at = frame as usize * self.page_size;
        &self.bytes[at..at + self.page_size]
    }
}

impl PageSink for VecMemory {
    fn page_mut(&mut self, frame: u64) -> &mut [u8] {
        let at = frame as usize * self.page_size;
        &mut self.bytes[at..at + self.page_size]
    }

    fn set_committed_epoch(&mut self, epoch: u64) {
        self.committed = Some(epoch);
    }
}
