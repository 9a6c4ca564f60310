#![no_main]
//! The replication session's frame decoder takes whatever a peer sends, in
//! pieces of any size: it yields frames or a typed error, never panics, and
//! a control frame it decodes re-encodes to a frame it decodes the same way.

use libfuzzer_sys::fuzz_target;
use wan::session::wire::{Decoder, Item};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the split size, so frames straddle reads.
    let (split, bytes) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s).max(1), rest),
        None => return,
    };
    let mut dec = Decoder::new();
    for piece in bytes.chunks(split) {
        dec.push(piece);
        loop {
            match dec.next_item() {
                Ok(Some(Item::Control(frame))) => {
                    let again = frame.encode();
                    let mut d2 = Decoder::new();
                    d2.push(&again);
                    match d2.next_item() {
                        Ok(Some(Item::Control(f2))) => assert_eq!(f2, frame),
                        other => panic!("re-encoded frame decoded as {other:?}"),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
