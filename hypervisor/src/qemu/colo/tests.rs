//! The parser against streams the writer produces: round trips, every
//! cut point, corruptions, and arbitrary bytes (never a panic).

use proptest::prelude::*;

use super::error::StreamError;
use super::message::ColoMessage;
use super::records::RamBlock;
use super::stream::{Event, StreamParser};
use super::writer;

fn blocks() -> Vec<RamBlock> {
    vec![
        RamBlock {
            idstr: "mem".into(),
            used_length: 64 * 4096,
        },
        RamBlock {
            idstr: "pc.bios".into(),
            used_length: 4 * 4096,
        },
    ]
}

/// Everything the parser reports, pages as (block, offset, first byte).
#[derive(Debug, Default, PartialEq, Eq, Clone)]
struct Seen {
    pages: Vec<(usize, u64, Vec<u8>)>,
    initial_devices: Option<Vec<u8>>,
    blobs: Vec<Vec<u8>>,
    messages: Vec<ColoMessage>,
    live_ends: usize,
    blocks: Vec<RamBlock>,
    colo: bool,
}

fn drain(p: &mut StreamParser, seen: &mut Seen) -> Result<(), StreamError> {
    while let Some(ev) = p.next()? {
        match ev {
            Event::Page {
                block,
                offset,
                data,
            } => {
                let mut page = vec![0u8; 4096];
                data.write_to(&mut page);
                seen.pages.push((block, offset, page));
            }
            Event::InitialEnd { devices } => seen.initial_devices = Some(devices.to_vec()),
            Event::DeviceBlob(b) => seen.blobs.push(b.to_vec()),
            Event::Message(m) => seen.messages.push(m),
            Event::LiveEnd => seen.live_ends += 1,
            Event::Blocks => seen.blocks = p.blocks().to_vec(),
            Event::Command(_) => seen.colo = p.colo_enabled(),
            Event::Header | Event::Configuration | Event::SectionEnd => {}
        }
    }
    Ok(())
}

fn parse_chunks(stream: &[u8], chunk: usize) -> Result<Seen, StreamError> {
    let mut p = StreamParser::new();
    let mut seen = Seen::default();
    for c in stream.chunks(chunk.max(1)) {
        p.push(c);
        drain(&mut p, &mut seen)?;
    }
    Ok(seen)
}

fn page(v: u8) -> Vec<u8> {
    let mut p = vec![v; 4096];
    p[0] = v.wrapping_add(1);
    p
}

type Pages = Vec<(usize, u64, Vec<u8>)>;

fn sample() -> (Vec<u8>, Pages, Vec<u8>, Vec<u8>) {
    let b = blocks();
    let pages: Pages = vec![
        (0, 0, page(1)),
        (0, 4096 * 3, vec![0u8; 4096]),
        (1, 4096, page(7)),
        (1, 0, page(9)),
    ];
    let last: Pages = vec![(0, 4096 * 63, page(3))];
    let devs: &[(&str, &[u8])] = &[("timer", &[1, 2, 3, 0x7e, 0, 0, 0, 10]), ("cpu", &[4; 40])];
    let mut initial = writer::primary_initial(
        &b,
        pages.iter().map(|(b, o, d)| (*b, *o, &d[..])),
        last.iter().map(|(b, o, d)| (*b, *o, &d[..])),
        devs,
    );
    let blob = writer::device_sections(devs);
    let (req, rest) =
        writer::primary_checkpoint(&b, last.iter().map(|(b, o, d)| (*b, *o, &d[..])), &blob);
    let mut all_pages = pages;
    all_pages.extend(last.iter().cloned());
    let mut colo = req;
    colo.extend_from_slice(&rest);
    initial.shrink_to_fit();
    (initial, all_pages, colo, blob)
}

#[test]
fn initial_stream_then_checkpoints() {
    let (initial, pages, colo, blob) = sample();
    for chunk in [1, 7, 4096, 1 << 20] {
        let mut p = StreamParser::new();
        let mut seen = Seen::default();
        for c in initial.chunks(chunk) {
            p.push(c);
            drain(&mut p, &mut seen).expect("initial stream");
        }
        assert!(seen.colo);
        assert_eq!(seen.blocks, blocks());
        assert_eq!(seen.pages, pages, "chunk {chunk}");
        assert_eq!(seen.initial_devices.as_deref(), Some(&blob[..]));
        assert!(p.configuration().starts_with(&[0x07]));
        assert_eq!(p.ram_section_id(), Some(1));
        assert!(p.footers());
        for round in 0..3 {
            for c in colo.chunks(chunk) {
                p.push(c);
                drain(&mut p, &mut seen).expect("checkpoint");
            }
            assert!(p.at_checkpoint_boundary());
            assert_eq!(seen.blobs.len(), round + 1);
            assert_eq!(seen.live_ends, round + 1);
        }
        assert_eq!(seen.blobs[0], blob);
        assert_eq!(
            &seen.messages[..2],
            &[ColoMessage::CheckpointRequest, ColoMessage::VmstateSend]
        );
    }
}

#[test]
fn restore_stream_round_trips_through_the_parser() {
    let b = blocks();
    let pages: Pages = vec![(1, 0, page(5)), (1, 8192, vec![0; 4096])];
    let devs: &[(&str, &[u8])] = &[("serial", &[9; 12])];
    let dev = writer::device_sections(devs);
    let mut out = Vec::new();
    writer::restore_stream(
        &mut out,
        &writer::configuration("pc-i440fx-10.0"),
        3,
        &b,
        pages.iter().map(|(b, o, d)| (*b, *o, &d[..])),
        &dev,
    );
    // The parser insists on the description QEMU appends; the replica
    // QEMU does not need it, so add one just for this check.
    let desc = writer::description(devs);
    out.push(0x06);
    out.extend_from_slice(&(desc.len() as u32).to_be_bytes());
    out.extend_from_slice(&desc);
    let seen = parse_chunks(&out, 100).expect("restore stream");
    assert_eq!(seen.pages, pages);
    assert_eq!(seen.initial_devices, Some(dev));
}

#[test]
fn corrupt_input_gives_typed_errors() {
    let (initial, _, colo, _) = sample();
    // Bad header.
    let mut bad = initial.clone();
    bad[3] = b'X';
    assert!(matches!(
        parse_chunks(&bad, 64),
        Err(StreamError::BadHeader(_))
    ));
    // An unknown section type right after the configuration.
    let cfg_end = 8 + writer::configuration("pc-i440fx-10.0").len();
    let mut bad = initial.clone();
    bad[cfg_end] = 0x42;
    assert!(matches!(
        parse_chunks(&bad, 64),
        Err(StreamError::UnknownSection { kind: 0x42, .. })
    ));
    // A postcopy command.
    let mut bad = initial.clone();
    bad[cfg_end + 2] = 3;
    assert!(matches!(
        parse_chunks(&bad, 64),
        Err(StreamError::UnsupportedCommand { cmd: 3, .. })
    ));
    // An unexpected COLO message where checkpoint-request belongs.
    let mut p = StreamParser::new();
    let mut seen = Seen::default();
    p.push(&initial);
    drain(&mut p, &mut seen).expect("initial");
    p.push(&ColoMessage::VmstateLoaded.encode());
    match drain(&mut p, &mut seen) {
        Err(StreamError::UnexpectedMessage { expected, got }) => {
            assert_eq!(expected, "checkpoint-request");
            assert_eq!(got, "vmstate-loaded");
        }
        other => panic!("{other:?}"),
    }
    // Sticky.
    assert!(p.next().is_err());
    // A checkpoint with an xbzrle page record.
    let mut p = StreamParser::new();
    p.push(&initial);
    drain(&mut p, &mut Seen::default()).expect("initial");
    let mut bad = colo.clone();
    // request(4) send(4) END header(5), then the first record's flags.
    bad[4 + 4 + 5 + 7] = 0x40;
    p.push(&bad);
    assert!(matches!(
        drain(&mut p, &mut Seen::default()),
        Err(StreamError::UnsupportedRamFlags { .. })
    ));
    // A device blob that is not sections + EOF.
    let b = blocks();
    let (req, rest) = writer::primary_checkpoint(&b, std::iter::empty(), b"garbage");
    let mut p = StreamParser::new();
    p.push(&initial);
    drain(&mut p, &mut Seen::default()).expect("initial");
    p.push(&req);
    p.push(&rest);
    assert!(matches!(
        drain(&mut p, &mut Seen::default()),
        Err(StreamError::BadDeviceBlob(_))
    ));
}

#[test]
fn truncated_streams_wait_for_more() {
    let (initial, _, colo, _) = sample();
    let mut whole = initial.clone();
    whole.extend_from_slice(&colo);
    // Any prefix parses without error and without the final event.
    for cut in (0..whole.len()).step_by(97).chain([whole.len() - 1]) {
        let seen = parse_chunks(&whole[..cut], 1 << 20).expect("a prefix is not an error");
        assert!(seen.blobs.is_empty(), "cut {cut}");
    }
}

#[test]
fn ignore_shared_in_the_configuration_is_refused() {
    let mut cfg = writer::configuration("pc-i440fx-10.0");
    cfg.push(0x05);
    let name = b"configuration/capabilities";
    cfg.push(name.len() as u8);
    cfg.extend_from_slice(name);
    cfg.extend_from_slice(&1u32.to_be_bytes());
    cfg.extend_from_slice(&1u32.to_be_bytes());
    cfg.push(15);
    cfg.extend_from_slice(b"x-ignore-shared");
    let mut s = super::wire::HEADER.to_vec();
    s.extend_from_slice(&cfg);
    s.push(0x01);
    assert!(matches!(
        parse_chunks(&s, 1000),
        Err(StreamError::BadConfiguration(m)) if m.contains("x-ignore-shared")
    ));
}

/// A stream captured from a real QEMU (`REMUS_WAN_CAPTURE=path`), if any:
/// the initial stream must parse to its end.
#[test]
fn captured_initial_stream_parses() {
    let Some(path) = std::env::var_os("REMUS_WAN_CAPTURE") else {
        return;
    };
    let data = std::fs::read(path).expect("read capture");
    let mut p = StreamParser::new();
    let mut n = 0usize;
    let mut end = None;
    for c in data.chunks(65536) {
        p.push(c);
        while let Some(ev) = p.next().expect("capture parses") {
            match ev {
                Event::Page { .. } => n += 1,
                Event::InitialEnd { devices } => end = Some(devices.len()),
                _ => {}
            }
        }
    }
    eprintln!(
        "{n} pages, device part {end:?} bytes, blocks {:?}",
        p.blocks()
    );
    assert!(end.is_some());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn any_pages_round_trip(
        pages in proptest::collection::vec((0usize..2, 0u64..4, any::<u8>(), any::<bool>()), 0..20),
        chunk in 1usize..5000,
    ) {
        let b = blocks();
        let pages: Pages = pages
            .into_iter()
            .map(|(blk, o, v, z)| (blk, o * 4096, if z { vec![0; 4096] } else { page(v) }))
            .collect();
        let devs: &[(&str, &[u8])] = &[("a", &[1]), ("b", &[])];
        let s = writer::primary_initial(
            &b,
            pages.iter().map(|(b, o, d)| (*b, *o, &d[..])),
            std::iter::empty(),
            devs,
        );
        let seen = parse_chunks(&s, chunk).expect("parses");
        prop_assert_eq!(seen.pages, pages);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..300) {
        let _ = parse_chunks(&data, chunk);
        // And after a valid header + configuration.
        let mut s = super::wire::HEADER.to_vec();
        s.extend_from_slice(&writer::configuration("pc"));
        s.extend_from_slice(&data);
        let _ = parse_chunks(&s, chunk);
    }

    #[test]
    fn mutated_streams_never_panic(idx in any::<prop::sample::Index>(), byte in any::<u8>(), chunk in 1usize..3000) {
        let (initial, _, colo, _) = sample();
        let mut s = initial;
        s.extend_from_slice(&colo);
        let i = idx.index(s.len());
        s[i] = byte;
        let _ = parse_chunks(&s, chunk);
    }

    #[test]
    fn envelope_round_trips(cfg in proptest::collection::vec(any::<u8>(), 0..50),
                            dev in proptest::collection::vec(any::<u8>(), 0..50),
                            sid in any::<u32>(), footers in any::<bool>()) {
        let st = super::ColoState { configuration: cfg, ram_section_id: sid, footers, blocks: blocks(), devices: dev };
        let mut out = Vec::new();
        st.encode(&mut out);
        prop_assert_eq!(super::ColoState::decode(&out).expect("decodes"), st);
        for cut in 0..out.len() {
            prop_assert!(super::ColoState::decode(&out[..cut]).is_err());
        }
    }
}
