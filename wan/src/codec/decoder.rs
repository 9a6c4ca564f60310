//! The receiver side: verifies an epoch completely and stages it.
//!
//! Order of checks (docs/wire-format.md, "What the decoder rejects"): magic,
//! version, lengths, checksum, header fields against the replica, then every
//! record. Only a fully verified epoch comes back, as a [`StagedEpoch`].

use std::sync::Mutex;
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_128;

use super::block::{read_block, RawBlock};
use super::chunk_decode::{CallerWork, ChunkDecompressor, ChunkJob, ChunkQueue};
use super::cpu_time::thread_cpu_time;
use super::encoder::EncoderConfig;
use super::error::CodecError;
use super::format::{
    Header, BLOCK_STORED, BLOCK_ZSTD_REFS, HEADER_LEN, MAGIC, MAX_CHUNK_RAW, MAX_CHUNK_REFS,
    MAX_PAGE_SIZE, MIN_PAGE_SIZE, NO_BASE, REC_DELTA_RLE, REC_DELTA_ZSTD, REC_FULL_RAW,
    REC_FULL_ZSTD, REC_PREFIX_ZSTD, REC_REF, REC_ZERO, TRAILER_LEN, VERSION, VERSION_PREFIX,
    VERSION_REFS,
};
use super::helper_threads::HelperThreads;
use super::memory::PageSource;
use super::parallel::{EpochTiming, ModeChooser};
use super::prefix::PrefixDecompressor;
use super::staged::{DiskWrite, StagedEpoch};
use super::wire::Reader;

/// Receiver limits. Anything above them is rejected as [`CodecError::Oversized`]
/// before memory is allocated for it.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Epochs for another VM are rejected. `None` accepts any VM id.
    pub vm_id: Option<u64>,
    /// Largest whole epoch on the wire.
    pub max_epoch_bytes: u64,
    /// Largest device/vCPU state blob.
    pub max_state_bytes: u64,
    /// Largest single disk write.
    pub max_disk_write_bytes: u64,
    /// Largest sum of disk writes in one epoch.
    pub max_disk_total_bytes: u64,
    /// Threads that decompress an epoch's record chunks (the calling thread
    /// included; `chunk_decode.rs`). The result, errors included, is the
    /// same for every count. `1` (or `0`): the calling thread only.
    /// Default: the machine's available parallelism, at most 4.
    pub threads: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            vm_id: None,
            max_epoch_bytes: 16 << 30,
            max_state_bytes: 256 << 20,
            max_disk_write_bytes: 64 << 20,
            max_disk_total_bytes: 4 << 30,
            threads: EncoderConfig::default_threads(),
        }
    }
}

/// Decodes epochs; holds zstd state and scratch reused between epochs.
pub struct Decoder {
    cfg: DecoderConfig,
    /// The calling thread's zstd contexts: chunks, pages, state, disk data.
    main: ChunkDecompressor,
    /// Helper threads' contexts, made on the first epoch that uses them,
    /// one per slot of a round (helper_threads.rs).
    helpers: Vec<Mutex<ChunkDecompressor>>,
    /// The threads that use them, started then and kept.
    threads: Option<HelperThreads>,
    /// Whether helpers paid in the last epoch that used them (the
    /// encoder's rule: on a machine whose other cores are busy, a helper
    /// that is not running holds its chunk, and the epoch waits for it).
    mode: ModeChooser,
    xor: Vec<u8>,
}

impl Decoder {
    pub fn new(cfg: DecoderConfig) -> Result<Self, CodecError> {
        Ok(Decoder {
            cfg,
            main: ChunkDecompressor::new()?,
            helpers: Vec::new(),
            threads: None,
            mode: ModeChooser::default(),
            xor: Vec::new(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Tests and fuzzing: always (`Some(true)`) or never use the helper
    /// threads where the epoch allows, whatever the timings say.
    pub(crate) fn force_helpers(&mut self, forced: Option<bool>) {
        self.mode.forced = forced;
    }

    /// Verifies `bytes` against `replica` and stages the epoch. The replica is
    /// only read; on error nothing about it changes.
    pub fn decode<S: PageSource + Sync + ?Sized>(
        &mut self,
        bytes: &[u8],
        replica: &S,
    ) -> Result<StagedEpoch, CodecError> {
        let header = self.verify_frame(bytes)?;
        self.check_header(&header, replica)?;
        let body = &bytes[HEADER_LEN..HEADER_LEN + header.body_len as usize];
        let mut r = Reader::new(body, "body");
        let page_size = header.page_size as usize;
        let frames = replica.frame_count();
        let mut staged = StagedEpoch::new(
            header.vm_id,
            header.epoch,
            header.base(),
            page_size,
            frames,
            header.record_count as usize,
        );
        if self.xor.len() != page_size {
            self.xor = vec![0; page_size];
        }

        self.read_chunks(&mut r, &header, replica, &mut staged)?;

        let state = read_block(&mut r, "state blob", self.cfg.max_state_bytes, false)?;
        state.decode_into(&mut staged.state_blob, &mut self.main.dz, "state blob")?;

        let mut disk_total = 0u64;
        for _ in 0..header.disk_write_count {
            let offset = r.u64()?;
            let block = read_block(&mut r, "disk write", self.cfg.max_disk_write_bytes, false)?;
            disk_total += block.raw_len;
            if disk_total > self.cfg.max_disk_total_bytes {
                return Err(CodecError::Oversized {
                    what: "disk writes of one epoch",
                    len: disk_total,
                    limit: self.cfg.max_disk_total_bytes,
                });
            }
            let mut data = Vec::new();
            block.decode_into(&mut data, &mut self.main.dz, "disk write")?;
            staged.disk_writes.push(DiskWrite { offset, data });
        }
        if !r.is_empty() {
            return Err(CodecError::corrupt(format!(
                "{} bytes left in the body after the last section",
                r.remaining()
            )));
        }
        Ok(staged)
    }

    /// Magic, version, lengths and checksum: everything that does not need
    /// the replica.
    fn verify_frame(&self, bytes: &[u8]) -> Result<Header, CodecError> {
        let mut r = Reader::new(bytes, "header");
        let mut magic = [0u8; 4];
        magic.copy_from_slice(r.bytes(4)?);
        if magic != MAGIC {
            return Err(CodecError::BadMagic { found: magic });
        }
        let version = r.u16()?;
        if !(super::format::MIN_VERSION..=VERSION).contains(&version) {
            return Err(CodecError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let header_len = r.u16()?;
        if usize::from(header_len) != HEADER_LEN {
            return Err(CodecError::corrupt(format!(
                "header length {header_len}, version 1 has {HEADER_LEN}"
            )));
        }
        if bytes.len() < HEADER_LEN {
            return Err(CodecError::Truncated {
                what: "header",
                needed: HEADER_LEN as u64,
                available: bytes.len() as u64,
            });
        }
        let flags = r.u32()?;
        let page_size = r.u32()?;
        let vm_id = r.u64()?;
        let epoch = r.u64()?;
        let base_epoch = r.u64()?;
        let record_count = r.u32()?;
        let chunk_count = r.u32()?;
        let disk_write_count = r.u32()?;
        let _reserved = r.u32()?;
        let body_len = r.u64()?;
        let header = Header {
            version,
            flags,
            page_size,
            vm_id,
            epoch,
            base_epoch,
            record_count,
            chunk_count,
            disk_write_count,
            body_len,
        };

        let limit = self.cfg.max_epoch_bytes;
        let total = body_len
            .checked_add((HEADER_LEN + TRAILER_LEN) as u64)
            .filter(|&t| t <= limit)
            .ok_or(CodecError::Oversized {
                what: "epoch",
                len: body_len,
                limit,
            })?;
        let have = bytes.len() as u64;
        if have < total {
            return Err(CodecError::Truncated {
                what: "epoch",
                needed: total,
                available: have,
            });
        }
        if have > total {
            return Err(CodecError::TrailingBytes {
                extra: have - total,
            });
        }
        let covered = total as usize - TRAILER_LEN;
        let mut trailer = [0u8; TRAILER_LEN];
        trailer.copy_from_slice(&bytes[covered..]);
        let expected = u128::from_le_bytes(trailer);
        let computed = xxh3_128(&bytes[..covered]);
        if expected != computed {
            return Err(CodecError::ChecksumMismatch { expected, computed });
        }
        // Checked after the checksum, so that a flipped bit reads as corruption
        // of the transfer, and an intact epoch with flags as a version problem.
        if flags != 0 {
            return Err(CodecError::UnsupportedFlags { flags });
        }
        Ok(header)
    }

    fn check_header<S: PageSource + ?Sized>(
        &self,
        h: &Header,
        replica: &S,
    ) -> Result<(), CodecError> {
        if let Some(vm) = self.cfg.vm_id {
            if vm != h.vm_id {
                return Err(CodecError::VmMismatch {
                    expected: vm,
                    found: h.vm_id,
                });
            }
        }
        let ps = u64::from(h.page_size);
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(CodecError::corrupt(format!("invalid page size {ps}")));
        }
        if ps != replica.page_size() as u64 {
            return Err(CodecError::PageSizeMismatch {
                expected: replica.page_size() as u64,
                found: ps,
            });
        }
        if h.epoch == NO_BASE {
            return Err(CodecError::corrupt("epoch number u64::MAX is reserved"));
        }
        if let Some(base) = h.base() {
            if h.epoch <= base {
                return Err(CodecError::corrupt(format!(
                    "epoch {} is not after its base {base}",
                    h.epoch
                )));
            }
            if replica.committed_epoch() != Some(base) {
                return Err(CodecError::BaseMismatch {
                    epoch: h.epoch,
                    base,
                    committed: replica.committed_epoch(),
                });
            }
        }
        if u64::from(h.record_count) > replica.frame_count() {
            return Err(CodecError::Oversized {
                what: "record count",
                len: u64::from(h.record_count),
                limit: replica.frame_count(),
            });
        }
        if h.chunk_count > h.record_count {
            return Err(CodecError::corrupt("more chunks than records"));
        }
        Ok(())
    }

    fn read_chunks<S: PageSource + Sync + ?Sized>(
        &mut self,
        r: &mut Reader<'_>,
        h: &Header,
        replica: &S,
        staged: &mut StagedEpoch,
    ) -> Result<(), CodecError> {
        if self.cfg.threads > 1 && h.chunk_count >= 2 {
            if let Some((jobs, rest)) = self.locate_chunks(r, h, replica) {
                // Forced (tests, fuzzing): whatever the chunks' sizes.
                let forced = self.mode.forced == Some(true);
                if (forced || worth_helpers(&jobs)) && self.mode.use_helpers() {
                    *r = rest;
                    return self.read_chunks_parallel(&jobs, h, replica, staged);
                }
            }
        }
        let mut records = 0u64;
        let mut predicted = 0u64;
        // Decoded chunks are kept for the staged epoch: raw pages and delta
        // runs are applied straight from them.
        let mut chunks: Vec<Vec<u8>> = Vec::with_capacity((h.chunk_count as usize).min(1024));
        for _ in 0..h.chunk_count {
            let (n, block) = read_chunk_header(r, h, &mut records)?;
            let mut buf = Vec::new();
            if block.method == BLOCK_ZSTD_REFS {
                self.decode_refs_chunk(&block, h, replica, &mut buf)?;
            } else {
                block.decode_into(&mut buf, &mut self.main.dz, "record chunk")?;
            }
            chunks.push(buf);
            predicted = self.read_chunk_records(n, h, replica, staged, &chunks, predicted)?;
        }
        if records != u64::from(h.record_count) {
            return Err(CodecError::corrupt(
                "chunk record counts disagree with header",
            ));
        }
        staged.set_chunks(chunks);
        Ok(())
    }

    /// A `BLOCK_ZSTD_REFS` chunk: the frame list, the prefix assembled from
    /// the replica's committed content of those frames, then the zstd
    /// frame, which must decode to exactly `raw_len` bytes.
    fn decode_refs_chunk<S: PageSource + ?Sized>(
        &mut self,
        block: &RawBlock<'_>,
        h: &Header,
        replica: &S,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let mut frames = Vec::new();
        let z = refs_frames(block, h, replica, &mut frames)?;
        self.main.refs(z, &frames, replica, block.raw_len, out)
    }

    /// Every chunk's header and block, and the prefix frame lists of
    /// `BLOCK_ZSTD_REFS` chunks, read ahead of any decompression; with the
    /// reader past the last chunk. `None` when anything there is wrong:
    /// the single-thread path then reports it, in its order.
    fn locate_chunks<'a, S: PageSource + ?Sized>(
        &self,
        r: &Reader<'a>,
        h: &Header,
        replica: &S,
    ) -> Option<(Vec<ChunkJob<'a>>, Reader<'a>)> {
        let mut scan = r.clone();
        let mut records = 0u64;
        let mut jobs = Vec::with_capacity((h.chunk_count as usize).min(1024));
        for _ in 0..h.chunk_count {
            let (n, block) = read_chunk_header(&mut scan, h, &mut records).ok()?;
            let mut refs = Vec::new();
            let refs_frame = if block.method == BLOCK_ZSTD_REFS {
                refs_frames(&block, h, replica, &mut refs).ok()?
            } else {
                &[]
            };
            jobs.push(ChunkJob {
                records: n,
                block,
                refs_frame,
                refs,
            });
        }
        (records == u64::from(h.record_count)).then_some((jobs, scan))
    }

    /// [`Decoder::read_chunks`] with the chunks decompressed on several
    /// threads, each chunk's records read in order as soon as it is ready.
    fn read_chunks_parallel<S: PageSource + Sync + ?Sized>(
        &mut self,
        jobs: &[ChunkJob<'_>],
        h: &Header,
        replica: &S,
        staged: &mut StagedEpoch,
    ) -> Result<(), CodecError> {
        let want = (self.cfg.threads - 1).min(jobs.len() - 1);
        while self.helpers.len() < want {
            self.helpers.push(Mutex::new(ChunkDecompressor::new()?));
        }
        let helpers = std::mem::take(&mut self.helpers);
        let mut threads = self
            .threads
            .take()
            .unwrap_or_else(|| HelperThreads::new(self.cfg.threads - 1, "codec-unzstd"));
        let queue = ChunkQueue::new(jobs);
        let (started, cpu_at_start) = (Instant::now(), thread_cpu_time());
        let mut me = CallerWork::default();
        let job = |slot: usize| {
            let mut ctx = helpers[slot].lock().unwrap_or_else(|e| e.into_inner());
            queue.help(&mut ctx, replica);
        };
        let chunks = threads.run(want, &job, |_| {
            let r = self.read_queued_chunks(&queue, h, replica, staged, &mut me);
            queue.stop();
            r
        });
        self.threads = Some(threads);
        self.helpers = helpers;
        let busy = match (cpu_at_start, thread_cpu_time()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        self.mode.record(
            started.elapsed(),
            EpochTiming::of(busy, me.idle, (me.bytes, me.time), queue.helper_bytes()),
        );
        staged.set_chunks(chunks?);
        Ok(())
    }

    /// The records of each chunk of `queue`, in order, as the chunks
    /// become ready; the decoded chunks.
    fn read_queued_chunks<S: PageSource + Sync + ?Sized>(
        &mut self,
        queue: &ChunkQueue<'_, '_>,
        h: &Header,
        replica: &S,
        staged: &mut StagedEpoch,
        me: &mut CallerWork,
    ) -> Result<Vec<Vec<u8>>, CodecError> {
        let jobs = queue.jobs();
        let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(jobs.len());
        let mut predicted = 0u64;
        for (i, job) in jobs.iter().enumerate() {
            chunks.push(queue.take(i, &mut self.main, replica, me)?);
            predicted =
                self.read_chunk_records(job.records, h, replica, staged, &chunks, predicted)?;
        }
        Ok(chunks)
    }

    /// The `n` records of the last chunk of `chunks`, which must hold
    /// exactly those; returns the next predicted frame.
    fn read_chunk_records<S: PageSource + ?Sized>(
        &mut self,
        n: u32,
        h: &Header,
        replica: &S,
        staged: &mut StagedEpoch,
        chunks: &[Vec<u8>],
        mut predicted: u64,
    ) -> Result<u64, CodecError> {
        let cur = chunks.len() - 1;
        let mut cr = Reader::new(&chunks[cur], "page record");
        for _ in 0..n {
            predicted = self.read_record(&mut cr, h, replica, staged, chunks, cur, predicted)?;
        }
        if !cr.is_empty() {
            return Err(CodecError::corrupt(
                "bytes after the last record of a chunk",
            ));
        }
        Ok(predicted)
    }

    /// Decodes one record of chunk `cur` into `staged`; returns the next
    /// predicted frame.
    #[allow(clippy::too_many_arguments)]
    fn read_record<S: PageSource + ?Sized>(
        &mut self,
        r: &mut Reader<'_>,
        h: &Header,
        replica: &S,
        staged: &mut StagedEpoch,
        chunks: &[Vec<u8>],
        cur: usize,
        predicted: u64,
    ) -> Result<u64, CodecError> {
        let frames = replica.frame_count();
        let ps = h.page_size as usize;
        let kind = r.u8()?;
        let frame = predicted.wrapping_add(r.zigzag()? as u64);
        if frame >= frames {
            return Err(CodecError::FrameOutOfRange { frame, frames });
        }
        if staged.contains(frame) {
            return Err(CodecError::DuplicateFrame { frame });
        }
        let payload_len = |r: &mut Reader<'_>| -> Result<usize, CodecError> {
            let len = r.uleb()?;
            if len > ps as u64 {
                return Err(CodecError::Oversized {
                    what: "page record payload",
                    len,
                    limit: ps as u64,
                });
            }
            Ok(len as usize)
        };
        let no_base = |reason| CodecError::BadReference {
            frame,
            target: frame,
            reason,
        };
        match kind {
            REC_ZERO => staged.push_zero(frame)?,
            REC_REF => {
                let src = frame.wrapping_add(r.zigzag()? as u64);
                if src >= frames {
                    return Err(CodecError::FrameOutOfRange { frame: src, frames });
                }
                if src == frame {
                    return Err(CodecError::BadReference {
                        frame,
                        target: src,
                        reason: "reference to itself",
                    });
                }
                if staged.contains(src) {
                    staged.push_copy_of_staged(frame, src, replica.page(src), chunks)?;
                } else if h.base().is_some() {
                    staged.push_page(frame, replica.page(src))?;
                } else {
                    return Err(CodecError::BadReference {
                        frame,
                        target: src,
                        reason: "committed content referenced by an epoch without base",
                    });
                }
            }
            REC_DELTA_RLE => {
                if h.base().is_none() {
                    return Err(no_base("delta in an epoch without base"));
                }
                let n = payload_len(r)?;
                let at = r.position();
                staged.push_delta(frame, cur, at, r.bytes(n)?)?;
            }
            REC_DELTA_ZSTD => {
                if h.base().is_none() {
                    return Err(no_base("delta in an epoch without base"));
                }
                let n = payload_len(r)?;
                let z = r.bytes(n)?;
                decompress_page(&mut self.main.dz, z, &mut self.xor)?;
                let page = staged.push_page(frame, replica.page(frame))?;
                for (d, x) in page.iter_mut().zip(&self.xor) {
                    *d ^= x;
                }
            }
            REC_FULL_ZSTD => {
                let n = payload_len(r)?;
                let z = r.bytes(n)?;
                decompress_page(&mut self.main.dz, z, &mut self.xor)?;
                staged.push_page(frame, &self.xor)?;
            }
            REC_PREFIX_ZSTD if h.version >= VERSION_PREFIX => {
                if h.base().is_none() {
                    return Err(no_base("delta in an epoch without base"));
                }
                let n = payload_len(r)?;
                let z = r.bytes(n)?;
                let old = replica.page(frame);
                decompress_with_prefix(&mut self.main.pd, z, old, &mut self.xor)?;
                staged.push_page(frame, &self.xor)?;
            }
            REC_FULL_RAW => {
                let at = r.position();
                r.bytes(ps)?;
                staged.push_raw(frame, cur, at)?;
            }
            k => return Err(CodecError::corrupt(format!("unknown page record kind {k}"))),
        }
        Ok(frame.wrapping_add(1))
    }
}

/// One chunk's record count and block; `records` sums the counts so far,
/// which may not pass the header's.
fn read_chunk_header<'a>(
    r: &mut Reader<'a>,
    h: &Header,
    records: &mut u64,
) -> Result<(u32, RawBlock<'a>), CodecError> {
    let n = r.u32()?;
    *records += u64::from(n);
    if n == 0 || *records > u64::from(h.record_count) {
        return Err(CodecError::corrupt(
            "chunk record counts disagree with header",
        ));
    }
    let block = read_block(r, "record chunk", MAX_CHUNK_RAW, h.version >= VERSION_REFS)?;
    Ok((n, block))
}

/// Whether a helper thread pays for these chunks: at least two of them are
/// zstd frames of [`MIN_HELPED_CHUNK`] bytes or more. A stored chunk is one
/// copy, and a small frame takes less time than starting a thread (about
/// 35 us here): on the recorded `copy` and `gzip` traces, whose chunks are
/// references or stored, helpers made decode 6-9 % slower.
fn worth_helpers(jobs: &[ChunkJob<'_>]) -> bool {
    jobs.iter()
        .filter(|j| j.block.method != BLOCK_STORED && j.block.raw_len >= MIN_HELPED_CHUNK)
        .count()
        >= 2
}

/// Raw bytes of a zstd chunk worth a helper thread's start.
const MIN_HELPED_CHUNK: u64 = 32 << 10;

/// A `BLOCK_ZSTD_REFS` chunk's frame list, checked against the replica,
/// into `refs`; returns the zstd frame after it.
fn refs_frames<'a, S: PageSource + ?Sized>(
    block: &RawBlock<'a>,
    h: &Header,
    replica: &S,
    refs: &mut Vec<u64>,
) -> Result<&'a [u8], CodecError> {
    if h.base().is_none() {
        return Err(CodecError::BadReference {
            frame: 0,
            target: 0,
            reason: "chunk prefix of committed content in an epoch without base",
        });
    }
    let frames = replica.frame_count();
    let mut r = Reader::new(block.stored, "record chunk prefix");
    let count = r.uleb()?;
    if count == 0 || count > MAX_CHUNK_REFS {
        return Err(CodecError::corrupt(format!(
            "record chunk names {count} prefix frames (1..={MAX_CHUNK_REFS})"
        )));
    }
    refs.clear();
    let mut predicted = 0u64;
    for _ in 0..count {
        let f = predicted.wrapping_add(r.zigzag()? as u64);
        if f >= frames {
            return Err(CodecError::FrameOutOfRange { frame: f, frames });
        }
        refs.push(f);
        predicted = f.wrapping_add(1);
    }
    r.bytes(r.remaining())
}

/// One [`REC_PREFIX_ZSTD`] payload: a zstd frame compressed with `prefix`
/// (the page's committed content) as its single-use dictionary, which must
/// decode to exactly `out.len()` bytes.
fn decompress_with_prefix(
    pd: &mut PrefixDecompressor,
    z: &[u8],
    prefix: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    let n = pd
        .decompress(z, prefix, out)
        .map_err(|e| CodecError::corrupt(format!("bad zstd page: {e}")))?;
    if n != out.len() {
        return Err(CodecError::corrupt(format!(
            "zstd page decodes to {n} bytes, page size is {}",
            out.len()
        )));
    }
    Ok(())
}

fn decompress_page(
    dz: &mut zstd::bulk::Decompressor<'static>,
    z: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    let n = dz
        .decompress_to_buffer(z, out)
        .map_err(|e| CodecError::corrupt(format!("bad zstd page: {e}")))?;
    if n != out.len() {
        return Err(CodecError::corrupt(format!(
            "zstd page decodes to {n} bytes, page size is {}",
            out.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{reseal, Encoder, EncoderConfig, VecMemory};

    /// Pages of text-like bytes: compressible, so every chunk is a zstd frame.
    fn text_pages(count: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
        let words: [&[u8]; 8] = [
            b"replica ",
            b"epoch ",
            b"commit ",
            b"page ",
            b"witness ",
            b"site ",
            b"dc2 ",
            b"\n",
        ];
        let mut x = seed | 1;
        (0..count)
            .map(|f| {
                let mut p = Vec::with_capacity(4096);
                while p.len() < 4096 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    p.extend_from_slice(words[(x % 8) as usize]);
                    p.extend_from_slice(format!("{} ", x % 1000).as_bytes());
                }
                p.truncate(4096);
                (f, p)
            })
            .collect()
    }

    fn decoder(threads: usize) -> Decoder {
        let mut d = Decoder::new(DecoderConfig {
            threads,
            ..DecoderConfig::default()
        })
        .expect("decoder");
        d.force_helpers(Some(true));
        d
    }

    /// Two epochs (the image, then rewrites) of four 64 KiB zstd chunks:
    /// enough for the helper path.
    fn epochs() -> (Vec<u8>, Vec<u8>, VecMemory) {
        let mut enc = Encoder::new(EncoderConfig {
            chunk_bytes: 64 << 10,
            threads: 1,
            ..EncoderConfig::default()
        })
        .expect("encoder");
        let first = text_pages(64, 1);
        let slices: Vec<(u64, &[u8])> = first.iter().map(|(f, p)| (*f, &p[..])).collect();
        let one = enc.encode(1, &slices, b"", &[]).expect("encode");
        enc.acknowledge(1);
        let second = text_pages(64, 2);
        let slices: Vec<(u64, &[u8])> = second.iter().map(|(f, p)| (*f, &p[..])).collect();
        let two = enc.encode(2, &slices, b"", &[]).expect("encode");
        (one, two, VecMemory::new(64, 4096))
    }

    #[test]
    fn two_threads_decode_exactly_what_one_does() {
        let (first, second, empty) = epochs();
        let (mut single, mut double) = (decoder(1), decoder(2));
        let (mut a, mut b) = (empty.clone(), empty);
        for bytes in [&first, &second] {
            single
                .decode(bytes, &a)
                .expect("decode")
                .apply(&mut a)
                .expect("apply");
            double
                .decode(bytes, &b)
                .expect("decode")
                .apply(&mut b)
                .expect("apply");
            assert_eq!(a, b);
        }
        assert_eq!(double.helpers.len(), 1, "the helper path was not taken");
        assert!(single.helpers.is_empty());
    }

    /// Corruptions anywhere in the header or the body (resealed, so that
    /// they reach the parser) give the same error, or the same staged
    /// epoch, on both paths.
    #[test]
    fn two_threads_fail_exactly_as_one_does() {
        let (first, second, mut replica) = epochs();
        decoder(1)
            .decode(&first, &replica)
            .expect("decode")
            .apply(&mut replica)
            .expect("apply");
        let (mut single, mut double) = (decoder(1), decoder(2));
        // Every header byte (counts, lengths, versions), then the body.
        let body = (HEADER_LEN..second.len() - TRAILER_LEN).step_by(61);
        let mut errors = 0;
        for at in (0..HEADER_LEN).chain(body) {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = second.clone();
                bad[at] ^= flip;
                reseal(&mut bad);
                let one = single.decode(&bad, &replica).map(|s| s.page_count());
                let two = double.decode(&bad, &replica).map(|s| s.page_count());
                assert_eq!(one, two, "byte {at} ^ {flip:#x}");
                errors += usize::from(one.is_err());
            }
        }
        assert!(errors > 100, "only {errors} corruptions were refused");
        assert_eq!(double.helpers.len(), 1, "the helper path was not taken");
    }
}
