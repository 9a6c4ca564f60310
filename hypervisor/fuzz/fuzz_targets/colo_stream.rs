//! The COLO migration-stream parser on arbitrary bytes, fed in chunks of
//! a size the input chooses: it must return events or a typed error,
//! never panic; after an error it keeps returning one.
#![no_main]

use hypervisor::qemu::colo::{wire, StreamParser};
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], chunk: usize) {
    let mut p = StreamParser::new();
    for c in data.chunks(chunk) {
        p.push(c);
        loop {
            match p.next() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    assert!(p.next().is_err(), "errors are sticky");
                    return;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&c, rest)) = data.split_first() else {
        return;
    };
    let chunk = 1 + c as usize * 17;
    run(rest, chunk);
    // Past the header, where the section parsers are.
    let mut s = wire::HEADER.to_vec();
    s.extend_from_slice(rest);
    run(&s, chunk);
});
