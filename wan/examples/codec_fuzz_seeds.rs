//! Writes the decoder fuzzer's seed corpus (valid epochs covering every
//! record kind) into a directory.
//!
//!     cargo run -p wan --example codec_fuzz_seeds -- wan/fuzz/seeds/decode_epoch

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "wan/fuzz/seeds/decode_epoch".into());
    std::fs::create_dir_all(&dir)?;
    for (i, seed) in wan::codec::fuzz_seed_corpus().iter().enumerate() {
        let path = format!("{dir}/seed-{i}.epoch");
        std::fs::write(&path, seed)?;
        println!("{path}: {} bytes", seed.len());
    }
    Ok(())
}
