//! Recorded dirty-page traces of a real guest, for the codec benchmark
//! (`CODEC_TRACE_DIR=DIR cargo bench -p wan --bench codec`). They are
//! written by the recorder `cargo run --release -p hypervisor --example
//! record_trace` (see docs/benchmarks.md, "Checkpoint codec").
//!
//! # Format
//!
//! A trace is a folder with one file per epoch, `epoch-NNNNNN.rwtrace`
//! (`NNNNNN`: the epoch's index, six decimal digits, from 0). Epoch 0 holds
//! the guest's image when recording began (every non-zero page); each later
//! epoch holds the pages one checkpoint found changed since the previous
//! one, with their contents at that checkpoint. Each file is one zstd frame
//! whose content is, little-endian:
//!
//! | field | size | |
//! |---|---|---|
//! | magic | 8 | `RWTRACE1` |
//! | page size | u32 | bytes per page, a power of two in 512..=65536 |
//! | frame count | u64 | pages of guest memory |
//! | index | u32 | the epoch's index (equals the file name's) |
//! | interval | u32 | µs of guest run time since the previous checkpoint (0 for epoch 0) |
//! | page count | u32 | pages in this epoch |
//! | name length | u16 | |
//! | name | name length | the workload, UTF-8 |
//! | frames | page count × u64 | page indices, ascending, each < frame count |
//! | pages | page count × page size | their contents, in frame order |
//! | checksum | u64 | xxh3-64 of every byte above |
//!
//! All files of a trace must agree on page size, frame count and name, and
//! the indices must run from 0 without a gap.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

/// First bytes of every epoch file (after zstd decompression).
pub const TRACE_MAGIC: [u8; 8] = *b"RWTRACE1";
/// zstd level of the epoch files.
const FILE_ZSTD_LEVEL: i32 = 3;
/// Largest decompressed epoch file the reader accepts (64 GiB guest).
const MAX_FILE_BYTES: u64 = 1 << 36;

/// Why a trace could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a trace epoch file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: truncated ({what})")]
    Truncated { path: PathBuf, what: &'static str },
    #[error("{path}: checksum mismatch")]
    Checksum { path: PathBuf },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{dir}: no epoch files (epoch-NNNNNN.rwtrace)")]
    Empty { dir: PathBuf },
}

/// One epoch of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEpoch {
    /// Guest run time since the previous checkpoint, µs (0 for epoch 0).
    pub interval_us: u32,
    /// Page indices, ascending.
    pub frames: Vec<u64>,
    /// Their contents, `frames.len() * page_size` bytes.
    pub pages: Vec<u8>,
}

impl TraceEpoch {
    /// `(frame, content)` pairs, as the codec takes them.
    pub fn page_slices(&self, page_size: usize) -> Vec<(u64, &[u8])> {
        self.frames
            .iter()
            .copied()
            .zip(self.pages.chunks_exact(page_size))
            .collect()
    }

    /// Bytes of dirty pages in this epoch.
    pub fn page_bytes(&self) -> usize {
        self.pages.len()
    }
}

/// What every epoch file of a trace shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceMeta {
    /// The workload that ran (e.g. `gzip`).
    pub workload: String,
    pub page_size: usize,
    pub frame_count: u64,
}

/// A whole trace, read from its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedTrace {
    pub meta: TraceMeta,
    /// Epoch 0 is the initial image.
    pub epochs: Vec<TraceEpoch>,
}

impl RecordedTrace {
    /// Guest memory with every epoch up to `upto` (exclusive) applied to
    /// zeros.
    pub fn image_after(&self, upto: usize) -> Vec<u8> {
        let ps = self.meta.page_size;
        let mut mem = vec![0u8; self.meta.frame_count as usize * ps];
        for e in &self.epochs[..upto.min(self.epochs.len())] {
            for (f, p) in e.page_slices(ps) {
                let at = f as usize * ps;
                mem[at..at + ps].copy_from_slice(p);
            }
        }
        mem
    }
}

/// File name of epoch `index` in a trace folder.
pub fn epoch_file_name(index: u32) -> String {
    format!("epoch-{index:06}.rwtrace")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TraceError + '_ {
    move |source| TraceError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, what: impl Into<String>) -> TraceError {
    TraceError::Invalid {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn check_page_size(path: &Path, ps: usize) -> Result<(), TraceError> {
    if ps.is_power_of_two() && (512..=65536).contains(&ps) {
        Ok(())
    } else {
        Err(invalid(path, format!("page size {ps}")))
    }
}

/// Writes epoch `index` into `dir` (which must exist), replacing any file
/// of that index. `pages` holds `frames.len()` pages of `meta.page_size`.
pub fn write_epoch(
    dir: &Path,
    meta: &TraceMeta,
    index: u32,
    epoch: &TraceEpoch,
) -> Result<PathBuf, TraceError> {
    let path = dir.join(epoch_file_name(index));
    check_page_size(&path, meta.page_size)?;
    if epoch.pages.len() != epoch.frames.len() * meta.page_size {
        return Err(invalid(&path, "pages do not match the frame list"));
    }
    if epoch.frames.windows(2).any(|w| w[0] >= w[1])
        || epoch.frames.last().is_some_and(|&f| f >= meta.frame_count)
    {
        return Err(invalid(&path, "frames not ascending or beyond the guest"));
    }
    let name = meta.workload.as_bytes();
    let name_len =
        u16::try_from(name.len()).map_err(|_| invalid(&path, "workload name too long"))?;
    let count = u32::try_from(epoch.frames.len()).map_err(|_| invalid(&path, "too many pages"))?;
    let mut head = Vec::with_capacity(34 + name.len() + epoch.frames.len() * 8);
    head.extend_from_slice(&TRACE_MAGIC);
    head.extend_from_slice(&(meta.page_size as u32).to_le_bytes());
    head.extend_from_slice(&meta.frame_count.to_le_bytes());
    head.extend_from_slice(&index.to_le_bytes());
    head.extend_from_slice(&epoch.interval_us.to_le_bytes());
    head.extend_from_slice(&count.to_le_bytes());
    head.extend_from_slice(&name_len.to_le_bytes());
    head.extend_from_slice(name);
    for f in &epoch.frames {
        head.extend_from_slice(&f.to_le_bytes());
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&head);
    hasher.update(&epoch.pages);
    let sum = hasher.digest();

    let tmp = dir.join(format!(".{}.tmp", epoch_file_name(index)));
    let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut z = zstd::stream::write::Encoder::new(std::io::BufWriter::new(file), FILE_ZSTD_LEVEL)
        .map_err(io_err(&tmp))?;
    z.write_all(&head).map_err(io_err(&tmp))?;
    z.write_all(&epoch.pages).map_err(io_err(&tmp))?;
    z.write_all(&sum.to_le_bytes()).map_err(io_err(&tmp))?;
    let mut w = z.finish().map_err(io_err(&tmp))?;
    w.flush().map_err(io_err(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

/// A little-endian cursor over a decompressed epoch file.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TraceError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(TraceError::Truncated {
                path: self.path.to_owned(),
                what,
            })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], TraceError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

/// Reads one epoch file: its index, the shared metadata and the epoch.
pub fn read_epoch(path: &Path) -> Result<(u32, TraceMeta, TraceEpoch), TraceError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::new();
    zstd::stream::read::Decoder::new(file)
        .map_err(io_err(path))?
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    let mut c = Cursor {
        path,
        buf: &buf,
        at: 0,
    };
    if c.take(8, "magic")? != TRACE_MAGIC {
        return Err(TraceError::BadMagic {
            path: path.to_owned(),
        });
    }
    let page_size = u32::from_le_bytes(c.arr("page size")?) as usize;
    check_page_size(path, page_size)?;
    let frame_count = u64::from_le_bytes(c.arr("frame count")?);
    let index = u32::from_le_bytes(c.arr("index")?);
    let interval_us = u32::from_le_bytes(c.arr("interval")?);
    let count = u32::from_le_bytes(c.arr("page count")?) as usize;
    let name_len = u16::from_le_bytes(c.arr("name length")?) as usize;
    let workload = std::str::from_utf8(c.take(name_len, "name")?)
        .map_err(|_| invalid(path, "workload name is not UTF-8"))?
        .to_owned();
    let frame_bytes = count
        .checked_mul(8)
        .ok_or_else(|| invalid(path, "page count overflows"))?;
    let frames: Vec<u64> = c
        .take(frame_bytes, "frames")?
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect();
    let page_bytes = count
        .checked_mul(page_size)
        .ok_or_else(|| invalid(path, "page count overflows"))?;
    let pages = c.take(page_bytes, "pages")?.to_vec();
    let body_end = c.at;
    let sum = u64::from_le_bytes(c.arr("checksum")?);
    if c.at != buf.len() {
        return Err(invalid(path, "bytes after the checksum"));
    }
    if xxh3_64(&buf[..body_end]) != sum {
        return Err(TraceError::Checksum {
            path: path.to_owned(),
        });
    }
    if frames.windows(2).any(|w| w[0] >= w[1]) || frames.last().is_some_and(|&f| f >= frame_count) {
        return Err(invalid(path, "frames not ascending or beyond the guest"));
    }
    Ok((
        index,
        TraceMeta {
            workload,
            page_size,
            frame_count,
        },
        TraceEpoch {
            interval_us,
            frames,
            pages,
        },
    ))
}

/// Reads every epoch of the trace in `dir`.
pub fn read_trace(dir: &Path) -> Result<RecordedTrace, TraceError> {
    let mut files: Vec<(u32, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = e.map_err(io_err(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(n) = name
            .strip_prefix("epoch-")
            .and_then(|n| n.strip_suffix(".rwtrace"))
        {
            let index = n
                .parse()
                .map_err(|_| invalid(&path, "file name is not epoch-NNNNNN.rwtrace"))?;
            files.push((index, path));
        }
    }
    if files.is_empty() {
        return Err(TraceError::Empty {
            dir: dir.to_owned(),
        });
    }
    files.sort();
    let mut meta: Option<TraceMeta> = None;
    let mut epochs = Vec::with_capacity(files.len());
    for (i, (index, path)) in files.iter().enumerate() {
        if *index as usize != i {
            return Err(invalid(path, format!("epoch {i} is missing")));
        }
        let (inner, m, e) = read_epoch(path)?;
        if inner != *index {
            return Err(invalid(path, format!("holds epoch {inner}")));
        }
        match &meta {
            None => meta = Some(m),
            Some(first) if *first != m => {
                return Err(invalid(
                    path,
                    "page size, frame count or workload differ from epoch 0",
                ))
            }
            Some(_) => {}
        }
        epochs.push(e);
    }
    let meta = meta.ok_or(TraceError::Empty {
        dir: dir.to_owned(),
    })?;
    Ok(RecordedTrace { meta, epochs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> TraceMeta {
        TraceMeta {
            workload: "test".into(),
            page_size: 4096,
            frame_count: 64,
        }
    }

    fn epoch(seed: u8, frames: &[u64]) -> TraceEpoch {
        TraceEpoch {
            interval_us: 100_000,
            frames: frames.to_vec(),
            pages: frames
                .iter()
                .flat_map(|&f| (0..4096).map(move |i| (i as u8) ^ (f as u8) ^ seed))
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let epochs = vec![epoch(0, &[0, 1, 5, 63]), epoch(1, &[]), epoch(2, &[5, 6])];
        for (i, e) in epochs.iter().enumerate() {
            write_epoch(dir.path(), &meta(), i as u32, e).expect("write");
        }
        let t = read_trace(dir.path()).expect("read");
        assert_eq!(t.meta, meta());
        assert_eq!(t.epochs, epochs);
        let img = t.image_after(3);
        assert_eq!(&img[5 * 4096..6 * 4096], &epochs[2].pages[..4096]);
        assert_eq!(&img[63 * 4096..], &epochs[0].pages[3 * 4096..]);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            read_trace(dir.path()),
            Err(TraceError::Empty { .. })
        ));
        let path = write_epoch(dir.path(), &meta(), 0, &epoch(0, &[1, 2])).expect("write");
        let good = std::fs::read(&path).expect("read");
        let mut plain = Vec::new();
        zstd::stream::read::Decoder::new(&good[..])
            .expect("zstd")
            .read_to_end(&mut plain)
            .expect("decompress");
        let rewrite = |bytes: &[u8]| {
            std::fs::write(&path, zstd::encode_all(bytes, 1).expect("zstd")).expect("write")
        };

        // A flipped page byte: checksum.
        let mut b = plain.clone();
        b[100] ^= 1;
        rewrite(&b);
        assert!(matches!(
            read_trace(dir.path()),
            Err(TraceError::Checksum { .. })
        ));
        // Cut short: truncated.
        rewrite(&plain[..plain.len() - 20]);
        assert!(matches!(
            read_trace(dir.path()),
            Err(TraceError::Truncated { .. })
        ));
        // Wrong magic.
        let mut b = plain.clone();
        b[0] = b'X';
        rewrite(&b);
        assert!(matches!(
            read_trace(dir.path()),
            Err(TraceError::BadMagic { .. })
        ));
        // A huge page count: truncated, not an allocation.
        let mut b = plain.clone();
        b[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        rewrite(&b);
        assert!(read_trace(dir.path()).is_err());
        // Not zstd at all.
        std::fs::write(&path, b"garbage").expect("write");
        assert!(matches!(read_trace(dir.path()), Err(TraceError::Io { .. })));
        // A gap in the indices.
        std::fs::write(&path, &good).expect("write");
        write_epoch(dir.path(), &meta(), 2, &epoch(0, &[1])).expect("write");
        assert!(matches!(
            read_trace(dir.path()),
            Err(TraceError::Invalid { .. })
        ));
    }
}
