//! Decoded-chunk buffers handed back by staged epochs for the next epoch.
//!
//! A staged epoch owns its decoded chunks and page data until it is applied
//! or dropped, often on another thread than the decoder's. Freed, buffers of
//! a few hundred KiB go back to the kernel (glibc trims the heap top and
//! unmaps large blocks), and the next epoch's first write to each page of a
//! new buffer is a page fault that clears it: on the recorded `sort` trace
//! a third of the decoder's time. The pool keeps them instead, bounded in
//! count and bytes so that one huge epoch does not pin its memory forever.

use std::sync::{Arc, Mutex};

/// Buffers kept at most.
const MAX_BUFFERS: usize = 64;
/// Capacity kept at most, over all buffers.
const MAX_BYTES: usize = 64 << 20;

#[derive(Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

/// A shared free list of byte buffers; clones share it.
#[derive(Clone, Default)]
pub(crate) struct BufferPool {
    free: Arc<Mutex<Free>>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BufferPool")
    }
}

impl BufferPool {
    /// An empty buffer, with capacity kept from an earlier epoch when the
    /// pool has one.
    pub(crate) fn take(&self) -> Vec<u8> {
        let Ok(mut free) = self.free.lock() else {
            return Vec::new();
        };
        match free.buffers.pop() {
            Some(b) => {
                free.bytes -= b.capacity();
                b
            }
            None => Vec::new(),
        }
    }

    /// Keeps `buf` for a later [`BufferPool::take`], or frees it when the
    /// pool is full.
    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        if free.buffers.len() < MAX_BUFFERS && free.bytes + buf.capacity() <= MAX_BYTES {
            buf.clear();
            free.bytes += buf.capacity();
            free.buffers.push(buf);
        }
    }

    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let free = self.free.lock().expect("pool lock");
        (free.buffers.len(), free.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_with_their_capacity() {
        let pool = BufferPool::default();
        let mut b = pool.take();
        assert_eq!(b.capacity(), 0);
        b.extend_from_slice(&[7; 1000]);
        let cap = b.capacity();
        pool.clone().give(b);
        assert_eq!(pool.kept(), (1, cap));
        let b = pool.take();
        assert!(b.is_empty());
        assert_eq!(b.capacity(), cap);
        assert_eq!(pool.kept(), (0, 0));
    }

    #[test]
    fn the_pool_is_bounded_in_count_and_bytes() {
        let pool = BufferPool::default();
        for _ in 0..MAX_BUFFERS + 10 {
            pool.give(Vec::with_capacity(16));
        }
        assert_eq!(pool.kept().0, MAX_BUFFERS);
        let pool = BufferPool::default();
        pool.give(Vec::with_capacity(MAX_BYTES + 1));
        assert_eq!(pool.kept(), (0, 0));
        pool.give(Vec::with_capacity(MAX_BYTES / 2));
        pool.give(Vec::with_capacity(MAX_BYTES / 2 + 1));
        assert_eq!(pool.kept().0, 1);
        // Empty vectors own nothing worth keeping.
        pool.give(Vec::new());
        assert_eq!(pool.kept().0, 1);
    }
}
