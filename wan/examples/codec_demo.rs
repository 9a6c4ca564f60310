//! Runs each synthetic dirty-page trace through the checkpoint codec, the
//! way the replication engine does: encode on the primary, decode + verify +
//! apply on the backup, acknowledge. After every epoch the replica must equal
//! the guest image byte for byte.
//!
//!     cargo run --release -p wan --example codec_demo [-- EPOCHS [TRACE...]]
//!
//! TRACE is one of sparse-write, streaming, random, zero-heavy (default: all).

use std::io::Write;
use std::time::{Duration, Instant};

use wan::codec::synthetic::{Trace, TraceConfig, TraceKind};
use wan::codec::{Decoder, DecoderConfig, Encoder, EncoderConfig, VecMemory};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let epochs: u64 = match args.next() {
        Some(a) => a.parse()?,
        None => 24,
    };
    let names: Vec<String> = args.collect();
    let kinds: Vec<TraceKind> = TraceKind::ALL
        .into_iter()
        .filter(|k| names.is_empty() || names.iter().any(|n| n == k.name()))
        .collect();
    let cfg = TraceConfig {
        frames: 16384, // 64 MiB guest
        page_size: 4096,
        dirty_pages: 2048,
        seed: 7,
    };
    println!(
        "guest {} MiB, {} dirty pages per epoch, cache 32 MiB; epoch 0 is the initial full copy (not in the figures)",
        (cfg.frames as usize * cfg.page_size) >> 20,
        cfg.dirty_pages
    );
    println!(
        "{:<13} {:>6} {:>9} {:>9} {:>8} {:>10} {:>10}  replica",
        "trace", "epochs", "raw MB", "wire MB", "ratio", "enc MB/s", "dec MB/s"
    );
    for kind in kinds {
        run(kind, cfg, epochs)?;
    }
    Ok(())
}

fn run(kind: TraceKind, cfg: TraceConfig, epochs: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mut trace = Trace::new(kind, cfg);
    let mut enc = Encoder::new(EncoderConfig {
        vm_id: 1,
        cache_budget_bytes: 32 << 20,
        ..EncoderConfig::default()
    })?;
    let mut dec = Decoder::new(DecoderConfig {
        vm_id: Some(1),
        ..DecoderConfig::default()
    })?;
    let mut replica = VecMemory::new(cfg.frames, cfg.page_size);

    // Initial synchronisation: the whole image.
    let all = trace.all_frames();
    let bytes = enc.encode(0, &trace.pages(&all), b"", &[])?;
    dec.decode(&bytes, &replica)?.apply(&mut replica)?;
    enc.acknowledge(0);
    if replica.as_bytes() != trace.memory() {
        return Err("replica differs after the initial copy".into());
    }

    let (mut raw, mut wire) = (0u64, 0u64);
    let (mut te, mut td) = (Duration::ZERO, Duration::ZERO);
    for epoch in 1..=epochs {
        let dirty = trace.step();
        let pages = trace.pages(&dirty);
        let state = epoch.to_le_bytes();
        let t = Instant::now();
        let bytes = enc.encode(epoch, &pages, &state, &[])?;
        te += t.elapsed();
        let t = Instant::now();
        let applied = dec.decode(&bytes, &replica)?.apply(&mut replica)?;
        td += t.elapsed();
        enc.acknowledge(applied.epoch);
        if replica.as_bytes() != trace.memory() || applied.state_blob != state {
            return Err(format!("{}: replica differs after epoch {epoch}", kind.name()).into());
        }
        raw += (pages.len() * cfg.page_size) as u64;
        wire += bytes.len() as u64;
        print!(
            "\r{:<13} {:>6} {:>9.1} {:>9.2} {:>7.1}x {:>10.0} {:>10.0}  identical",
            kind.name(),
            epoch,
            raw as f64 / 1e6,
            wire as f64 / 1e6,
            raw as f64 / wire as f64,
            raw as f64 / te.as_secs_f64() / 1e6,
            raw as f64 / td.as_secs_f64() / 1e6,
        );
        std::io::stdout().flush()?;
    }
    println!();
    Ok(())
}
