//! The state blob a COLO-mode checkpoint carries: what a replica needs
//! beyond RAM to be loaded by a fresh QEMU. QEMU's device blob alone is
//! not enough: the replica's stream is synthesized (see `writer`), and
//! needs the primary's configuration section and RAM block list.
//!
//! Layout (all big-endian): magic "RWQCOLO\0", u32 version, then
//! u32 len + configuration section, u32 RAM section id, u8 footers,
//! u32 block count + per block (u8 len + id, u64 used length),
//! u32 len + device part (FULL sections + EOF).

use super::records::{RamBlock, MAX_BLOCKS};
use super::wire::{self, Cursor};

/// First bytes of the envelope.
pub const MAGIC: [u8; 8] = *b"RWQCOLO\0";
/// Envelope version.
pub const VERSION: u32 = 1;

/// The replica-side view of one checkpoint's non-RAM state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ColoState {
    /// The configuration section as the primary sent it.
    pub configuration: Vec<u8>,
    /// The primary's RAM section id.
    pub ram_section_id: u32,
    /// Whether the primary's sections had footers.
    pub footers: bool,
    /// The RAM block list.
    pub blocks: Vec<RamBlock>,
    /// FULL device sections + EOF.
    pub devices: Vec<u8>,
}

/// The envelope cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a COLO state envelope (bad magic)")]
    Magic,
    #[error("COLO state envelope version {0}, this build reads {VERSION}")]
    Version(u32),
    #[error("COLO state envelope truncated")]
    Truncated,
    #[error("COLO state envelope malformed: {0}")]
    Malformed(&'static str),
}

impl ColoState {
    /// Appends the envelope to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&(self.configuration.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.configuration);
        out.extend_from_slice(&self.ram_section_id.to_be_bytes());
        out.push(self.footers as u8);
        out.extend_from_slice(&(self.blocks.len() as u32).to_be_bytes());
        for b in &self.blocks {
            wire::put_idstr(out, b.idstr.as_bytes());
            out.extend_from_slice(&b.used_length.to_be_bytes());
        }
        out.extend_from_slice(&(self.devices.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.devices);
    }

    /// Whether `blob` is an envelope (as opposed to a Compare-mode QEVM
    /// stream).
    pub fn is_envelope(blob: &[u8]) -> bool {
        blob.starts_with(&MAGIC)
    }

    /// Reads an envelope.
    pub fn decode(blob: &[u8]) -> Result<ColoState, EnvelopeError> {
        let mut c = Cursor::new(blob);
        let t = EnvelopeError::Truncated;
        if c.take(8).map_err(|_| t.clone())? != MAGIC {
            return Err(EnvelopeError::Magic);
        }
        let v = c.be32().map_err(|_| t.clone())?;
        if v != VERSION {
            return Err(EnvelopeError::Version(v));
        }
        let n = c.be32().map_err(|_| t.clone())? as usize;
        let configuration = c.take(n).map_err(|_| t.clone())?.to_vec();
        let ram_section_id = c.be32().map_err(|_| t.clone())?;
        let footers = match c.u8().map_err(|_| t.clone())? {
            0 => false,
            1 => true,
            _ => return Err(EnvelopeError::Malformed("footer flag")),
        };
        let count = c.be32().map_err(|_| t.clone())? as usize;
        if count > MAX_BLOCKS {
            return Err(EnvelopeError::Malformed("block count"));
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            let id = c.idstr().map_err(|_| t.clone())?;
            let used_length = c.be64().map_err(|_| t.clone())?;
            if !wire::plausible_idstr(id) {
                return Err(EnvelopeError::Malformed("block id"));
            }
            blocks.push(RamBlock {
                idstr: String::from_utf8_lossy(id).into_owned(),
                used_length,
            });
        }
        let n = c.be32().map_err(|_| t.clone())? as usize;
        let devices = c.take(n).map_err(|_| t.clone())?.to_vec();
        if c.remaining() != 0 {
            return Err(EnvelopeError::Malformed("trailing bytes"));
        }
        Ok(ColoState {
            configuration,
            ram_section_id,
            footers,
            blocks,
            devices,
        })
    }
}
