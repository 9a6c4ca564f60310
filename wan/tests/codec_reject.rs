//! Every kind of bad input is rejected with its own error variant, and the
//! replica is left exactly as it was.

use wan::codec::{
    reseal, CodecError, Decoder, DecoderConfig, Encoder, EncoderConfig, PageSource, VecMemory,
    HEADER_LEN, NO_BASE,
};

const PS: usize = 4096;
const FRAMES: u64 = 32;

fn encoder() -> Encoder {
    Encoder::new(EncoderConfig {
        vm_id: 9,
        cache_budget_bytes: 64 * PS,
        ..EncoderConfig::default()
    })
    .expect("encoder")
}

fn decoder() -> Decoder {
    Decoder::new(DecoderConfig {
        vm_id: Some(9),
        ..DecoderConfig::default()
    })
    .expect("decoder")
}

fn page(seed: u8) -> Vec<u8> {
    (0..PS)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

/// A replica that has committed epoch 1 (the full image `pages`), and the
/// encoder that sent it.
fn committed_pair() -> (Encoder, VecMemory, Vec<Vec<u8>>) {
    let mut enc = encoder();
    let pages: Vec<Vec<u8>> = (0..FRAMES).map(|f| page(f as u8 + 1)).collect();
    let replica = commit_image(&mut enc, &pages, b"state");
    enc.acknowledge(1);
    (enc, replica, pages)
}

/// Epoch 1 of `enc`: every frame's page in `pages`, decoded and applied to
/// a fresh replica.
fn commit_image(enc: &mut Encoder, pages: &[Vec<u8>], state: &[u8]) -> VecMemory {
    let all: Vec<(u64, &[u8])> = pages
        .iter()
        .enumerate()
        .map(|(f, p)| (f as u64, &p[..]))
        .collect();
    let e1 = enc.encode(1, &all, state, &[]).expect("encode");
    let mut replica = VecMemory::new(FRAMES, PS);
    decoder()
        .decode(&e1, &replica)
        .expect("decode")
        .apply(&mut replica)
        .expect("apply");
    replica
}

/// Epoch 2 over the committed pair: a delta, a reference, a zero page.
fn epoch2(enc: &mut Encoder, pages: &[Vec<u8>]) -> Vec<u8> {
    let mut p3 = pages[3].clone();
    p3[10] ^= 1;
    let p4 = pages[7].clone();
    let zero = vec![0u8; PS];
    enc.encode(
        2,
        &[(3, &p3[..]), (4, &p4[..]), (5, &zero[..])],
        b"s2",
        &[(0, b"d")],
    )
    .expect("encode")
}

fn assert_rejected(bytes: &[u8], replica: &VecMemory, check: impl Fn(&CodecError) -> bool) {
    let before = replica.clone();
    let err = decoder()
        .decode(bytes, replica)
        .expect_err("must be rejected");
    assert!(check(&err), "unexpected error {err:?}");
    assert_eq!(*replica, before);
}

#[test]
fn valid_epoch_applies() {
    let (mut enc, mut replica, pages) = committed_pair();
    let e2 = epoch2(&mut enc, &pages);
    let applied = decoder()
        .decode(&e2, &replica)
        .expect("decode")
        .apply(&mut replica)
        .expect("apply");
    assert_eq!(applied.state_blob, b"s2");
    assert_eq!(replica.page(4), &pages[7][..]);
    assert_eq!(replica.page(5), &[0u8; PS][..]);
    assert_eq!(replica.committed_epoch(), Some(2));
    let st = enc.stats();
    assert_eq!((st.delta_rle, st.duplicate, st.zero), (1, 1, 1));
}

#[test]
fn every_truncation_is_truncated() {
    let (mut enc, replica, pages) = committed_pair();
    let e2 = epoch2(&mut enc, &pages);
    for cut in 0..e2.len() {
        assert_rejected(&e2[..cut], &replica, |e| {
            matches!(e, CodecError::Truncated { .. })
        });
    }
}

#[test]
fn trailing_bytes_rejected() {
    let (mut enc, replica, pages) = committed_pair();
    let mut e2 = epoch2(&mut enc, &pages);
    e2.push(0);
    assert_rejected(&e2, &replica, |e| {
        *e == CodecError::TrailingBytes { extra: 1 }
    });
}

#[test]
fn bad_magic_and_unknown_version() {
    let (mut enc, replica, pages) = committed_pair();
    let e2 = epoch2(&mut enc, &pages);
    let mut m = e2.clone();
    m[0] = b'X';
    assert_rejected(&m, &replica, |e| matches!(e, CodecError::BadMagic { .. }));
    // Versions 1 to 3 are read; 0 and 4 are not.
    for version in [0u8, 4] {
        let mut v = e2.clone();
        v[4] = version;
        assert_rejected(&v, &replica, |e| {
            *e == CodecError::UnsupportedVersion {
                found: version.into(),
                supported: 3,
            }
        });
    }
}

#[test]
fn any_flipped_bit_is_a_checksum_mismatch() {
    let (mut enc, replica, pages) = committed_pair();
    let e2 = epoch2(&mut enc, &pages);
    // Past magic, version and header length, whose own checks come first,
    // and sparing body_len (a length change reads as truncation).
    for at in (8..e2.len()).filter(|a| !(56..64).contains(a)) {
        for bit in [0, 3, 7] {
            let mut c = e2.clone();
            c[at] ^= 1 << bit;
            assert_rejected(&c, &replica, |e| {
                matches!(e, CodecError::ChecksumMismatch { .. })
            });
        }
    }
}

#[test]
fn oversized_length_rejected() {
    let (mut enc, replica, pages) = committed_pair();
    let mut e2 = epoch2(&mut enc, &pages);
    e2[56..64].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
    assert_rejected(&e2, &replica, |e| {
        matches!(e, CodecError::Oversized { what: "epoch", .. })
    });
    let mut small = Decoder::new(DecoderConfig {
        max_state_bytes: 1,
        ..DecoderConfig::default()
    })
    .expect("decoder");
    let e3 = enc.encode(3, &[], b"a state blob", &[]).expect("encode");
    let mut replica2 = replica.clone().with_committed_epoch(Some(2));
    let err = small.decode(&e3, &replica2).expect_err("state too big");
    assert!(
        matches!(
            err,
            CodecError::Oversized {
                what: "state blob",
                ..
            }
        ),
        "{err:?}"
    );
    let _ = &mut replica2;
}

#[test]
fn frame_out_of_range_rejected() {
    let mut enc = encoder();
    let p = page(1);
    let e1 = enc
        .encode(1, &[(FRAMES + 5, &p[..])], b"", &[])
        .expect("encode");
    let replica = VecMemory::new(FRAMES, PS);
    assert_rejected(&e1, &replica, |e| {
        *e == CodecError::FrameOutOfRange {
            frame: FRAMES + 5,
            frames: FRAMES,
        }
    });
}

#[test]
fn reference_out_of_range_rejected() {
    // The sender knows a frame the (smaller) receiver does not have.
    let mut enc = encoder();
    let p = page(5);
    let e1 = enc
        .encode(1, &[(FRAMES + 1, &p[..])], b"", &[])
        .expect("e1");
    enc.acknowledge(1);
    let e2 = enc.encode(2, &[(3, &p[..])], b"", &[]).expect("e2");
    let replica = VecMemory::new(FRAMES, PS).with_committed_epoch(Some(1));
    let _ = e1;
    assert_rejected(&e2, &replica, |e| {
        *e == CodecError::FrameOutOfRange {
            frame: FRAMES + 1,
            frames: FRAMES,
        }
    });
}

#[test]
fn references_without_base_rejected() {
    let (mut enc, replica, pages) = committed_pair();
    let mut e2 = epoch2(&mut enc, &pages);
    // Claim the epoch needs no base: its delta and reference become unresolvable.
    e2[32..40].copy_from_slice(&NO_BASE.to_le_bytes());
    reseal(&mut e2);
    assert_rejected(&e2, &replica, |e| {
        matches!(e, CodecError::BadReference { .. })
    });
}

#[test]
fn base_mismatch_rejected_at_decode_and_apply() {
    let (mut enc, mut replica, pages) = committed_pair();
    let e2 = epoch2(&mut enc, &pages);
    let e3 = enc.encode(3, &[(1, &pages[2][..])], b"", &[]).expect("e3");
    assert_rejected(&e3, &replica, |e| {
        *e == CodecError::BaseMismatch {
            epoch: 3,
            base: 2,
            committed: Some(1),
        }
    });
    // Verified against one state, applied to another: refused, nothing written.
    let staged = decoder().decode(&e2, &replica).expect("decode");
    let staged_again = decoder().decode(&e2, &replica).expect("decode");
    staged.apply(&mut replica).expect("apply");
    let before = replica.clone();
    let err = staged_again.apply(&mut replica).expect_err("stale");
    assert!(matches!(err, CodecError::BaseMismatch { .. }));
    assert_eq!(replica, before);
}

#[test]
fn wrong_vm_and_page_size_rejected() {
    let (mut enc, replica, pages) = committed_pair();
    let e2 = epoch2(&mut enc, &pages);
    let mut other = Decoder::new(DecoderConfig {
        vm_id: Some(10),
        ..DecoderConfig::default()
    })
    .expect("decoder");
    assert!(matches!(
        other.decode(&e2, &replica),
        Err(CodecError::VmMismatch {
            expected: 10,
            found: 9
        })
    ));
    let small_pages = VecMemory::new(FRAMES * 8, 512).with_committed_epoch(Some(1));
    assert_rejected(&e2, &small_pages, |e| {
        matches!(e, CodecError::PageSizeMismatch { .. })
    });
}

#[test]
fn unknown_flags_and_record_kind_rejected() {
    let (mut enc, replica, pages) = committed_pair();
    let mut f = epoch2(&mut enc, &pages);
    f[8] = 1;
    reseal(&mut f);
    assert_rejected(&f, &replica, |e| {
        *e == CodecError::UnsupportedFlags { flags: 1 }
    });

    // A lone zero page: its chunk is stored, the record kind byte sits right
    // after the chunk's record count and block header.
    let zero = vec![0u8; PS];
    let mut z = enc.encode(3, &[(0, &zero[..])], b"", &[]).expect("e3");
    let kind_at = HEADER_LEN + 4 + 9;
    assert_eq!(z[kind_at], 0);
    z[kind_at] = 0x7f;
    reseal(&mut z);
    let replica2 = replica.clone().with_committed_epoch(Some(2));
    assert_rejected(&z, &replica2, |e| matches!(e, CodecError::Corrupt(_)));
}

#[test]
fn encoder_rejects_bad_input_without_changing_state() {
    let (mut enc, _replica, pages) = committed_pair();
    let short = [0u8; 100];
    assert!(matches!(
        enc.encode(2, &[(0, &short[..])], b"", &[]),
        Err(CodecError::PageSizeMismatch { .. })
    ));
    assert!(matches!(
        enc.encode(2, &[(0, &pages[0][..]), (0, &pages[1][..])], b"", &[]),
        Err(CodecError::DuplicateFrame { frame: 0 })
    ));
    assert!(matches!(
        enc.encode(1, &[], b"", &[]),
        Err(CodecError::EpochNotIncreasing {
            epoch: 1,
            previous: 1
        })
    ));
    assert_eq!(enc.base_epoch(), Some(1));
    assert_eq!(
        enc.invalidate_from(1),
        Err(CodecError::AlreadyAcknowledged {
            epoch: 1,
            acknowledged: 1
        })
    );
}

/// After a lost epoch the frames it carried are sent whole, the epochs
/// built on it are refused, and the next epoch applies cleanly.
#[test]
fn lost_epoch_frames_are_sent_whole() {
    let (mut enc, mut replica, pages) = committed_pair();
    let mut dec = decoder();
    // Epoch 2 (will be lost) and 3 (built on it) touch frames 3 and 4 sparsely.
    let mut p3 = pages[3].clone();
    p3[100] ^= 0xff;
    let e2 = enc.encode(2, &[(3, &p3[..])], b"", &[]).expect("e2");
    let mut p4 = pages[4].clone();
    p4[200] ^= 0xff;
    p3[101] ^= 0xff;
    let e3 = enc
        .encode(3, &[(3, &p3[..]), (4, &p4[..])], b"", &[])
        .expect("e3");
    assert_eq!(enc.stats().delta_rle, 3, "sparse edits travel as deltas");
    drop(e2);
    let before = replica.clone();
    assert!(matches!(
        dec.decode(&e3, &replica),
        Err(CodecError::BaseMismatch { .. })
    ));
    assert_eq!(replica, before);

    enc.invalidate_from(2).expect("invalidate");
    assert_eq!(enc.base_epoch(), Some(1));
    // Frame 3 was only in lost epochs: sent whole. Frame 4's cache entry came
    // from lost epoch 3, so it is sent whole too. Frame 6 still deltas.
    let mut p6 = pages[6].clone();
    p6[7] ^= 1;
    let before_stats = enc.stats();
    let e4 = enc
        .encode(4, &[(3, &p3[..]), (4, &p4[..]), (6, &p6[..])], b"", &[])
        .expect("e4");
    let st = enc.stats();
    assert_eq!(st.delta_rle - before_stats.delta_rle, 1);
    assert_eq!(
        (st.full_zstd + st.full_raw) - (before_stats.full_zstd + before_stats.full_raw),
        2
    );
    dec.decode(&e4, &replica)
        .expect("decode")
        .apply(&mut replica)
        .expect("apply");
    assert_eq!(replica.page(3), &p3[..]);
    assert_eq!(replica.page(4), &p4[..]);
    assert_eq!(replica.page(6), &p6[..]);
}

/// A lost epoch's content must not serve as a duplicate source either.
#[test]
fn lost_content_is_never_referenced() {
    let (mut enc, mut replica, pages) = committed_pair();
    let fresh = page(200);
    let _lost = enc.encode(2, &[(3, &fresh[..])], b"", &[]).expect("e2");
    enc.invalidate_from(2).expect("invalidate");
    let e3 = enc.encode(3, &[(9, &fresh[..])], b"", &[]).expect("e3");
    assert_eq!(enc.stats().duplicate, 0);
    decoder()
        .decode(&e3, &replica)
        .expect("decode")
        .apply(&mut replica)
        .expect("apply");
    assert_eq!(replica.page(9), &fresh[..]);
    assert_eq!(replica.page(3), &pages[3][..]);
}

fn noise(seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..PS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn uleb(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    v
}

fn put_uleb(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Offset of the first chunk's block method (after its record count).
const METHOD_AT: usize = HEADER_LEN + 4;
const STORED_AT: usize = METHOD_AT + 9;

/// A replica that committed epoch 1 (pseudo-random pages) and epoch 2,
/// where frame 20 is frame 5's content 100 bytes off the page boundary:
/// its chunk names frame 5 as zstd prefix (`BLOCK_ZSTD_REFS`, version 3).
fn refs_epoch() -> (VecMemory, Vec<u8>, Vec<u8>) {
    let mut enc = encoder();
    let pages: Vec<Vec<u8>> = (0..FRAMES).map(|f| noise(f as u32 + 1)).collect();
    let replica = commit_image(&mut enc, &pages, b"");
    let mut spliced = pages[5][100..].to_vec();
    spliced.extend_from_slice(&pages[6][..100]);
    let e2 = enc
        .encode(2, &[(20, &spliced[..])], b"", &[])
        .expect("encode");
    assert_eq!(u16::from_le_bytes([e2[4], e2[5]]), 3);
    assert_eq!(e2[METHOD_AT], 2, "a chunk with prefix frames");
    // Far smaller than the page: the prefix holds it.
    assert!(e2.len() < 400, "{} bytes", e2.len());
    (replica, e2, spliced)
}

/// `bytes` with the first chunk's prefix frame list replaced by `refs`
/// (count, frames as written), lengths fixed and resealed.
fn with_refs(bytes: &[u8], refs: &[u8]) -> Vec<u8> {
    let mut at = STORED_AT;
    let count = uleb(bytes, &mut at);
    for _ in 0..count {
        uleb(bytes, &mut at);
    }
    let stored_len = u32::from_le_bytes(bytes[METHOD_AT + 5..STORED_AT].try_into().unwrap());
    let zstd_end = STORED_AT + stored_len as usize;
    let mut out = bytes[..STORED_AT].to_vec();
    out.extend_from_slice(refs);
    out.extend_from_slice(&bytes[at..]);
    let grow = refs.len() as i64 - (at - STORED_AT) as i64;
    let new_stored = (i64::from(stored_len) + grow) as u32;
    out[METHOD_AT + 5..STORED_AT].copy_from_slice(&new_stored.to_le_bytes());
    let body = u64::from_le_bytes(out[56..64].try_into().unwrap());
    out[56..64].copy_from_slice(&((body as i64 + grow) as u64).to_le_bytes());
    assert!(zstd_end <= bytes.len());
    reseal(&mut out);
    out
}

#[test]
fn chunk_prefix_frames_apply_and_malformed_ones_are_rejected() {
    let (replica, e2, spliced) = refs_epoch();
    let mut applied = replica.clone();
    decoder()
        .decode(&e2, &applied)
        .expect("decode")
        .apply(&mut applied)
        .expect("apply");
    assert_eq!(applied.page(20), &spliced[..]);

    // The same bytes claiming version 2: the block method is unknown there.
    let mut v2 = e2.clone();
    v2[4] = 2;
    reseal(&mut v2);
    assert_rejected(&v2, &replica, |e| matches!(e, CodecError::Corrupt(_)));

    // No frames, too many frames.
    let none = with_refs(&e2, &[0]);
    assert_rejected(&none, &replica, |e| matches!(e, CodecError::Corrupt(_)));
    let mut many = Vec::new();
    put_uleb(&mut many, 257);
    many.extend(std::iter::repeat_n(0u8, 257));
    let many = with_refs(&e2, &many);
    assert_rejected(&many, &replica, |e| matches!(e, CodecError::Corrupt(_)));

    // A frame past the replica's end.
    let mut far = vec![1];
    put_uleb(&mut far, 2 * (FRAMES + 5));
    let far = with_refs(&e2, &far);
    assert_rejected(
        &far,
        &replica,
        |e| matches!(e, CodecError::FrameOutOfRange { frame, .. } if *frame == FRAMES + 5),
    );

    // A count of 100 with one frame: the zstd frame's bytes read as frame
    // numbers (out of range), or the list runs past the block.
    let short = with_refs(&e2, &[100, 10]);
    assert_rejected(&short, &replica, |e| {
        matches!(
            e,
            CodecError::Corrupt(_)
                | CodecError::Truncated { .. }
                | CodecError::FrameOutOfRange { .. }
        )
    });

    // Another frame as prefix: zstd fails or the records do not parse;
    // either way the replica is untouched (assert_rejected checks).
    let other = with_refs(&e2, &[1, 2 * 9]);
    let mut dec = decoder();
    let before = replica.clone();
    if let Ok(staged) = dec.decode(&other, &replica) {
        // zstd cannot tell a wrong prefix; the checksum covers the wire
        // only. Nothing may be written before apply.
        assert_eq!(replica, before);
        drop(staged);
    }

    // The zstd frame cut short (the stored length says one byte less).
    let mut cut = e2.clone();
    let stored_len = u32::from_le_bytes(cut[METHOD_AT + 5..STORED_AT].try_into().unwrap());
    cut[METHOD_AT + 5..STORED_AT].copy_from_slice(&(stored_len - 1).to_le_bytes());
    let end = STORED_AT + stored_len as usize;
    cut.remove(end - 1);
    let body = u64::from_le_bytes(cut[56..64].try_into().unwrap());
    cut[56..64].copy_from_slice(&(body - 1).to_le_bytes());
    reseal(&mut cut);
    assert_rejected(&cut, &replica, |e| matches!(e, CodecError::Corrupt(_)));

    // Committed content named by an epoch without base.
    let mut no_base = e2.clone();
    no_base[32..40].copy_from_slice(&NO_BASE.to_le_bytes());
    reseal(&mut no_base);
    assert_rejected(&no_base, &replica, |e| {
        matches!(e, CodecError::BadReference { .. })
    });
}
