//! The `bgp_decode` fuzz target's seeds run as an ordinary test, so they are
//! exercised even where nightly / cargo-fuzz is not available. Files in the
//! local corpus (`netops/fuzz/corpus/bgp_decode`, git-ignored, grown by
//! `cargo fuzz run`) run too when present. `NETOPS_WRITE_SEEDS=1` writes
//! the seeds into that directory to start a fuzzing campaign from them.

use std::path::PathBuf;

#[test]
fn bgp_decode_seeds_and_local_corpus_do_not_panic() {
    let seeds = netops::bgp::fuzzing::seeds();
    assert!(!seeds.is_empty());
    for s in &seeds {
        netops::bgp::fuzzing::bgp_decode(s);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/bgp_decode");
    if std::env::var("NETOPS_WRITE_SEEDS").as_deref() == Ok("1") {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            netops::bgp::fuzzing::bgp_decode(&data);
        }
    }
}
