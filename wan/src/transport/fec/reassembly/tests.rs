use proptest::prelude::*;

use super::*;
use crate::transport::fec::encoder::{Encoder, FecParams};

/// One thing the receiver gets: a stream chunk or a datagram.
#[derive(Debug, Clone)]
enum Item {
    Chunk(u64, Bytes),
    Datagram(Bytes),
}

fn limits() -> Limits {
    Limits::for_stream_window(32 << 20)
}

fn feed(r: &mut Reassembly, items: &[Item], out: &mut Vec<u8>) -> Result<(), FecError> {
    for it in items {
        match it {
            Item::Chunk(o, b) => r.on_stream_chunk(*o, b.clone())?,
            Item::Datagram(d) => r.on_datagram(d.clone())?,
        }
        while let Some(b) = r.poll_output() {
            out.extend_from_slice(&b);
        }
    }
    Ok(())
}

/// Sends `data` in `bursts` (lengths), flushing after each; the stream is
/// cut into `chunk` sized pieces independently of the bursts. Returns the
/// stream chunks and the datagrams.
fn send(
    data: &[u8],
    bursts: &[usize],
    chunk: usize,
    max_datagram: usize,
    params: FecParams,
) -> (Vec<Item>, Vec<Item>) {
    let mut e = Encoder::new(params);
    let mut dgrams = Vec::new();
    let mut at = 0;
    for &n in bursts {
        let n = n.min(data.len() - at);
        e.record(&data[at..at + n], Some(max_datagram), &mut dgrams);
        e.flush(Some(max_datagram), &mut dgrams);
        at += n;
    }
    e.record(&data[at..], Some(max_datagram), &mut dgrams);
    e.flush(Some(max_datagram), &mut dgrams);
    let chunks = data
        .chunks(chunk.max(1))
        .enumerate()
        .map(|(i, c)| Item::Chunk((i * chunk.max(1)) as u64, Bytes::copy_from_slice(c)))
        .collect();
    (chunks, dgrams.into_iter().map(Item::Datagram).collect())
}

fn payload(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Whether the receiver can rebuild everything from `chunks` and `dgrams`
/// without retransmission: in every window, complete data shards plus
/// recovery shards number at least the data shards.
fn recoverable(len: usize, chunks: &[Item], dgrams: &[Item]) -> bool {
    let mut have = vec![false; len];
    let mut mark = |o: u64, n: usize| {
        for h in &mut have[o as usize..o as usize + n] {
            *h = true;
        }
    };
    for c in chunks {
        if let Item::Chunk(o, b) = c {
            mark(*o, b.len());
        }
    }
    let mut windows: BTreeMap<u64, (WindowShape, usize)> = BTreeMap::new();
    for d in dgrams {
        let Item::Datagram(d) = d else { continue };
        match Datagram::decode(d.clone()).expect("valid") {
            Datagram::Mirror { offset, bytes } => mark(offset, bytes.len()),
            Datagram::Repair { shape, .. } => {
                windows.entry(shape.start).or_insert((shape, 0)).1 += 1
            }
            Datagram::Hello => {}
        }
    }
    let mut rebuilt = have.clone();
    for (shape, repairs) in windows.values() {
        let complete = (0..usize::from(shape.shard_count))
            .filter(|&i| {
                let (s, e) = shape.shard_range(i);
                have[s as usize..e as usize].iter().all(|h| *h)
            })
            .count();
        if complete + repairs >= usize::from(shape.shard_count) {
            for h in &mut rebuilt[shape.start as usize..shape.end() as usize] {
                *h = true;
            }
        }
    }
    rebuilt.iter().all(|h| *h)
}

#[test]
fn a_lost_tail_packet_is_rebuilt_without_retransmission() {
    let data = payload(100_000, 1);
    let (mut chunks, dgrams) = send(&data, &[], 1400, 1200, FecParams::default());
    let lost = chunks.pop().expect("chunks");
    let mut r = Reassembly::new(limits());
    let mut out = Vec::new();
    feed(&mut r, &chunks, &mut out).expect("feed");
    assert!(
        out.len() < data.len(),
        "the tail is missing before the repairs"
    );
    feed(&mut r, &dgrams, &mut out).expect("feed");
    assert_eq!(out, data);
    assert!(r.stats().recovered_shards >= 1);
    // quinn's retransmission afterwards is a duplicate.
    feed(&mut r, &[lost], &mut out).expect("feed");
    assert_eq!(out, data);
    assert!(r.stats().duplicate_bytes > 0);
    assert_eq!(r.pending_windows(), 0);
}

#[test]
fn a_lost_commit_message_arrives_by_its_mirror() {
    let data = b"COMMIT epoch 41".to_vec();
    let (chunks, dgrams) = send(&data, &[], 1400, 1200, FecParams::default());
    assert_eq!((chunks.len(), dgrams.len()), (1, 1));
    let mut r = Reassembly::new(limits());
    let mut out = Vec::new();
    feed(&mut r, &dgrams, &mut out).expect("feed");
    assert_eq!(out, data);
    assert_eq!(r.stats().mirrored_bytes, data.len() as u64);
}

#[test]
fn bytes_far_beyond_the_delivered_prefix_are_refused() {
    let mut r = Reassembly::new(limits());
    let max = limits().max_ahead;
    assert!(r.on_stream_chunk(max - 1, Bytes::from_static(b"x")).is_ok());
    assert!(matches!(
        r.on_stream_chunk(max, Bytes::from_static(b"x")),
        Err(FecError::TooFarAhead { .. })
    ));
    let m = Datagram::Mirror {
        offset: max * 2,
        bytes: Bytes::from_static(b"x"),
    };
    assert!(matches!(
        r.on_datagram(m.encode()),
        Err(FecError::TooFarAhead { .. })
    ));
}

fn repair(start: u64, len: u32, index: u16) -> Bytes {
    Datagram::Repair {
        shape: WindowShape {
            start,
            len,
            shard_size: 1000,
            shard_count: len.div_ceil(1000) as u16,
            recovery_count: 4,
        },
        index,
        shard: Bytes::from(vec![0u8; 1000]),
    }
    .encode()
}

#[test]
fn conflicting_windows_are_refused() {
    let mut r = Reassembly::new(limits());
    r.on_datagram(repair(0, 5000, 0)).expect("first");
    r.on_datagram(repair(0, 5000, 1)).expect("same window");
    assert!(matches!(
        r.on_datagram(repair(0, 6000, 2)),
        Err(FecError::ConflictingWindow { start: 0 })
    ));
    assert!(matches!(
        r.on_datagram(repair(4000, 3000, 0)),
        Err(FecError::ConflictingWindow { start: 4000 })
    ));
    assert!(matches!(
        r.on_datagram(Bytes::from_static(b"?")),
        Err(FecError::UnknownKind(b'?'))
    ));
}

#[test]
fn pending_windows_and_repair_bytes_are_bounded() {
    let mut r = Reassembly::new(Limits {
        max_windows: 3,
        max_repair_bytes: 10_000,
        ..limits()
    });
    for w in 0..10u64 {
        for i in 0..4 {
            r.on_datagram(repair(w * 5000, 5000, i))
                .expect("accepted or dropped");
        }
    }
    assert_eq!(r.pending_windows(), 3);
    assert!(r.repair_bytes <= 10_000);
    assert!(r.stats().dropped_repairs > 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    /// Random stream, bursts, chunking, losses of chunks and datagrams, any
    /// order: the output is always a prefix of the input; it is the whole
    /// input whenever the survivors suffice; and after quinn's
    /// retransmissions it is exactly the input.
    #[test]
    fn the_stream_comes_out_exactly(
        len in 0usize..120_000,
        seed in any::<u64>(),
        bursts in proptest::collection::vec(1usize..40_000, 0..6),
        chunk in 1usize..3000,
        max_datagram in 200usize..1500,
        window_cap in 2_000usize..60_000,
        loss in 0.0f64..0.15,
        initial_loss in 0.0f64..0.03,
        order_seed in any::<u64>(),
    ) {
        let data = payload(len, seed);
        let params = FecParams { window_cap, initial_loss, ..FecParams::default() };
        let (chunks, dgrams) = send(&data, &bursts, chunk, max_datagram, params);
        let mut rng = order_seed | 1;
        let mut coin = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut kept_chunks = Vec::new();
        let mut lost_chunks = Vec::new();
        for c in chunks {
            if coin() < loss { lost_chunks.push(c) } else { kept_chunks.push(c) }
        }
        let kept_dgrams: Vec<Item> = dgrams.into_iter().filter(|_| coin() >= loss).collect();
        let expect_all = recoverable(len, &kept_chunks, &kept_dgrams);
        let mut items: Vec<Item> = kept_chunks.iter().chain(&kept_dgrams).cloned().collect();
        // Fisher-Yates with the same generator: any reordering.
        for i in (1..items.len()).rev() {
            let j = (coin() * (i + 1) as f64) as usize;
            items.swap(i, j.min(i));
        }
        let mut r = Reassembly::new(limits());
        let mut out = Vec::new();
        feed(&mut r, &items, &mut out).expect("an honest sender is never refused");
        prop_assert_eq!(&out[..], &data[..out.len()]);
        if expect_all {
            prop_assert_eq!(out.len(), data.len());
        }
        feed(&mut r, &lost_chunks, &mut out).expect("retransmissions");
        prop_assert_eq!(&out, &data);
        prop_assert_eq!(r.pending_windows(), 0);
        prop_assert!(r.buffered() <= limits().retain + 60_000);
    }
}
