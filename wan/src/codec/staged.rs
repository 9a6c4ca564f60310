//! A decoded, verified epoch waiting to be applied.
//!
//! Decoding builds the epoch's new page contents aside from the replica;
//! nothing is written until [`StagedEpoch::apply`], which cannot fail halfway:
//! it re-checks that the replica is still the one the epoch was verified
//! against, then writes every page.

use super::error::CodecError;
use super::fasthash::{map_with_capacity, U64Map};
use super::memory::{PageSink, PageSource};
use super::rle::{apply_xor, check_runs};

/// Where the new content of one staged frame lives. Raw pages and delta
/// runs stay in the decoded chunks they arrived in: no copy before apply.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Zero,
    /// Index of a whole page in `data`.
    Page(u32),
    /// A raw page at `chunks[chunk][at..at + page_size]`.
    Raw {
        chunk: u32,
        at: usize,
    },
    /// Verified XOR runs at `chunks[chunk][at..at + len]`, applied to the
    /// replica page in place.
    Delta {
        chunk: u32,
        at: usize,
        len: usize,
    },
}

/// One disk write of the epoch, to be applied by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What the caller still has to apply after the pages: device/vCPU state and
/// disk writes. The epoch counts as committed only once these are applied too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedEpoch {
    pub epoch: u64,
    pub state_blob: Vec<u8>,
    pub disk_writes: Vec<DiskWrite>,
}

/// A complete, checksum-verified epoch whose references all resolved.
#[derive(Debug)]
pub struct StagedEpoch {
    pub(crate) vm_id: u64,
    pub(crate) epoch: u64,
    pub(crate) base: Option<u64>,
    pub(crate) page_size: usize,
    pub(crate) frame_count: u64,
    frames: Vec<u64>,
    slots: Vec<Slot>,
    data: Vec<u8>,
    chunks: Vec<Vec<u8>>,
    index: U64Map<u32>,
    pub(crate) state_blob: Vec<u8>,
    pub(crate) disk_writes: Vec<DiskWrite>,
}

impl StagedEpoch {
    pub(crate) fn new(
        vm_id: u64,
        epoch: u64,
        base: Option<u64>,
        page_size: usize,
        frame_count: u64,
        expected_records: usize,
    ) -> Self {
        // The header's record count is untrusted: never pre-allocate page data
        // from it, only small per-record bookkeeping, and that capped too.
        let n = expected_records.min(1 << 16);
        StagedEpoch {
            vm_id,
            epoch,
            base,
            page_size,
            frame_count,
            frames: Vec::with_capacity(n),
            slots: Vec::with_capacity(n),
            data: Vec::new(),
            chunks: Vec::new(),
            index: map_with_capacity(n),
            state_blob: Vec::new(),
            disk_writes: Vec::new(),
        }
    }

    pub fn vm_id(&self) -> u64 {
        self.vm_id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch the replica must have committed for this one to apply.
    pub fn base_epoch(&self) -> Option<u64> {
        self.base
    }

    /// Pages this epoch writes.
    pub fn page_count(&self) -> usize {
        self.frames.len()
    }

    pub fn state_blob(&self) -> &[u8] {
        &self.state_blob
    }

    pub fn disk_writes(&self) -> &[DiskWrite] {
        &self.disk_writes
    }

    pub(crate) fn contains(&self, frame: u64) -> bool {
        self.index.contains_key(&frame)
    }

    fn register(&mut self, frame: u64, slot: Slot) -> Result<(), CodecError> {
        if self.index.insert(frame, self.frames.len() as u32).is_some() {
            return Err(CodecError::DuplicateFrame { frame });
        }
        self.frames.push(frame);
        self.slots.push(slot);
        Ok(())
    }

    pub(crate) fn push_zero(&mut self, frame: u64) -> Result<(), CodecError> {
        self.register(frame, Slot::Zero)
    }

    /// Adds a page slot for `frame` initialised with `content` and returns it
    /// for in-place completion (delta XOR, decompression).
    pub(crate) fn push_page(
        &mut self,
        frame: u64,
        content: &[u8],
    ) -> Result<&mut [u8], CodecError> {
        let slot = (self.data.len() / self.page_size) as u32;
        self.register(frame, Slot::Page(slot))?;
        self.data.extend_from_slice(content);
        let at = slot as usize * self.page_size;
        Ok(&mut self.data[at..at + self.page_size])
    }

    /// Adds `frame` as the raw page at `at` in decoded chunk `chunk`.
    pub(crate) fn push_raw(
        &mut self,
        frame: u64,
        chunk: usize,
        at: usize,
    ) -> Result<(), CodecError> {
        self.register(
            frame,
            Slot::Raw {
                chunk: chunk as u32,
                at,
            },
        )
    }

    /// Adds `frame` as XOR runs against its committed content; the runs are
    /// `runs`, found at `at` in decoded chunk `chunk`. They are checked here,
    /// so that applying them later cannot fail.
    pub(crate) fn push_delta(
        &mut self,
        frame: u64,
        chunk: usize,
        at: usize,
        runs: &[u8],
    ) -> Result<(), CodecError> {
        check_runs(runs, self.page_size)?;
        self.register(
            frame,
            Slot::Delta {
                chunk: chunk as u32,
                at,
                len: runs.len(),
            },
        )
    }

    /// Adds `frame` with the content staged `src` has at this point of the
    /// epoch; `src_committed` is the committed content of `src`, `chunks` the
    /// chunks decoded so far.
    pub(crate) fn push_copy_of_staged(
        &mut self,
        frame: u64,
        src: u64,
        src_committed: &[u8],
        chunks: &[Vec<u8>],
    ) -> Result<(), CodecError> {
        let Some(&i) = self.index.get(&src) else {
            return Err(CodecError::BadReference {
                frame,
                target: src,
                reason: "source not staged",
            });
        };
        let ps = self.page_size;
        let missing = || CodecError::corrupt("staged source outside its chunk");
        match self.slots[i as usize] {
            Slot::Zero => self.push_zero(frame),
            Slot::Page(p) => {
                let slot = (self.data.len() / ps) as u32;
                self.register(frame, Slot::Page(slot))?;
                let at = p as usize * ps;
                self.data.extend_from_within(at..at + ps);
                Ok(())
            }
            Slot::Raw { chunk, at } => {
                let page = chunks
                    .get(chunk as usize)
                    .and_then(|c| c.get(at..at + ps))
                    .ok_or_else(missing)?;
                self.push_page(frame, page)?;
                Ok(())
            }
            Slot::Delta { chunk, at, len } => {
                let runs = chunks
                    .get(chunk as usize)
                    .and_then(|c| c.get(at..at + len))
                    .ok_or_else(missing)?;
                let page = self.push_page(frame, src_committed)?;
                apply_xor(runs, page)
            }
        }
    }

    /// Hands over the decoded chunks that `Raw` and `Delta` slots point into.
    pub(crate) fn set_chunks(&mut self, chunks: Vec<Vec<u8>>) {
        self.chunks = chunks;
    }

    /// Writes the epoch into `replica` and marks it committed.
    ///
    /// Checked first, with nothing written on error: the replica has the page
    /// size and memory size the epoch was decoded against, and has committed
    /// exactly the epoch this one is based on.
    pub fn apply<R: PageSource + PageSink + ?Sized>(
        self,
        replica: &mut R,
    ) -> Result<AppliedEpoch, CodecError> {
        if replica.page_size() != self.page_size {
            return Err(CodecError::PageSizeMismatch {
                expected: replica.page_size() as u64,
                found: self.page_size as u64,
            });
        }
        if replica.frame_count() != self.frame_count {
            return Err(CodecError::corrupt(format!(
                "replica has {} frames, epoch was verified against {}",
                replica.frame_count(),
                self.frame_count
            )));
        }
        if let Some(base) = self.base {
            if replica.committed_epoch() != Some(base) {
                return Err(CodecError::BaseMismatch {
                    epoch: self.epoch,
                    base,
                    committed: replica.committed_epoch(),
                });
            }
        }
        for (&frame, &slot) in self.frames.iter().zip(&self.slots) {
            match slot {
                Slot::Zero => replica.zero_page(frame),
                Slot::Page(p) => {
                    let at = p as usize * self.page_size;
                    replica.write_page(frame, &self.data[at..at + self.page_size]);
                }
                Slot::Raw { chunk, at } => {
                    let page = &self.chunks[chunk as usize][at..at + self.page_size];
                    replica.write_page(frame, page);
                }
                Slot::Delta { chunk, at, len } => {
                    // Checked by push_delta against this page size.
                    let runs = &self.chunks[chunk as usize][at..at + len];
                    let applied = apply_xor(runs, replica.page_mut(frame));
                    debug_assert!(applied.is_ok());
                }
            }
        }
        replica.set_committed_epoch(self.epoch);
        Ok(AppliedEpoch {
            epoch: self.epoch,
            state_blob: self.state_blob,
            disk_writes: self.disk_writes,
        })
    }
}
