#![no_main]
//! The online-verify frame bodies (VERIFY_HASHES, VERIFY_RESULT) take
//! whatever a peer sends: a typed error or a body that re-encodes to the
//! same bytes, never a panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wan::session::verify_frames::fuzz_verify_body(data);
});
