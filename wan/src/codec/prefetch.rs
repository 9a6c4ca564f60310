//! Software prefetch of the next pages of the page pass.
//!
//! Dirty pages arrive cold (the guest wrote them, often long ago): the
//! first pass over a page, its hash, waits for memory at 7-9 GB/s where a
//! cached page hashes at 25. The hardware prefetcher does not cross a
//! 4 KiB boundary, so the pass asks for the next pages itself, while it
//! works on this one.

/// Cache line size assumed for the prefetch stride.
const LINE: usize = 64;

/// Asks for every cache line of `page` to be brought into the cache.
#[inline]
pub(super) fn page(page: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..page.len()).step_by(LINE) {
        // SAFETY: prefetching is a hint with no architectural effect; the
        // address is inside `page`. SSE is part of the x86_64 baseline.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                page.as_ptr().add(i).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = page;
}
