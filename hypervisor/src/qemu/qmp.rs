//! A small synchronous QMP client (QEMU Machine Protocol over a unix
//! socket).
//!
//! Synchronous on purpose: every command of a checkpoint must finish before
//! the next one starts (stop, save state, cont), and the engine calls the
//! backend from one thread, so an async client would only add a runtime to
//! the pause. Each read has a timeout, so a hung QEMU turns into an error
//! instead of a hung checkpoint. Asynchronous events QEMU sends between
//! replies are kept (see [`Qmp::take_events`]).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::error::{Error, Result};

/// How long one command may take before the client gives up.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
    line: String,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until `deadline`
    /// (QEMU creates the socket while it starts). `alive` is asked between
    /// attempts and ends the wait with its error (QEMU exited).
    pub fn connect(
        path: &Path,
        deadline: Instant,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Qmp> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    alive()?;
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            what: format!("connecting to QMP at {} ({e})", path.display()),
                            after: started.elapsed(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream
            .set_read_timeout(Some(COMMAND_TIMEOUT))
            .map_err(Error::io("QMP socket timeout"))?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(Error::io("cloning the QMP socket"))?,
        );
        let mut qmp = Qmp {
            writer: stream,
            reader,
            events: Vec::new(),
            line: String::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::QmpProtocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let msg = Self::encode(command, arguments);
        self.writer
            .write_all(msg.as_bytes())
            .map_err(Error::io(format!("sending QMP command {command}")))?;
        self.reply(command)
    }

    /// Runs `command` with the file descriptor `fd` attached (SCM_RIGHTS),
    /// as `getfd` and `add-fd` expect.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value> {
        let msg = Self::encode(command, arguments);
        send_with_fd(&self.writer, msg.as_bytes(), fd).map_err(Error::io(format!(
            "sending QMP command {command} with an fd"
        )))?;
        self.reply(command)
    }

    /// Events received so far (and forgets them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn encode(command: &str, arguments: Option<Value>) -> String {
        let mut v = json!({ "execute": command });
        if let Some(a) = arguments {
            v["arguments"] = a;
        }
        let mut s = v.to_string();
        s.push('\n');
        s
    }

    /// Reads until the reply to the command just sent; events on the way
    /// are kept.
    fn reply(&mut self, command: &str) -> Result<Value> {
        loop {
            let mut msg = self.read_message()?;
            if let Some(r) = msg.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = msg.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(Error::Qmp {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            if msg.get("event").is_some() {
                // Bounded: a QEMU that floods events while we wait for a
                // reply must not grow this without end.
                if self.events.len() < 1024 {
                    self.events.push(msg);
                }
                continue;
            }
            return Err(Error::QmpProtocol(format!(
                "unexpected message while waiting for {command}: {msg}"
            )));
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                Error::Timeout {
                    what: "waiting for a QMP reply".into(),
                    after: COMMAND_TIMEOUT,
                }
            } else {
                Error::io("reading from QMP")(e)
            }
        })?;
        if n == 0 {
            return Err(Error::QmpProtocol("QEMU closed the QMP connection".into()));
        }
        serde_json::from_str(&self.line)
            .map_err(|e| Error::QmpProtocol(format!("bad JSON {:?}: {e}", self.line.trim())))
    }
}

/// Sends `bytes` with `fd` as ancillary data in one `sendmsg`.
fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes we own, enough for one
    // cmsghdr carrying one int (CMSG_SPACE above).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, raw);
    }
    // SAFETY: msg and everything it points at live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    if n < bytes.len() {
        // The fd went with the first byte; the rest is plain data.
        (&*sock).write_all(&bytes[n..])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A fake QEMU on the other end of a socket pair: greeting, then
    /// scripted replies.
    #[test]
    fn commands_replies_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("query-status"));
            s.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {\"status\": \"paused\"}}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            s.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n")
                .unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let mut q = Qmp::connect(&path, Instant::now() + Duration::from_secs(5), &mut || {
            Ok(())
        })
        .unwrap();
        let st = q.execute("query-status", None).unwrap();
        assert_eq!(st["status"], "paused");
        assert_eq!(q.take_events().len(), 1);
        match q.execute("cont", None) {
            Err(Error::Qmp { class, desc, .. }) => {
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "nope");
            }
            other => panic!("expected a QMP error, got {other:?}"),
        }
        drop(q);
        server.join().unwrap();
    }
}
