//! Failover messages on a QUIC stream: each one is a u16 little-endian
//! length followed by its `failover::wire` encoding.

use failover::wire::{self, WireError, MAX_MESSAGE_LEN};
use failover::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than any failover message")]
    TooLong(usize),
    #[error("bad failover message: {0}")]
    Wire(#[from] WireError),
}

pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    vm: &str,
    msg: &Message,
) -> Result<(), FrameError> {
    let bytes = wire::encode(vm, msg)?;
    let mut framed = Vec::with_capacity(2 + bytes.len());
    framed.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    framed.extend_from_slice(&bytes);
    w.write_all(&framed).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one message; `Ok(None)` at a clean end of stream.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(String, Message)>, FrameError> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = usize::from(u16::from_le_bytes(len));
    if len > MAX_MESSAGE_LEN {
        return Err(FrameError::TooLong(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(wire::decode(&buf)?))
}
