//! A cheap hasher for maps keyed by frame numbers or xxh3 values.
//!
//! SipHash's flood resistance buys nothing here (keys are frame numbers and
//! content hashes the sender computed itself) and costs a noticeable share
//! of the per-page budget at 1 GB/s.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default, Clone, Copy)]
pub struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b) ^ self.0.rotate_left(8));
        }
    }

    fn write_u64(&mut self, x: u64) {
        // Folded multiply: mixes into both the low bits (bucket index) and
        // the high bits (hashbrown's control byte).
        let p = u128::from(x ^ self.0) * 0x9e37_79b9_7f4a_7c15_u128;
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }
}

pub type U64Map<V> = HashMap<u64, V, BuildHasherDefault<U64Hasher>>;

pub fn map_with_capacity<V>(n: usize) -> U64Map<V> {
    HashMap::with_capacity_and_hasher(n, BuildHasherDefault::default())
}
