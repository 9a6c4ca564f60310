//! The sink: the I/O shell around [`StreamParser`] that plays QEMU's COLO
//! secondary on the migration socket.
//!
//! Phases: `Precopy` (QEMU's initial migration streams RAM while the
//! guest runs) → `Completed` (initial stream done; the guest is stopped
//! until we send CHECKPOINT_READY) → `Running` (COLO: the guest runs until
//! we ask for a checkpoint) → `Stopped` (a checkpoint's pages and state
//! are in; the guest is stopped until we send VMSTATE_RECEIVED +
//! VMSTATE_LOADED) → `Running`... `Completed` and `Stopped` are the
//! race-free epoch boundaries: QEMU itself keeps the guest stopped until
//! we answer. Any error makes the phase `Failed`; the caller then tells
//! QEMU to give up on its peer (`x-colo-lost-heartbeat` /
//! `migrate_cancel`, see [`Control`]) so the guest runs on, and starts a
//! fresh migration when the engine asks for a resync.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::envelope::ColoState;
use super::error::StreamError;
use super::layout::{Layout, LayoutError};
use super::message::ColoMessage;
use super::stream::{Event, StreamParser};
use super::wire::PAGE_SIZE;
use crate::guest::Checkpoint;

/// How long QEMU may stay silent while we wait for it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 1 << 20;

/// What can go wrong in the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("migration stream: {0}")]
    Stream(#[from] StreamError),
    #[error("RAM layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("migration socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the migration socket{0}")]
    Closed(&'static str),
    #[error("QEMU was silent for {0:?} on the migration socket")]
    Timeout(Duration),
    #[error("controlling QEMU: {0}")]
    Control(String),
    #[error("the sink failed before; a resync (new migration) is needed")]
    Failed,
    #[error("{0} is not possible in phase {1:?}")]
    Phase(&'static str, Phase),
}

/// The QMP actions the sink needs (a trait so tests can fake QEMU).
pub trait Control {
    /// Hands QEMU its end of the migration socket and starts `migrate`.
    fn start_migration(&mut self, qemu_end: UnixStream) -> Result<(), String>;
    /// Makes the initial migration complete at its next iteration.
    fn force_completion(&mut self) -> Result<(), String>;
    /// Asks COLO for a checkpoint now.
    fn request_checkpoint(&mut self) -> Result<(), String>;
    /// Ends the migration/COLO without its peer (the guest runs on).
    fn abandon(&mut self) -> Result<(), String>;
}

/// Where the sink stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Precopy,
    Completed,
    Running,
    Stopped,
    Failed,
}

/// Pages received and not yet handed to the engine: the last contents per
/// frame (a page re-sent later replaces the earlier copy).
#[derive(Debug, Default)]
struct Staged {
    index: HashMap<u64, usize>,
    pages: Vec<u8>,
}

impl Staged {
    fn put(&mut self, frame: u64, write: impl FnOnce(&mut [u8])) {
        let slot = match self.index.get(&frame) {
            Some(&i) => i,
            None => {
                let i = self.index.len();
                self.index.insert(frame, i);
                self.pages.resize((i + 1) * PAGE_SIZE, 0);
                i
            }
        };
        write(&mut self.pages[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE]);
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    /// Moves the pages into `out`, ascending by frame.
    fn take(&mut self, out: &mut Checkpoint) {
        let mut order: Vec<(u64, usize)> = self.index.drain().collect();
        order.sort_unstable();
        out.frames.clear();
        out.pages.clear();
        out.pages.reserve(order.len() * PAGE_SIZE);
        for (f, i) in order {
            out.frames.push(f);
            out.pages
                .extend_from_slice(&self.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
        self.pages.clear();
    }
}

/// What a pump of the socket waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// `n` staged pages, or a section end with nothing more buffered.
    Pages(usize),
    InitialEnd,
    Message(ColoMessage),
    Blob,
}

/// See the module documentation.
pub struct ColoSink {
    sock: UnixStream,
    parser: StreamParser,
    phase: Phase,
    ram_pages: u64,
    layout: Option<Layout>,
    staged: Staged,
    /// The last device part/blob (FULL sections + EOF).
    devices: Vec<u8>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ColoSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColoSink")
            .field("phase", &self.phase)
            .field("offset", &self.parser.offset())
            .finish()
    }
}

impl ColoSink {
    /// Starts a migration of a guest with `ram_pages` pages of main RAM
    /// into a new sink.
    pub fn start(ctl: &mut dyn Control, ram_pages: u64) -> Result<ColoSink, SinkError> {
        let (ours, qemu_end) = UnixStream::pair()?;
        ours.set_read_timeout(Some(READ_TIMEOUT))?;
        ctl.start_migration(qemu_end).map_err(SinkError::Control)?;
        Ok(ColoSink {
            sock: ours,
            parser: StreamParser::new(),
            phase: Phase::Precopy,
            ram_pages,
            layout: None,
            staged: Staged::default(),
            devices: Vec::new(),
            scratch: vec![0u8; READ_CHUNK],
        })
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether QEMU holds the guest stopped waiting for us.
    pub fn guest_held(&self) -> bool {
        matches!(self.phase, Phase::Completed | Phase::Stopped)
    }

    /// Marks the sink failed and tells QEMU to go on without us.
    pub fn fail(&mut self, ctl: &mut dyn Control) {
        if self.phase != Phase::Failed {
            self.phase = Phase::Failed;
            if let Err(e) = ctl.abandon() {
                tracing::warn!("abandoning the COLO migration: {e}");
            }
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
    }

    fn check(&self) -> Result<(), SinkError> {
        if self.phase == Phase::Failed {
            Err(SinkError::Failed)
        } else {
            Ok(())
        }
    }

    /// One pre-copy round: up to `max` pages of the initial migration into
    /// `out`. Returns early at a section end with nothing buffered (QEMU
    /// is between passes). If the initial migration completes, the guest
    /// is let run at once unless `hold`.
    pub fn precopy_round(
        &mut self,
        max: usize,
        hold: bool,
        out: &mut Checkpoint,
    ) -> Result<(), SinkError> {
        self.check()?;
        if self.phase == Phase::Precopy {
            self.pump(Until::Pages(max.max(1)))?;
            if self.phase == Phase::Completed && !hold {
                self.release()?;
            }
        }
        self.staged.take(out);
        Ok(())
    }

    /// Brings the guest to a stop QEMU holds: completes the initial
    /// migration, or runs a COLO checkpoint up to where all of its data
    /// is in. Returns whether it stopped now (false: it already was).
    pub fn stop(&mut self, ctl: &mut dyn Control) -> Result<bool, SinkError> {
        self.check()?;
        match self.phase {
            Phase::Precopy => {
                ctl.force_completion().map_err(SinkError::Control)?;
                self.pump(Until::InitialEnd)?;
                Ok(true)
            }
            Phase::Running => {
                ctl.request_checkpoint().map_err(SinkError::Control)?;
                self.pump(Until::Message(ColoMessage::CheckpointRequest))?;
                self.send(ColoMessage::CheckpointReply)?;
                self.pump(Until::Message(ColoMessage::VmstateSend))?;
                self.phase = Phase::Stopped;
                Ok(true)
            }
            Phase::Completed | Phase::Stopped => Ok(false),
            Phase::Failed => Err(SinkError::Failed),
        }
    }

    /// With the guest stopped (after [`ColoSink::stop`]): reads the rest of
    /// the checkpoint (its RAM and device blob).
    pub fn collect(&mut self) -> Result<(), SinkError> {
        self.check()?;
        if self.phase == Phase::Stopped && !self.parser.at_checkpoint_boundary() {
            self.pump(Until::Blob)?;
        }
        Ok(())
    }

    /// Moves the staged pages and the state envelope into `out`.
    pub fn take(&mut self, out: &mut Checkpoint) -> Result<(), SinkError> {
        self.staged.take(out);
        out.state.clear();
        self.state().encode(&mut out.state);
        Ok(())
    }

    /// The envelope of the last device state.
    pub fn state(&self) -> ColoState {
        ColoState {
            configuration: self.parser.configuration().to_vec(),
            ram_section_id: self.parser.ram_section_id().unwrap_or(0),
            footers: self.parser.footers(),
            blocks: self.parser.blocks().to_vec(),
            devices: self.devices.clone(),
        }
    }

    /// Lets QEMU resume the guest it holds stopped.
    pub fn release(&mut self) -> Result<(), SinkError> {
        self.check()?;
        match self.phase {
            Phase::Completed => self.send(ColoMessage::CheckpointReady)?,
            Phase::Stopped => {
                self.send(ColoMessage::VmstateReceived)?;
                self.send(ColoMessage::VmstateLoaded)?;
            }
            _ => return Ok(()),
        }
        self.phase = Phase::Running;
        Ok(())
    }

    fn send(&mut self, m: ColoMessage) -> Result<(), SinkError> {
        self.sock.write_all(&m.encode())?;
        Ok(())
    }

    fn pump(&mut self, until: Until) -> Result<(), SinkError> {
        loop {
            if self.drain(until)? {
                return Ok(());
            }
            if let Until::Pages(_) = until {
                // Between passes QEMU may have little to send: return
                // what we have rather than wait for a full round.
                if self.staged.len() > 0 && self.parser.pending() == 0 && !self.readable()? {
                    return Ok(());
                }
            }
            let n = match self.sock.read(&mut self.scratch) {
                Ok(0) => return Err(SinkError::Closed("")),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(SinkError::Timeout(READ_TIMEOUT))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.parser.push(&self.scratch[..n]);
        }
    }

    /// Whether bytes wait on the socket (without blocking).
    fn readable(&self) -> Result<bool, SinkError> {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(r > 0)
    }

    /// Handles buffered events; true once `until` is reached.
    fn drain(&mut self, until: Until) -> Result<bool, SinkError> {
        loop {
            if let Until::Pages(n) = until {
                if self.staged.len() >= n {
                    return Ok(true);
                }
            }
            let ev = match self.parser.next()? {
                Some(ev) => ev,
                None => return Ok(false),
            };
            match ev {
                Event::Blocks => {
                    self.layout = Some(Layout::new(self.parser.blocks(), self.ram_pages)?);
                }
                Event::Page {
                    block,
                    offset,
                    data,
                } => {
                    let Some(layout) = &self.layout else {
                        return Err(StreamError::PageBeforeBlocks.into());
                    };
                    self.staged
                        .put(layout.frame(block, offset), |p| data.write_to(p));
                }
                Event::InitialEnd { devices } => {
                    self.devices.clear();
                    self.devices.extend_from_slice(devices);
                    self.phase = Phase::Completed;
                    if matches!(until, Until::InitialEnd | Until::Pages(_)) {
                        return Ok(true);
                    }
                    return Err(SinkError::Phase(
                        "the end of the initial stream",
                        self.phase,
                    ));
                }
                Event::DeviceBlob(b) => {
                    self.devices.clear();
                    self.devices.extend_from_slice(b);
                    if until == Until::Blob {
                        return Ok(true);
                    }
                }
                Event::Message(m) => {
                    if until == Until::Message(m) {
                        return Ok(true);
                    }
                }
                Event::Header
                | Event::Configuration
                | Event::Command(_)
                | Event::SectionEnd
                | Event::LiveEnd => {}
            }
        }
    }
}
