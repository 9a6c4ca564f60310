//! The standby's epoch journal: one decoded epoch written whole before any
//! of it touches the replica, so a standby killed mid-apply replays it on
//! restart instead of exposing half an epoch.
//!
//! ```text
//! "RWJ1"  u64 epoch  u64 token  u32 page_size  u32 pages  u32 disk_writes  u32 state_len
//! pages × (u64 frame, page_size bytes; a zero page is frame | ZERO_FLAG with no bytes)
//! disk_writes × (u64 offset, u32 len, len bytes)
//! state_len bytes of device/vCPU state
//! u64 xxh3-64 of everything above
//! ```
//! Little-endian. The journal is written under a temporary name and renamed
//! into place: the rename is the epoch's commit point.

use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 4] = b"RWJ1";
const HEADER: usize = 4 + 8 + 8 + 4 + 4 + 4 + 4;
/// Marks a zero page (no bytes follow) in the frame field.
const ZERO_FLAG: u64 = 1 << 63;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal truncated")]
    Truncated,
    #[error("not a remus-wan journal (bad magic)")]
    BadMagic,
    #[error("journal checksum mismatch")]
    Checksum,
    #[error("journal I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Builds a journal in memory as the epoch is applied.
pub struct JournalWriter {
    buf: Vec<u8>,
    page_size: usize,
    pages: u32,
}

impl JournalWriter {
    pub fn new(epoch: u64, token: u64, page_size: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER + 64 * 1024);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&token.to_le_bytes());
        buf.extend_from_slice(&(page_size as u32).to_le_bytes());
        buf.extend_from_slice(&[0; 12]); // counts, filled by finish()
        Self {
            buf,
            page_size,
            pages: 0,
        }
    }

    /// The epoch number is known only once the codec has applied it.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.buf[4..12].copy_from_slice(&epoch.to_le_bytes());
    }

    pub fn page(&mut self, frame: u64, data: &[u8]) {
        debug_assert_eq!(data.len(), self.page_size);
        self.buf.extend_from_slice(&frame.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.pages += 1;
    }

    /// Appends `frame` with `base` as its content and returns that content
    /// for changing in place (deltas are XORed into it).
    pub fn page_from(&mut self, frame: u64, base: &[u8]) -> &mut [u8] {
        debug_assert_eq!(base.len(), self.page_size);
        self.buf.extend_from_slice(&frame.to_le_bytes());
        let at = self.buf.len();
        self.buf.extend_from_slice(base);
        self.pages += 1;
        &mut self.buf[at..]
    }

    pub fn zero_page(&mut self, frame: u64) {
        self.buf
            .extend_from_slice(&(frame | ZERO_FLAG).to_le_bytes());
        self.pages += 1;
    }

    /// Appends disk writes and state and seals the journal.
    pub fn finish(mut self, disk_writes: &[(u64, &[u8])], state: &[u8]) -> Vec<u8> {
        for (offset, data) in disk_writes {
            self.buf.extend_from_slice(&offset.to_le_bytes());
            self.buf
                .extend_from_slice(&(data.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(data);
        }
        self.buf.extend_from_slice(state);
        self.buf[24..28].copy_from_slice(&self.pages.to_le_bytes());
        self.buf[28..32].copy_from_slice(&(disk_writes.len() as u32).to_le_bytes());
        self.buf[32..36].copy_from_slice(&(state.len() as u32).to_le_bytes());
        let sum = xxh3_64(&self.buf);
        self.buf.extend_from_slice(&sum.to_le_bytes());
        self.buf
    }
}

/// A verified journal, borrowed from its bytes.
#[derive(Debug)]
pub struct Journal<'a> {
    pub epoch: u64,
    pub token: u64,
    pub page_size: usize,
    /// (frame, Some(bytes)) or (frame, None) for a zero page.
    pub pages: Vec<(u64, Option<&'a [u8]>)>,
    pub disk_writes: Vec<(u64, &'a [u8])>,
    pub state: &'a [u8],
}

impl<'a> Journal<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, JournalError> {
        if bytes.len() < HEADER + 8 {
            return Err(JournalError::Truncated);
        }
        if &bytes[..4] != MAGIC {
            return Err(JournalError::BadMagic);
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if xxh3_64(body) != u64::from_le_bytes(sum.try_into().map_err(|_| JournalError::Truncated)?)
        {
            return Err(JournalError::Checksum);
        }
        let mut r = Cursor { b: body, at: 4 };
        let epoch = r.u64()?;
        let token = r.u64()?;
        let page_size = r.u32()? as usize;
        let n_pages = r.u32()?;
        let n_disk = r.u32()?;
        let state_len = r.u32()? as usize;
        let mut pages = Vec::with_capacity(n_pages.min(1 << 20) as usize);
        for _ in 0..n_pages {
            let f = r.u64()?;
            if f & ZERO_FLAG != 0 {
                pages.push((f & !ZERO_FLAG, None));
            } else {
                pages.push((f, Some(r.take(page_size)?)));
            }
        }
        let mut disk_writes = Vec::with_capacity(n_disk.min(1 << 16) as usize);
        for _ in 0..n_disk {
            let off = r.u64()?;
            let len = r.u32()? as usize;
            disk_writes.push((off, r.take(len)?));
        }
        let state = r.take(state_len)?;
        if r.at != body.len() {
            return Err(JournalError::Truncated);
        }
        Ok(Journal {
            epoch,
            token,
            page_size,
            pages,
            disk_writes,
            state,
        })
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], JournalError> {
        let end = self.at.checked_add(n).ok_or(JournalError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(JournalError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, JournalError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, JournalError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

pub(crate) fn io(path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}
