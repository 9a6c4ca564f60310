//! A consistency group: several guests protected as one. They pause at
//! the same epoch boundary, their checkpoints travel as one epoch (so the
//! backup commits all of them or none), and one replica holds them all.
//!
//! [`GroupGuest`] is a [`ProtectedGuest`] over its members: member `i`'s
//! frame `f` is group frame `base[i] + f`, and the group's state blob
//! holds every member's blob ([`GroupState`]). Each member checkpoints on
//! a thread of its own; all of them wait at the boundary until every
//! member is paused, the engine's `at_pause` runs once, then each copies
//! and resumes on its own (a member running again cannot affect another's
//! copy: its output is held by the engine until the epoch commits).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::guest::{Checkpoint, FrameReader, GuestError, PauseTimings, ProtectedGuest};

/// First bytes of a group state blob.
const MAGIC: [u8; 4] = *b"RWGS";
const VERSION: u8 = 1;

/// How long members wait for each other at the boundary; a member that
/// cannot pause by then fails the group's checkpoint (never a hang).
const BOUNDARY_TIMEOUT: Duration = Duration::from_secs(10);

/// Several guests protected as one.
pub struct GroupGuest {
    members: Vec<Box<dyn ProtectedGuest>>,
    /// First group frame of each member.
    base: Vec<u64>,
    page_size: usize,
    /// Per-member staging buffers, reused across epochs.
    staging: Vec<Checkpoint>,
    /// The member whose pre-copy round comes next.
    next_precopy: usize,
}

/// Why members cannot form a group.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("a group needs at least one member")]
    Empty,
    #[error("member {member} has {got}-byte pages, the group {want}-byte ones")]
    PageSize {
        member: usize,
        got: usize,
        want: usize,
    },
}

impl GroupGuest {
    pub fn new(members: Vec<Box<dyn ProtectedGuest>>) -> Result<Self, GroupError> {
        let page_size = members.first().ok_or(GroupError::Empty)?.page_size();
        let mut base = Vec::with_capacity(members.len());
        let mut next = 0u64;
        for (i, m) in members.iter().enumerate() {
            if m.page_size() != page_size {
                return Err(GroupError::PageSize {
                    member: i,
                    got: m.page_size(),
                    want: page_size,
                });
            }
            base.push(next);
            next += m.frame_count();
        }
        let staging = members.iter().map(|_| Checkpoint::default()).collect();
        Ok(Self {
            members,
            base,
            page_size,
            staging,
            next_precopy: 0,
        })
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Appends a member's staged frames (renumbered from `base`) and their
    /// pages to `out` (a backend may keep its staging buffer longer than
    /// its frames: only theirs are taken).
    fn append(out: &mut Checkpoint, base: u64, part: &Checkpoint, page_size: usize) {
        out.frames.extend(part.frames.iter().map(|f| base + f));
        let bytes = (part.frames.len() * page_size).min(part.pages.len());
        out.pages.extend_from_slice(&part.pages[..bytes]);
    }
}

/// The frame ranges of a group's members: member `i` holds frames
/// `ranges[i]` of the group (for splitting a replica at takeover).
pub fn member_ranges(frame_counts: &[u64]) -> Vec<std::ops::Range<u64>> {
    let mut next = 0;
    frame_counts
        .iter()
        .map(|&n| {
            let r = next..next + n;
            next += n;
            r
        })
        .collect()
}

/// The group's state blob: every member's own blob, in member order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState(pub Vec<Vec<u8>>);

/// A group state blob that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupStateError {
    #[error("not a group state (bad magic)")]
    Magic,
    #[error("group state version {0} is not supported (this build reads {VERSION})")]
    Version(u8),
    #[error("group state truncated at byte {0}")]
    Truncated(usize),
    #[error("{0} bytes after the last member's state")]
    Trailing(usize),
}

impl GroupState {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for s in &self.0 {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s);
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, GroupStateError> {
        if b.len() < 9 {
            return Err(if b.len() >= 4 && b[..4] != MAGIC {
                GroupStateError::Magic
            } else {
                GroupStateError::Truncated(b.len())
            });
        }
        if b[..4] != MAGIC {
            return Err(GroupStateError::Magic);
        }
        if b[4] != VERSION {
            return Err(GroupStateError::Version(b[4]));
        }
        let n = u32::from_le_bytes([b[5], b[6], b[7], b[8]]) as usize;
        let mut at = 9;
        // Each member takes at least its 8-byte length: bounds the
        // allocation by the input, whatever `n` claims.
        let mut members = Vec::with_capacity(n.min(b.len() / 8));
        for _ in 0..n {
            let len_bytes = b.get(at..at + 8).ok_or(GroupStateError::Truncated(at))?;
            let mut l = [0u8; 8];
            l.copy_from_slice(len_bytes);
            let len = usize::try_from(u64::from_le_bytes(l))
                .map_err(|_| GroupStateError::Truncated(at))?;
            at += 8;
            let end = at.checked_add(len).ok_or(GroupStateError::Truncated(at))?;
            let s = b.get(at..end).ok_or(GroupStateError::Truncated(at))?;
            members.push(s.to_vec());
            at = end;
        }
        if at != b.len() {
            return Err(GroupStateError::Trailing(b.len() - at));
        }
        Ok(Self(members))
    }
}

/// Where members meet at the epoch boundary.
struct Boundary {
    state: Mutex<BoundaryState>,
    cv: Condvar,
}

struct BoundaryState {
    members: usize,
    paused: usize,
    /// The engine's `at_pause` ran: everyone may copy and resume.
    closed: bool,
    /// A member failed before pausing: nobody waits for it.
    broken: bool,
}

impl Boundary {
    fn new(members: usize) -> Self {
        Self {
            state: Mutex::new(BoundaryState {
                members,
                paused: 0,
                closed: false,
                broken: false,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundaryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member is paused; waits until every member is (true), or until
    /// one failed or the timeout passed (false).
    fn all_paused(&self) -> bool {
        let mut s = self.lock();
        s.paused += 1;
        self.cv.notify_all();
        let (s, _) = self
            .cv
            .wait_timeout_while(s, BOUNDARY_TIMEOUT, |s| s.paused < s.members && !s.broken)
            .unwrap_or_else(|e| e.into_inner());
        let ok = s.paused >= s.members && !s.broken;
        drop(s);
        if !ok {
            self.fail();
        }
        ok
    }

    /// A member waits until the epoch is closed (or the group failed).
    fn wait_closed(&self) {
        let s = self.lock();
        let _ = self
            .cv
            .wait_timeout_while(s, BOUNDARY_TIMEOUT, |s| !s.closed && !s.broken);
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    fn fail(&self) {
        self.lock().broken = true;
        self.cv.notify_all();
    }

    fn broken(&self) -> bool {
        self.lock().broken
    }
}

impl ProtectedGuest for GroupGuest {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn frame_count(&self) -> u64 {
        self.base.last().copied().unwrap_or(0) + self.members.last().map_or(0, |m| m.frame_count())
    }

    fn precopy_round(&mut self, max_frames: usize, out: &mut Checkpoint) -> Result<(), GuestError> {
        out.clear();
        // Every member gets a round, starting with the one after the last
        // round's first, so a large member cannot starve the others.
        let n = self.members.len();
        let share = (max_frames / n).max(1);
        for k in 0..n {
            let i = (self.next_precopy + k) % n;
            let part = &mut self.staging[i];
            self.members[i].precopy_round(share, part)?;
            Self::append(out, self.base[i], part, self.page_size);
            out.timings.dirty_log += part.timings.dirty_log;
            out.timings.copy += part.timings.copy;
        }
        self.next_precopy = (self.next_precopy + 1) % n;
        Ok(())
    }

    fn restart_sync(&mut self) {
        for m in &mut self.members {
            m.restart_sync();
        }
    }

    fn checkpoint(
        &mut self,
        out: &mut Checkpoint,
        at_pause: &mut dyn FnMut(),
    ) -> Result<(), GuestError> {
        out.clear();
        let boundary = Arc::new(Boundary::new(self.members.len()));
        let (first, rest) = self.members.split_at_mut(1);
        let (first_out, rest_out) = self.staging.split_at_mut(1);
        let results: Vec<Result<(), GuestError>> = std::thread::scope(|s| {
            let others: Vec<_> = rest
                .iter_mut()
                .zip(rest_out.iter_mut())
                .map(|(m, o)| {
                    let b = boundary.clone();
                    s.spawn(move || {
                        let mut reached = false;
                        let r = m.checkpoint(o, &mut || {
                            reached = true;
                            if b.all_paused() {
                                b.wait_closed();
                            }
                        });
                        if !reached {
                            b.fail();
                        }
                        r
                    })
                })
                .collect();
            // The first member on this thread: it runs the engine's
            // `at_pause` once every member is paused.
            let b = boundary.clone();
            let mut reached = false;
            let r0 = first[0].checkpoint(&mut first_out[0], &mut || {
                reached = true;
                if b.all_paused() {
                    at_pause();
                    b.close();
                }
            });
            if !reached {
                b.fail();
            }
            let mut all = vec![r0];
            all.extend(others.into_iter().map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(GuestError::Backend("a member's checkpoint panicked".into()))
                })
            }));
            all
        });
        for r in results {
            r?;
        }
        if boundary.broken() {
            return Err(GuestError::Backend(
                "the group's members did not all pause at the boundary".into(),
            ));
        }
        let mut state = GroupState(Vec::with_capacity(self.members.len()));
        let mut t = PauseTimings::default();
        for (i, part) in self.staging.iter().enumerate() {
            Self::append(out, self.base[i], part, self.page_size);
            state.0.push(part.state.clone());
            // The group's pause is its slowest member's.
            t.stop = t.stop.max(part.timings.stop);
            t.dirty_log = t.dirty_log.max(part.timings.dirty_log);
            t.copy = t.copy.max(part.timings.copy);
            t.state = t.state.max(part.timings.state);
            t.total = t.total.max(part.timings.total);
        }
        state.encode(&mut out.state);
        out.timings = t;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        for m in &mut self.members {
            m.pause()?;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        for m in &mut self.members {
            m.resume()?;
        }
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.members.iter().all(|m| m.is_running())
    }

    fn frame_reader(&self) -> Option<FrameReader> {
        let readers: Vec<(u64, u64, FrameReader)> = self
            .members
            .iter()
            .zip(&self.base)
            .map(|(m, &b)| m.frame_reader().map(|r| (b, m.frame_count(), r)))
            .collect::<Option<_>>()?;
        let ps = self.page_size;
        Some(Arc::new(move |first: u64, buf: &mut [u8]| {
            // A read may span members: each part from its own reader.
            let mut frame = first;
            let mut at = 0;
            while at < buf.len() {
                let (b, n, r) = readers
                    .iter()
                    .find(|(b, n, _)| frame >= *b && frame < b + n)
                    .ok_or_else(|| GuestError::Backend(format!("frame {frame} out of range")))?;
                let here = ((b + n - frame) as usize * ps).min(buf.len() - at);
                r(frame - b, &mut buf[at..at + here])?;
                at += here;
                frame += (here / ps) as u64;
            }
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const PS: usize = 16;

    /// A guest of `frames` frames whose frame `f` holds byte `tag + f`;
    /// every frame is dirty at every checkpoint. It counts itself in
    /// `paused` while paused.
    struct Fake {
        tag: u8,
        frames: u64,
        paused: Arc<AtomicUsize>,
        fail_before_pause: bool,
        held: bool,
    }

    impl ProtectedGuest for Fake {
        fn page_size(&self) -> usize {
            PS
        }
        fn frame_count(&self) -> u64 {
            self.frames
        }
        fn precopy_round(&mut self, max: usize, out: &mut Checkpoint) -> Result<(), GuestError> {
            out.clear();
            for f in 0..(self.frames as usize).min(max) as u64 {
                out.frames.push(f);
                out.pages
                    .extend(std::iter::repeat_n(self.tag + f as u8, PS));
            }
            Ok(())
        }
        fn restart_sync(&mut self) {}
        fn checkpoint(
            &mut self,
            out: &mut Checkpoint,
            at_pause: &mut dyn FnMut(),
        ) -> Result<(), GuestError> {
            if self.fail_before_pause {
                return Err(GuestError::NotRunning);
            }
            self.paused.fetch_add(1, Ordering::SeqCst);
            at_pause();
            self.precopy_round(usize::MAX, out)?;
            // A longer staging buffer than its frames, as the KVM backend keeps.
            out.pages.extend_from_slice(&[0xEE; PS]);
            out.state = vec![self.tag; 3];
            self.paused.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        fn pause(&mut self) -> Result<(), GuestError> {
            self.held = true;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), GuestError> {
            self.held = false;
            Ok(())
        }
        fn is_running(&self) -> bool {
            true
        }
    }

    fn group(frames: &[u64], fail: Option<usize>) -> (GroupGuest, Arc<AtomicUsize>) {
        let paused = Arc::new(AtomicUsize::new(0));
        let members = frames
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                Box::new(Fake {
                    tag: 10 * (i as u8 + 1),
                    frames: n,
                    paused: paused.clone(),
                    fail_before_pause: fail == Some(i),
                    held: false,
                }) as Box<dyn ProtectedGuest>
            })
            .collect();
        (GroupGuest::new(members).expect("group"), paused)
    }

    #[test]
    fn the_engine_closes_the_epoch_once_while_every_member_is_paused() {
        let (mut g, paused) = group(&[3, 2, 4], None);
        assert_eq!(g.frame_count(), 9);
        let mut out = Checkpoint::default();
        let mut calls = 0;
        g.checkpoint(&mut out, &mut || {
            calls += 1;
            assert_eq!(
                paused.load(Ordering::SeqCst),
                3,
                "a member runs at the boundary"
            );
        })
        .expect("checkpoint");
        assert_eq!(calls, 1);
        assert_eq!(out.frames, (0..9).collect::<Vec<u64>>());
        assert_eq!(out.pages.len(), 9 * PS, "only the frames' pages");
        // Member 1's frame 0 is group frame 3.
        assert_eq!(out.pages[3 * PS], 20);
        let state = GroupState::decode(&out.state).expect("state");
        assert_eq!(state.0, vec![vec![10; 3], vec![20; 3], vec![30; 3]]);
    }

    #[test]
    fn a_member_that_cannot_pause_fails_the_checkpoint_without_a_hang() {
        for failing in 0..3 {
            let (mut g, _) = group(&[1, 1, 1], Some(failing));
            let mut closed = false;
            let r = g.checkpoint(&mut Checkpoint::default(), &mut || closed = true);
            assert!(r.is_err(), "member {failing} failed");
            assert!(!closed, "the epoch must not close without every member");
        }
    }

    #[test]
    fn precopy_rounds_cover_every_member() {
        let (mut g, _) = group(&[3, 5], None);
        let mut out = Checkpoint::default();
        g.precopy_round(4, &mut out).expect("round");
        assert_eq!(out.frames, vec![0, 1, 3, 4]);
        assert_eq!(out.pages.len(), 4 * PS);
    }

    #[test]
    fn member_ranges_split_the_group_frames() {
        assert_eq!(member_ranges(&[3, 0, 2]), vec![0..3, 3..3, 3..5]);
    }

    proptest::proptest! {
        #[test]
        fn group_state_round_trips(members in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..5)) {
            let s = GroupState(members);
            let mut b = Vec::new();
            s.encode(&mut b);
            proptest::prop_assert_eq!(GroupState::decode(&b), Ok(s.clone()));
            // Any cut is refused, never misread.
            for cut in 0..b.len() {
                proptest::prop_assert!(GroupState::decode(&b[..cut]).is_err());
            }
        }

        #[test]
        fn any_bytes_decode_or_are_refused(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = GroupState::decode(&b);
        }
    }
}
