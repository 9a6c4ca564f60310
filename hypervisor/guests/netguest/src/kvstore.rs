//! Key-value store kept as an append-only log on the virtio block device:
//! one 512-byte sector per `SET` (magic, key length, value length, key,
//! value), starting at sector 1. A `SET` is acknowledged only after its
//! sector is written. At boot the log is replayed.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::MmioTransport;

use crate::hal::IdentityHal;

const MAGIC: &[u8; 4] = b"KV01";
const SECTOR: usize = 512;
/// Longest key plus value.
pub const MAX_ENTRY: usize = SECTOR - 8;

/// The block driver type.
pub type Disk = VirtIOBlk<IdentityHal, MmioTransport<'static>>;

/// The store.
pub struct KvStore {
    disk: Option<Disk>,
    next_sector: u64,
    map: BTreeMap<String, String>,
}

impl KvStore {
    /// Replays the log of `disk` (no disk: memory only).
    pub fn open(mut disk: Option<Disk>) -> KvStore {
        let mut map = BTreeMap::new();
        let mut next = 1u64;
        if let Some(d) = &mut disk {
            let cap = d.capacity();
            let mut buf = [0u8; SECTOR];
            while next < cap {
                if d.read_blocks(next as usize, &mut buf).is_err() || &buf[..4] != MAGIC {
                    break;
                }
                let kl = u16::from_le_bytes([buf[4], buf[5]]) as usize;
                let vl = u16::from_le_bytes([buf[6], buf[7]]) as usize;
                if kl + vl > MAX_ENTRY {
                    break;
                }
                let k = String::from_utf8_lossy(&buf[8..8 + kl]).into_owned();
                let v = String::from_utf8_lossy(&buf[8 + kl..8 + kl + vl]).into_owned();
                map.insert(k, v);
                next += 1;
            }
        }
        KvStore {
            disk,
            next_sector: next,
            map,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Looks a key up.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.map.get(k).map(String::as_str)
    }

    /// Stores a key durably (on the disk when there is one).
    pub fn set(&mut self, k: &str, v: &str) -> Result<(), &'static str> {
        if k.len() + v.len() > MAX_ENTRY {
            return Err("entry too large");
        }
        if let Some(d) = &mut self.disk {
            if self.next_sector >= d.capacity() {
                return Err("disk full");
            }
            let mut buf = [0u8; SECTOR];
            buf[..4].copy_from_slice(MAGIC);
            buf[4..6].copy_from_slice(&(k.len() as u16).to_le_bytes());
            buf[6..8].copy_from_slice(&(v.len() as u16).to_le_bytes());
            buf[8..8 + k.len()].copy_from_slice(k.as_bytes());
            buf[8 + k.len()..8 + k.len() + v.len()].copy_from_slice(v.as_bytes());
            d.write_blocks(self.next_sector as usize, &buf)
                .map_err(|_| "disk write failed")?;
            self.next_sector += 1;
        }
        self.map.insert(k.into(), v.into());
        Ok(())
    }

    /// Serves one request line; returns the reply line.
    pub fn handle(&mut self, line: &str) -> String {
        let mut parts = line.trim_end_matches('\r').splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("SET"), Some(k), Some(v)) if !k.is_empty() => match self.set(k, v) {
                Ok(()) => "OK\n".into(),
                Err(e) => alloc::format!("ERR {e}\n"),
            },
            (Some("GET"), Some(k), None) => match self.get(k) {
                Some(v) => alloc::format!("VALUE {v}\n"),
                None => "NONE\n".into(),
            },
            (Some("COUNT"), None, None) => alloc::format!("COUNT {}\n", self.len()),
            _ => "ERR usage: SET key value | GET key | COUNT\n".into(),
        }
    }
}

/// Splits complete lines off `buf`.
pub fn take_lines(buf: &mut Vec<u8>) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(i) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=i).collect();
        out.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
    }
    out
}
