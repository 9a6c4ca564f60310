//! Checkpoint wire format and delta codec (see docs/wire-format.md).
//!
//! One epoch of a protected VM (dirty pages, device/vCPU state blob, disk
//! writes) becomes one self-contained byte string on the sender and a
//! verified, staged epoch on the receiver.
//!
//! # Sender
//!
//! ```
//! use wan::codec::{Encoder, EncoderConfig};
//! let mut enc = Encoder::new(EncoderConfig { vm_id: 7, ..EncoderConfig::default() })?;
//! let page = vec![1u8; 4096];
//! let bytes = enc.encode(1, &[(0, &page[..])], b"vcpu state", &[(512, b"disk")])?;
//! // ... send `bytes`; when the backup acknowledges epoch 1:
//! enc.acknowledge(1);
//! # Ok::<(), wan::codec::CodecError>(())
//! ```
//!
//! * [`Encoder::encode`] / [`Encoder::encode_into`]: one epoch to bytes. Epoch
//!   numbers grow; several epochs may be in flight.
//! * [`Encoder::acknowledge`]: the replica committed that epoch.
//! * [`Encoder::invalidate_from`]: that epoch and all later ones are lost or
//!   rejected. Frames they carried are sent whole afterwards and never used
//!   as duplicate sources, and the next epoch is based on the last earlier one.
//! * [`Encoder::reset`]: the replica's state is unknown (new replica, resync):
//!   forget everything.
//!
//! **Pipelining rule.** Every epoch names its base: the epoch encoded just
//! before it in the current chain. Its deltas and references are relative to
//! the replica state right after that base, which is what the sender last
//! sent for every frame. The decoder refuses an epoch whose base is not the
//! replica's committed epoch ([`CodecError::BaseMismatch`]), so an epoch built
//! on a lost one can never be applied. After a loss, call
//! `invalidate_from(first lost epoch)`; epochs already sent on top of it will
//! be rejected by the replica and must be invalidated too (invalidating from
//! the first one covers them).
//!
//! # Receiver
//!
//! ```
//! # use wan::codec::{Encoder, EncoderConfig};
//! use wan::codec::{Decoder, DecoderConfig, VecMemory};
//! # let mut enc = Encoder::new(EncoderConfig::default())?;
//! # let page = vec![1u8; 4096];
//! # let bytes = enc.encode(1, &[(0, &page[..])], b"", &[])?;
//! let mut replica = VecMemory::new(16, 4096);
//! let mut dec = Decoder::new(DecoderConfig::default())?;
//! let staged = dec.decode(&bytes, &replica)?; // verified, nothing written yet
//! let applied = staged.apply(&mut replica)?;  // pages written, epoch committed
//! // apply applied.state_blob and applied.disk_writes, then ack applied.epoch
//! # assert_eq!(replica.as_bytes()[..4096], page[..]);
//! # Ok::<(), wan::codec::CodecError>(())
//! ```
//!
//! The replica is anything implementing [`PageSource`] (committed pages,
//! frame count, committed epoch) and [`PageSink`] (pages in place, mark the
//! epoch committed); [`VecMemory`] is a plain in-memory one.
//! [`Decoder::decode`] only reads the replica; [`StagedEpoch::apply`]
//! re-checks that the replica is still the one it was verified against, then
//! writes every page and cannot fail halfway. The state blob and disk writes
//! come back in [`AppliedEpoch`] for the caller to apply before it
//! acknowledges the epoch.
//!
//! # Encoding choices
//!
//! Per dirty page: no record if unchanged since last sent, else zero page,
//! else a reference to an identical page (xxh3-64, confirmed byte for byte),
//! else an XOR delta against the last-sent content (run-length coded), else
//! the raw page; zstd then compresses whole chunks of records, with the
//! cached pages that share most sub-page fingerprints with the chunk's raw
//! pages as prefix (wire version 3, `xref.rs`)
//! ([`EncoderConfig::per_page_zstd`] switches to per-page zstd candidates).
//! The sender's [`Encoder`] keeps the last-sent content in a CLOCK cache with
//! a memory budget that favours pages rewritten again and again.
//!
//! [`synthetic`] holds the deterministic page traces shared by the
//! benchmark (`wan/benches/codec.rs`), the demo (`wan/examples/codec_demo.rs`)
//! and the tests; [`trace_bench`] the benchmark's tables, shared by the
//! criterion bench and `remus-wan bench codec`. [`fuzz_decode`] is the decoder's fuzzing entry point
//! (`wan/fuzz`).

mod anchors;
mod block;
mod chunk_decode;
mod chunk_plan;
pub mod cpu_time;
mod decoder;
mod digest;
mod encoder;
mod error;
mod fasthash;
mod format;
mod fuzzing;
mod helper_threads;
mod match_finder;
mod memory;
mod page_cache;
mod parallel;
mod prefetch;
mod prefix;
pub mod recorded;
mod rle;
mod staged;
pub mod synthetic;
pub mod trace_bench;
mod wire;
mod xref;

pub use decoder::{Decoder, DecoderConfig};
pub use encoder::{EncodeStats, Encoder, EncoderConfig};
pub use error::CodecError;
pub use format::{HEADER_LEN, MAGIC, NO_BASE, TRAILER_LEN, VERSION};
pub use fuzzing::{fuzz_decode, fuzz_memory, fuzz_seed_corpus, reseal, FUZZ_BASE_EPOCH};
pub use memory::{PageSink, PageSource, VecMemory};
pub use staged::{AppliedEpoch, DiskWrite, StagedEpoch};
