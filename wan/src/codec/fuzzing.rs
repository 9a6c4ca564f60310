//! The decoder's fuzzing entry point, shared by the cargo-fuzz target
//! (`wan/fuzz`) and the mutation test in `wan/tests/codec_fuzz.rs`.

use super::decoder::{Decoder, DecoderConfig};
use super::encoder::{Encoder, EncoderConfig};
use super::error::CodecError;
use super::format::TRAILER_LEN;
use super::memory::{PageSink, PageSource, VecMemory};
use xxhash_rust::xxh3::xxh3_128;

/// Epoch the fuzzing replica has committed; seeds are based on it.
pub const FUZZ_BASE_EPOCH: u64 = 7;
const FUZZ_FRAMES: u64 = 16;
const FUZZ_PAGE: usize = 4096;
const FUZZ_VM: u64 = 42;

/// The small replica every fuzz input is decoded against: 16 pages of
/// varied content (zeros, constants, patterns, one pseudo-random page),
/// committed at [`FUZZ_BASE_EPOCH`].
pub fn fuzz_memory() -> VecMemory {
    let mut m = VecMemory::new(FUZZ_FRAMES, FUZZ_PAGE);
    for f in 0..FUZZ_FRAMES {
        let page = m.page_mut(f);
        match f % 4 {
            // One page of pseudo-random bytes: content whose sub-page
            // fingerprints are its own (the patterns below repeat).
            _ if f == FUZZ_FRAMES - 1 => {
                let mut x = 0x2545_f491_u32;
                for b in page.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *b = (x >> 24) as u8;
                }
            }
            0 => {}
            1 => page.fill(f as u8),
            _ => {
                for (i, b) in page.iter_mut().enumerate() {
                    *b = (i as u64 * (f + 1) / 7) as u8;
                }
            }
        }
    }
    m.with_committed_epoch(Some(FUZZ_BASE_EPOCH))
}

fn small_limits(threads: usize) -> DecoderConfig {
    DecoderConfig {
        vm_id: Some(FUZZ_VM),
        max_epoch_bytes: 4 << 20,
        max_state_bytes: 1 << 20,
        max_disk_write_bytes: 1 << 20,
        max_disk_total_bytes: 2 << 20,
        threads,
    }
}

/// Rewrites the trailer of `bytes` so the checksum matches its content.
///
/// For tests and fuzzing: a mutated epoch with a stale checksum never gets
/// past the checksum check, a resealed one exercises the whole parser.
pub fn reseal(bytes: &mut [u8]) {
    if let Some(covered) = bytes.len().checked_sub(TRAILER_LEN) {
        let sum = xxh3_128(&bytes[..covered]);
        bytes[covered..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Decodes `data` against [`fuzz_memory`] and applies it if accepted, then
/// does the same with `data` resealed (see [`reseal`]). Returns the result
/// for `data` as given.
///
/// This is a harness: it panics if the codec breaks its contract, i.e. if a
/// rejected epoch changed the replica, or an accepted one did not commit,
/// or if decoding on one thread and on two (chunks decompressed side by
/// side) gave different results or replicas.
pub fn fuzz_decode(data: &[u8]) -> Result<(), CodecError> {
    let mut sealed = data.to_vec();
    reseal(&mut sealed);
    let _ = same_on_one_and_two_threads(&sealed);
    same_on_one_and_two_threads(data)
}

fn same_on_one_and_two_threads(data: &[u8]) -> Result<(), CodecError> {
    let (one, replica_one) = decode_and_apply(data, 1);
    let (two, replica_two) = decode_and_apply(data, 2);
    assert_eq!(one, two, "one and two decoder threads disagree");
    assert_eq!(
        replica_one, replica_two,
        "one and two decoder threads disagree"
    );
    one
}

fn decode_and_apply(data: &[u8], threads: usize) -> (Result<(), CodecError>, VecMemory) {
    let mut replica = fuzz_memory();
    let before = replica.clone();
    let mut dec = match Decoder::new(small_limits(threads)) {
        Ok(d) => d,
        Err(e) => return (Err(e), replica),
    };
    dec.force_helpers(Some(threads > 1));
    let staged = dec.decode(data, &replica);
    assert_eq!(replica, before, "decode must not change the replica");
    let applied = staged.and_then(|s| s.apply(&mut replica));
    match &applied {
        Ok(a) => assert_eq!(replica.committed_epoch(), Some(a.epoch)),
        Err(_) => assert_eq!(replica, before, "a rejected epoch changed the replica"),
    }
    (applied.map(|_| ()), replica)
}

/// Valid epochs against [`fuzz_memory`] exercising every record kind, for
/// the fuzzer's seed corpus and the mutation test: each pair (full image as
/// epoch [`FUZZ_BASE_EPOCH`], then an epoch of edits on top) once batched and
/// once with per-page zstd.
pub fn fuzz_seed_corpus() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for per_page_zstd in [false, true] {
        seed_pair(per_page_zstd, &mut out);
    }
    out
}

fn seed_pair(per_page_zstd: bool, out: &mut Vec<Vec<u8>>) {
    let Ok(mut enc) = Encoder::new(EncoderConfig {
        vm_id: FUZZ_VM,
        page_size: FUZZ_PAGE,
        cache_budget_bytes: 1 << 20,
        chunk_bytes: 8 << 10,
        per_page_zstd,
        ..EncoderConfig::default()
    }) else {
        return;
    };
    let mem = fuzz_memory();
    let pages: Vec<Vec<u8>> = (0..FUZZ_FRAMES).map(|f| mem.page(f).to_vec()).collect();
    // Teach the encoder the replica's content as epoch FUZZ_BASE_EPOCH.
    let all: Vec<(u64, &[u8])> = pages
        .iter()
        .enumerate()
        .map(|(f, p)| (f as u64, &p[..]))
        .collect();
    if let Ok(e) = enc.encode(FUZZ_BASE_EPOCH, &all, b"", &[]) {
        out.push(e);
    }
    // Next epoch: sparse edits (RLE deltas), a rewrite, random data (raw),
    // a zeroed page, copies of a committed and of a just-sent frame
    // (references), a page with every 16th byte changed (XOR-then-zstd
    // in per-page mode), a page whose content moved by 8 bytes (zstd
    // with the old content as prefix, wire version 2), and a page made of
    // another frame's content 100 bytes off the page boundary (its chunk
    // names that frame as zstd prefix, wire version 3, when batched).
    let mut next = pages.clone();
    next[2][100] ^= 0x55;
    next[3][4000] = 9;
    next[5]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i / 3) as u8);
    let mut x = 0x9e37_79b9_u32;
    for b in next[6].iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    next[9].fill(0);
    next[10] = pages[1].clone();
    next[11] = next[6].clone();
    for b in next[14].iter_mut().step_by(16) {
        *b = b.wrapping_add(1);
    }
    next[7].copy_within(64..4000, 72);
    next[7][64..72].copy_from_slice(b"inserted");
    next[12][..4096 - 100].copy_from_slice(&pages[15][100..]);
    next[12][4096 - 100..].copy_from_slice(&pages[15][..100]);
    let changed: Vec<(u64, &[u8])> = [2u64, 3, 5, 6, 7, 9, 10, 11, 12, 14]
        .iter()
        .map(|&f| (f, &next[f as usize][..]))
        .collect();
    if let Ok(e) = enc.encode(
        FUZZ_BASE_EPOCH + 1,
        &changed,
        &[3u8; 600],
        &[(0, &[1u8; 300][..]), (4096, b"tiny")],
    ) {
        out.push(e);
    }
}
