//! The sink against a scripted QEMU on the other end of a socket pair:
//! the initial stream, checkpoints, a hold across `stop`/`release`, and a
//! protocol violation that fails the sink and abandons the migration.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use super::message::ColoMessage;
use super::records::RamBlock;
use super::sink::{ColoSink, Control, Phase, SinkError};
use super::writer;
use super::ColoState;
use crate::guest::Checkpoint;

const RAM_PAGES: u64 = 64;

fn blocks() -> Vec<RamBlock> {
    vec![
        RamBlock {
            idstr: "mem".into(),
            used_length: RAM_PAGES * 4096,
        },
        RamBlock {
            idstr: "pc.bios".into(),
            used_length: 2 * 4096,
        },
    ]
}

fn page(v: u8) -> Vec<u8> {
    vec![v; 4096]
}

enum Cmd {
    Checkpoint(Vec<(usize, u64, Vec<u8>)>, Vec<u8>),
    Garbage,
}

/// The fake QEMU: `start_migration` spawns a thread that speaks the
/// primary's side; `request_checkpoint` tells it to run one.
struct FakeQemu {
    tx: Option<mpsc::Sender<Cmd>>,
    next: Option<Cmd>,
    initial: Vec<u8>,
    abandoned: bool,
    thread: Option<std::thread::JoinHandle<Vec<u32>>>,
}

fn read_msg(s: &mut UnixStream) -> Option<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).ok()?;
    Some(u32::from_be_bytes(b))
}

impl Control for FakeQemu {
    fn start_migration(&mut self, mut qemu_end: UnixStream) -> Result<(), String> {
        let (tx, rx) = mpsc::channel::<Cmd>();
        self.tx = Some(tx);
        let initial = self.initial.clone();
        self.thread = Some(std::thread::spawn(move || {
            let mut got = Vec::new();
            if qemu_end.write_all(&initial).is_err() {
                return got;
            }
            match read_msg(&mut qemu_end) {
                Some(m) => got.push(m),
                None => return got,
            }
            for cmd in rx {
                match cmd {
                    Cmd::Garbage => {
                        let _ = qemu_end.write_all(&ColoMessage::VmstateLoaded.encode());
                    }
                    Cmd::Checkpoint(pages, blob) => {
                        let b = blocks();
                        let (req, rest) = writer::primary_checkpoint(
                            &b,
                            pages.iter().map(|(b, o, d)| (*b, *o, &d[..])),
                            &blob,
                        );
                        let _ = qemu_end.write_all(&req);
                        match read_msg(&mut qemu_end) {
                            Some(m) => got.push(m),
                            None => return got,
                        }
                        let _ = qemu_end.write_all(&rest);
                        for _ in 0..2 {
                            match read_msg(&mut qemu_end) {
                                Some(m) => got.push(m),
                                None => return got,
                            }
                        }
                    }
                }
            }
            got
        }));
        Ok(())
    }
    fn force_completion(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn request_checkpoint(&mut self) -> Result<(), String> {
        let cmd = self.next.take().ok_or("no checkpoint scripted")?;
        self.tx
            .as_ref()
            .ok_or("not started")?
            .send(cmd)
            .map_err(|e| e.to_string())
    }
    fn abandon(&mut self) -> Result<(), String> {
        self.abandoned = true;
        Ok(())
    }
}

fn fake() -> FakeQemu {
    let b = blocks();
    let first: Vec<(usize, u64, Vec<u8>)> = (0..RAM_PAGES)
        .map(|i| (0usize, i * 4096, page(i as u8)))
        .chain([(1, 0, page(0xb1)), (1, 4096, page(0xb2))])
        .collect();
    let last = [(0usize, 5 * 4096u64, page(0x55))];
    let devs: &[(&str, &[u8])] = &[("timer", &[1; 9])];
    FakeQemu {
        tx: None,
        next: None,
        initial: writer::primary_initial(
            &b,
            first.iter().map(|(b, o, d)| (*b, *o, &d[..])),
            last.iter().map(|(b, o, d)| (*b, *o, &d[..])),
            devs,
        ),
        abandoned: false,
        thread: None,
    }
}

#[test]
fn precopy_checkpoints_hold_and_release() {
    let mut q = fake();
    let mut sink = ColoSink::start(&mut q, RAM_PAGES).expect("start");
    let mut cp = Checkpoint::default();
    // Bounded rounds; frames ascending; the reserve after the main RAM.
    let mut all = Vec::new();
    loop {
        sink.precopy_round(16, true, &mut cp).expect("round");
        assert!(cp.frames.len() <= 16);
        assert!(cp.frames.windows(2).all(|w| w[0] < w[1]));
        all.extend(cp.frames.iter().copied());
        if sink.phase() == Phase::Completed {
            break;
        }
    }
    // Page 5 came twice: the later copy wins in its round.
    assert!(all.contains(&RAM_PAGES) && all.contains(&(RAM_PAGES + 1)));
    assert!(sink.guest_held(), "held: READY not sent yet");
    // A checkpoint while held: nothing new, the initial device part.
    assert!(!sink.stop(&mut q).expect("stop"));
    sink.collect().expect("collect");
    sink.take(&mut cp).expect("take");
    assert!(cp.frames.is_empty());
    let st = ColoState::decode(&cp.state).expect("envelope");
    assert_eq!(st.blocks, blocks());
    assert_eq!(st.devices, writer::device_sections(&[("timer", &[1; 9])]));
    sink.release().expect("ready");
    assert_eq!(sink.phase(), Phase::Running);

    for round in 0..3u8 {
        let blob = writer::device_sections(&[("timer", &[round; 3])]);
        q.next = Some(Cmd::Checkpoint(
            vec![
                (0, 9 * 4096, page(round)),
                (1, 0, page(round)),
                (0, 4096, page(7)),
            ],
            blob.clone(),
        ));
        assert!(sink.stop(&mut q).expect("stop"));
        assert!(sink.guest_held());
        sink.collect().expect("collect");
        sink.take(&mut cp).expect("take");
        assert_eq!(cp.frames, vec![1, 9, RAM_PAGES]);
        assert_eq!(cp.pages[4096 * 2], round);
        assert_eq!(ColoState::decode(&cp.state).expect("env").devices, blob);
        sink.release().expect("release");
    }
    drop(q.tx.take());
    let got = q.thread.take().expect("thread").join().expect("join");
    let want: Vec<u32> = std::iter::once(0)
        .chain((0..3).flat_map(|_| [2, 5, 6]))
        .collect();
    assert_eq!(
        got, want,
        "ready, then reply/received/loaded per checkpoint"
    );
    assert!(!q.abandoned);
}

#[test]
fn an_unexpected_message_fails_the_sink_and_abandons() {
    let mut q = fake();
    let mut sink = ColoSink::start(&mut q, RAM_PAGES).expect("start");
    let mut cp = Checkpoint::default();
    while sink.phase() == Phase::Precopy {
        sink.precopy_round(1000, false, &mut cp).expect("round");
    }
    assert_eq!(
        sink.phase(),
        Phase::Running,
        "released at once when not held"
    );
    q.next = Some(Cmd::Garbage);
    let e = sink.stop(&mut q).expect_err("garbage");
    assert!(e.to_string().contains("vmstate-loaded"), "{e}");
    sink.fail(&mut q);
    assert!(q.abandoned);
    assert!(matches!(sink.stop(&mut q), Err(SinkError::Failed)));
}

#[test]
fn a_wrong_ram_size_is_a_layout_error() {
    let mut q = fake();
    let mut sink = ColoSink::start(&mut q, RAM_PAGES * 2).expect("start");
    let mut cp = Checkpoint::default();
    let e = sink.precopy_round(10, false, &mut cp).expect_err("layout");
    assert!(matches!(e, SinkError::Layout(_)), "{e}");
}
