//! The state blob decoder on arbitrary bytes: it must return an error or a
//! state, never panic. Each input is tried as it is and with its checksum
//! recomputed (so the fuzzer reaches the section parsers behind the
//! checksum); a decoded state must encode and decode to itself.
#![no_main]

use hypervisor::kvm::state::{seal_checksum, VmState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = VmState::decode(data);
    let mut sealed = data.to_vec();
    seal_checksum(&mut sealed);
    if let Ok(state) = VmState::decode(&sealed) {
        let again = VmState::decode(&state.to_bytes()).expect("re-encoded state decodes");
        assert_eq!(again, state);
    }
});
