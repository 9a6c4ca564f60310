//! Arbitrary bytes from a BGP peer: the framing, OPEN and UPDATE decoders
//! and an Established session must never panic (see
//! `netops::bgp::fuzzing::bgp_decode`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    netops::bgp::fuzzing::bgp_decode(data);
});
