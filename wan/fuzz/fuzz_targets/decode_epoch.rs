//! Arbitrary bytes as a checkpoint epoch: the decoder must reject or accept
//! without panicking, and a rejected epoch must leave the replica untouched
//! (`fuzz_decode` checks both, also on a resealed copy of the input so that
//! mutations get past the checksum).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wan::codec::fuzz_decode(data);
});
