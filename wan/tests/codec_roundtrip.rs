//! decode(encode(x)) reproduces the exact memory image, over random page
//! sets and random histories: pipelined epochs, lost epochs, invalidation,
//! resets, small caches.

use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;
use wan::codec::synthetic::{fill_struct, fill_text, Rng};
use wan::codec::{
    CodecError, Decoder, DecoderConfig, Encoder, EncoderConfig, PageSource, VecMemory,
};

#[derive(Debug, Clone)]
enum Mutation {
    /// A few bytes changed.
    Poke {
        at: u16,
        val: u8,
        count: u8,
    },
    Zero,
    /// Content of another frame (a duplicate).
    CopyFrom(u16),
    Random(u64),
    Text(u64),
    Struct(u64),
    /// Dirty but rewritten with the same content.
    Touch,
    /// Content moved within the page: `by` bytes inserted at `at`, the
    /// rest shifted (zstd with the old content as prefix catches it).
    Shift {
        at: u16,
        by: u8,
    },
    /// Another frame's content from byte `at` on, the next frame's after
    /// it: content found elsewhere at another alignment (chunks naming
    /// prefix frames, wire version 3).
    Splice {
        src: u16,
        at: u16,
    },
}

#[derive(Debug, Clone)]
enum Op {
    /// Guest runs an epoch; the encoder sends it.
    Send(Vec<(u16, Mutation)>),
    /// The oldest epoch in flight arrives and is applied (and maybe acked).
    Deliver { ack: bool },
    /// The oldest epoch in flight is lost; later ones are then rejected.
    Lose,
    /// The sender forgets everything and resyncs the whole image.
    Reset,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<u16>(), any::<u8>(), 1u8..6).prop_map(|(at, val, count)| Mutation::Poke { at, val, count }),
        1 => Just(Mutation::Zero),
        1 => any::<u16>().prop_map(Mutation::CopyFrom),
        1 => any::<u64>().prop_map(Mutation::Random),
        1 => any::<u64>().prop_map(Mutation::Text),
        1 => any::<u64>().prop_map(Mutation::Struct),
        1 => Just(Mutation::Touch),
        2 => (any::<u16>(), 1u8..40).prop_map(|(at, by)| Mutation::Shift { at, by }),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(src, at)| Mutation::Splice { src, at }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec((any::<u16>(), mutation()), 0..12).prop_map(Op::Send),
        4 => any::<bool>().prop_map(|ack| Op::Deliver { ack }),
        1 => Just(Op::Lose),
        1 => Just(Op::Reset),
    ]
}

struct InFlight {
    epoch: u64,
    bytes: Vec<u8>,
    dirty: BTreeSet<u64>,
    /// The source image when the epoch was taken.
    image: Vec<u8>,
}

fn mutate(mem: &mut [u8], ps: usize, frames: u64, frame: u64, m: &Mutation) {
    let src_copy = |mem: &[u8], f: u64| mem[f as usize * ps..(f as usize + 1) * ps].to_vec();
    let page_of = |mem: &mut [u8], f: u64| -> std::ops::Range<usize> {
        let _ = mem;
        f as usize * ps..(f as usize + 1) * ps
    };
    let r = page_of(mem, frame);
    match m {
        Mutation::Poke { at, val, count } => {
            for i in 0..*count as usize {
                let at = (*at as usize + i * 37) % ps;
                mem[r.start + at] = mem[r.start + at].wrapping_add(*val | 1);
            }
        }
        Mutation::Zero => mem[r].fill(0),
        Mutation::CopyFrom(src) => {
            let c = src_copy(mem, u64::from(*src) % frames);
            mem[r].copy_from_slice(&c);
        }
        Mutation::Random(seed) => Rng::new(*seed).fill(&mut mem[r]),
        Mutation::Text(seed) => fill_text(&mut Rng::new(*seed), &mut mem[r]),
        Mutation::Struct(seed) => fill_struct(&mut Rng::new(*seed), &mut mem[r]),
        Mutation::Touch => {}
        Mutation::Splice { src, at } => {
            let a = u64::from(*src) % frames;
            let b = (a + 1) % frames;
            let at = 1 + *at as usize % (ps - 1);
            let mut c = src_copy(mem, a)[at..].to_vec();
            c.extend_from_slice(&src_copy(mem, b)[..at]);
            mem[r].copy_from_slice(&c);
        }
        Mutation::Shift { at, by } => {
            let at = *at as usize % ps;
            let by = (*by as usize).min(ps - at);
            mem.copy_within(r.start + at..r.end - by, r.start + at + by);
            for (i, b) in mem[r.start + at..r.start + at + by].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31) ^ 0x5a;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_history(
    frames: u64,
    ps: usize,
    cache_pages: usize,
    chunk_bytes: usize,
    level: i32,
    per_page_zstd: bool,
    chunk_refs: usize,
    seed: u64,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let mut source = vec![0u8; frames as usize * ps];
    let mut rng = Rng::new(seed);
    for (i, page) in source.chunks_exact_mut(ps).enumerate() {
        match i % 4 {
            0 => {}
            1 => fill_text(&mut rng, page),
            2 => fill_struct(&mut rng, page),
            _ => rng.fill(page),
        }
    }
    let mut enc = Encoder::new(EncoderConfig {
        vm_id: 3,
        page_size: ps,
        cache_budget_bytes: cache_pages * ps,
        zstd_level: level,
        chunk_bytes,
        per_page_zstd,
        chunk_refs,
        ..EncoderConfig::default()
    })
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut dec = Decoder::new(DecoderConfig {
        vm_id: Some(3),
        ..DecoderConfig::default()
    })
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    // The replica starts empty: the first epoch carries the whole image.
    let mut replica = VecMemory::new(frames, ps);
    let mut pending: BTreeSet<u64> = (0..frames).collect();
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut next_epoch = 1u64;

    for op in ops {
        match op {
            Op::Send(muts) => {
                let mut order: Vec<u64> = Vec::new();
                for (f, m) in &muts {
                    let f = u64::from(*f) % frames;
                    mutate(&mut source, ps, frames, f, m);
                    if !order.contains(&f) {
                        order.push(f);
                    }
                }
                // Dirty frames in the guest's order, then those owed by lost epochs.
                let mut dirty: BTreeSet<u64> = order.iter().copied().collect();
                for &f in &pending {
                    if dirty.insert(f) {
                        order.push(f);
                    }
                }
                pending.clear();
                let pages: Vec<(u64, &[u8])> = order
                    .iter()
                    .map(|&f| (f, &source[f as usize * ps..(f as usize + 1) * ps]))
                    .collect();
                let bytes = enc
                    .encode(
                        next_epoch,
                        &pages,
                        &next_epoch.to_le_bytes(),
                        &[(next_epoch * 512, b"disk")],
                    )
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                in_flight.push_back(InFlight {
                    epoch: next_epoch,
                    bytes,
                    dirty,
                    image: source.clone(),
                });
                next_epoch += 1;
            }
            Op::Deliver { ack } => {
                let Some(e) = in_flight.pop_front() else {
                    continue;
                };
                let staged = dec
                    .decode(&e.bytes, &replica)
                    .map_err(|err| TestCaseError::fail(format!("epoch {}: {err}", e.epoch)))?;
                let applied = staged
                    .apply(&mut replica)
                    .map_err(|err| TestCaseError::fail(err.to_string()))?;
                prop_assert_eq!(applied.epoch, e.epoch);
                prop_assert_eq!(&applied.state_blob[..], &e.epoch.to_le_bytes()[..]);
                prop_assert_eq!(applied.disk_writes.len(), 1);
                prop_assert!(
                    replica.as_bytes() == &e.image[..],
                    "replica differs after epoch {}",
                    e.epoch
                );
                if ack {
                    enc.acknowledge(e.epoch);
                }
            }
            Op::Lose => {
                let Some(lost) = in_flight.pop_front() else {
                    continue;
                };
                pending.extend(&lost.dirty);
                // Everything sent after it is built on it: the replica refuses.
                for later in in_flight.drain(..) {
                    let before = replica.clone();
                    let err = dec.decode(&later.bytes, &replica).err();
                    let is_base_mismatch = matches!(err, Some(CodecError::BaseMismatch { .. }));
                    prop_assert!(is_base_mismatch, "got {:?}", err);
                    prop_assert!(replica == before);
                    pending.extend(&later.dirty);
                }
                enc.invalidate_from(lost.epoch)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // The next epoch builds on what the replica holds (or, after a
                // reset, on nothing).
                let base = enc.base_epoch();
                prop_assert!(base.is_none() || base == replica.committed_epoch());
            }
            Op::Reset => {
                in_flight.clear();
                enc.reset();
                pending = (0..frames).collect();
            }
        }
    }
    // Drain: everything still in flight arrives.
    while let Some(e) = in_flight.pop_front() {
        let staged = dec
            .decode(&e.bytes, &replica)
            .map_err(|err| TestCaseError::fail(format!("epoch {}: {err}", e.epoch)))?;
        staged
            .apply(&mut replica)
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert!(replica.as_bytes() == &e.image[..]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_histories_reproduce_the_image(
        frames in 4u64..40,
        ps in prop_oneof![Just(512usize), Just(4096)],
        cache_pages in prop_oneof![Just(0usize), Just(1), Just(3), Just(16), Just(64)],
        chunk_bytes in prop_oneof![Just(300usize), Just(256 << 10)],
        level in 1i32..4,
        per_page_zstd in any::<bool>(),
        chunk_refs in prop_oneof![Just(0usize), Just(1), Just(64)],
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_history(frames, ps, cache_pages, chunk_bytes, level, per_page_zstd, chunk_refs, seed, ops)?;
    }
}

/// Without chunk prefixes, a page whose content moved goes as zstd with
/// its old content as prefix, in an epoch marked wire version 2; epochs
/// without such a record stay version 1; a version-1 epoch carrying the
/// record is refused.
#[test]
fn moved_content_goes_as_prefix_zstd_in_version_2() {
    let ps = 4096;
    let mut old = vec![0u8; ps];
    fill_text(&mut Rng::new(3), &mut old);
    let mut moved = old.clone();
    moved.copy_within(100..ps - 24, 124);
    moved[100..124].copy_from_slice(b"twenty-four new bytes!!!");
    let mut enc = Encoder::new(EncoderConfig {
        chunk_refs: 0,
        ..EncoderConfig::default()
    })
    .expect("encoder");
    let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
    let mut replica = VecMemory::new(4, ps);
    let version = |b: &[u8]| u16::from_le_bytes([b[4], b[5]]);
    let first = enc.encode(1, &[(2, &old[..])], b"", &[]).expect("encode");
    assert_eq!(version(&first), 1);
    dec.decode(&first, &replica)
        .expect("decode")
        .apply(&mut replica)
        .expect("apply");
    let st_before = enc.stats();
    let second = enc.encode(2, &[(2, &moved[..])], b"", &[]).expect("encode");
    assert_eq!(enc.stats().prefix_zstd, st_before.prefix_zstd + 1);
    assert_eq!(version(&second), 2);
    assert!(second.len() < 300, "{} bytes", second.len());
    // The same epoch claiming version 1 (resealed): refused, not misread.
    let mut as_v1 = second.clone();
    as_v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    wan::codec::reseal(&mut as_v1);
    assert!(dec.decode(&as_v1, &replica).is_err());
    dec.decode(&second, &replica)
        .expect("decode")
        .apply(&mut replica)
        .expect("apply");
    assert_eq!(replica.page(2), &moved[..]);
    // Without the option: version 1, same image.
    let mut enc = Encoder::new(EncoderConfig {
        prefix_zstd: false,
        chunk_refs: 0,
        ..EncoderConfig::default()
    })
    .expect("encoder");
    enc.encode(1, &[(2, &old[..])], b"", &[]).expect("encode");
    let plain = enc.encode(2, &[(2, &moved[..])], b"", &[]).expect("encode");
    assert_eq!(version(&plain), 1);
    assert!(plain.len() > second.len());
}

/// Pages partly rewritten (the XOR delta has runs but is long) go raw in
/// a chunk whose zstd prefix is their own last-sent content, in version 3,
/// smaller than the delta; the replica ends with the image. Also when
/// that content begins with zstd's dictionary magic: it is raw content,
/// never parsed as a dictionary.
#[test]
fn partly_rewritten_pages_go_with_their_old_content_as_chunk_prefix() {
    let ps = 4096;
    let frames = 16u64;
    let version = |b: &[u8]| u16::from_le_bytes([b[4], b[5]]);
    for magic in [false, true] {
        let mut mem = vec![0u8; frames as usize * ps];
        let mut rng = Rng::new(9);
        for p in mem.chunks_exact_mut(ps) {
            fill_text(&mut rng, p);
            if magic {
                p[..4].copy_from_slice(&0xEC30_A437u32.to_le_bytes());
            }
        }
        let mut sizes = Vec::new();
        // Without chunk prefixes nor prefix frames: version 1.
        for chunk_refs in [64, 0] {
            let mut enc = Encoder::new(EncoderConfig {
                chunk_refs,
                prefix_zstd: chunk_refs > 0,
                ..EncoderConfig::default()
            })
            .expect("encoder");
            let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
            let mut replica = VecMemory::new(frames, ps);
            let mut image = mem.clone();
            let mut total = 0;
            for epoch in 1..=3u64 {
                if epoch > 1 {
                    // Every other 16-byte field rewritten: a delta of
                    // about half the page, with runs.
                    for (f, p) in image.chunks_exact_mut(ps).enumerate() {
                        for field in p.chunks_exact_mut(32).skip(1) {
                            field[..16].fill(b'a' + ((f as u64 + epoch) % 26) as u8);
                        }
                    }
                }
                let pages: Vec<(u64, &[u8])> = image
                    .chunks_exact(ps)
                    .enumerate()
                    .map(|(f, p)| (f as u64, p))
                    .collect();
                let before = enc.stats().own_prefix;
                let wire = enc.encode(epoch, &pages, b"", &[]).expect("encode");
                if epoch > 1 {
                    total += wire.len();
                    let own = enc.stats().own_prefix - before;
                    if chunk_refs > 0 {
                        assert_eq!(own, frames, "epoch {epoch}");
                        assert_eq!(version(&wire), 3);
                    } else {
                        assert_eq!(own, 0);
                        assert_eq!(version(&wire), 1);
                    }
                }
                dec.decode(&wire, &replica)
                    .expect("decode")
                    .apply(&mut replica)
                    .expect("apply");
                assert!(replica.as_bytes() == &image[..], "epoch {epoch}");
            }
            sizes.push(total);
        }
        assert!(sizes[0] < sizes[1], "{sizes:?} (magic {magic})");
    }
}

/// Pages made of other frames' content at another alignment go in chunks
/// that name those frames as zstd prefix, in an epoch marked wire
/// version 3, far smaller than without; the replica ends with the image.
#[test]
fn content_found_elsewhere_goes_with_prefix_frames_in_version_3() {
    let ps = 4096;
    let frames = 64u64;
    let mut mem = vec![0u8; frames as usize * ps];
    let mut rng = Rng::new(5);
    for p in mem.chunks_exact_mut(ps) {
        rng.fill(p);
    }
    let version = |b: &[u8]| u16::from_le_bytes([b[4], b[5]]);
    let mut sizes = Vec::new();
    for chunk_refs in [64, 0] {
        let mut enc = Encoder::new(EncoderConfig {
            chunk_refs,
            ..EncoderConfig::default()
        })
        .expect("encoder");
        let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
        let mut replica = VecMemory::new(frames, ps);
        let all: Vec<(u64, &[u8])> = mem
            .chunks_exact(ps)
            .enumerate()
            .map(|(f, p)| (f as u64, p))
            .collect();
        let first = enc.encode(1, &all, b"", &[]).expect("encode");
        assert_eq!(version(&first), 1, "no base: no prefix frames");
        dec.decode(&first, &replica)
            .expect("decode")
            .apply(&mut replica)
            .expect("apply");
        // Frames 48..64 become frames 0..16 shifted by 1000 bytes.
        let mut next = mem.clone();
        for f in 48..64u64 {
            let m = Mutation::Splice {
                src: (f - 48) as u16,
                at: 1000,
            };
            mutate(&mut next, ps, frames, f, &m);
        }
        let dirty: Vec<(u64, &[u8])> = (48..64u64)
            .map(|f| (f, &next[f as usize * ps..][..ps]))
            .collect();
        let second = enc.encode(2, &dirty, b"", &[]).expect("encode");
        assert_eq!(version(&second), if chunk_refs > 0 { 3 } else { 1 });
        dec.decode(&second, &replica)
            .expect("decode")
            .apply(&mut replica)
            .expect("apply");
        assert!(replica.as_bytes() == &next[..]);
        sizes.push(second.len());
    }
    // Random pages: nothing compresses them but the prefix.
    assert!(sizes[0] * 10 < sizes[1], "{sizes:?}");
}

/// Long synthetic traces through the same path, one per dirtying pattern.
#[test]
fn synthetic_traces_round_trip() {
    use wan::codec::synthetic::{Trace, TraceConfig, TraceKind};
    for kind in TraceKind::ALL {
        let cfg = TraceConfig {
            frames: 512,
            dirty_pages: 64,
            ..TraceConfig::default()
        };
        let mut trace = Trace::new(kind, cfg);
        let mut enc = Encoder::new(EncoderConfig {
            cache_budget_bytes: 128 * 4096,
            ..EncoderConfig::default()
        })
        .expect("encoder");
        let mut dec = Decoder::new(DecoderConfig::default()).expect("decoder");
        let mut replica = VecMemory::new(cfg.frames, cfg.page_size);
        let all = trace.all_frames();
        let mut frames = all;
        for epoch in 1..=12 {
            let bytes = enc
                .encode(epoch, &trace.pages(&frames), b"", &[])
                .expect("encode");
            dec.decode(&bytes, &replica)
                .expect("decode")
                .apply(&mut replica)
                .expect("apply");
            assert!(
                replica.as_bytes() == trace.memory(),
                "{kind:?} epoch {epoch}"
            );
            enc.acknowledge(epoch);
            frames = trace.step();
        }
    }
}
