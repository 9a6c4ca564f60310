//! Consistency groups in the site daemon: a group is one replication unit
//! (one epoch stream, one replica, one lease, one status entry, named
//! after the group) whose guest is a [`hypervisor::group::GroupGuest`] of
//! its members. Each member's transmitted frames are tagged with the
//! member's index as they are held, so the group's one output buffer
//! releases them (together, at the group's commit) to each member's own
//! tap.
//!
//! Frames from one member to another (unicast to a member's MAC) are not
//! held: they leave at once through the sender's tap. Why that is safe: a
//! takeover resumes every member from the same group checkpoint, so a
//! frame a member received from a future the checkpoint does not hold is
//! forgotten by its receiver together with its sender; and whatever a
//! member tells the world because of it is held until a commit that holds
//! both. Why it matters: a request that crosses tiers (web to database and
//! back) would otherwise wait for a commit at every hop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hypervisor::group::{member_ranges, GroupGuest, GroupState};
use hypervisor::kvm::devices::net::FrameSink;
use hypervisor::{ProtectedGuest, Seams, WriteHook};

use crate::config::{Config, Vm};
use crate::engine::disk_image::DiskImage;
use crate::engine::protect::Capture;

/// What the daemon replicates as one: a VM, or a consistency group.
#[derive(Debug, Clone)]
pub struct Unit {
    /// The unit as the engine sees one VM: for a group, a VM named after
    /// the group, with its members' sites, replication settings, total
    /// memory, service prefixes and DNS records (see [`group_as_vm`]).
    pub vm: Vm,
    /// The group's members, in configuration order; empty for a plain VM.
    pub members: Vec<Vm>,
}

impl Unit {
    pub fn name(&self) -> &str {
        &self.vm.name
    }

    pub fn is_group(&self) -> bool {
        !self.members.is_empty()
    }
}

/// The units among `vms`: a group whose members are all among them is one
/// unit, every other VM is a unit of its own (a group with members
/// missing from `vms` is left out: all of a group runs at one site).
pub fn units(cfg: &Config, vms: Vec<Vm>) -> Vec<Unit> {
    let mut out = Vec::new();
    let grouped = |name: &str| cfg.groups.iter().any(|g| g.vms.iter().any(|v| v == name));
    for g in &cfg.groups {
        let members: Vec<Vm> = g
            .vms
            .iter()
            .filter_map(|m| vms.iter().find(|v| &v.name == m).cloned())
            .collect();
        if members.len() == g.vms.len() && !members.is_empty() {
            out.push(Unit {
                vm: group_as_vm(&g.name, &members),
                members,
            });
        }
    }
    for vm in vms {
        if !grouped(&vm.name) {
            out.push(Unit {
                vm,
                members: Vec::new(),
            });
        }
    }
    out
}

/// The unit's disk at its primary: the VM's image, or a group's member
/// images back to back in member order (members have disks all or none:
/// the configuration is checked for it).
pub fn unit_disk(vm: &Vm, members: &[Vm]) -> Option<DiskImage> {
    if members.is_empty() {
        return vm.disk.clone().map(DiskImage::file);
    }
    let parts: Vec<PathBuf> = members.iter().filter_map(|m| m.disk.clone()).collect();
    (!parts.is_empty()).then(|| DiskImage::members(&vm.name, parts))
}

/// Where each member's disk lies in the group's disk (start, bytes), from
/// the members' images at this site; None for a member without one. The
/// same layout holds at both sites: the standby sizes the group's replica
/// from its own copies of the images.
pub fn member_disks(members: &[Vm]) -> Result<Vec<Option<(u64, u64)>>, String> {
    let mut start = 0u64;
    members
        .iter()
        .map(|m| {
            let Some(p) = &m.disk else {
                return Ok(None);
            };
            let len = std::fs::metadata(p)
                .map_err(|e| format!("vms.{}.disk {}: {e}", m.name, p.display()))?
                .len();
            let at = (start, len);
            start += len;
            Ok(Some(at))
        })
        .collect()
}

/// The group as one VM for the engine, failover and netops: the first
/// member's settings, the group's name, every member's memory, prefixes
/// and DNS records (announced and moved together, under the group's one
/// lease).
pub fn group_as_vm(name: &str, members: &[Vm]) -> Vm {
    let mut v = members[0].clone();
    v.name = name.to_owned();
    v.memory_mib = members.iter().map(|m| m.memory_mib).sum();
    v.disk = None;
    v.service_prefixes = members
        .iter()
        .flat_map(|m| m.service_prefixes.iter().copied())
        .collect();
    v.dns = members.iter().flat_map(|m| m.dns.iter().cloned()).collect();
    v
}

/// The members' MACs and taps, for frames between members (see the
/// module's notes). The taps are known once the members run.
pub struct Intra {
    macs: Vec<[u8; 6]>,
    taps: Mutex<Vec<Option<Box<dyn FrameSink>>>>,
}

impl Intra {
    pub fn new(macs: Vec<[u8; 6]>) -> Arc<Intra> {
        Arc::new(Intra {
            macs,
            taps: Mutex::new(Vec::new()),
        })
    }

    fn set_taps(&self, taps: Vec<Option<Box<dyn FrameSink>>>) {
        if let Ok(mut t) = self.taps.lock() {
            *t = taps;
        }
    }

    /// Sends `frame` of member `from` at once if it goes to another
    /// member; false if it must be held.
    fn send_between_members(&self, from: usize, frame: &[u8]) -> bool {
        let Some(dst) = frame.get(..6) else {
            return false;
        };
        // Broadcast and multicast (ARP requests...) reach the world too.
        let to_member = dst[0] & 1 == 0
            && self
                .macs
                .iter()
                .enumerate()
                .any(|(i, mac)| i != from && mac[..] == *dst);
        if !to_member {
            return false;
        }
        match self.taps.lock() {
            Ok(mut taps) => match taps.get_mut(from) {
                Some(Some(tap)) => {
                    tap.send(frame);
                    true
                }
                // Not running yet: held like any other frame.
                _ => false,
            },
            Err(_) => false,
        }
    }
}

/// Frames of member `tag`, held in the group's output buffer with the tag
/// in front, except those to another member.
struct TagFrames {
    tag: u8,
    inner: Box<dyn FrameSink>,
    intra: Option<Arc<Intra>>,
    buf: Vec<u8>,
}

impl FrameSink for TagFrames {
    fn send(&mut self, frame: &[u8]) {
        if let Some(intra) = &self.intra {
            if intra.send_between_members(usize::from(self.tag), frame) {
                return;
            }
        }
        self.buf.clear();
        self.buf.push(self.tag);
        self.buf.extend_from_slice(frame);
        self.inner.send(&self.buf);
    }
}

/// Releases the group's committed frames, each to its member's tap.
pub struct GroupRelease {
    taps: Vec<Option<Box<dyn FrameSink>>>,
}

impl FrameSink for GroupRelease {
    fn send(&mut self, frame: &[u8]) {
        let Some((&tag, rest)) = frame.split_first() else {
            return;
        };
        if let Some(Some(tap)) = self.taps.get_mut(usize::from(tag)) {
            tap.send(rest);
        }
    }
}

/// A member's disk writes, captured at the member's place in the group's
/// disk.
struct ShiftWrites {
    start: u64,
    inner: Box<dyn WriteHook>,
}

impl WriteHook for ShiftWrites {
    fn on_write(&mut self, offset: u64, data: &[u8]) {
        self.inner.on_write(self.start + offset, data);
    }

    fn on_flush(&mut self) {
        self.inner.on_flush();
    }
}

/// The seams of member `index`: its frames held (tagged) with the group's,
/// those to other members sent at once through `intra`; its disk writes
/// (if it has a disk, at `disk` in the group's) captured with the group's.
fn member_seams(
    capture: &Capture,
    index: usize,
    intra: &Arc<Intra>,
    disk: Option<(u64, u64)>,
) -> Result<Seams, String> {
    let tag = u8::try_from(index).map_err(|_| "a group has at most 256 members".to_owned())?;
    Ok(Seams {
        frame_sink: Some(Box::new(TagFrames {
            tag,
            inner: capture.frame_sink(),
            intra: Some(intra.clone()),
            buf: Vec::new(),
        })),
        write_hook: disk.map(|(start, _)| {
            Box::new(ShiftWrites {
                start,
                inner: capture.write_hook(),
            }) as Box<dyn WriteHook>
        }),
    })
}

/// The members' MACs, for [`Intra`].
fn intra_of(members: &[Vm]) -> Result<Arc<Intra>, String> {
    let macs = members
        .iter()
        .map(|m| super::kvm_vm::guest_net(m, "micro-VMs speak IPv4 only").map(|n| n.mac))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Intra::new(macs))
}

/// Starts every member here (micro-VMs), their output held by `capture`.
pub fn start_members(
    members: &[Vm],
    capture: &Capture,
) -> Result<(GroupGuest, GroupRelease), String> {
    let intra = intra_of(members)?;
    let disks = member_disks(members)?;
    let mut vms = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        let spec = super::kvm_vm::spec_from_config(m)?;
        let g = hypervisor::kvm::Vm::start(&spec, member_seams(capture, i, &intra, disks[i])?)
            .map_err(|e| format!("VM {}: {e}", m.name))?;
        vms.push(g);
    }
    assemble(vms, &intra)
}

/// The running members as one guest, their taps known to `intra` (for
/// frames between members) and to the group's release.
fn assemble(
    vms: Vec<hypervisor::kvm::Vm>,
    intra: &Intra,
) -> Result<(GroupGuest, GroupRelease), String> {
    let mut guests: Vec<Box<dyn ProtectedGuest>> = Vec::new();
    let mut taps: Vec<Option<Box<dyn FrameSink>>> = Vec::new();
    let mut direct: Vec<Option<Box<dyn FrameSink>>> = Vec::new();
    for g in vms {
        taps.push(g.tap().map(|t| Box::new(t) as Box<dyn FrameSink>));
        direct.push(g.tap().map(|t| Box::new(t) as Box<dyn FrameSink>));
        guests.push(Box::new(g));
    }
    intra.set_taps(direct);
    let group = GroupGuest::new(guests).map_err(|e| e.to_string())?;
    Ok((group, GroupRelease { taps }))
}

/// Resumes every member from the group's replica (memory split by member,
/// state blob split by member, each member's disk its part of the
/// replica's `disk`), their output held by `capture`.
pub fn resume_members(
    members: &[Vm],
    memory: &[u8],
    state: &[u8],
    disk: &Path,
    capture: &Capture,
) -> Result<(GroupGuest, GroupRelease), String> {
    let intra = intra_of(members)?;
    let disks = member_disks(members)?;
    let vms = restore_members(members, memory, state, disk, &disks, |i| {
        member_seams(capture, i, &intra, disks[i])
    })?;
    assemble(vms, &intra)
}

/// Resumes every member from the group's replica with its output going
/// straight to its tap (`standby --activate`: no protection).
pub fn activate_members(
    members: &[Vm],
    memory: &[u8],
    state: &[u8],
    disk: &Path,
) -> Result<Vec<hypervisor::kvm::Vm>, String> {
    let disks = member_disks(members)?;
    restore_members(members, memory, state, disk, &disks, |_| {
        Ok(Seams::default())
    })
}

/// Each member restored from its slice of the group's memory, its part of
/// the group's state blob and its part (`disks`, from [`member_disks`]) of
/// the replica's disk image, with the seams `seams(i)` gives.
fn restore_members(
    members: &[Vm],
    memory: &[u8],
    state: &[u8],
    disk: &Path,
    disks: &[Option<(u64, u64)>],
    seams: impl Fn(usize) -> Result<Seams, String>,
) -> Result<Vec<hypervisor::kvm::Vm>, String> {
    use hypervisor::kvm;

    let states = GroupState::decode(state).map_err(|e| format!("the group's state: {e}"))?;
    if states.0.len() != members.len() {
        return Err(format!(
            "the replica holds {} members' state, the group has {} members",
            states.0.len(),
            members.len()
        ));
    }
    let ps = 4096u64;
    let frames: Vec<u64> = members.iter().map(|m| m.memory_mib * 256).collect();
    let mut vms = Vec::new();
    for (i, (m, range)) in members.iter().zip(member_ranges(&frames)).enumerate() {
        let mut spec = super::kvm_vm::spec_from_config(m)?;
        if let Some((start, len)) = disks[i] {
            // The member's own image here is an old copy: it runs on its
            // part of the replica.
            spec = spec.disk_window(disk, start, len);
        }
        let (lo, hi) = ((range.start * ps) as usize, (range.end * ps) as usize);
        let image = memory.get(lo..hi).ok_or_else(|| {
            format!(
                "the replica has {} bytes of memory, member {} needs bytes {lo}..{hi}",
                memory.len(),
                m.name
            )
        })?;
        let g = super::takeover::restore_retrying(&m.name, || {
            let seams = seams(i).map_err(kvm::Error::Restore)?;
            kvm::restore(&spec, image, &states.0[i], seams)
        })
        .map_err(|e| format!("resuming group member {}: {e}", m.name))?;
        vms.push(g);
    }
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);

    impl FrameSink for Collect {
        fn send(&mut self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    #[test]
    fn each_members_frames_reach_its_own_tap() {
        let a = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::new(Mutex::new(Vec::new()));
        let mut release = GroupRelease {
            taps: vec![
                Some(Box::new(Collect(a.clone()))),
                Some(Box::new(Collect(b.clone()))),
            ],
        };
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut m1 = TagFrames {
            tag: 1,
            inner: Box::new(Collect(held.clone())),
            intra: None,
            buf: Vec::new(),
        };
        let mut m0 = TagFrames {
            tag: 0,
            inner: Box::new(Collect(held.clone())),
            intra: None,
            buf: Vec::new(),
        };
        m1.send(b"to b");
        m0.send(b"to a");
        for f in held.lock().unwrap().iter() {
            release.send(f);
        }
        // Garbage (no tag, unknown member) goes nowhere.
        release.send(b"");
        release.send(&[7, 1, 2]);
        assert_eq!(*a.lock().unwrap(), vec![b"to a".to_vec()]);
        assert_eq!(*b.lock().unwrap(), vec![b"to b".to_vec()]);
    }

    fn frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_between_members_leave_at_once_and_the_rest_is_held() {
        let (a, b) = ([0x52, 0x54, 0, 0, 0, 1], [0x52, 0x54, 0, 0, 0, 2]);
        let outsider = [0x52, 0x54, 0, 0, 0, 3];
        let tap_a = Arc::new(Mutex::new(Vec::new()));
        let tap_b = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let intra = Intra::new(vec![a, b]);
        let mut m0 = TagFrames {
            tag: 0,
            inner: Box::new(Collect(held.clone())),
            intra: Some(intra.clone()),
            buf: Vec::new(),
        };
        // Before the taps are known everything is held.
        m0.send(&frame(b, b"early"));
        assert_eq!(held.lock().unwrap().len(), 1);
        intra.set_taps(vec![
            Some(Box::new(Collect(tap_a.clone()))),
            Some(Box::new(Collect(tap_b.clone()))),
        ]);
        m0.send(&frame(b, b"to b"));
        m0.send(&frame(outsider, b"to the world"));
        m0.send(&frame([0xff; 6], b"broadcast"));
        m0.send(&frame(a, b"to itself"));
        m0.send(&[0x52, 0x54]);
        // The frame to b left through a's own tap, at once.
        assert_eq!(*tap_a.lock().unwrap(), vec![frame(b, b"to b")]);
        assert!(tap_b.lock().unwrap().is_empty());
        let held = held.lock().unwrap();
        let held_payloads: Vec<&[u8]> = held.iter().map(|f| &f[1..]).collect();
        assert_eq!(
            held_payloads,
            vec![
                &frame(b, b"early")[..],
                &frame(outsider, b"to the world")[..],
                &frame([0xff; 6], b"broadcast")[..],
                &frame(a, b"to itself")[..],
                &[0x52, 0x54][..],
            ]
        );
    }
}
