//! Finding the pages the guest changed: guest RAM compared with a shadow
//! copy of what the replica holds.
//!
//! The shadow is exactly the replica's memory, so it doubles as the delta
//! codec's reference. Which pages are compared: with kernel write tracking
//! (`write_protect`), only the pages written since the last round
//! ([`Shadow::collect_written`]); without it, every page
//! ([`Shadow::collect`]).
//!
//! Invariant: for every frame below `sent`, the shadow holds what was sent
//! for it last. A page is copied RAM → staging buffer → shadow, so even a
//! page torn by a running guest (pre-copy) leaves shadow == sent, and the
//! page compares different again next round. Frames at and above `sent`
//! were never sent (the first rounds carry the full image, in order).
//!
//! The full compare costs one pass over the RAM and the shadow per
//! checkpoint: the pause grows with guest RAM. To keep it short the compare runs in
//! 64 KiB blocks (memcmp, which glibc vectorizes) on several threads, and
//! looks at single pages only inside blocks that differ.

use std::ops::Range;

use super::write_protect::Written;

/// Bytes per frame.
pub const PAGE_SIZE: usize = 4096;
/// Pages per compare block.
const BLOCK_PAGES: usize = 16;
/// Below this many frames, one thread does it (spawning costs more).
const PARALLEL_MIN_FRAMES: u64 = 4096;

/// Guest RAM as seen through our own shared mapping of QEMU's RAM file.
///
/// Only raw pointers are handed out: the guest (another process) writes
/// this memory while it runs, so no Rust reference to it may exist.
#[derive(Debug)]
pub struct RamMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid until drop; all
// accesses go through raw pointers (copies and memcmp), never references.
unsafe impl Send for RamMap {}
// SAFETY: as above; &RamMap only reads.
unsafe impl Sync for RamMap {}

impl RamMap {
    /// Maps `file` (shared, read-write) with `len` bytes.
    pub fn map(file: &std::fs::File, len: usize) -> std::io::Result<RamMap> {
        use std::os::fd::AsRawFd;
        // SAFETY: a new shared mapping of a file we hold open; the kernel
        // picks the address; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RamMap {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address (for raw copies; see the type's note).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Copies the whole RAM into `out` (a consistent image only while the
    /// guest is stopped).
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        out.resize(self.len, 0);
        // SAFETY: both ranges are `len` bytes and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), self.len) }
    }

    /// Writes `image` at the start of RAM (a replica's QEMU has not started
    /// its guest yet).
    pub fn write_from(&self, image: &[u8]) {
        let n = image.len().min(self.len);
        // SAFETY: n bytes fit both; no overlap.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), self.ptr, n) }
    }
}

impl Drop for RamMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// Time spent in one [`Shadow::collect`] finding the changed pages.
#[derive(Debug, Clone, Copy, Default)]
pub struct Found {
    /// Comparing RAM with the shadow.
    pub compare: std::time::Duration,
}

/// The shadow image and what has been sent.
#[derive(Debug)]
pub struct Shadow {
    shadow: Vec<u8>,
    frames: u64,
    /// Frames below this were sent at least once.
    sent: u64,
    threads: usize,
    /// Below this many frames one thread compares.
    parallel_min: u64,
    /// Per-thread lists of differing frames, kept across rounds.
    found: Vec<Vec<u64>>,
}

impl Shadow {
    /// A shadow for `ram_bytes` of RAM; nothing sent yet.
    pub fn new(ram_bytes: usize) -> Shadow {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        // vec! of zeros comes from calloc: untouched pages cost nothing
        // until the first round fills them.
        let shadow = vec![0u8; ram_bytes];
        advise_huge_pages(&shadow);
        Shadow {
            shadow,
            frames: (ram_bytes / PAGE_SIZE) as u64,
            sent: 0,
            threads,
            parallel_min: PARALLEL_MIN_FRAMES,
            found: vec![Vec::new(); threads],
        }
    }

    /// Sets how many threads compare (at least 1), whatever the RAM size.
    pub fn set_threads(&mut self, n: usize) {
        self.threads = n.max(1);
        self.parallel_min = 0;
        self.found.resize(self.threads, Vec::new());
    }

    /// Frames of RAM.
    pub fn frame_count(&self) -> u64 {
        self.frames
    }

    /// Forgets what was sent: the next rounds carry the full image.
    pub fn reset(&mut self) {
        self.sent = 0;
    }

    /// The shadow (= the replica's memory for frames already sent).
    pub fn image(&self) -> &[u8] {
        &self.shadow
    }

    /// One round: up to `max` frames that differ from what was sent (then
    /// never-sent frames, ascending), with their contents from `ram` into
    /// `frames`/`pages`; the shadow takes the same contents.
    ///
    /// # Safety
    /// `ram` must point at `frame_count() * PAGE_SIZE` readable bytes that
    /// stay mapped during the call.
    pub unsafe fn collect(
        &mut self,
        ram: *const u8,
        max: usize,
        frames: &mut Vec<u64>,
        pages: &mut Vec<u8>,
    ) -> Found {
        let t = std::time::Instant::now();
        frames.clear();
        let sent = self.sent;
        let ram_addr = ram as usize;
        let shadow_addr = self.shadow.as_ptr() as usize;
        let chunks = split(
            0..sent,
            if sent < self.parallel_min {
                1
            } else {
                self.threads
            },
        );
        let found = &mut self.found[..chunks.len()];
        if chunks.len() == 1 {
            // SAFETY: forwarded from the caller; the range is in bounds.
            unsafe { diff(ram_addr, shadow_addr, chunks[0].clone(), max, &mut found[0]) };
        } else {
            std::thread::scope(|s| {
                for (range, out) in chunks.iter().zip(found.iter_mut()) {
                    let range = range.clone();
                    // SAFETY: as above; threads only read.
                    s.spawn(move || unsafe { diff(ram_addr, shadow_addr, range, max, out) });
                }
            });
        }
        for f in found.iter() {
            let room = max - frames.len();
            frames.extend_from_slice(&f[..f.len().min(room)]);
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.finish_round(ram, max, t, frames, pages) }
    }

    /// One round with the frames written since the last one known (kernel
    /// write tracking): of the frames in `written`, up to `max` that differ
    /// from what was sent (a page rewritten with the same bytes is not
    /// resent), then never-sent frames, ascending, with their contents from
    /// `ram` into `frames`/`pages`; the shadow takes the same contents.
    /// Only the written pages are compared: the cost follows the epoch's
    /// writes, not the size of RAM. Frames left over (beyond `max`) stay in
    /// `written` for the next round.
    ///
    /// # Safety
    /// As [`Shadow::collect`].
    pub unsafe fn collect_written(
        &mut self,
        ram: *const u8,
        max: usize,
        written: &mut Written,
        frames: &mut Vec<u64>,
        pages: &mut Vec<u8>,
    ) -> Found {
        let t = std::time::Instant::now();
        frames.clear();
        let sent = self.sent;
        let shadow = self.shadow.as_ptr();
        written.drain_while(|f| {
            if f >= sent {
                // Never sent: the fresh frames below carry it.
                return true;
            }
            if frames.len() >= max {
                return false;
            }
            // SAFETY: f < sent <= frame_count: in bounds of both.
            if !unsafe { same_page(ram, shadow, f) } {
                frames.push(f);
            }
            true
        });
        // SAFETY: forwarded from the caller.
        unsafe { self.finish_round(ram, max, t, frames, pages) }
    }

    /// The end of every round: never-sent frames after the changed ones,
    /// up to `max` in all, then the contents copied out. `t` is when the
    /// round began (the search's time is reported).
    ///
    /// # Safety
    /// As [`Shadow::collect`].
    unsafe fn finish_round(
        &mut self,
        ram: *const u8,
        max: usize,
        t: std::time::Instant,
        frames: &mut Vec<u64>,
        pages: &mut Vec<u8>,
    ) -> Found {
        let sent = self.sent;
        let room = (max - frames.len()) as u64;
        let fresh = (self.frames - sent).min(room);
        frames.extend(sent..sent + fresh);
        self.sent = sent + fresh;
        let found = Found {
            compare: t.elapsed(),
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_out(ram, frames, pages) };
        found
    }

    /// Copies `frames` (ascending) from `ram` into `pages` and the shadow.
    ///
    /// # Safety
    /// As [`Shadow::collect`].
    unsafe fn copy_out(&mut self, ram: *const u8, frames: &[u64], pages: &mut Vec<u8>) {
        pages.resize(frames.len() * PAGE_SIZE, 0);
        let mut i = 0;
        while i < frames.len() {
            // Runs of consecutive frames in one copy each (the first
            // round is one run).
            let first = frames[i];
            let mut n = 1;
            while i + n < frames.len() && frames[i + n] == first + n as u64 {
                n += 1;
            }
            let off = first as usize * PAGE_SIZE;
            let len = n * PAGE_SIZE;
            let dst = &mut pages[i * PAGE_SIZE..i * PAGE_SIZE + len];
            // SAFETY: off+len is inside RAM (frames < frame_count); dst is
            // our buffer.
            unsafe { std::ptr::copy_nonoverlapping(ram.add(off), dst.as_mut_ptr(), len) };
            self.shadow[off..off + len].copy_from_slice(dst);
            i += n;
        }
    }
}

/// Asks for transparent huge pages under `buf` (where THP is in `madvise`
/// mode): the compare walks the whole shadow every checkpoint, and 2 MiB
/// pages spare it most TLB misses. Advice only: failure changes nothing.
fn advise_huge_pages(buf: &[u8]) {
    const HUGE: usize = 2 << 20;
    let start = (buf.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (buf.as_ptr() as usize + buf.len()) & !(HUGE - 1);
    if end > start {
        // SAFETY: [start, end) lies inside `buf`'s allocation; madvise
        // with MADV_HUGEPAGE does not change its contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// `range` cut into `n` nearly equal pieces on block boundaries.
fn split(range: Range<u64>, n: usize) -> Vec<Range<u64>> {
    let len = range.end - range.start;
    let blocks = len.div_ceil(BLOCK_PAGES as u64);
    let per = blocks.div_ceil(n as u64).max(1) * BLOCK_PAGES as u64;
    let mut out = Vec::new();
    let mut s = range.start;
    while s < range.end || out.is_empty() {
        let e = (s + per).min(range.end);
        out.push(s..e);
        s = e;
        if s >= range.end {
            break;
        }
    }
    out
}

/// Whether frame `f` holds the same bytes in RAM and in the shadow.
///
/// # Safety
/// Both addresses must point at memory covering frame `f`.
unsafe fn same_page(ram: *const u8, shadow: *const u8, f: u64) -> bool {
    let off = f as usize * PAGE_SIZE;
    // SAFETY: the caller guarantees both cover frame f.
    unsafe { libc::memcmp(ram.add(off).cast(), shadow.add(off).cast(), PAGE_SIZE) == 0 }
}

/// Frames in `range` whose RAM differs from the shadow (at most `max`).
///
/// # Safety
/// Both addresses must point at memory covering `range` frames.
unsafe fn diff(ram: usize, shadow: usize, range: Range<u64>, max: usize, out: &mut Vec<u64>) {
    out.clear();
    let (ram, shadow) = (ram as *const u8, shadow as *const u8);
    let mut f = range.start;
    while f < range.end && out.len() < max {
        let n = (range.end - f).min(BLOCK_PAGES as u64);
        let off = f as usize * PAGE_SIZE;
        let len = n as usize * PAGE_SIZE;
        // SAFETY: the caller guarantees both cover `range`.
        let same = unsafe { libc::memcmp(ram.add(off).cast(), shadow.add(off).cast(), len) } == 0;
        if !same {
            for p in 0..n {
                // SAFETY: as above.
                if !unsafe { same_page(ram, shadow, f + p) } && out.len() < max {
                    out.push(f + p);
                }
            }
        }
        f += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round(s: &mut Shadow, ram: &[u8], max: usize) -> (Vec<u64>, Vec<u8>) {
        let (mut f, mut p) = (Vec::new(), Vec::new());
        // SAFETY: ram covers the shadow's frames.
        unsafe { s.collect(ram.as_ptr(), max, &mut f, &mut p) };
        (f, p)
    }

    #[test]
    fn first_round_is_the_full_image_then_only_changes() {
        let frames = 5000;
        let mut ram = vec![0u8; frames * PAGE_SIZE];
        ram[3 * PAGE_SIZE] = 1;
        let mut s = Shadow::new(ram.len());
        let (f, p) = round(&mut s, &ram, usize::MAX);
        assert_eq!(f.len(), frames);
        assert_eq!(p, ram);
        assert!(round(&mut s, &ram, usize::MAX).0.is_empty());
        ram[7 * PAGE_SIZE + 5] = 9;
        ram[4999 * PAGE_SIZE + 4095] = 9;
        let (f, p) = round(&mut s, &ram, usize::MAX);
        assert_eq!(f, [7, 4999]);
        assert_eq!(&p[..PAGE_SIZE], &ram[7 * PAGE_SIZE..8 * PAGE_SIZE]);
    }

    proptest! {
        /// With the written frames known (as kernel write tracking reports
        /// them, plus frames rewritten with the same bytes), bounded rounds
        /// reproduce the RAM in the replica and compare only those frames.
        #[test]
        fn replica_follows_ram_from_written_frames(
            writes in proptest::collection::vec(
                proptest::collection::vec((0usize..300, any::<u8>()), 0..40), 1..6),
            extra in proptest::collection::vec(0u64..300, 0..10),
            max in 1usize..400,
        ) {
            let frames = 300;
            let mut ram = vec![0u8; frames * PAGE_SIZE];
            let mut replica = vec![0xAAu8; frames * PAGE_SIZE];
            let mut s = Shadow::new(ram.len());
            let mut w = Written::new(frames as u64);
            for epoch in writes {
                for (frame, v) in epoch {
                    ram[frame * PAGE_SIZE + (v as usize * 13) % PAGE_SIZE] = v;
                    w.mark(frame as u64..frame as u64 + 1);
                }
                for &f in &extra {
                    w.mark(f..f + 1);
                }
                loop {
                    let (mut f, mut p) = (Vec::new(), Vec::new());
                    // SAFETY: ram covers the shadow's frames.
                    unsafe { s.collect_written(ram.as_ptr(), max, &mut w, &mut f, &mut p) };
                    for (i, fr) in f.iter().enumerate() {
                        let o = *fr as usize * PAGE_SIZE;
                        replica[o..o + PAGE_SIZE].copy_from_slice(&p[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                    }
                    if f.len() < max { break; }
                }
                prop_assert!(ram == replica);
                prop_assert!(w.is_empty());
            }
        }
    }

    proptest! {
        /// Whatever the writes, thread count and per-round limits, applying
        /// every round's pages to a replica reproduces the RAM.
        #[test]
        fn replica_follows_ram(
            writes in proptest::collection::vec(
                proptest::collection::vec((0usize..300, any::<u8>()), 0..40), 1..6),
            max in 1usize..400,
            threads in 1usize..4,
        ) {
            let frames = 300;
            let mut ram = vec![0u8; frames * PAGE_SIZE];
            let mut replica = vec![0xAAu8; frames * PAGE_SIZE];
            let mut s = Shadow::new(ram.len());
            s.set_threads(threads);
            for epoch in writes {
                for (frame, v) in epoch {
                    ram[frame * PAGE_SIZE + (v as usize * 13) % PAGE_SIZE] = v;
                }
                // Bounded rounds until nothing is left (as pre-copy does),
                // then the replica must match.
                loop {
                    let (f, p) = round(&mut s, &ram, max);
                    for (i, fr) in f.iter().enumerate() {
                        let o = *fr as usize * PAGE_SIZE;
                        replica[o..o + PAGE_SIZE].copy_from_slice(&p[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                    }
                    if f.len() < max { break; }
                }
                prop_assert!(ram == replica);
            }
        }
    }
}
