//! The fuzz target's function over its seed corpus and a few thousand
//! mutations of valid epochs: no panic, and a rejected epoch leaves the
//! replica untouched (`fuzz_decode` asserts that itself).

use std::sync::OnceLock;

use proptest::prelude::*;
use wan::codec::{fuzz_decode, fuzz_seed_corpus, reseal, CodecError};

#[test]
fn seed_corpus_is_accepted() {
    let seeds = fuzz_seed_corpus();
    assert!(seeds.len() >= 2);
    for s in &seeds {
        assert_eq!(fuzz_decode(s), Ok(()));
    }
}

#[test]
fn empty_and_tiny_inputs_rejected() {
    for n in 0..80 {
        let zeros = vec![0u8; n];
        assert!(fuzz_decode(&zeros).is_err());
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, val: u8 },
    Truncate(usize),
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, val)| Mutation::Set { at, val }),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..32).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    let n = data.len().max(1);
    match m {
        Mutation::Flip { at, bit } => {
            if let Some(b) = data.get_mut(at % n) {
                *b ^= 1 << bit;
            }
        }
        Mutation::Set { at, val } => {
            if let Some(b) = data.get_mut(at % n) {
                *b = *val;
            }
        }
        Mutation::Truncate(at) => data.truncate(at % n),
        Mutation::Insert { at, bytes } => {
            let at = at % n;
            data.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            let end = (at + len).min(data.len());
            if at < end {
                data.drain(at..end);
            }
        }
    }
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(fuzz_seed_corpus)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn mutated_epochs_never_panic(
        seed in any::<prop::sample::Index>(),
        muts in prop::collection::vec(mutation(), 1..6),
        resealed in any::<bool>(),
    ) {
        let seeds = seeds();
        let mut data = seeds[seed.index(seeds.len())].clone();
        let original = data.clone();
        for m in &muts {
            apply(&mut data, m);
        }
        if resealed {
            reseal(&mut data);
        }
        let result = fuzz_decode(&data);
        if !resealed && data != original {
            // Without a fresh checksum any change must be caught.
            prop_assert!(result.is_err());
            if data.len() == original.len() && data[..8] == original[..8] {
                let is_checksum = matches!(result, Err(CodecError::ChecksumMismatch { .. }));
                prop_assert!(is_checksum || matches!(result, Err(CodecError::Truncated { .. })) || data[56..64] != original[56..64],
                    "{:?}", result);
            }
        }
    }
}

/// The seeds come from both encoder modes, and the per-page mode does emit
/// the zstd record kinds the batched mode never uses, so the fuzzer starts
/// from every record kind the decoder knows.
#[test]
fn seeds_cover_both_encoder_modes() {
    use wan::codec::{Encoder, EncoderConfig};
    assert_eq!(fuzz_seed_corpus().len(), 4);
    let mut enc = Encoder::new(EncoderConfig {
        per_page_zstd: true,
        ..EncoderConfig::default()
    })
    .expect("encoder");
    let old: Vec<u8> = (0..4096u32).map(|i| (i * 7 / 5) as u8).collect();
    let mut new = old.clone();
    for b in new.iter_mut().step_by(16) {
        *b = b.wrapping_add(1);
    }
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
        .iter()
        .cycle()
        .take(4096)
        .copied()
        .collect();
    enc.encode(1, &[(0, &old[..]), (1, &text[..])], b"", &[])
        .expect("e1");
    enc.encode(2, &[(0, &new[..])], b"", &[]).expect("e2");
    let st = enc.stats();
    assert_eq!(st.full_zstd, 2, "{st:?}");
    assert_eq!(st.delta_zstd, 1, "{st:?}");
    // The batched seed epoch on top of the base carries a page compressed
    // with its old content as prefix (wire version 2) and a chunk with
    // other frames as prefix (version 3, which implies kind 6 is allowed).
    let version = |b: &[u8]| u16::from_le_bytes([b[4], b[5]]);
    assert!(fuzz_seed_corpus().iter().any(|s| version(s) == 3));
}
