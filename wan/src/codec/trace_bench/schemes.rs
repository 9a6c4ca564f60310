//! What the benchmark runs over a workload: a sender and a receiver side
//! of one page-transfer scheme, ours included.

use super::TraceBenchError;
use crate::codec::{Decoder, DecoderConfig, Encoder, EncoderConfig, VecMemory};

/// A page-transfer scheme with a sender and a receiver side.
pub(super) trait Scheme {
    fn name(&self) -> String;
    /// One epoch into `out` (cleared first). The caller reuses `out`, as the
    /// engine reuses its send buffer: no allocation is timed that a real
    /// sender would not make.
    fn encode(&mut self, epoch: u64, pages: &[(u64, &[u8])], out: &mut Vec<u8>);
    /// Applies one epoch to the replica.
    fn decode(&mut self, bytes: &[u8]) -> Result<(), TraceBenchError>;
    fn replica(&self) -> &[u8];
}

/// Our codec, with a replica that applies each epoch as the standby would
/// (decode, verify, apply), acknowledging every epoch at once.
pub(super) struct Ours {
    label: String,
    enc: Encoder,
    dec: Decoder,
    replica: VecMemory,
    /// The encoder's result of the last `encode`: reported by `decode`, whose
    /// signature every scheme shares.
    failed: Option<crate::codec::CodecError>,
}

impl Ours {
    pub(super) fn new(
        label: impl Into<String>,
        cfg: EncoderConfig,
        initial: &[u8],
    ) -> Result<Self, TraceBenchError> {
        let page_size = cfg.page_size;
        Ok(Ours {
            label: label.into(),
            enc: Encoder::new(cfg)?,
            // One thread: the per-core figure. The threaded one is
            // `threaded_encode`'s.
            dec: Decoder::new(DecoderConfig {
                threads: 1,
                ..DecoderConfig::default()
            })?,
            replica: VecMemory::from_bytes(initial.to_vec(), page_size),
            failed: None,
        })
    }
}

impl Scheme for Ours {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn encode(&mut self, epoch: u64, pages: &[(u64, &[u8])], out: &mut Vec<u8>) {
        match self.enc.encode_into(epoch, pages, &[], &[], out) {
            Ok(_) => self.enc.acknowledge(epoch),
            Err(e) => {
                out.clear();
                self.failed = Some(e);
            }
        }
    }
    fn decode(&mut self, bytes: &[u8]) -> Result<(), TraceBenchError> {
        if let Some(e) = self.failed.take() {
            return Err(e.into());
        }
        let staged = self.dec.decode(bytes, &self.replica)?;
        staged.apply(&mut self.replica)?;
        Ok(())
    }
    fn replica(&self) -> &[u8] {
        self.replica.as_bytes()
    }
}
