//! The `bgp_decode` fuzz target's seed corpus runs as an ordinary test, so
//! it is exercised even where nightly / cargo-fuzz is not available.
//! `NETOPS_WRITE_SEEDS=1` (re)writes the seeds from `fuzzing::seeds()`.

use std::path::PathBuf;

#[test]
fn bgp_decode_corpus_does_not_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/bgp_decode");
    if std::env::var("NETOPS_WRITE_SEEDS").as_deref() == Ok("1") {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in netops::bgp::fuzzing::seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        netops::bgp::fuzzing::bgp_decode(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}
