//! [`QemuGuest`]: one QEMU process running a protected Linux guest, and
//! [`ProtectedGuest`] for it.
//!
//! A checkpoint: QMP `stop` (vCPUs stopped; QEMU's main loop keeps running,
//! but the NIC sends nothing while the guest is stopped), wait until every
//! frame the guest sent before the stop has reached the sink, `at_pause`
//! (the epoch boundary), device state saved through `migrate` while RAM is
//! compared with the shadow, `cont`. Any failure after the shadow has
//! changed resets it, so the next round carries the full image again
//! rather than a replica that diverged.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::colo::sink::{ColoSink, Control};
use super::colo::{self, ColoState, Layout};
use super::devstate::{self, StateChannel};
use super::error::{Error, Result};
use super::nbd::NbdServer;
use super::netdev::{Listening, NetBackend};
use super::process::{command_line, Paths, QemuProcess};
use super::qmp::Qmp;
use super::shadow::{RamMap, Shadow, PAGE_SIZE};
use super::spec::{DirtyTracking, QemuSpec};
use super::write_protect::{self, WriteTracker, Written};
use crate::guest::{Checkpoint, GuestError, ProtectedGuest};
use crate::seams::Seams;

/// How long QEMU may take to start (QMP socket up, NIC connected).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the NIC backend may take to drain after a stop.
const QUIESCE_TIMEOUT: Duration = Duration::from_millis(50);

/// Where the last checkpoint's pause went, in this backend's own terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QemuTimings {
    /// QMP `stop` (and draining the NIC backend).
    pub stop: Duration,
    /// Saving the device state (`migrate` to the memfd), beyond the part
    /// that overlaps the compare.
    pub state: Duration,
    /// Finding the changed pages: comparing RAM with the shadow (all of it
    /// in Compare mode, the written pages with kernel write tracking),
    /// the scan included.
    pub compare: Duration,
    /// Kernel write tracking: the `PAGEMAP_SCAN` walk (part of `compare`).
    pub scan: Duration,
    /// Kernel write tracking: pages the scan reported written.
    pub written_pages: u64,
    /// Copying the changed pages (staging buffer and shadow).
    pub copy: Duration,
    /// QMP `cont`.
    pub cont: Duration,
    /// Stop to resume.
    pub total: Duration,
    /// Device state size in bytes.
    pub state_bytes: usize,
}

/// The RAM file in tmpfs; its name is removed once QEMU has mapped it, or
/// on drop if starting failed before.
#[derive(Debug)]
struct RamFile {
    path: PathBuf,
    _file: File,
}

impl Drop for RamFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A Linux guest running in a QEMU process we own.
pub struct QemuGuest {
    // Declaration order is drop order: QEMU is killed first, then the
    // sockets close and the RAM goes.
    process: Mutex<QemuProcess>,
    qmp: Qmp,
    net: Option<NetBackend>,
    nbd: Option<NbdServer>,
    /// Shared with [`ProtectedGuest::frame_reader`]'s readers.
    ram: std::sync::Arc<RamMap>,
    _ram_file: RamFile,
    shadow: Shadow,
    /// Kernel write tracking (None: Compare or COLO mode).
    tracker: Option<WriteTracker>,
    /// Frames the tracker reported and no round has taken yet.
    written: Written,
    state: StateChannel,
    /// COLO mode: the sink of the current migration (None until started,
    /// or when a restart failed: the next call retries).
    sink: Option<ColoSink>,
    colo: bool,
    /// QMP `stop` is in force (Compare mode, or a COLO sink that failed).
    qmp_stopped: bool,
    ram_pages: u64,
    paths: Paths,
    /// The engine paused the guest (`pause`): checkpoints leave it paused.
    held: bool,
    timings: QemuTimings,
}

/// The sink's QMP actions on our QEMU.
struct QmpControl<'a>(&'a mut Qmp);

/// What `x-checkpoint-delay` is set to: never on its own; every set
/// (even to the same value) triggers a checkpoint at once.
const CHECKPOINT_DELAY_MS: u64 = 3_600_000;

impl Control for QmpControl<'_> {
    fn start_migration(
        &mut self,
        qemu_end: std::os::unix::net::UnixStream,
    ) -> std::result::Result<(), String> {
        use serde_json::json;
        use std::os::fd::AsFd;
        let q = &mut *self.0;
        let r = (|| -> Result<()> {
            // x-ignore-shared must be off: with it the checkpoints would
            // skip the (shared) guest RAM too.
            q.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [
                    {"capability": "x-ignore-shared", "state": false},
                    {"capability": "x-colo", "state": true}]})),
            )?;
            q.execute(
                "migrate-set-parameters",
                Some(json!({"x-checkpoint-delay": CHECKPOINT_DELAY_MS,
                            "max-bandwidth": 1u64 << 40,
                            "downtime-limit": 1})),
            )?;
            q.execute_with_fd(
                "getfd",
                Some(json!({"fdname": "remus-wan-colo"})),
                qemu_end.as_fd(),
            )?;
            q.execute("migrate", Some(json!({"uri": "fd:remus-wan-colo"})))?;
            Ok(())
        })();
        r.map_err(|e| e.to_string())
    }
    fn force_completion(&mut self) -> std::result::Result<(), String> {
        self.0
            .execute(
                "migrate-set-parameters",
                Some(serde_json::json!({"downtime-limit": 2_000_000})),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn request_checkpoint(&mut self) -> std::result::Result<(), String> {
        self.0
            .execute(
                "migrate-set-parameters",
                Some(serde_json::json!({"x-checkpoint-delay": CHECKPOINT_DELAY_MS})),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn abandon(&mut self) -> std::result::Result<(), String> {
        // In COLO: failover, the guest runs on. Before COLO: cancel.
        match self.0.execute("x-colo-lost-heartbeat", None) {
            Ok(_) => Ok(()),
            Err(e) => self
                .0
                .execute("migrate_cancel", None)
                .map(|_| ())
                .map_err(|c| format!("{e}; {c}")),
        }
    }
}

impl std::fmt::Debug for QemuGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuGuest")
            .field("pid", &self.pid())
            .field("ram", &self.paths.ram)
            .field("held", &self.held)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl QemuGuest {
    /// Boots the guest described by `spec`. Transmitted frames go to
    /// `seams.frame_sink` (dropped when there is none).
    pub fn start(spec: &QemuSpec, seams: Seams) -> Result<QemuGuest> {
        Self::launch(spec, seams, "primary", None)
    }

    /// Builds a guest from a committed replica and runs it: `memory_image`
    /// is the whole guest RAM and `state` the device state of the same
    /// checkpoint (as [`ProtectedGuest::checkpoint`] produced them). The
    /// QEMU is started with `spec`'s command line plus `-incoming defer`,
    /// loads the state and continues. The next checkpoint of the new
    /// guest carries its full image.
    pub fn restore(
        spec: &QemuSpec,
        memory_image: &[u8],
        state: &[u8],
        seams: Seams,
    ) -> Result<QemuGuest> {
        let frames_bytes = spec.frame_count() * PAGE_SIZE as u64;
        let n = memory_image.len() as u64;
        if n != frames_bytes && n != spec.ram_bytes() {
            return Err(Error::Restore(format!(
                "memory image has {n} bytes, the VM has {frames_bytes} ({} frames)",
                spec.frame_count()
            )));
        }
        if ColoState::is_envelope(state) && n != frames_bytes {
            return Err(Error::Restore(format!(
                "memory image has {n} bytes; a COLO checkpoint needs all {frames_bytes} (RAM blocks beyond the main RAM included)"
            )));
        }
        if !state.starts_with(&devstate::STREAM_MAGIC) && !ColoState::is_envelope(state) {
            return Err(Error::Restore(
                "the device state is not a QEMU migration stream".into(),
            ));
        }
        Self::launch(spec, seams, "replica", Some((memory_image, state)))
    }

    fn launch(
        spec: &QemuSpec,
        seams: Seams,
        tag: &str,
        replica: Option<(&[u8], &[u8])>,
    ) -> Result<QemuGuest> {
        spec.validate()?;
        if seams.write_hook.is_some() && spec.disk.is_none() {
            return Err(Error::Spec(
                "a disk write hook but no disk in the spec".into(),
            ));
        }
        for p in [&spec.image.kernel, &spec.image.initrd] {
            std::fs::metadata(p).map_err(|source| Error::GuestImage {
                path: p.clone(),
                source,
            })?;
        }
        let paths = Paths::new(spec, tag);
        let len = spec.ram_bytes() as usize;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&paths.ram)
            .map_err(Error::io(format!("creating {}", paths.ram.display())))?;
        let ram_file = RamFile {
            path: paths.ram.clone(),
            _file: file
                .try_clone()
                .map_err(Error::io("duplicating the RAM fd"))?,
        };
        file.set_len(len as u64)
            .map_err(Error::io(format!("sizing {}", paths.ram.display())))?;
        let ram =
            std::sync::Arc::new(RamMap::map(&file, len).map_err(Error::io("mapping guest RAM"))?);
        if let Some((image, _)) = replica {
            ram.write_from(image);
        }

        // The disk server listens before QEMU starts: QEMU connects to it
        // while it builds the block device.
        let nbd = match &spec.disk {
            Some(image) => Some(NbdServer::start(image, &paths.nbd, seams.write_hook)?),
            None => None,
        };
        let listening = match &spec.network {
            Some(_) => Some(Listening::bind(&paths.net)?),
            None => None,
        };
        let args = command_line(spec, &paths, spec.accel.resolve(), replica.is_some());
        tracing::debug!(?args, "starting QEMU");
        let want_wp = matches!(
            spec.dirty_tracking,
            DirtyTracking::Auto | DirtyTracking::WriteProtect
        );
        // Asked for by name, write tracking must work; under Auto its
        // absence means the next mode.
        let wp_unavailable = |e: write_protect::WpError| -> Result<()> {
            if spec.dirty_tracking == DirtyTracking::WriteProtect {
                return Err(e.into());
            }
            tracing::warn!("kernel write tracking unavailable ({e}); trying COLO, then compare");
            Ok(())
        };
        let env = if want_wp {
            write_protect::preload_env(&spec.run_dir)
                .or_else(|e| wp_unavailable(e).map(|()| Vec::new()))?
        } else {
            Vec::new()
        };
        let mut process = QemuProcess::spawn(&spec.qemu_binary, &args, &env, &paths.log)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut alive = || process.check_alive("starting");
        let net = match listening {
            Some(l) => Some(l.accept(deadline, &mut alive, seams.frame_sink)?),
            None => None,
        };
        let mut qmp = Qmp::connect(&paths.qmp, deadline, &mut alive)?;
        // QMP answers once QEMU's main loop runs, so QEMU has mapped the
        // RAM file by now and so have we: its name can go, and nothing is
        // left in tmpfs even if this process is killed without unwinding.
        let _ = std::fs::remove_file(&paths.ram);
        let mut state = StateChannel::new()?;
        let ram_pages = (len / PAGE_SIZE) as u64;
        let accel = spec.accel.resolve();
        let tracker = if want_wp && !env.is_empty() {
            WriteTracker::attach(process.pid(), &ram_file._file, len as u64)
                .map(Some)
                .or_else(|e| wp_unavailable(e).map(|()| None))?
        } else {
            None
        };
        let setup = (|| -> Result<bool> {
            let colo = match spec.dirty_tracking {
                DirtyTracking::Compare | DirtyTracking::WriteProtect => false,
                DirtyTracking::Auto if tracker.is_some() => false,
                mode => {
                    let v = qmp.execute("query-version", None)?;
                    let v = colo::version::from_qmp(&v)
                        .ok_or_else(|| Error::QmpProtocol(format!("query-version returned {v}")))?;
                    match (mode, colo::version::check(v, accel)) {
                        (DirtyTracking::Colo, Err(u)) => return Err(u.into()),
                        (_, r) => r.is_ok(),
                    }
                }
            };
            match replica {
                Some((image, blob)) if ColoState::is_envelope(blob) => {
                    let stream = restore_stream(blob, image, ram_pages)?;
                    state.load(&mut qmp, &stream)?;
                }
                Some((_, blob)) => {
                    devstate::enable_ignore_shared(&mut qmp)?;
                    state.load(&mut qmp, blob)?;
                }
                None => {}
            }
            // Compare mode saves device state with x-ignore-shared; COLO
            // must not have it (checkpoints would skip the guest RAM).
            qmp.execute(
                "migrate-set-capabilities",
                Some(serde_json::json!({"capabilities": [
                    {"capability": "x-ignore-shared", "state": !colo}]})),
            )?;
            if replica.is_some() {
                qmp.execute("cont", None)?;
            }
            Ok(colo)
        })();
        let colo = match setup {
            Ok(c) => c,
            Err(e) => {
                // QEMU exits on a stream it cannot load: its own message
                // says more than the closed QMP socket.
                std::thread::sleep(Duration::from_millis(100));
                let what = if replica.is_some() {
                    "loading the device state"
                } else {
                    "setting up migration"
                };
                return Err(match process.check_alive(what) {
                    Err(exited) => exited,
                    Ok(()) => e,
                });
            }
        };
        let sink = if colo {
            Some(ColoSink::start(&mut QmpControl(&mut qmp), ram_pages)?)
        } else {
            None
        };
        Ok(QemuGuest {
            process: Mutex::new(process),
            qmp,
            net,
            nbd,
            ram,
            _ram_file: ram_file,
            shadow: Shadow::new(len),
            tracker,
            written: Written::new(ram_pages),
            state,
            sink,
            colo,
            qmp_stopped: false,
            ram_pages,
            paths,
            held: false,
            timings: QemuTimings::default(),
        })
    }

    /// Whether this guest uses COLO dirty tracking.
    pub fn colo(&self) -> bool {
        self.colo
    }

    /// The dirty tracking this guest uses (never `Auto`).
    pub fn dirty_tracking(&self) -> DirtyTracking {
        if self.tracker.is_some() {
            DirtyTracking::WriteProtect
        } else if self.colo {
            DirtyTracking::Colo
        } else {
            DirtyTracking::Compare
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        lock(&self.process).pid()
    }

    /// The serial console's output file.
    pub fn console_path(&self) -> &Path {
        &self.paths.console
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.paths.console).unwrap_or_default()
    }

    /// The NIC backend (to give the guest frames), if the guest has a NIC.
    pub fn net(&self) -> Option<&NetBackend> {
        self.net.as_ref()
    }

    /// The QMP connection, for commands this type does not wrap.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// The last checkpoint's pause, part by part.
    pub fn last_timings(&self) -> QemuTimings {
        self.timings
    }

    /// Sets how many threads compare RAM with the shadow.
    pub fn set_compare_threads(&mut self, n: usize) {
        self.shadow.set_threads(n);
    }

    /// A copy of the whole guest RAM (consistent while the guest is
    /// paused).
    pub fn read_ram(&self, out: &mut Vec<u8>) {
        self.ram.copy_to(out);
    }

    /// Guest RAM through our mapping (for benchmarks that compare it
    /// themselves; see `RamMap` on why only raw pointers are given out).
    pub fn ram(&self) -> &RamMap {
        &self.ram
    }

    /// The runstate QEMU reports (`running`, `paused`, `postmigrate`...).
    pub fn runstate(&mut self) -> Result<String> {
        let st = self.qmp.execute("query-status", None)?;
        Ok(st
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("?")
            .to_owned())
    }

    /// A QMP failure as the engine sees it: `NotRunning` when QEMU died.
    fn guest_error(&self, e: Error) -> GuestError {
        if lock(&self.process).is_alive() {
            GuestError::Backend(e.to_string())
        } else {
            GuestError::NotRunning
        }
    }

    fn stop(&mut self) -> Result<()> {
        // `stop` drains QEMU's block requests: every write of the epoch
        // has been answered, hence seen by the write hook.
        self.qmp.execute("stop", None)?;
        if let Some(d) = &self.nbd {
            if !d.quiesce(QUIESCE_TIMEOUT) {
                tracing::warn!("disk server still busy after the stop");
            }
        }
        if let Some(n) = &self.net {
            if !n.quiesce(QUIESCE_TIMEOUT) {
                tracing::warn!(
                    "NIC backend still had bytes after the stop; they go to the next epoch"
                );
            }
        }
        Ok(())
    }

    fn cont(&mut self) -> Result<()> {
        self.qmp.execute("cont", None)?;
        Ok(())
    }

    fn checkpoint_stopped(
        &mut self,
        out: &mut Checkpoint,
        at_pause: &mut dyn FnMut(),
    ) -> Result<()> {
        at_pause();
        // QEMU writes the device state from its migration thread while we
        // compare RAM (the stream skips the shared RAM, so the two do not
        // meet). `state` is the time the state costs the pause beyond the
        // compare: starting it, and waiting for it afterwards.
        let t = Instant::now();
        self.state.start_save(&mut self.qmp)?;
        let started = t.elapsed();
        let (compare, copy) = self.collect(usize::MAX, out)?;
        self.timings.compare = compare;
        self.timings.copy = copy;
        let t = Instant::now();
        self.state.finish_save(&mut self.qmp, &mut out.state)?;
        self.timings.state = started + t.elapsed();
        self.timings.state_bytes = out.state.len();
        Ok(())
    }

    /// One round of changed pages into `out` (at most `max`): with kernel
    /// write tracking, the pages written since the last round; else a
    /// compare of all RAM. Returns (finding, copying) times.
    fn collect(&mut self, max: usize, out: &mut Checkpoint) -> Result<(Duration, Duration)> {
        let t = Instant::now();
        let ram = self.ram.as_ptr();
        let Some(tracker) = self.tracker.as_mut() else {
            // SAFETY: the mapping covers the shadow's frames (both were
            // sized from the spec's RAM) and lives as long as self.
            let found = unsafe {
                self.shadow
                    .collect(ram, max, &mut out.frames, &mut out.pages)
            };
            return Ok((found.compare, t.elapsed().saturating_sub(found.compare)));
        };
        let written = &mut self.written;
        match tracker.take_written(|r| written.mark(r)) {
            Ok(n) => self.timings.written_pages = n,
            Err(e) => {
                // Some pages may have been re-protected unreported: only a
                // full resend is safe now.
                self.shadow.reset();
                self.written.clear();
                out.frames.clear();
                out.pages.clear();
                return Err(e.into());
            }
        }
        self.timings.scan = t.elapsed();
        // SAFETY: as above.
        let found = unsafe {
            self.shadow.collect_written(
                ram,
                max,
                &mut self.written,
                &mut out.frames,
                &mut out.pages,
            )
        };
        let compare = self.timings.scan + found.compare;
        Ok((compare, t.elapsed().saturating_sub(compare)))
    }
}

/// The migration stream a replica QEMU loads for a COLO checkpoint:
/// `image` is the replica's frames (main RAM first, written into the RAM
/// file beforehand; the other RAM blocks from the reserve go in the
/// stream), `blob` the checkpoint's envelope.
fn restore_stream(blob: &[u8], image: &[u8], ram_pages: u64) -> Result<Vec<u8>> {
    let st = ColoState::decode(blob).map_err(|e| Error::Restore(e.to_string()))?;
    let layout = Layout::new(&st.blocks, ram_pages).map_err(|e| Error::Restore(e.to_string()))?;
    let mut pages: Vec<(usize, u64, &[u8])> = Vec::new();
    for (block, first, n) in layout.others() {
        for i in 0..n {
            let at = ((first + i) as usize) * PAGE_SIZE;
            let page = image
                .get(at..at + PAGE_SIZE)
                .ok_or_else(|| Error::Restore(format!("frame {} beyond the image", first + i)))?;
            pages.push((block, i * PAGE_SIZE as u64, page));
        }
    }
    let mut out = Vec::with_capacity(pages.len() * (PAGE_SIZE + 16) + st.devices.len() + 4096);
    colo::writer::restore_stream(
        &mut out,
        &st.configuration,
        st.ram_section_id,
        &st.blocks,
        pages.into_iter(),
        &st.devices,
    );
    Ok(out)
}

impl QemuGuest {
    /// Runs `f` on the sink with our QMP as its control; any error fails
    /// the sink (QEMU is told to let the guest run on).
    fn with_sink<T>(
        &mut self,
        f: impl FnOnce(
            &mut ColoSink,
            &mut QmpControl<'_>,
        ) -> std::result::Result<T, colo::sink::SinkError>,
    ) -> Result<T> {
        let Some(sink) = self.sink.as_mut() else {
            return Err(Error::Sink(colo::sink::SinkError::Failed));
        };
        let mut ctl = QmpControl(&mut self.qmp);
        match f(sink, &mut ctl) {
            Ok(v) => Ok(v),
            Err(e) => {
                sink.fail(&mut ctl);
                Err(e.into())
            }
        }
    }

    /// The NIC and disk servers drained after the guest stopped.
    fn quiesce(&self) {
        if let Some(d) = &self.nbd {
            if !d.quiesce(QUIESCE_TIMEOUT) {
                tracing::warn!("disk server still busy after the stop");
            }
        }
        if let Some(n) = &self.net {
            if !n.quiesce(QUIESCE_TIMEOUT) {
                tracing::warn!(
                    "NIC backend still had bytes after the stop; they go to the next epoch"
                );
            }
        }
    }

    /// COLO checkpoint: the guest stopped by QEMU (a checkpoint or the end
    /// of the initial migration), `at_pause`, its pages and state, resumed.
    fn colo_checkpoint(&mut self, out: &mut Checkpoint, at_pause: &mut dyn FnMut()) -> Result<()> {
        let t0 = Instant::now();
        self.with_sink(|s, c| s.stop(c).map(|_| ()))?;
        self.quiesce();
        let t_stop = Instant::now();
        at_pause();
        self.with_sink(|s, _| s.collect())?;
        let t_data = Instant::now();
        self.with_sink(|s, _| s.take(out))?;
        let t_copy = Instant::now();
        if !self.held {
            self.with_sink(|s, _| s.release())?;
        }
        let t_end = Instant::now();
        self.timings.stop = t_stop - t0;
        self.timings.compare = t_data - t_stop;
        self.timings.copy = t_copy - t_data;
        self.timings.cont = t_end - t_copy;
        self.timings.total = t_end - t0;
        self.timings.state_bytes = out.state.len();
        Ok(())
    }

    /// Ends the current COLO migration and starts a fresh one (full RAM).
    fn colo_restart(&mut self) -> Result<()> {
        if let Some(mut s) = self.sink.take() {
            s.fail(&mut QmpControl(&mut self.qmp));
        }
        // The old migration must reach a final state before `migrate`.
        let deadline = Instant::now() + devstate::MIGRATION_TIMEOUT;
        loop {
            let m = self.qmp.execute("query-migrate", None)?;
            match m.get("status").and_then(|s| s.as_str()) {
                None | Some("completed") | Some("failed") | Some("cancelled") | Some("none") => {
                    break
                }
                _ if Instant::now() > deadline => {
                    return Err(Error::Timeout {
                        what: "the abandoned COLO migration to end".into(),
                        after: devstate::MIGRATION_TIMEOUT,
                    })
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        if self.held && !self.qmp_stopped {
            // Failover resumed the guest; the engine holds it paused.
            self.qmp.execute("stop", None)?;
            self.qmp_stopped = true;
        }
        self.sink = Some(ColoSink::start(
            &mut QmpControl(&mut self.qmp),
            self.ram_pages,
        )?);
        Ok(())
    }
}

impl ProtectedGuest for QemuGuest {
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    fn frame_count(&self) -> u64 {
        // Main RAM, then the reserve for QEMU's other RAM blocks (only
        // COLO mode fills it; both modes number frames the same way).
        self.ram_pages + colo::RESERVE_FRAMES
    }

    fn precopy_round(
        &mut self,
        max_frames: usize,
        out: &mut Checkpoint,
    ) -> std::result::Result<(), GuestError> {
        out.clear();
        if !self.is_running() {
            return Err(GuestError::NotRunning);
        }
        if self.colo {
            if self.sink.is_none() {
                // A restart that failed earlier: try again now.
                self.colo_restart().map_err(|e| self.guest_error(e))?;
            }
            let t = Instant::now();
            let held = self.held;
            let r = self.with_sink(|s, _| s.precopy_round(max_frames, held, out));
            out.timings.copy = t.elapsed();
            return r.map_err(|e| self.guest_error(e));
        }
        let (compare, copy) = self
            .collect(max_frames, out)
            .map_err(|e| self.guest_error(e))?;
        out.timings.dirty_log = compare;
        out.timings.copy = copy;
        Ok(())
    }

    fn restart_sync(&mut self) {
        if self.colo {
            // A fresh migration: its first passes carry the whole RAM.
            if let Err(e) = self.colo_restart() {
                tracing::warn!("restarting the COLO migration: {e} (retried at the next round)");
                self.sink = None;
            }
            return;
        }
        // Every frame counts as never sent: the rounds send them all.
        self.shadow.reset();
        self.written.clear();
    }

    fn checkpoint(
        &mut self,
        out: &mut Checkpoint,
        at_pause: &mut dyn FnMut(),
    ) -> std::result::Result<(), GuestError> {
        out.frames.clear();
        out.state.clear();
        out.timings = Default::default();
        self.timings = QemuTimings::default();
        if self.colo {
            if !self.is_running() {
                return Err(GuestError::NotRunning);
            }
            if self.sink.is_none() {
                self.colo_restart().map_err(|e| self.guest_error(e))?;
            }
            if let Err(e) = self.colo_checkpoint(out, at_pause) {
                out.frames.clear();
                out.pages.clear();
                return Err(self.guest_error(e));
            }
            out.timings.stop = self.timings.stop;
            out.timings.dirty_log = self.timings.compare;
            out.timings.copy = self.timings.copy;
            out.timings.total = self.timings.total;
            return Ok(());
        }
        let t0 = Instant::now();
        if !self.held {
            if let Err(e) = self.stop() {
                out.pages.clear();
                return Err(self.guest_error(e));
            }
        }
        let t_stop = Instant::now();
        self.timings.stop = t_stop - t0;
        let r = self.checkpoint_stopped(out, at_pause);
        let t_cont = Instant::now();
        let r = r.and_then(|()| if self.held { Ok(()) } else { self.cont() });
        let t_end = Instant::now();
        self.timings.cont = t_end - t_cont;
        self.timings.total = t_end - t0;
        if let Err(e) = r {
            // The shadow may hold pages the engine will not send.
            self.shadow.reset();
            if !self.held {
                let _ = self.cont();
            }
            out.frames.clear();
            out.pages.clear();
            return Err(self.guest_error(e));
        }
        out.timings.stop = self.timings.stop;
        out.timings.dirty_log = self.timings.compare;
        out.timings.copy = self.timings.copy;
        out.timings.state = self.timings.state;
        out.timings.total = self.timings.total;
        Ok(())
    }

    fn pause(&mut self) -> std::result::Result<(), GuestError> {
        if self.colo && !self.held {
            // QEMU itself holds the guest stopped in the middle of a
            // checkpoint (or at the end of the initial migration) until
            // `resume` answers: a QMP stop would be undone by COLO.
            let r = if self.sink.is_some() {
                self.with_sink(|s, c| s.stop(c).map(|_| ()))
                    .map(|()| self.quiesce())
                    .and_then(|()| self.with_sink(|s, _| s.collect()))
            } else {
                self.stop().map(|()| self.qmp_stopped = true)
            };
            if let Err(e) = r {
                // The failed sink let the guest run: stop it the plain way.
                self.stop().map_err(|e| self.guest_error(e))?;
                self.qmp_stopped = true;
                tracing::warn!("COLO pause failed ({e}); stopped through QMP");
            }
            self.held = true;
            return Ok(());
        }
        if !self.held {
            self.stop().map_err(|e| self.guest_error(e))?;
            self.held = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> std::result::Result<(), GuestError> {
        if self.colo && self.held {
            if self.sink.as_ref().is_some_and(|s| s.guest_held()) {
                self.with_sink(|s, _| s.release())
                    .map_err(|e| self.guest_error(e))?;
            }
            if self.qmp_stopped {
                self.cont().map_err(|e| self.guest_error(e))?;
                self.qmp_stopped = false;
            }
            self.held = false;
            return Ok(());
        }
        if self.held {
            self.cont().map_err(|e| self.guest_error(e))?;
            self.held = false;
        }
        Ok(())
    }

    fn is_running(&self) -> bool {
        lock(&self.process).is_alive()
    }

    fn frame_reader(&self) -> Option<crate::guest::FrameReader> {
        if self.colo {
            // COLO fills the reserve frames from QEMU's other RAM blocks,
            // which our mapping does not show.
            return None;
        }
        // Frames are offsets into the RAM file; the reserve after it is
        // never sent in this mode, so the replica holds zeros there.
        let ram = self.ram.clone();
        let frames = self.frame_count();
        Some(std::sync::Arc::new(move |first, out: &mut [u8]| {
            let n = (out.len() / PAGE_SIZE) as u64;
            if first.checked_add(n).is_none_or(|end| end > frames) {
                return Err(GuestError::Backend(format!(
                    "frames {first}..+{n} beyond the guest's {frames}"
                )));
            }
            let start = first as usize * PAGE_SIZE;
            let in_ram = ram.len().saturating_sub(start).min(out.len());
            out[in_ram..].fill(0);
            if in_ram > 0 {
                // SAFETY: start + in_ram <= ram.len(); `out` is ours. The
                // guest may write concurrently unless paused: the caller
                // reads only at a pause (see FrameReader).
                unsafe {
                    std::ptr::copy_nonoverlapping(ram.as_ptr().add(start), out.as_mut_ptr(), in_ram)
                };
            }
            Ok(())
        }))
    }
}
