//! TCP 9100: the guest's own memory-dirtying workload, for `remus-wan bench
//! protect`. A client sends `DIRTY <working_set_kib> <millis>\n`; the guest
//! walks the working set writing one word per 4 KiB page (with a little
//! arithmetic per write) for that long on its own clock, and replies
//! `DONE <iterations> <micros> <stalled_micros>\n`, one iteration being one
//! page written, and `stalled_micros` the time lost in gaps of more than
//! [`STALL_US`] between two reads of the clock: the vCPU was not running
//! (a checkpoint pause, or the host scheduling another thread).
//!
//! Why a request rather than a background loop: the working set is chosen
//! per measurement without restarting the VM, the workload runs only while
//! it is measured (the other services and tests see an idle guest), and the
//! count and duration come from the guest's clock (the host TSC, which keeps
//! running while the VMM pauses the guest for a checkpoint), so the rate
//! includes every pause and dirty-logging fault but not the output-commit
//! delay of the reply itself. The walk runs in slices of about a
//! millisecond between polls of the network stack, so echo, counter and
//! key-value keep being served meanwhile.

use alloc::format;
use alloc::vec::Vec;

use guest_rt::time;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

/// The port.
pub const PORT: u16 = 9100;
const PAGE: usize = 4096;
/// Longest run one request may ask for: keeps a mistyped request from
/// occupying the guest for hours.
const MAX_MILLIS: u64 = 60_000;
/// Guest time spent walking pages between two polls of the network stack.
const SLICE_US: u64 = 1_000;
/// Pages written between two reads of the clock: few enough that even when
/// every write takes a dirty-logging fault (about 20 µs on the nested KVM
/// of our development machines) a group stays well below [`STALL_US`].
const CLOCK_EVERY: u64 = 16;
/// A gap between two clock reads longer than this is counted as a stall.
pub const STALL_US: u64 = 1_000;
const MAX_LINE: usize = 128;

/// A request being served.
struct Job {
    pages: usize,
    end_us: u64,
    start_us: u64,
    iterations: u64,
    /// Time lost in stalls so far, and the last clock read (also across
    /// slices, so a pause during a network poll counts too).
    stalled_us: u64,
    last_us: u64,
    /// Mixed into each written word so every pass changes the pages' contents.
    acc: u64,
}

/// The listening socket, the working-set buffer and the job in progress.
pub struct Dirtier {
    handle: SocketHandle,
    line: Vec<u8>,
    /// Kept between requests so a repeated size does not allocate again.
    buf: Vec<u8>,
    job: Option<Job>,
}

/// One step of a 64-bit mixer (murmur3's finaliser): the "bit of
/// computation" per page, so the workload is not a pure store stream.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Parses `DIRTY <kib> <millis>` into (pages, millis).
fn parse(req: &str) -> Result<(usize, u64), &'static str> {
    let mut it = req.split_ascii_whitespace();
    if it.next() != Some("DIRTY") {
        return Err("expected DIRTY <working_set_kib> <millis>");
    }
    let kib: usize = it
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad working set (KiB)")?;
    let millis: u64 = it
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad duration (ms)")?;
    if it.next().is_some() {
        return Err("too many words");
    }
    let pages = kib / (PAGE / 1024);
    if pages == 0 {
        return Err("working set below one page (4 KiB)");
    }
    // The buffer's size must not wrap around (the walk indexes it by page).
    if pages.checked_mul(PAGE).is_none() {
        return Err("working set larger than the address space");
    }
    if millis == 0 || millis > MAX_MILLIS {
        return Err("duration must be 1..=60000 ms");
    }
    Ok((pages, millis))
}

impl Dirtier {
    /// Opens the listening socket.
    pub fn new(sockets: &mut SocketSet<'static>) -> Dirtier {
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(alloc::vec![0; 1024]),
            tcp::SocketBuffer::new(alloc::vec![0; 1024]),
        );
        let _ = sock.listen(PORT);
        Dirtier {
            handle: sockets.add(sock),
            line: Vec::new(),
            buf: Vec::new(),
            job: None,
        }
    }

    /// Whether a job is running (the main loop must not idle then).
    pub fn active(&self) -> bool {
        self.job.is_some()
    }

    /// Takes requests, runs one slice of the current job, sends its reply
    /// when it ends; `true` if anything moved.
    pub fn serve(&mut self, sockets: &mut SocketSet<'static>) -> bool {
        let s = sockets.get_mut::<tcp::Socket>(self.handle);
        if !s.is_open() {
            // The client went away (a job of a vanished client is dropped).
            self.job = None;
            self.line.clear();
            let _ = s.listen(PORT);
            return false;
        }
        let mut moved = false;
        // No reading while a job runs, nor past one line's worth: what the
        // client sends meanwhile waits in the socket (TCP flow control), so
        // it cannot grow the guest's heap.
        while self.job.is_none() && self.line.len() <= MAX_LINE && s.can_recv() {
            let mut b = [0u8; 128];
            match s.recv_slice(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.line.extend_from_slice(&b[..n]);
                    moved = true;
                }
            }
        }
        if self.job.is_none() {
            // One job at a time: further lines wait until it ends.
            if let Some(i) = self.line.iter().position(|&b| b == b'\n') {
                let req: Vec<u8> = self.line.drain(..=i).collect();
                match self.start(&req) {
                    Ok(()) => moved = true,
                    Err(e) => {
                        let _ = s.send_slice(format!("ERR {e}\n").as_bytes());
                    }
                }
            } else if self.line.len() > MAX_LINE {
                self.line.clear();
                let _ = s.send_slice(b"ERR line too long\n");
            }
        }
        if !s.may_recv() && s.state() == tcp::State::CloseWait {
            s.close();
        }
        let Some(job) = self.job.as_mut() else {
            return moved;
        };
        let now = walk(&mut self.buf, job);
        if now >= job.end_us {
            let reply = format!(
                "DONE {} {} {}\n",
                job.iterations,
                now - job.start_us,
                job.stalled_us
            );
            let _ = s.send_slice(reply.as_bytes());
            self.job = None;
        }
        true
    }

    fn start(&mut self, req: &[u8]) -> Result<(), &'static str> {
        let req = core::str::from_utf8(req).map_err(|_| "not UTF-8")?;
        let (pages, millis) = parse(req.trim())?;
        // Cannot overflow: `parse` checked it.
        let bytes = pages * PAGE;
        if self.buf.len() < bytes {
            // Free the smaller buffer first so the heap can hold the larger.
            self.buf = Vec::new();
            let mut v = Vec::new();
            v.try_reserve_exact(bytes)
                .map_err(|_| "working set larger than the guest's free memory")?;
            // Zero-fill before the clock starts: first touches of fresh
            // memory are not part of the measured rate.
            v.resize(bytes, 0);
            self.buf = v;
        }
        let start_us = time::micros();
        self.job = Some(Job {
            pages,
            end_us: start_us + millis * 1000,
            start_us,
            iterations: 0,
            stalled_us: 0,
            last_us: start_us,
            acc: start_us,
        });
        Ok(())
    }
}

/// Writes pages for one slice (or until the job's end); returns the time.
fn walk(buf: &mut [u8], job: &mut Job) -> u64 {
    let mut now = time::micros();
    let slice_end = (now + SLICE_US).min(job.end_us);
    loop {
        let gap = now.saturating_sub(job.last_us);
        if gap > STALL_US {
            job.stalled_us += gap;
        }
        job.last_us = now;
        if now >= slice_end {
            return now;
        }
        for _ in 0..CLOCK_EVERY {
            let i = job.iterations;
            let page = (i % job.pages as u64) as usize;
            // A different word of the page on each pass.
            let word = ((i / job.pages as u64) % (PAGE as u64 / 8)) as usize;
            job.acc = mix(job.acc ^ i);
            let off = page * PAGE + word * 8;
            buf[off..off + 8].copy_from_slice(&job.acc.to_le_bytes());
            job.iterations += 1;
        }
        now = time::micros();
    }
}
