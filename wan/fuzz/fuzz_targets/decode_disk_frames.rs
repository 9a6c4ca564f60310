#![no_main]
//! The disk-resynchronisation frame bodies (DISK_SYNC = 7, DISK_REPORT = 8)
//! take whatever a peer sends: a frame or a typed error, never a panic, and
//! a decoded body re-encodes to the same bytes it was read from.

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use wan::session::wire::{DiskReport, DiskSync};

fuzz_target!(|data: &[u8]| {
    let Some((which, body)) = data.split_first() else {
        return;
    };
    let mut b = Bytes::copy_from_slice(body);
    let before = b.len();
    let mut again = BytesMut::new();
    if which & 1 == 0 {
        let Ok(f) = DiskSync::decode_body(&mut b) else { return };
        f.encode_body(&mut again);
    } else {
        let Ok(f) = DiskReport::decode_body(&mut b) else { return };
        f.encode_body(&mut again);
    }
    let used = before - b.len();
    assert_eq!(&again[..], &body[..used], "re-encoded body differs");
});
