//! The disk a protected unit replicates, as one range of bytes: a VM's
//! image file, or a consistency group's member images one after another
//! (member `i`'s byte `b` is the unit's byte `start[i] + b`). The replica
//! at the backup is one file of the whole range either way, so a group's
//! members commit their disk writes together with their memory, in the
//! same epochs, as one disk.
//!
//! Everything the primary reads of its disk (sync chunks, written blocks,
//! hashes for a checksum resync, verify slices) goes through a
//! [`DiskFile`], so it reads across members' images without knowing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Where a unit's disk lives: one image, or several back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    parts: Vec<PathBuf>,
    /// The written-block map of the whole range.
    map: PathBuf,
}

impl DiskImage {
    /// One image file; its block map beside it (`<image>.blockmap`).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let map = super::blockmap::map_path(&path);
        Self {
            parts: vec![path],
            map,
        }
    }

    /// Consistency group `group`'s member images in member order; the
    /// block map beside the first (`<first>.group-<group>.blockmap`), so a
    /// member protected on its own later never reads the group's map.
    pub fn members(group: &str, parts: Vec<PathBuf>) -> Self {
        let map = match parts.first() {
            Some(first) => {
                let mut p = first.as_os_str().to_owned();
                p.push(format!(".group-{group}.blockmap"));
                PathBuf::from(p)
            }
            None => PathBuf::new(),
        };
        Self { parts, map }
    }

    pub fn parts(&self) -> &[PathBuf] {
        &self.parts
    }

    /// The written-block map's file.
    pub fn map_path(&self) -> &Path {
        &self.map
    }

    /// The first image: what messages about the disk name.
    pub fn path(&self) -> &Path {
        self.parts.first().map_or(Path::new(""), PathBuf::as_path)
    }

    /// Bytes in all (the images' sizes now).
    pub fn bytes(&self) -> std::io::Result<u64> {
        self.parts.iter().try_fold(0u64, |sum, p| {
            let len = std::fs::metadata(p).map_err(|e| in_part(p, e))?.len();
            Ok(sum + len)
        })
    }

    /// Opens every image for reading.
    pub fn open(&self) -> std::io::Result<DiskFile> {
        let mut parts = Vec::with_capacity(self.parts.len());
        let mut start = 0u64;
        for p in &self.parts {
            let file = File::open(p).map_err(|e| in_part(p, e))?;
            let len = file.metadata().map_err(|e| in_part(p, e))?.len();
            parts.push(Part { file, start, len });
            start += len;
        }
        Ok(DiskFile { parts, len: start })
    }
}

impl std::fmt::Display for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.parts.iter().map(|p| p.display().to_string()).collect();
        f.write_str(&names.join(" + "))
    }
}

/// An I/O error that names the image it came from, when there are several.
fn in_part(p: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

#[derive(Debug)]
struct Part {
    file: File,
    /// The unit's byte where this image begins.
    start: u64,
    len: u64,
}

/// A [`DiskImage`] open for reading, its sizes fixed at the open.
#[derive(Debug)]
pub struct DiskFile {
    parts: Vec<Part>,
    len: u64,
}

impl DiskFile {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces of `len` bytes at `offset`: (part, offset in its image,
    /// bytes). Bytes beyond the end are not in any piece.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Part, u64, u64)> {
        let end = offset.saturating_add(len);
        self.parts.iter().filter_map(move |p| {
            let from = offset.max(p.start);
            let to = end.min(p.start + p.len);
            (from < to).then(|| (p, from - p.start, to - from))
        })
    }

    /// Fills `buf` from `offset`; an error if any of it lies past the end.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at {offset} lie past the disk's end ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        let mut at = 0usize;
        for (part, off, n) in self.pieces(offset, buf.len() as u64) {
            let n = n as usize;
            part.file.read_exact_at(&mut buf[at..at + n], off)?;
            at += n;
        }
        Ok(())
    }

    /// Whether `len` bytes at `offset` are all holes (read as zeros
    /// without touching storage).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.pieces(offset, len)
            .all(|(part, off, n)| hole_in(&part.file, off, n))
    }
}

/// Reading a disk at any offset: a replica's image file, or a unit's
/// [`DiskFile`].
pub trait DiskRead {
    /// Fills `buf` from `offset`.
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Whether `len` bytes at `offset` are all holes.
    fn is_hole(&self, offset: u64, len: u64) -> bool;
}

impl DiskRead for File {
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        hole_in(self, offset, len)
    }
}

impl DiskRead for DiskFile {
    fn read_disk(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        DiskFile::read_exact_at(self, buf, offset)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        DiskFile::is_hole(self, offset, len)
    }
}

/// Whether `len` bytes at `offset` of `file` hold no data.
fn hole_in(file: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on a file descriptor we own; no memory is touched.
    let next = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after offset. Anything else: not known.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write image");
        p
    }

    #[test]
    fn one_file_keeps_its_block_map_beside_it() {
        let d = DiskImage::file("/var/lib/vm/web1.img");
        assert_eq!(d.map_path(), Path::new("/var/lib/vm/web1.img.blockmap"));
        assert_eq!(d.path(), Path::new("/var/lib/vm/web1.img"));
        let g = DiskImage::members("shop", vec!["/a.img".into(), "/b.img".into()]);
        assert_eq!(g.map_path(), Path::new("/a.img.group-shop.blockmap"));
        assert_eq!(g.to_string(), "/a.img + /b.img");
    }

    #[test]
    fn reads_past_the_end_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = image(tmp.path(), "a", &[1; 10]);
        let f = DiskImage::file(a).open().expect("open");
        let mut buf = [0u8; 4];
        let e = f.read_exact_at(&mut buf, 8).expect_err("past the end");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        f.read_exact_at(&mut buf, 6).expect("the last four bytes");
        assert_eq!(buf, [1; 4]);
    }

    #[test]
    fn a_missing_member_image_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = image(tmp.path(), "a", &[1; 10]);
        let b = tmp.path().join("missing.img");
        let e = DiskImage::members("g", vec![a, b.clone()])
            .open()
            .expect_err("missing");
        assert!(e.to_string().contains(&b.display().to_string()), "{e}");
    }

    #[test]
    fn holes_are_found_across_images() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sparse = |name: &str| {
            let p = tmp.path().join(name);
            File::create(&p)
                .and_then(|f| f.set_len(1 << 20))
                .expect("sparse");
            p
        };
        let (a, b) = (sparse("a"), sparse("b"));
        let f = DiskImage::members("g", vec![a, b.clone()])
            .open()
            .expect("open");
        assert!(f.is_hole(0, 2 << 20), "two sparse images are one hole");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&b)
            .and_then(|f| f.write_all_at(&[7; 4096], 4096))
            .expect("write");
        assert!(f.is_hole(0, 1 << 20));
        assert!(!f.is_hole((1 << 20) - 4096, 16384), "a range into b's data");
    }

    proptest! {
        /// Any range of the concatenation reads exactly the bytes of the
        /// images laid end to end.
        #[test]
        fn members_read_as_one_range(
            sizes in prop::collection::vec(0usize..3000, 1..5),
            seed in any::<u8>(),
            offset in 0usize..12000,
            len in 0usize..6000,
        ) {
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut whole = Vec::new();
            let mut parts = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let bytes: Vec<u8> = (0..*n).map(|j| (j as u8).wrapping_mul(31) ^ seed ^ i as u8).collect();
                whole.extend_from_slice(&bytes);
                parts.push(image(tmp.path(), &format!("p{i}"), &bytes));
            }
            let f = DiskImage::members("g", parts).open().expect("open");
            prop_assert_eq!(f.len(), whole.len() as u64);
            let mut buf = vec![0u8; len];
            let r = f.read_exact_at(&mut buf, offset as u64);
            if offset + len <= whole.len() {
                prop_assert!(r.is_ok());
                prop_assert_eq!(&buf[..], &whole[offset..offset + len]);
            } else {
                prop_assert!(r.is_err());
            }
        }
    }
}
