//! Online verify (as DRBD's `verify`): proves the replica equals the
//! primary, slice by slice, while the VM runs.
//!
//! Exactness rests on one property of the pipeline: the replica at the
//! commit of epoch E is the primary as it was at the pause that closed E.
//! So the primary hashes a slice (a run of memory frames or disk blocks)
//! while the guest is paused at checkpoint E and sends the hashes tagged
//! with E right after that epoch; the standby, which applies epochs one
//! after the other, hashes the same slice of its replica right after
//! committing E and before applying E + 1, and answers with the units that
//! differ. Over successive epochs the whole memory and disk are walked.
//!
//! This is the sans-IO core of one run on the primary: which slice to hash
//! next, what the answers mean, what to resend when repairing. The engine
//! (`protect.rs`) does the hashing at the pause and the talking.
//!
//! Repair: a differing unit is resent whole in the next epoch (read at its
//! pause, so it is that epoch's content) and then verified again at that
//! same epoch.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use wan::session::wire::{
    VerifyHashes, VerifyOutcome, VerifyRegion, VerifyResult, MAX_VERIFY_UNITS,
};

/// Bytes hashed per slice at most: 16 MiB costs a few milliseconds of
/// pause (xxh3 runs at several GB/s; reading a disk slice from the page
/// cache about as fast).
pub const SLICE_BYTES: u64 = 16 << 20;
/// Unit of disk comparison (and of repair).
pub const DISK_BLOCK: u32 = 4096;
/// Slices whose answers may be awaited at once.
pub const MAX_OUTSTANDING: usize = 4;
/// Differences listed one by one (all are counted).
pub const MAX_LISTED: usize = 4096;
/// Answers "not compared, ask again" tolerated before the run gives up.
pub const MAX_RETRIES: u32 = 1000;
/// Times one differing unit is resent before it is left as it is.
pub const MAX_REPAIRS: u32 = 3;

/// The hash both sides compute of one unit.
pub fn hash_unit(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// What a run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    pub memory: bool,
    pub disk: bool,
}

/// The VM's shape as the primary sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub page_size: u32,
    pub frames: u64,
    /// 0 when the VM has no disk.
    pub disk_bytes: u64,
}

impl Layout {
    fn units(&self, r: VerifyRegion) -> u64 {
        match r {
            VerifyRegion::Memory => self.frames,
            VerifyRegion::Disk => self.disk_bytes.div_ceil(DISK_BLOCK as u64),
        }
    }

    fn unit_size(&self, r: VerifyRegion) -> u32 {
        match r {
            VerifyRegion::Memory => self.page_size,
            VerifyRegion::Disk => DISK_BLOCK,
        }
    }

    /// Units per slice: [`SLICE_BYTES`] worth, within a frame's limit.
    fn slice_units(&self, r: VerifyRegion) -> u64 {
        (SLICE_BYTES / self.unit_size(r).max(1) as u64).clamp(1, MAX_VERIFY_UNITS as u64)
    }

    /// Byte range of `count` units from `first` (the disk's last block
    /// stops at the image's end).
    pub fn byte_range(&self, s: &Slice) -> (u64, u64) {
        let unit = self.unit_size(s.region) as u64;
        let start = s.first * unit;
        let end = (s.first + s.count as u64) * unit;
        match s.region {
            VerifyRegion::Memory => (start, end),
            VerifyRegion::Disk => (start, end.min(self.disk_bytes)),
        }
    }
}

/// A run of units to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub region: VerifyRegion,
    pub first: u64,
    pub count: u32,
}

/// One unit found different.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// "memory" or "disk".
    pub region: String,
    /// Frame number, or disk block number.
    pub unit: u64,
    /// Byte offset (in guest-physical memory, or in the disk image).
    pub offset: u64,
    /// The epoch at whose commit it differed.
    pub epoch: u64,
    /// Resent and found equal afterwards.
    pub repaired: bool,
}

/// Where a run stands (what `status` and the CLI show).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyProgress {
    pub run: u64,
    /// running, done or failed.
    pub state: String,
    pub repair: bool,
    pub scope_memory: bool,
    pub scope_disk: bool,
    pub slices_total: u64,
    pub slices_done: u64,
    pub pages_checked: u64,
    pub blocks_checked: u64,
    /// Units found different (first pass).
    pub mismatches: u64,
    /// Of those, resent and found equal afterwards.
    pub repaired: u64,
    /// The first [`MAX_LISTED`] differences.
    pub listed: Vec<Mismatch>,
    /// Why the run failed, when it did.
    pub error: Option<String>,
    /// Epochs whose commit the run compared (first and last).
    pub first_epoch: Option<u64>,
    pub last_epoch: Option<u64>,
}

/// What the engine must do after an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing more.
    None,
    /// The run just ended (done or failed).
    Finished,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    slice: Slice,
    /// A check of units that were resent (not counted again as checked).
    recheck: bool,
}

/// One verify run on the primary (sans-IO).
#[derive(Debug)]
pub struct VerifyRun {
    layout: Layout,
    repair: bool,
    /// Next first-pass slice: region and first unit.
    cursor: Option<(VerifyRegion, u64)>,
    regions: Vec<VerifyRegion>,
    /// Slices to hash again (lost, or not compared), before new ones.
    redo: VecDeque<Pending>,
    outstanding: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Units to resend at the next pause, and how often each was.
    to_repair: Vec<(VerifyRegion, u64)>,
    repairs: BTreeMap<(VerifyRegion, u64), u32>,
    retries: u32,
    progress: VerifyProgress,
}

impl VerifyRun {
    /// A new run numbered `run` (request ids start from `run << 32`, so
    /// late answers to an earlier run are never mistaken for this one's).
    pub fn new(run: u64, layout: Layout, scope: Scope, repair: bool) -> Self {
        let mut regions = Vec::new();
        if scope.memory && layout.frames > 0 {
            regions.push(VerifyRegion::Memory);
        }
        if scope.disk && layout.disk_bytes > 0 {
            regions.push(VerifyRegion::Disk);
        }
        let slices_total = regions
            .iter()
            .map(|&r| layout.units(r).div_ceil(layout.slice_units(r)))
            .sum();
        let mut s = Self {
            layout,
            repair,
            cursor: regions.first().map(|&r| (r, 0)),
            regions,
            redo: VecDeque::new(),
            outstanding: BTreeMap::new(),
            next_id: run << 32,
            to_repair: Vec::new(),
            repairs: BTreeMap::new(),
            retries: 0,
            progress: VerifyProgress {
                run,
                state: "running".into(),
                repair,
                scope_memory: scope.memory,
                scope_disk: scope.disk,
                slices_total,
                ..VerifyProgress::default()
            },
        };
        s.check_done();
        s
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn progress(&self) -> &VerifyProgress {
        &self.progress
    }

    pub fn is_finished(&self) -> bool {
        self.progress.state != "running"
    }

    /// Units to resend whole in the epoch being closed now (read at this
    /// pause). Their check again is queued for this same epoch.
    pub fn take_repairs(&mut self) -> Vec<(VerifyRegion, u64)> {
        let units = std::mem::take(&mut self.to_repair);
        // Contiguous units are checked again as one slice.
        let mut i = 0;
        while i < units.len() {
            let (region, first) = units[i];
            let mut count = 1u32;
            while i + (count as usize) < units.len()
                && units[i + count as usize] == (region, first + count as u64)
                && count < MAX_VERIFY_UNITS
            {
                count += 1;
            }
            self.redo.push_front(Pending {
                slice: Slice {
                    region,
                    first,
                    count,
                },
                recheck: true,
            });
            i += count as usize;
        }
        units
    }

    /// The slice to hash at this pause, if any (at most one per epoch, and
    /// at most [`MAX_OUTSTANDING`] awaiting answers).
    pub fn next_slice(&mut self) -> Option<Slice> {
        if self.is_finished() || self.outstanding.len() >= MAX_OUTSTANDING {
            return None;
        }
        if let Some(p) = self.redo.front() {
            return Some(p.slice);
        }
        let (region, first) = self.cursor?;
        let total = self.layout.units(region);
        let count = self.layout.slice_units(region).min(total - first) as u32;
        Some(Slice {
            region,
            first,
            count,
        })
    }

    /// The engine hashed `slice` (the one [`Self::next_slice`] gave) at the
    /// pause closing `epoch`: the request to send after that epoch.
    pub fn hashed(&mut self, slice: Slice, epoch: u64, hashes: Vec<u64>) -> VerifyHashes {
        let pending = match self.redo.front().copied() {
            Some(p) if p.slice == slice => {
                self.redo.pop_front();
                p
            }
            _ => {
                self.advance_cursor(slice);
                Pending {
                    slice,
                    recheck: false,
                }
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.outstanding.insert(id, pending);
        VerifyHashes {
            id,
            epoch,
            region: slice.region,
            unit: self.layout.unit_size(slice.region),
            first: slice.first,
            hashes,
        }
    }

    /// The request for `id` could not be sent (or was lost with its
    /// connection): it is hashed again at a later epoch.
    pub fn lost(&mut self, id: u64) {
        if let Some(p) = self.outstanding.remove(&id) {
            self.redo.push_back(p);
        }
    }

    /// Every request awaiting an answer is lost (the connection went
    /// down, or a resync replaces the replica).
    pub fn lost_all(&mut self) {
        let ids: Vec<u64> = self.outstanding.keys().copied().collect();
        for id in ids {
            self.lost(id);
        }
    }

    fn advance_cursor(&mut self, slice: Slice) {
        let Some((region, first)) = self.cursor else {
            return;
        };
        if region != slice.region || first != slice.first {
            return;
        }
        let next = first + slice.count as u64;
        self.cursor = if next < self.layout.units(region) {
            Some((region, next))
        } else {
            let i = self.regions.iter().position(|&r| r == region);
            i.and_then(|i| self.regions.get(i + 1)).map(|&r| (r, 0))
        };
    }

    /// The standby's answer. Unknown ids (a previous run, a duplicate after
    /// a reconnection) are ignored.
    pub fn on_result(&mut self, r: &VerifyResult) -> Action {
        let Some(p) = self.outstanding.get(&r.id).copied() else {
            return Action::None;
        };
        if r.region != p.slice.region || r.first != p.slice.first || r.count != p.slice.count {
            return self.fail(format!(
                "the standby answered request {} for {} units {}+{}, not {} units {}+{}",
                r.id,
                r.region.name(),
                r.first,
                r.count,
                p.slice.region.name(),
                p.slice.first,
                p.slice.count
            ));
        }
        self.outstanding.remove(&r.id);
        match &r.outcome {
            VerifyOutcome::Retry(_) => {
                self.retries += 1;
                if self.retries > MAX_RETRIES {
                    return self.fail(format!(
                        "the standby could not compare {MAX_RETRIES} times in a row (replica resynchronising or refusing epochs)"
                    ));
                }
                self.redo.push_back(p);
                Action::None
            }
            VerifyOutcome::Failed(why) => self.fail(format!("the standby cannot compare: {why}")),
            VerifyOutcome::Compared { differing } => {
                self.retries = 0;
                self.compared(p, r.epoch, differing);
                if self.check_done() {
                    Action::Finished
                } else {
                    Action::None
                }
            }
        }
    }

    fn compared(&mut self, p: Pending, epoch: u64, differing: &[u32]) {
        let region = p.slice.region;
        let unit_size = self.layout.unit_size(region) as u64;
        let prog = &mut self.progress;
        prog.first_epoch = Some(prog.first_epoch.map_or(epoch, |e| e.min(epoch)));
        prog.last_epoch = Some(prog.last_epoch.map_or(epoch, |e| e.max(epoch)));
        if p.recheck {
            let still: Vec<u64> = differing
                .iter()
                .map(|&o| p.slice.first + o as u64)
                .collect();
            for unit in p.slice.first..p.slice.first + p.slice.count as u64 {
                if still.contains(&unit) {
                    let n = self.repairs.entry((region, unit)).or_insert(0);
                    if *n < MAX_REPAIRS {
                        self.to_repair.push((region, unit));
                    }
                    continue;
                }
                prog.repaired += 1;
                if let Some(m) = prog
                    .listed
                    .iter_mut()
                    .find(|m| m.unit == unit && m.region == region.name())
                {
                    m.repaired = true;
                }
            }
            return;
        }
        prog.slices_done += 1;
        match region {
            VerifyRegion::Memory => prog.pages_checked += p.slice.count as u64,
            VerifyRegion::Disk => prog.blocks_checked += p.slice.count as u64,
        }
        for &o in differing {
            let unit = p.slice.first + o as u64;
            prog.mismatches += 1;
            if prog.listed.len() < MAX_LISTED {
                prog.listed.push(Mismatch {
                    region: region.name().into(),
                    unit,
                    offset: unit * unit_size,
                    epoch,
                    repaired: false,
                });
            }
            if self.repair {
                self.to_repair.push((region, unit));
            }
        }
    }

    /// Records a repair handed to the engine (see [`Self::take_repairs`]).
    pub fn repair_sent(&mut self, region: VerifyRegion, unit: u64) {
        *self.repairs.entry((region, unit)).or_insert(0) += 1;
    }

    fn fail(&mut self, why: String) -> Action {
        self.progress.state = "failed".into();
        self.progress.error = Some(why);
        self.outstanding.clear();
        self.redo.clear();
        self.to_repair.clear();
        Action::Finished
    }

    /// Ends the run from outside (the engine stops, or the VM moved).
    pub fn abort(&mut self, why: &str) {
        if !self.is_finished() {
            self.fail(why.to_string());
        }
    }

    fn check_done(&mut self) -> bool {
        if !self.is_finished()
            && self.cursor.is_none()
            && self.redo.is_empty()
            && self.outstanding.is_empty()
            && self.to_repair.is_empty()
        {
            self.progress.state = "done".into();
        }
        self.is_finished()
    }
}

/// What the primary read at a pause: the slice's hashes and the units
/// to resend.
#[derive(Debug, Default)]
pub struct AtPause {
    pub hashes: Option<Vec<u64>>,
    /// Memory frames to resend, with their content.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// Disk blocks to resend: (byte offset, content).
    pub blocks: Vec<(u64, Vec<u8>)>,
    /// Reading failed: the run stops.
    pub error: Option<String>,
}

/// Pages read from guest memory at once while hashing (1 MiB).
const READ_FRAMES: u64 = 256;

/// Runs while the guest is paused at a checkpoint: reads the units to
/// resend and hashes `slice`. I/O, kept out of the state machine.
pub fn at_pause(
    layout: &Layout,
    reader: Option<&hypervisor::FrameReader>,
    disk: Option<&crate::engine::disk_image::DiskImage>,
    repairs: &[(VerifyRegion, u64)],
    slice: Option<Slice>,
) -> AtPause {
    let mut out = AtPause::default();
    if let Err(e) = read_at_pause(layout, reader, disk, repairs, slice, &mut out) {
        out.error = Some(e);
        out.hashes = None;
    }
    out
}

fn read_at_pause(
    layout: &Layout,
    reader: Option<&hypervisor::FrameReader>,
    disk: Option<&crate::engine::disk_image::DiskImage>,
    repairs: &[(VerifyRegion, u64)],
    slice: Option<Slice>,
    out: &mut AtPause,
) -> Result<(), String> {
    let ps = layout.page_size as usize;
    let needs_disk = repairs.iter().any(|(r, _)| *r == VerifyRegion::Disk)
        || slice.is_some_and(|s| s.region == VerifyRegion::Disk);
    let file = match disk {
        Some(d) if needs_disk => Some(
            d.open()
                .map_err(|e| format!("opening the disk image {d}: {e}"))?,
        ),
        _ => None,
    };
    let read_disk = |off: u64, buf: &mut [u8]| -> Result<(), String> {
        let f = file.as_ref().ok_or("the VM has no disk image")?;
        f.read_exact_at(buf, off)
            .map_err(|e| format!("reading the disk image at {off}: {e}"))
    };
    let read_mem = |first: u64, buf: &mut [u8]| -> Result<(), String> {
        let r = reader.ok_or("this backend cannot read guest memory")?;
        r(first, buf).map_err(|e| e.to_string())
    };
    for &(region, unit) in repairs {
        let s = Slice {
            region,
            first: unit,
            count: 1,
        };
        let (start, end) = layout.byte_range(&s);
        let mut buf = vec![0u8; (end - start) as usize];
        match region {
            VerifyRegion::Memory => {
                read_mem(unit, &mut buf)?;
                out.pages.push((unit, buf));
            }
            VerifyRegion::Disk => {
                read_disk(start, &mut buf)?;
                out.blocks.push((start, buf));
            }
        }
    }
    let Some(s) = slice else { return Ok(()) };
    let mut hashes = Vec::with_capacity(s.count as usize);
    match s.region {
        VerifyRegion::Memory => {
            let mut buf = vec![0u8; READ_FRAMES as usize * ps];
            let end = s.first + s.count as u64;
            let mut f = s.first;
            while f < end {
                let n = (end - f).min(READ_FRAMES);
                let b = &mut buf[..n as usize * ps];
                read_mem(f, b)?;
                hashes.extend(b.chunks(ps).map(hash_unit));
                f += n;
            }
        }
        VerifyRegion::Disk => {
            let (start, end) = layout.byte_range(&s);
            let mut buf = vec![0u8; (end - start) as usize];
            read_disk(start, &mut buf)?;
            hashes.extend(buf.chunks(DISK_BLOCK as usize).map(hash_unit));
        }
    }
    out.hashes = Some(hashes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u32 = 4096;

    fn layout(frames: u64, disk_bytes: u64) -> Layout {
        Layout {
            page_size: PAGE,
            frames,
            disk_bytes,
        }
    }

    /// A simulated primary and replica: units of the replica that differ.
    struct Sim {
        run: VerifyRun,
        bad: std::collections::BTreeSet<(VerifyRegion, u64)>,
        epoch: u64,
        /// Requests sent, answered at the end of the epoch.
        in_flight: VecDeque<VerifyHashes>,
        /// Resent units reach the replica (false: a replica that keeps
        /// corrupting them).
        repairs_take: bool,
    }

    impl Sim {
        fn new(run: VerifyRun) -> Self {
            Self {
                run,
                bad: Default::default(),
                epoch: 0,
                in_flight: VecDeque::new(),
                repairs_take: true,
            }
        }

        fn hashes(&self, s: &Slice, replica: bool) -> Vec<u64> {
            (s.first..s.first + s.count as u64)
                .map(|u| {
                    let bad = replica && self.bad.contains(&(s.region, u));
                    hash_unit(&[u as u8, (u >> 8) as u8, bad as u8])
                })
                .collect()
        }

        /// One checkpoint: repairs, then a slice; answers of the previous
        /// epoch's requests come back.
        fn epoch(&mut self) {
            self.epoch += 1;
            for (r, u) in self.run.take_repairs() {
                self.run.repair_sent(r, u);
                if self.repairs_take {
                    self.bad.remove(&(r, u));
                }
            }
            if let Some(s) = self.run.next_slice() {
                let h = self.hashes(&s, false);
                let req = self.run.hashed(s, self.epoch, h);
                self.in_flight.push_back(req);
            }
            while let Some(req) = self.in_flight.pop_front() {
                let s = Slice {
                    region: req.region,
                    first: req.first,
                    count: req.hashes.len() as u32,
                };
                let mine = self.hashes(&s, true);
                let differing = mine
                    .iter()
                    .zip(&req.hashes)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, _)| i as u32)
                    .collect();
                self.run.on_result(&VerifyResult {
                    id: req.id,
                    epoch: req.epoch,
                    region: req.region,
                    first: req.first,
                    count: s.count,
                    outcome: VerifyOutcome::Compared { differing },
                });
            }
        }

        fn run_to_end(&mut self) {
            for _ in 0..100_000 {
                if self.run.is_finished() {
                    return;
                }
                self.epoch();
            }
            panic!("run did not finish: {:?}", self.run.progress());
        }
    }

    #[test]
    fn walks_memory_then_disk_and_counts_every_unit() {
        // 40 MiB of memory (3 slices), 20 MiB + 100 bytes of disk (2 slices).
        let l = layout(10_240, (20 << 20) + 100);
        let run = VerifyRun::new(
            1,
            l,
            Scope {
                memory: true,
                disk: true,
            },
            false,
        );
        assert_eq!(run.progress().slices_total, 3 + 2);
        let mut sim = Sim::new(run);
        let mut seen = Vec::new();
        while let Some(s) = sim.run.next_slice() {
            seen.push((s.region, s.first, s.count));
            let h = sim.hashes(&s, false);
            let req = sim.run.hashed(s, 1, h);
            sim.in_flight.push_back(req);
            sim.in_flight.clear();
            sim.run.lost_all();
            sim.run.redo.clear();
        }
        assert_eq!(
            seen,
            vec![
                (VerifyRegion::Memory, 0, 4096),
                (VerifyRegion::Memory, 4096, 4096),
                (VerifyRegion::Memory, 8192, 2048),
                (VerifyRegion::Disk, 0, 4096),
                (VerifyRegion::Disk, 4096, 1025),
            ]
        );
        let mut sim = Sim::new(VerifyRun::new(
            2,
            l,
            Scope {
                memory: true,
                disk: true,
            },
            false,
        ));
        sim.run_to_end();
        let p = sim.run.progress();
        assert_eq!(p.state, "done");
        assert_eq!(p.slices_done, 5);
        assert_eq!(p.pages_checked, 10_240);
        assert_eq!(p.blocks_checked, 5121);
        assert_eq!(p.mismatches, 0);
        assert_eq!(
            l.byte_range(&Slice {
                region: VerifyRegion::Disk,
                first: 5120,
                count: 1
            }),
            (20 << 20, (20 << 20) + 100)
        );
    }

    #[test]
    fn scope_limits_the_walk() {
        let l = layout(100, 1 << 20);
        let mem = VerifyRun::new(
            1,
            l,
            Scope {
                memory: true,
                disk: false,
            },
            false,
        );
        assert_eq!(mem.progress().slices_total, 1);
        let mut sim = Sim::new(mem);
        sim.run_to_end();
        assert_eq!(
            (
                sim.run.progress().pages_checked,
                sim.run.progress().blocks_checked
            ),
            (100, 0)
        );
        // Nothing to verify: done at once.
        let none = VerifyRun::new(
            2,
            layout(100, 0),
            Scope {
                memory: false,
                disk: true,
            },
            false,
        );
        assert!(none.is_finished());
        assert_eq!(none.progress().state, "done");
    }

    #[test]
    fn differences_are_listed_with_frame_numbers_and_offsets() {
        let l = layout(10_000, 1 << 20);
        let mut sim = Sim::new(VerifyRun::new(
            1,
            l,
            Scope {
                memory: true,
                disk: true,
            },
            false,
        ));
        sim.bad.insert((VerifyRegion::Memory, 4097));
        sim.bad.insert((VerifyRegion::Disk, 3));
        sim.run_to_end();
        let p = sim.run.progress();
        assert_eq!(p.state, "done");
        assert_eq!(p.mismatches, 2);
        assert_eq!(p.repaired, 0);
        assert_eq!(p.listed[0].region, "memory");
        assert_eq!((p.listed[0].unit, p.listed[0].offset), (4097, 4097 * 4096));
        assert_eq!(p.listed[1].region, "disk");
        assert_eq!((p.listed[1].unit, p.listed[1].offset), (3, 3 * 4096));
        assert!(
            sim.bad.contains(&(VerifyRegion::Memory, 4097)),
            "no repair without --repair"
        );
    }

    #[test]
    fn repair_resends_and_checks_again() {
        let l = layout(10_000, 1 << 20);
        let mut sim = Sim::new(VerifyRun::new(
            1,
            l,
            Scope {
                memory: true,
                disk: true,
            },
            true,
        ));
        for u in [5, 6, 7, 9000] {
            sim.bad.insert((VerifyRegion::Memory, u));
        }
        sim.bad.insert((VerifyRegion::Disk, 255));
        sim.run_to_end();
        let p = sim.run.progress();
        assert_eq!(p.state, "done");
        assert_eq!((p.mismatches, p.repaired), (5, 5));
        assert!(p.listed.iter().all(|m| m.repaired));
        assert!(sim.bad.is_empty());
    }

    #[test]
    fn lost_and_refused_requests_are_asked_again() {
        let l = layout(8192, 0);
        let mut run = VerifyRun::new(
            3,
            l,
            Scope {
                memory: true,
                disk: true,
            },
            false,
        );
        let s = run.next_slice().unwrap();
        let req = run.hashed(s, 10, vec![0; s.count as usize]);
        assert_eq!(req.id, 3 << 32);
        // The connection dropped: the same slice comes again.
        run.lost_all();
        assert_eq!(run.next_slice(), Some(s));
        let req = run.hashed(s, 11, vec![0; s.count as usize]);
        // Not compared (the replica was not at epoch 11): again.
        let a = run.on_result(&VerifyResult {
            id: req.id,
            epoch: 11,
            region: s.region,
            first: s.first,
            count: s.count,
            outcome: VerifyOutcome::Retry("resync".into()),
        });
        assert_eq!(a, Action::None);
        assert_eq!(run.next_slice(), Some(s));
        // A stale answer changes nothing.
        assert_eq!(
            run.on_result(&VerifyResult {
                id: 7,
                epoch: 1,
                region: s.region,
                first: 0,
                count: 1,
                outcome: VerifyOutcome::Compared { differing: vec![0] },
            }),
            Action::None
        );
        assert_eq!(run.progress().mismatches, 0);
        // The standby cannot compare at all: the run fails.
        let req = run.hashed(s, 12, vec![0; s.count as usize]);
        let a = run.on_result(&VerifyResult {
            id: req.id,
            epoch: 12,
            region: s.region,
            first: s.first,
            count: s.count,
            outcome: VerifyOutcome::Failed("no replica".into()),
        });
        assert_eq!(a, Action::Finished);
        assert_eq!(run.progress().state, "failed");
        assert!(run.next_slice().is_none());
    }

    #[test]
    fn outstanding_requests_are_bounded() {
        let mut run = VerifyRun::new(
            1,
            layout(1 << 20, 0),
            Scope {
                memory: true,
                disk: false,
            },
            false,
        );
        for e in 0..MAX_OUTSTANDING as u64 {
            let s = run.next_slice().unwrap();
            run.hashed(s, e, vec![0; s.count as usize]);
        }
        assert!(run.next_slice().is_none());
    }

    #[test]
    fn a_unit_that_stays_different_is_resent_a_bounded_number_of_times() {
        let mut sim = Sim::new(VerifyRun::new(
            1,
            layout(64, 0),
            Scope {
                memory: true,
                disk: false,
            },
            true,
        ));
        sim.bad.insert((VerifyRegion::Memory, 1));
        sim.repairs_take = false;
        sim.run_to_end();
        let p = sim.run.progress();
        assert_eq!(p.state, "done");
        assert_eq!((p.mismatches, p.repaired), (1, 0));
        assert_eq!(
            sim.run.repairs.get(&(VerifyRegion::Memory, 1)),
            Some(&MAX_REPAIRS)
        );
    }
}
