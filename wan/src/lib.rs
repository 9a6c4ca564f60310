//! Everything that crosses the wide-area link between sites: the checkpoint
//! wire format and delta codec, the QUIC transport, and the WAN emulator.

pub mod codec;
#[cfg(feature = "net")]
pub mod emulator;
pub mod session;
#[cfg(feature = "net")]
pub mod transport;
