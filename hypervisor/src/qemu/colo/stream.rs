//! The incremental parser of what QEMU sends its migration peer: the
//! initial stream (header, configuration, commands, RAM sections, device
//! sections, EOF, description) and then, in COLO mode, one checkpoint
//! after another (CHECKPOINT_REQUEST, VMSTATE_SEND, RAM END section, EOF,
//! VMSTATE_SIZE + device blob).
//!
//! Sans-IO: bytes go in with [`StreamParser::push`], events come out of
//! [`StreamParser::next`], `Ok(None)` meaning "need more bytes". An item
//! is consumed only once all of it has arrived, so input may be cut
//! anywhere. The first error is sticky.

use super::devices;
use super::error::StreamError;
use super::message::{self, ColoMessage};
use super::records::{self, PageData, RamBlock, Record};
use super::wire::{self, Cursor, Short};

/// Bound on a checkpoint's device blob.
pub const MAX_BLOB: u64 = 256 << 20;

/// What the parser saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// "QEVM" v3.
    Header,
    /// The configuration section (see [`StreamParser::configuration`]).
    Configuration,
    /// A migration command (`wire::CMD_*`).
    Command(u16),
    /// The RAM block list was (re)declared ([`StreamParser::blocks`]).
    Blocks,
    /// A page of RAM block `block` at byte `offset`.
    Page {
        block: usize,
        offset: u64,
        data: PageData<'a>,
    },
    /// A RAM section ended (EOS and footer).
    SectionEnd,
    /// The initial stream ended; `devices` is its device part (FULL
    /// sections + EOF, the description left out). The guest is stopped
    /// and, in COLO mode, QEMU waits for CHECKPOINT_READY.
    InitialEnd { devices: &'a [u8] },
    /// A COLO message (checkpoint-request, vmstate-send).
    Message(ColoMessage),
    /// The RAM of a checkpoint ended (EOF after its sections).
    LiveEnd,
    /// A checkpoint's device blob (FULL sections + EOF).
    DeviceBlob(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    /// Section level of the initial stream.
    Top,
    /// Records of RAM section `sid`.
    Ram {
        sid: u32,
        live: bool,
    },
    /// After EOS: an optional footer.
    Footer {
        sid: u32,
        live: bool,
    },
    /// The device part of the initial stream, until its end is found.
    Devices,
    /// COLO: waiting for CHECKPOINT_REQUEST.
    AwaitRequest,
    /// COLO: waiting for VMSTATE_SEND.
    AwaitSend,
    /// COLO: section level of a checkpoint's RAM.
    Live,
    /// COLO: waiting for VMSTATE_SIZE.
    AwaitSize,
    /// COLO: the device blob of `len` bytes.
    Blob {
        len: usize,
    },
}

/// An item parsed, as ranges into the buffer (so `next` can lend slices).
enum Step {
    Event(EventKind),
    Page {
        block: usize,
        offset: u64,
        at: usize,
        fill: Option<u8>,
    },
    Slice {
        kind: SliceKind,
        start: usize,
        end: usize,
    },
}

#[derive(Clone, Copy)]
enum EventKind {
    Header,
    Configuration,
    Command(u16),
    Blocks,
    SectionEnd,
    Message(ColoMessage),
    LiveEnd,
}

#[derive(Clone, Copy)]
enum SliceKind {
    Initial,
    Blob,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct StreamParser {
    buf: Vec<u8>,
    pos: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    state: Option<State>,
    blocks: Vec<RamBlock>,
    last_block: Option<usize>,
    ram_sid: Option<u32>,
    configuration: Vec<u8>,
    seen_section: bool,
    colo_enabled: bool,
    footers: bool,
    error: Option<StreamError>,
}

impl StreamParser {
    /// A parser expecting the start of a stream.
    pub fn new() -> StreamParser {
        StreamParser {
            state: Some(State::Header),
            ..Default::default()
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        // Compact once the consumed prefix dominates: amortised O(1) per
        // byte, and the buffer stays around one read's worth.
        if self.pos > 0 && (self.pos >= self.buf.len() / 2 || self.pos > (4 << 20)) {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet consumed.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Stream offset of the next unconsumed byte.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// The RAM block list (empty before MEM_SIZE).
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The configuration section as sent (its type byte included), empty
    /// if the stream had none.
    pub fn configuration(&self) -> &[u8] {
        &self.configuration
    }

    /// The RAM section's id.
    pub fn ram_section_id(&self) -> Option<u32> {
        self.ram_sid
    }

    /// Whether QEMU sent ENABLE_COLO.
    pub fn colo_enabled(&self) -> bool {
        self.colo_enabled
    }

    /// Whether sections carried footers.
    pub fn footers(&self) -> bool {
        self.footers
    }

    /// Whether the parser is between checkpoints (nothing half-parsed).
    pub fn at_checkpoint_boundary(&self) -> bool {
        self.state == Some(State::AwaitRequest) && self.pending() == 0
    }

    /// The next event, `Ok(None)` if more bytes are needed.
    #[allow(clippy::should_implement_trait)] // lends from self: not an Iterator
    pub fn next(&mut self) -> Result<Option<Event<'_>>, StreamError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let step = match self.step() {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.error = Some(e.clone());
                return Err(e);
            }
        };
        Ok(Some(match step {
            Step::Event(k) => match k {
                EventKind::Header => Event::Header,
                EventKind::Configuration => Event::Configuration,
                EventKind::Command(c) => Event::Command(c),
                EventKind::Blocks => Event::Blocks,
                EventKind::SectionEnd => Event::SectionEnd,
                EventKind::Message(m) => Event::Message(m),
                EventKind::LiveEnd => Event::LiveEnd,
            },
            Step::Page {
                block,
                offset,
                at,
                fill,
            } => Event::Page {
                block,
                offset,
                data: match fill {
                    Some(v) => PageData::Fill(v),
                    None => PageData::Bytes(&self.buf[at..at + wire::PAGE_SIZE]),
                },
            },
            Step::Slice { kind, start, end } => {
                let s = &self.buf[start..end];
                match kind {
                    SliceKind::Initial => Event::InitialEnd { devices: s },
                    SliceKind::Blob => Event::DeviceBlob(s),
                }
            }
        }))
    }

    fn step(&mut self) -> Result<Option<Step>, StreamError> {
        let state = self.state.unwrap_or(State::Header);
        let at = self.offset();
        let start = self.pos;
        let mut c = Cursor::new(&self.buf[start..]);
        let (step, next) = match state {
            State::Header => {
                let Ok(h) = c.take(8) else { return Ok(None) };
                if h != wire::HEADER {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(h);
                    return Err(StreamError::BadHeader(a));
                }
                (Step::Event(EventKind::Header), State::Top)
            }
            State::Top => {
                let Ok(kind) = c.peek() else { return Ok(None) };
                match kind {
                    wire::CONFIGURATION if !self.seen_section && self.configuration.is_empty() => {
                        match parse_configuration(&mut c)? {
                            Ok(()) => {}
                            Err(Short) => return Ok(None),
                        }
                        self.configuration = self.buf[start..start + c.pos()].to_vec();
                        (Step::Event(EventKind::Configuration), State::Top)
                    }
                    wire::COMMAND => {
                        let Ok(cmd) = parse_command(&mut c)? else {
                            return Ok(None);
                        };
                        if cmd == wire::CMD_ENABLE_COLO {
                            self.colo_enabled = true;
                        }
                        (Step::Event(EventKind::Command(cmd)), State::Top)
                    }
                    wire::SECTION_START => {
                        let Ok((sid, id, _inst, version)) = section_start(&mut c) else {
                            return Ok(None);
                        };
                        if id != wire::RAM_IDSTR.as_bytes() || version != wire::RAM_VERSION {
                            return Err(StreamError::UnsupportedSection {
                                idstr: String::from_utf8_lossy(id).into_owned(),
                                kind,
                                at,
                            });
                        }
                        self.seen_section = true;
                        self.ram_sid = Some(sid);
                        self.pos += c.pos();
                        self.state = Some(State::Ram { sid, live: false });
                        return self.step();
                    }
                    wire::SECTION_PART | wire::SECTION_END => {
                        let (Ok(_), Ok(sid)) = (c.u8(), c.be32()) else {
                            return Ok(None);
                        };
                        if Some(sid) != self.ram_sid {
                            return Err(StreamError::UnknownSectionId(sid));
                        }
                        self.pos += c.pos();
                        self.state = Some(State::Ram { sid, live: false });
                        return self.step();
                    }
                    wire::SECTION_FULL | wire::VM_EOF => {
                        self.seen_section = true;
                        self.state = Some(State::Devices);
                        return self.step();
                    }
                    _ => return Err(StreamError::UnknownSection { kind, at }),
                }
            }
            State::Ram { sid, live } => {
                let rec = match records::parse(&mut c, &self.blocks, self.last_block, at)? {
                    Ok(r) => r,
                    Err(Short) => return Ok(None),
                };
                match rec {
                    Record::MemSize(blocks) => {
                        self.blocks = blocks;
                        self.last_block = None;
                        (Step::Event(EventKind::Blocks), State::Ram { sid, live })
                    }
                    Record::Page {
                        block,
                        offset,
                        data,
                    } => {
                        self.last_block = Some(block);
                        let (at, fill) = match data {
                            PageData::Fill(v) => (0, Some(v)),
                            PageData::Bytes(_) => (start + c.pos() - wire::PAGE_SIZE, None),
                        };
                        (
                            Step::Page {
                                block,
                                offset,
                                at,
                                fill,
                            },
                            State::Ram { sid, live },
                        )
                    }
                    Record::Eos => {
                        self.pos += c.pos();
                        self.state = Some(State::Footer { sid, live });
                        return self.step();
                    }
                }
            }
            State::Footer { sid, live } => {
                let Ok(b) = c.peek() else { return Ok(None) };
                if b == wire::SECTION_FOOTER {
                    let (Ok(_), Ok(found)) = (c.u8(), c.be32()) else {
                        return Ok(None);
                    };
                    if found != sid {
                        return Err(StreamError::BadFooter {
                            expected: sid,
                            found,
                        });
                    }
                    self.footers = true;
                }
                let back = if live { State::Live } else { State::Top };
                (Step::Event(EventKind::SectionEnd), back)
            }
            State::Devices => {
                let Some((devices, total)) = devices::find_end(&self.buf[start..])? else {
                    return Ok(None);
                };
                self.pos += total;
                self.state = Some(State::AwaitRequest);
                return Ok(Some(Step::Slice {
                    kind: SliceKind::Initial,
                    start,
                    end: start + devices,
                }));
            }
            State::AwaitRequest | State::AwaitSend | State::AwaitSize => {
                let Ok(v) = c.be32() else { return Ok(None) };
                let (want, then) = match state {
                    State::AwaitRequest => (ColoMessage::CheckpointRequest, State::AwaitSend),
                    State::AwaitSend => (ColoMessage::VmstateSend, State::Live),
                    _ => (ColoMessage::VmstateSize, State::AwaitSize),
                };
                if v != want.code() {
                    return Err(StreamError::UnexpectedMessage {
                        expected: want.name(),
                        got: message::describe(v),
                    });
                }
                if want == ColoMessage::VmstateSize {
                    let Ok(len) = c.be64() else { return Ok(None) };
                    if len > MAX_BLOB {
                        return Err(StreamError::TooLarge {
                            what: "device blob",
                            len,
                            max: MAX_BLOB,
                        });
                    }
                    self.pos += c.pos();
                    self.state = Some(State::Blob { len: len as usize });
                    return self.step();
                }
                (Step::Event(EventKind::Message(want)), then)
            }
            State::Live => {
                let Ok(kind) = c.peek() else { return Ok(None) };
                match kind {
                    wire::SECTION_PART | wire::SECTION_END => {
                        let (Ok(_), Ok(sid)) = (c.u8(), c.be32()) else {
                            return Ok(None);
                        };
                        if Some(sid) != self.ram_sid {
                            return Err(StreamError::UnknownSectionId(sid));
                        }
                        self.pos += c.pos();
                        self.state = Some(State::Ram { sid, live: true });
                        return self.step();
                    }
                    wire::VM_EOF => {
                        let _ = c.u8();
                        (Step::Event(EventKind::LiveEnd), State::AwaitSize)
                    }
                    _ => return Err(StreamError::UnknownSection { kind, at }),
                }
            }
            State::Blob { len } => {
                if c.remaining() < len {
                    return Ok(None);
                }
                let blob = &self.buf[start..start + len];
                devices::check_blob(blob)?;
                self.pos += len;
                self.state = Some(State::AwaitRequest);
                return Ok(Some(Step::Slice {
                    kind: SliceKind::Blob,
                    start,
                    end: start + len,
                }));
            }
        };
        self.pos += c.pos();
        self.state = Some(next);
        Ok(Some(step))
    }
}

fn section_start<'a>(c: &mut Cursor<'a>) -> Result<(u32, &'a [u8], u32, u32), Short> {
    c.u8()?;
    let sid = c.be32()?;
    let id = c.idstr()?;
    let inst = c.be32()?;
    let version = c.be32()?;
    Ok((sid, id, inst, version))
}

fn parse_command(c: &mut Cursor<'_>) -> Result<Result<u16, Short>, StreamError> {
    let head = (|| Ok::<_, Short>((c.u8()?, c.be16()?, c.be16()?)))();
    let Ok((_, cmd, len)) = head else {
        return Ok(Err(Short));
    };
    let ok = matches!(
        (cmd, len),
        (wire::CMD_OPEN_RETURN_PATH, 0)
            | (wire::CMD_PING, 4)
            | (wire::CMD_ENABLE_COLO, 0)
            | (wire::CMD_SWITCHOVER_START, 0)
    );
    if !ok {
        return Err(StreamError::UnsupportedCommand { cmd, len });
    }
    Ok(c.take(len as usize).map(|_| cmd))
}

/// savevm.c `vmstate_configuration`: be32 length + machine type, then
/// the subsections QEMU may add (target-page-bits, capabilities, uuid).
fn parse_configuration(c: &mut Cursor<'_>) -> Result<Result<(), Short>, StreamError> {
    let bad = |m: String| Err(StreamError::BadConfiguration(m));
    macro_rules! get {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(Short) => return Ok(Err(Short)),
            }
        };
    }
    get!(c.u8());
    let len = get!(c.be32());
    if len == 0 || len > 256 {
        return bad(format!("machine type of {len} bytes"));
    }
    let name = get!(c.take(len as usize));
    if !wire::plausible_idstr(name) {
        return bad("machine type is not text".into());
    }
    loop {
        match c.peek() {
            Ok(wire::SUBSECTION) => {}
            Ok(_) => return Ok(Ok(())),
            Err(Short) => return Ok(Err(Short)),
        }
        get!(c.u8());
        let sub = get!(c.idstr());
        let _version = get!(c.be32());
        match sub {
            b"configuration/target-page-bits" => {
                get!(c.be32());
            }
            b"configuration/capabilities" => {
                let n = get!(c.be32());
                if n > 64 {
                    return bad(format!("{n} capabilities"));
                }
                for _ in 0..n {
                    let cap = get!(c.idstr());
                    // These change the RAM records (block addresses,
                    // skipped shared RAM): a sink must see them off.
                    if cap == b"x-ignore-shared" || cap == b"mapped-ram" {
                        return bad(format!(
                            "capability {} is on; it must be off",
                            String::from_utf8_lossy(cap)
                        ));
                    }
                }
            }
            b"configuration/uuid" => {
                get!(c.take(16));
            }
            other => {
                return bad(format!(
                    "unknown subsection {:?}",
                    String::from_utf8_lossy(other)
                ))
            }
        }
    }
}
