#![no_main]
//! FEC datagrams and stream chunks take whatever a peer sends: a datagram
//! decodes to a typed error or to a value that re-encodes to the same
//! bytes; a receiver fed any sequence of chunks and datagrams refuses with
//! a typed error or makes progress within its memory bounds, never panics.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wan::transport::fec::wire::fuzz_decode(data);
    wan::transport::fec::reassembly::fuzz_feed(data);
});
