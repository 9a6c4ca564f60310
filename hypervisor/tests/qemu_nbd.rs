//! remus-wan's NBD server for a QEMU guest's disk, against QEMU's own NBD
//! client (`qemu-io` commands run inside `qemu-system-x86_64 -M none`
//! through QMP, so only the package the test suite installs is needed),
//! and against a hand-written client for what QEMU never sends: requests
//! out of range, too long, unknown, or out of step.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::kvm::devices::block::WriteHook;
use hypervisor::qemu::nbd::{self, NbdServer};
use proptest::prelude::*;

const QEMU: &str = "qemu-system-x86_64";
const IMAGE_SIZE: u64 = 1 << 20;

/// `true` when QEMU (our NBD client) runs here; otherwise prints why and
/// returns `false` under REMUS_WAN_ALLOW_SKIP=1, or panics saying why.
fn require_qemu() -> bool {
    match hypervisor::qemu::available(QEMU.as_ref()) {
        Ok(()) => true,
        Err(e) if std::env::var("REMUS_WAN_ALLOW_SKIP").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (REMUS_WAN_ALLOW_SKIP=1): {e}");
            false
        }
        Err(e) => panic!(
            "this test needs QEMU as the NBD client: {e} (set REMUS_WAN_ALLOW_SKIP=1 to skip)"
        ),
    }
}

/// What the hook saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A write: offset, data, and whether the image already held the data
    /// when the hook saw it (it must not).
    Write(u64, Vec<u8>, bool),
    Flush,
}

/// Records every write and flush, and checks each write reaches the hook
/// before it reaches the image.
#[derive(Clone)]
struct Recorder {
    image: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn new(image: &Path) -> Recorder {
        Recorder {
            image: image.to_owned(),
            seen: Arc::default(),
        }
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn writes(&self) -> Vec<(u64, usize)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Write(o, d, _) => Some((o, d.len())),
                Seen::Flush => None,
            })
            .collect()
    }
}

impl WriteHook for Recorder {
    fn on_write(&mut self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let mut now = vec![0u8; data.len()];
        let f = std::fs::File::open(&self.image).unwrap();
        f.read_exact_at(&mut now, offset).unwrap();
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Write(offset, data.to_vec(), now == data));
    }
    fn on_flush(&mut self) {
        self.seen.lock().unwrap().push(Seen::Flush);
    }
}

/// A zero-filled image, a socket path, and the server on them.
fn serve(dir: &Path) -> (PathBuf, NbdServer, Recorder) {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    let rec = Recorder::new(&image);
    let server = NbdServer::start(&image, &dir.join("nbd.sock"), Some(Box::new(rec.clone())))
        .expect("start the NBD server");
    (image, server, rec)
}

/// Runs `qemu-io` commands on the export at `socket` with QEMU's NBD
/// client; returns what each command printed.
fn qemu_io(socket: &Path, cmds: &[&str]) -> Vec<String> {
    let blockdev = format!(
        "driver=nbd,node-name=d0,server.type=unix,server.path={}",
        socket.display()
    );
    let mut child = Command::new(QEMU)
        .args(["-M", "none", "-nodefaults", "-display", "none"])
        .args(["-qmp", "stdio", "-blockdev", &blockdev])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let mut input = String::from("{\"execute\":\"qmp_capabilities\"}\n");
    for c in cmds {
        let line = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": {"command-line": format!("qemu-io d0 \"{c}\"")},
        });
        input.push_str(&format!("{line}\n"));
    }
    input.push_str("{\"execute\":\"quit\"}\n");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    // A watchdog, so a hung client fails the test instead of hanging it.
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        // SAFETY: kill of the child we started (not yet reaped: the
        // waiter has not returned).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let out = waiter.join().unwrap().expect("qemu-system-x86_64 output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // qemu-io prints on QEMU's stdout, before the command's QMP return.
    let mut per_cmd = Vec::new();
    let mut cur = String::new();
    for line in stdout.lines() {
        if line.starts_with("{\"return\"") || line.starts_with("{\"error\"") {
            per_cmd.push(std::mem::take(&mut cur) + line);
        } else if !line.starts_with("{\"QMP\"") && !line.starts_with("{\"timestamp\"") {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    // One return for qmp_capabilities, one per command, one for quit.
    assert!(
        per_cmd.len() == cmds.len() + 2,
        "QEMU as NBD client did not run every command ({}); stdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    per_cmd[1..=cmds.len()].to_vec()
}

fn assert_ok(cmd: &str, out: &str, expect: &str) {
    assert!(
        out.contains(expect) && !out.contains("failed") && !out.contains("error"),
        "`{cmd}` printed:\n{out}"
    );
}

#[test]
fn qemu_writes_pass_the_hook_first_and_read_back() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, server, rec) = serve(dir.path());
    let cmds = [
        "write -P 0xab 4096 8192",
        "read -P 0xab 4096 8192",
        "read -P 0x00 0 4096",
        "write -P 0xcd 65536 512",
        "read -P 0xcd 65536 512",
        "read -P 0xab 4096 8192",
    ];
    let out = qemu_io(server.socket(), &cmds);
    assert_ok(cmds[0], &out[0], "wrote 8192/8192 bytes at offset 4096");
    assert_ok(cmds[1], &out[1], "read 8192/8192 bytes at offset 4096");
    assert_ok(cmds[2], &out[2], "read 4096/4096 bytes at offset 0");
    assert_ok(cmds[3], &out[3], "wrote 512/512 bytes at offset 65536");
    assert_ok(cmds[4], &out[4], "read 512/512 bytes at offset 65536");
    assert_ok(cmds[5], &out[5], "read 8192/8192 bytes at offset 4096");

    let seen = rec.seen();
    let writes: Vec<_> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Write(o, d, landed) => Some((*o, d.clone(), *landed)),
            Seen::Flush => None,
        })
        .collect();
    assert_eq!(
        writes,
        vec![
            (4096, vec![0xab; 8192], false),
            (65536, vec![0xcd; 512], false)
        ],
        "the hook sees each write, with its bytes, before the image does"
    );
    let disk = std::fs::read(&image).unwrap();
    assert!(disk[4096..12288].iter().all(|&b| b == 0xab));
    assert!(disk[65536..66048].iter().all(|&b| b == 0xcd));
    assert!(disk[..4096].iter().all(|&b| b == 0));
    assert_eq!(server.stats().writes, 2);
    assert!(server.stats().reads >= 4);
    assert_eq!(server.stats().errors, 0);
}

#[test]
fn qemu_fua_is_native_and_flush_reaches_the_hook() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_image, server, rec) = serve(dir.path());
    let cmds = [
        "write -f -P 0x11 0 4096",
        "write -P 0x22 4096 4096",
        "flush",
        "read -P 0x11 0 4096",
    ];
    let out = qemu_io(server.socket(), &cmds);
    assert_ok(cmds[0], &out[0], "wrote 4096/4096 bytes at offset 0");
    assert_ok(cmds[1], &out[1], "wrote 4096/4096 bytes at offset 4096");
    assert_ok(cmds[3], &out[3], "read 4096/4096 bytes at offset 0");
    let seen = rec.seen();
    // Had we not offered FUA, QEMU would follow the first write with a
    // flush of its own.
    assert!(
        matches!(
            &seen[..],
            [
                Seen::Write(0, _, false),
                Seen::Write(4096, _, false),
                Seen::Flush,
                ..
            ]
        ),
        "expected write, write, flush; the hook saw {:?}",
        seen.iter()
            .map(|s| match s {
                Seen::Write(o, d, _) => format!("write {o}+{}", d.len()),
                Seen::Flush => "flush".into(),
            })
            .collect::<Vec<_>>()
    );
    assert!(server.stats().flushes >= 1);
}

/// A hand-written NBD client, for requests QEMU would never send.
struct RawClient(UnixStream);

impl RawClient {
    fn connect(socket: &Path) -> RawClient {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = RawClient(s);
        let mut hello = [0u8; 18];
        c.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([hello[16], hello[17]]) & 1, 1);
        // Fixed newstyle, no zeroes.
        c.0.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// (option, reply type, data) of the next option reply.
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            nbd::OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        (opt, kind, data)
    }

    /// NBD_OPT_GO on the default export; returns (size, flags).
    fn go(&mut self) -> (u64, u16) {
        self.option(7, &[0, 0, 0, 0, 0, 0]);
        let (opt, kind, info) = self.option_reply();
        assert_eq!((opt, kind, info.len()), (7, 3, 12), "NBD_REP_INFO");
        assert_eq!(self.option_reply(), (7, 1, vec![]), "NBD_REP_ACK");
        (
            u64::from_be_bytes(info[2..10].try_into().unwrap()),
            u16::from_be_bytes(info[10..12].try_into().unwrap()),
        )
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut h = nbd::REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.0.write_all(&h).unwrap();
    }

    /// (error, cookie) of the next simple reply.
    fn reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        assert_eq!(
            u32::from_be_bytes(r[..4].try_into().unwrap()),
            nbd::SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..].try_into().unwrap()),
        )
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        // A reset when the server closed with our bytes still unread.
        match self.0.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

#[test]
fn bad_requests_get_errors_and_the_server_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (image, server, rec) = serve(dir.path());
    let mut c = RawClient::connect(server.socket());
    let (size, flags) = c.go();
    assert_eq!(size, IMAGE_SIZE);
    assert_eq!(flags, nbd::TRANSMISSION_FLAGS);

    // A write past the end: ENOSPC, its payload consumed, nothing written.
    c.request(nbd::CMD_WRITE, 0, 1, IMAGE_SIZE - 512, 1024, &[0xee; 1024]);
    assert_eq!(c.reply(), (nbd::ENOSPC, 1));
    // An offset that overflows.
    c.request(nbd::CMD_WRITE, 0, 2, u64::MAX - 10, 512, &[0xee; 512]);
    assert_eq!(c.reply(), (nbd::ENOSPC, 2));
    // Reads past the end, or longer than 32 MiB.
    c.request(nbd::CMD_READ, 0, 3, IMAGE_SIZE, 1, &[]);
    assert_eq!(c.reply(), (nbd::EINVAL, 3));
    c.request(nbd::CMD_READ, 0, 4, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.reply(), (nbd::EINVAL, 4));
    // TRIM and an unknown command are refused.
    c.request(4, 0, 5, 0, 512, &[]);
    assert_eq!(c.reply(), (nbd::EINVAL, 5));
    c.request(0xbeef, 0, 6, 0, 0, &[]);
    assert_eq!(c.reply(), (nbd::EINVAL, 6));
    // Still in step: a good write with FUA, then a read of it.
    c.request(nbd::CMD_WRITE, nbd::CMD_FLAG_FUA, 7, 512, 4, b"abcd");
    assert_eq!(c.reply(), (0, 7));
    c.request(nbd::CMD_READ, 0, 8, 510, 8, &[]);
    assert_eq!(c.reply(), (0, 8));
    let mut data = [0u8; 8];
    c.0.read_exact(&mut data).unwrap();
    assert_eq!(&data, b"\0\0abcd\0\0");
    c.request(nbd::CMD_FLUSH, 0, 9, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 9));
    // An empty write: acknowledged, nothing for the hook.
    c.request(nbd::CMD_WRITE, 0, 10, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 10));
    // Bad magic: the stream is out of step, the server closes it.
    c.0.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed());

    // A write longer than 32 MiB: closed without reading its payload.
    let mut c = RawClient::connect(server.socket());
    c.go();
    c.request(nbd::CMD_WRITE, 0, 1, 0, (32 << 20) + 512, &[]);
    assert!(c.closed());

    // DISC: closed without a reply.
    let mut c = RawClient::connect(server.socket());
    c.go();
    c.request(nbd::CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed());

    assert_eq!(
        rec.writes(),
        vec![(512, 4)],
        "refused writes never reach the hook"
    );
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(disk.len() as u64, IMAGE_SIZE);
    assert!(disk[IMAGE_SIZE as usize - 512..].iter().all(|&b| b == 0));
    assert!(server.stats().errors >= 8);

    // And the server still serves the next client: QEMU's.
    if require_qemu() {
        let out = qemu_io(server.socket(), &["read -P 0x61 512 1", "write -P 7 0 512"]);
        assert_ok("read", &out[0], "read 1/1 bytes at offset 512");
        assert_ok("write", &out[1], "wrote 512/512 bytes at offset 0");
        // QEMU itself refuses a write past the end of the size we told
        // it, before it reaches us: an error, and the server goes on.
        let out = qemu_io(
            server.socket(),
            &["write -P 1 1048064 1024", "read -P 7 0 512"],
        );
        assert!(out[0].contains("write failed"), "{}", out[0]);
        assert_ok("read", &out[1], "read 512/512 bytes at offset 0");
    }
}

#[test]
fn handshake_export_name_unsupported_options_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server, _rec) = serve(dir.path());

    // Options we do not serve (structured replies, list) are refused with
    // NBD_REP_ERR_UNSUP; a malformed GO with NBD_REP_ERR_INVALID; ABORT
    // is acknowledged and the connection closed.
    let mut c = RawClient::connect(server.socket());
    c.option(8, &[]);
    assert_eq!(c.option_reply(), (8, (1 << 31) + 1, vec![]));
    c.option(3, &[]);
    assert_eq!(c.option_reply(), (3, (1 << 31) + 1, vec![]));
    c.option(7, &[0, 0, 0, 9]);
    assert_eq!(c.option_reply(), (7, (1 << 31) + 3, vec![]));
    c.option(2, &[]);
    assert_eq!(c.option_reply(), (2, 1, vec![]));
    assert!(c.closed());

    // The old way in: NBD_OPT_EXPORT_NAME, answered with size and flags
    // (no zeroes: the client asked so).
    let mut c = RawClient::connect(server.socket());
    c.option(1, b"disk");
    let mut info = [0u8; 10];
    c.0.read_exact(&mut info).unwrap();
    assert_eq!(
        u64::from_be_bytes(info[..8].try_into().unwrap()),
        IMAGE_SIZE
    );
    assert_eq!(
        u16::from_be_bytes([info[8], info[9]]),
        nbd::TRANSMISSION_FLAGS
    );
    c.request(nbd::CMD_READ, 0, 42, 0, 16, &[]);
    assert_eq!(c.reply(), (0, 42));
    let mut d = [1u8; 16];
    c.0.read_exact(&mut d).unwrap();
    assert_eq!(d, [0u8; 16]);

    // Garbage instead of an option: closed.
    let mut c = RawClient::connect(server.socket());
    c.0.write_all(b"NOTANOPTIONATALL").unwrap();
    assert!(c.closed());
}

#[test]
fn quiesce_waits_for_a_request_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, server, rec) = serve(dir.path());
    let mut c = RawClient::connect(server.socket());
    c.go();
    assert!(server.quiesce(Duration::from_secs(1)));
    // Header and half the payload of a write: it is in progress.
    c.request(nbd::CMD_WRITE, 0, 1, 0, 1024, &[9; 512]);
    assert!(!server.quiesce(Duration::from_millis(200)));
    assert!(rec.writes().is_empty());
    c.0.write_all(&[9; 512]).unwrap();
    assert_eq!(c.reply(), (0, 1));
    assert!(server.quiesce(Duration::from_secs(1)));
    assert_eq!(rec.writes(), vec![(0, 1024)]);
}

#[test]
fn stop_closes_clients_joins_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (_image, mut server, _rec) = serve(dir.path());
    let sock = server.socket().to_owned();
    // One client idle in transmission, one stuck in the handshake.
    let mut a = RawClient::connect(&sock);
    a.go();
    let _b = UnixStream::connect(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    server.stop();
    assert!(!sock.exists());
    assert!(a.closed());
    drop(server); // a second stop is harmless
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any 28 bytes parse or are refused, and any request is classified,
    /// without a panic; a parsed header has the request magic.
    #[test]
    fn request_parser_takes_any_bytes(bytes in proptest::array::uniform28(any::<u8>()), size in any::<u64>()) {
        match nbd::parse_request(&bytes) {
            Some(r) => {
                prop_assert_eq!(&bytes[..4], &nbd::REQUEST_MAGIC.to_be_bytes()[..]);
                let _ = nbd::classify(&r, size);
            }
            None => prop_assert_ne!(&bytes[..4], &nbd::REQUEST_MAGIC.to_be_bytes()[..]),
        }
    }

    /// A request header with the right magic and anything else in it:
    /// classified without a panic, and reads and writes only inside the
    /// export.
    #[test]
    fn classify_keeps_io_inside_the_export(flags in any::<u16>(), kind in 0u16..10, offset in any::<u64>(), length in any::<u32>(), size in any::<u64>()) {
        let r = nbd::Request { flags, kind, cookie: 1, offset, length };
        match nbd::classify(&r, size) {
            nbd::Action::Read | nbd::Action::Write { .. } => {
                prop_assert!(length <= nbd::MAX_PAYLOAD);
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= size));
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Random bytes after the handshake never bring the server down: it
    /// still serves a well-behaved client afterwards.
    #[test]
    fn random_streams_do_not_hurt_the_server(garbage in proptest::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().unwrap();
        let (_image, server, _rec) = serve(dir.path());
        {
            let mut c = RawClient::connect(server.socket());
            c.go();
            let _ = c.0.write_all(&garbage);
            let _ = c.0.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.0.read_to_end(&mut sink);
        }
        let mut c = RawClient::connect(server.socket());
        c.go();
        c.request(nbd::CMD_READ, 0, 5, 0, 4, &[]);
        prop_assert_eq!(c.reply(), (0, 5));
    }
}
