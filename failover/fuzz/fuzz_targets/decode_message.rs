#![no_main]
//! Any bytes a peer sends decode to a message or a typed error; a decoded
//! message re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((vm, msg)) = failover::wire::decode(data) {
        let again = failover::wire::encode(&vm, &msg).expect("decoded messages re-encode");
        assert_eq!(again, data);
    }
});
