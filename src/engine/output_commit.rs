//! Output commit: what the guest transmits during epoch N leaves the host
//! only once the backup has committed epoch N.
//!
//! The buffer is bounded in bytes; when it is full the engine must stop
//! the guest from producing more (by checkpointing sooner and waiting for
//! acknowledgements), never drop or release a frame early. Frames of one
//! epoch are released in the order the guest sent them, epochs in order.

use std::collections::VecDeque;

#[derive(Debug)]
struct Held {
    epoch: u64,
    frames: Vec<Vec<u8>>,
    bytes: usize,
}

#[derive(Debug)]
pub struct OutputBuffer {
    /// The epoch the guest is running in now (frames go there).
    current: u64,
    held: VecDeque<Held>,
    bytes: usize,
    limit: usize,
    released_frames: u64,
    released_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "output buffer full ({held} bytes held, limit {limit}): checkpoint and wait for the backup"
)]
pub struct BufferFull {
    pub held: usize,
    pub limit: usize,
}

impl OutputBuffer {
    /// `first_epoch` is the epoch the guest runs in when protection starts.
    pub fn new(first_epoch: u64, limit_bytes: usize) -> Self {
        Self {
            current: first_epoch,
            held: VecDeque::new(),
            bytes: 0,
            limit: limit_bytes,
            released_frames: 0,
            released_bytes: 0,
        }
    }

    /// The guest transmitted `frame` in the current epoch.
    pub fn hold(&mut self, frame: Vec<u8>) -> Result<(), BufferFull> {
        if self.bytes + frame.len() > self.limit {
            return Err(BufferFull {
                held: self.bytes,
                limit: self.limit,
            });
        }
        self.bytes += frame.len();
        match self.held.back_mut() {
            Some(h) if h.epoch == self.current => {
                h.bytes += frame.len();
                h.frames.push(frame);
            }
            _ => self.held.push_back(Held {
                epoch: self.current,
                bytes: frame.len(),
                frames: vec![frame],
            }),
        }
        Ok(())
    }

    /// The guest was paused at the end of the current epoch; what it sends
    /// from now on belongs to the next one. Returns the epoch just closed.
    pub fn close_epoch(&mut self) -> u64 {
        let closed = self.current;
        self.current += 1;
        closed
    }

    /// Closes the running epoch under the number `epoch` (≥ the current
    /// one): epoch numbers also count pre-copy rounds, which carry no
    /// output of their own, so what was sent meanwhile belongs to the
    /// checkpoint that follows them.
    pub fn close_epoch_as(&mut self, epoch: u64) -> u64 {
        let epoch = epoch.max(self.current);
        if let Some(h) = self.held.back_mut() {
            if h.epoch == self.current {
                h.epoch = epoch;
            }
        }
        self.current = epoch + 1;
        epoch
    }

    pub fn current_epoch(&self) -> u64 {
        self.current
    }

    /// The backup committed everything up to and including `epoch`: the
    /// frames of those epochs may leave, in order.
    pub fn release_through(&mut self, epoch: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self
            .held
            .front()
            .is_some_and(|h| h.epoch <= epoch && h.epoch < self.current)
        {
            if let Some(h) = self.held.pop_front() {
                self.bytes -= h.bytes;
                self.released_bytes += h.bytes as u64;
                self.released_frames += h.frames.len() as u64;
                out.extend(h.frames);
            }
        }
        out
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    pub fn held_frames(&self) -> usize {
        self.held.iter().map(|h| h.frames.len()).sum()
    }

    /// The oldest epoch with output still held.
    pub fn oldest_held(&self) -> Option<u64> {
        self.held.front().map(|h| h.epoch)
    }

    pub fn released(&self) -> (u64, u64) {
        (self.released_frames, self.released_bytes)
    }

    /// Protection is dropped (the backup is gone and the site runs
    /// unprotected under its lease): everything held may leave now.
    pub fn release_all(&mut self) -> Vec<Vec<u8>> {
        // Frames of the running epoch too: unprotected output is not held.
        self.released_bytes += self.bytes as u64;
        self.bytes = 0;
        let out: Vec<Vec<u8>> = self.held.drain(..).flat_map(|h| h.frames).collect();
        self.released_frames += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(tag: u8) -> Vec<u8> {
        vec![tag; 10]
    }

    #[test]
    fn frames_leave_only_after_their_epoch_commits() {
        let mut b = OutputBuffer::new(1, 1 << 20);
        b.hold(f(1)).unwrap();
        b.hold(f(2)).unwrap();
        assert_eq!(b.close_epoch(), 1);
        b.hold(f(3)).unwrap();
        // Nothing before the ack.
        assert!(b.release_through(0).is_empty());
        assert_eq!(b.release_through(1), vec![f(1), f(2)]);
        // Epoch 2 is still running: an ack for it cannot come yet, and even
        // a bogus one releases nothing of the running epoch.
        assert!(b.release_through(2).is_empty());
        b.close_epoch();
        assert_eq!(b.release_through(2), vec![f(3)]);
        assert_eq!(b.held_bytes(), 0);
        assert_eq!(b.released(), (3, 30));
    }

    #[test]
    fn a_cumulative_ack_releases_several_epochs_in_order() {
        let mut b = OutputBuffer::new(5, 1 << 20);
        for e in 0..4u8 {
            b.hold(f(e)).unwrap();
            b.close_epoch();
        }
        assert_eq!(b.oldest_held(), Some(5));
        assert_eq!(b.release_through(7), vec![f(0), f(1), f(2)]);
        assert_eq!(b.oldest_held(), Some(8));
    }

    #[test]
    fn pre_copy_epochs_carry_no_output() {
        let mut b = OutputBuffer::new(1, 1 << 20);
        b.hold(f(1)).unwrap();
        // Epochs 1..=3 were pre-copy rounds; the first checkpoint is 4.
        assert_eq!(b.close_epoch_as(4), 4);
        assert!(b.release_through(3).is_empty());
        assert_eq!(b.release_through(4), vec![f(1)]);
        b.hold(f(2)).unwrap();
        assert_eq!(b.close_epoch(), 5);
    }

    #[test]
    fn the_buffer_is_bounded() {
        let mut b = OutputBuffer::new(1, 25);
        b.hold(f(1)).unwrap();
        b.hold(f(2)).unwrap();
        assert_eq!(
            b.hold(f(3)),
            Err(BufferFull {
                held: 20,
                limit: 25
            })
        );
        b.close_epoch();
        b.release_through(1);
        b.hold(f(3)).unwrap();
    }

    #[test]
    fn release_all_empties_it_and_keeps_epoch_numbering() {
        let mut b = OutputBuffer::new(1, 1 << 20);
        b.hold(f(1)).unwrap();
        b.close_epoch();
        b.hold(f(2)).unwrap();
        assert_eq!(b.release_all(), vec![f(1), f(2)]);
        assert_eq!(b.current_epoch(), 2);
        assert_eq!(b.held_frames(), 0);
    }
}
