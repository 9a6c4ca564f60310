//! Sender side: which repair datagrams to send for the bytes written.
//!
//! The encoder sees every byte the stream accepted, in order, so it knows
//! each byte's stream offset. Bytes written since the last burst end form a
//! window; at the burst end ([`Encoder::flush`]: the session has nothing
//! more to write) or when the window reaches its cap (a big resync) it
//! closes the window: a short one is mirrored verbatim, a longer one is cut
//! into shards of one datagram each and `R` Reed-Solomon recovery shards
//! are sent. Any `R` lost shards (data or recovery) of the window can then
//! be rebuilt by the receiver without a retransmission.

use bytes::Bytes;

use super::loss::LossEstimate;
use super::wire::{
    Datagram, WindowShape, MAX_RECOVERY_COUNT, MAX_SHARD_COUNT, MAX_SHARD_SIZE, MIRROR_HEADER,
    REPAIR_HEADER,
};

/// How much redundancy to send.
#[derive(Debug, Clone)]
pub struct FecParams {
    /// Largest shard (bytes); the datagram size usually limits it first.
    pub max_shard: usize,
    /// A window closes at this many bytes even without a burst end.
    pub window_cap: usize,
    /// Fewest recovery shards of a window: a lost tail packet damages two
    /// shards, and a recovery shard may be lost too.
    pub min_recovery: usize,
    /// Most recovery shards, as a fraction of the data shards (above
    /// `min_recovery`).
    pub max_overhead: f64,
    /// Recovery shards cover the expected damage plus this many standard
    /// deviations of it ...
    pub sigmas: f64,
    /// ... plus this many.
    pub spare: usize,
    /// Data shards damaged per lost stream packet: a shard is about one
    /// packet's worth of stream bytes, so a lost packet straddles two.
    pub shards_per_loss: f64,
    /// Loss rate assumed before the connection measured one, and the cap
    /// of the estimate ([`LossEstimate`]). The cap is the highest random
    /// loss FEC is sized for (2 %, the benchmark's worst): above it, what
    /// quinn counts as lost is mostly BBR's own queue overflow while it
    /// saturates the path, which repairs only add to. With 3 % the repairs
    /// took ~9 % of a saturated link and goodput fell below QUIC without
    /// FEC; 1 % kept goodput level but protected less (docs/transport.md).
    pub initial_loss: f64,
    pub max_loss: f64,
}

impl Default for FecParams {
    fn default() -> Self {
        Self {
            max_shard: MAX_SHARD_SIZE,
            window_cap: 4 << 20,
            min_recovery: 4,
            max_overhead: 0.10,
            sigmas: 4.0,
            spare: 2,
            shards_per_loss: 2.0,
            initial_loss: 0.01,
            max_loss: 0.02,
        }
    }
}

/// What the encoder sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncoderStats {
    pub windows: u64,
    pub data_shards: u64,
    pub repairs: u64,
    pub mirrors: u64,
    /// Payload bytes of repair and mirror datagrams.
    pub redundant_bytes: u64,
    /// Windows sent without redundancy (no datagram room).
    pub unprotected: u64,
}

#[derive(Debug)]
pub struct Encoder {
    params: FecParams,
    /// Stream offset of the first byte of `window`.
    start: u64,
    window: Vec<u8>,
    loss: LossEstimate,
    stats: EncoderStats,
}

impl Encoder {
    pub fn new(params: FecParams) -> Self {
        Self {
            loss: LossEstimate::new(params.initial_loss, params.max_loss),
            window: Vec::new(),
            start: 0,
            params,
            stats: EncoderStats::default(),
        }
    }

    /// Stream offset of the next byte.
    pub fn offset(&self) -> u64 {
        self.start + self.window.len() as u64
    }

    pub fn stats(&self) -> EncoderStats {
        self.stats
    }

    pub fn loss_rate(&self) -> f64 {
        self.loss.rate()
    }

    /// The connection's cumulative sent / lost packet counters.
    pub fn observe_path(&mut self, sent_packets: u64, lost_packets: u64) {
        self.loss.observe(sent_packets, lost_packets);
    }

    /// Records bytes the stream accepted. `max_datagram`: the largest
    /// datagram the connection can send now (`None`: none at all).
    pub fn record(&mut self, mut data: &[u8], max_datagram: Option<usize>, out: &mut Vec<Bytes>) {
        while !data.is_empty() {
            let take = (self.params.window_cap - self.window.len()).min(data.len());
            self.window.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.window.len() >= self.params.window_cap {
                self.close_window(max_datagram, out);
            }
        }
    }

    /// The burst ended: protect what was written since the last one.
    pub fn flush(&mut self, max_datagram: Option<usize>, out: &mut Vec<Bytes>) {
        if !self.window.is_empty() {
            self.close_window(max_datagram, out);
        }
    }

    /// Recovery shards for a window of `k` data shards at the current loss
    /// estimate: the expected damaged shards plus `sigmas` standard
    /// deviations plus `spare`, within [min_recovery, max(min_recovery,
    /// k * max_overhead)].
    pub fn recovery_count(&self, k: usize) -> usize {
        let p = &self.params;
        let lost_packets = self.loss.rate() * k as f64;
        let want =
            p.shards_per_loss * (lost_packets + p.sigmas * lost_packets.sqrt()) + p.spare as f64;
        let cap = ((k as f64 * p.max_overhead).ceil() as usize).max(p.min_recovery);
        (want.ceil() as usize)
            .clamp(p.min_recovery, cap)
            .min(MAX_RECOVERY_COUNT)
    }

    fn close_window(&mut self, max_datagram: Option<usize>, out: &mut Vec<Bytes>) {
        let start = self.start;
        let len = self.window.len();
        self.start += len as u64;
        self.stats.windows += 1;
        let data = std::mem::take(&mut self.window);
        let Some(max) = max_datagram else {
            self.stats.unprotected += 1;
            return;
        };
        if len + MIRROR_HEADER <= max {
            self.stats.mirrors += 1;
            self.stats.redundant_bytes += len as u64;
            out.push(
                Datagram::Mirror {
                    offset: start,
                    bytes: Bytes::from(data),
                }
                .encode(),
            );
            return;
        }
        let shard = max
            .saturating_sub(REPAIR_HEADER)
            .min(self.params.max_shard)
            .min(MAX_SHARD_SIZE)
            & !1;
        let k = len.div_ceil(shard.max(1));
        if shard < 64 || k > MAX_SHARD_COUNT || len > u32::MAX as usize {
            self.stats.unprotected += 1;
            return;
        }
        let r = self.recovery_count(k);
        let shape = WindowShape {
            start,
            len: len as u32,
            shard_size: shard as u16,
            shard_count: k as u16,
            recovery_count: r as u16,
        };
        let last = {
            let mut v = data[(k - 1) * shard..].to_vec();
            v.resize(shard, 0);
            v
        };
        let originals = data[..(k - 1) * shard]
            .chunks(shard)
            .chain(std::iter::once(last.as_slice()));
        let Ok(recovery) = reed_solomon_simd::encode(k, r, originals) else {
            self.stats.unprotected += 1;
            return;
        };
        self.stats.data_shards += k as u64;
        for (index, shard) in recovery.into_iter().enumerate() {
            self.stats.repairs += 1;
            self.stats.redundant_bytes += shard.len() as u64;
            out.push(
                Datagram::Repair {
                    shape,
                    index: index as u16,
                    shard: Bytes::from(shard),
                }
                .encode(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_follows_the_loss_within_its_bounds() {
        let mut e = Encoder::new(FecParams {
            max_loss: 0.03,
            ..FecParams::default()
        });
        let (mut s, mut l) = (0u64, 0u64);
        e.observe_path(s, l);
        for _ in 0..60 {
            s += 1000;
            l += 5;
            e.observe_path(s, l);
        }
        // ~0.5 % on a 1 MiB epoch (~740 shards): 2 x (3.7 + 4 x 1.9) + 2
        let r = e.recovery_count(740);
        assert!((24..=26).contains(&r), "{r}");
        assert_eq!(e.recovery_count(3), 4, "the floor covers a tail loss");
        for _ in 0..60 {
            s += 1000;
            l += 500;
            e.observe_path(s, l);
        }
        assert_eq!(e.recovery_count(740), 74, "capped at 10 %");
        // The default caps the loss estimate at 2 %: 2 x (14.8 + 4 x 3.85) + 2.
        let mut d = Encoder::new(FecParams::default());
        d.observe_path(0, 0);
        for i in 1..=40 {
            d.observe_path(i * 1000, i * 500);
        }
        assert_eq!(d.recovery_count(740), 63);
    }

    #[test]
    fn short_bursts_are_mirrored_and_long_ones_get_repairs() {
        let mut e = Encoder::new(FecParams::default());
        let mut out = Vec::new();
        e.record(b"commit 7", Some(1200), &mut out);
        e.flush(Some(1200), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            Datagram::decode(out[0].clone()),
            Ok(Datagram::Mirror {
                offset: 0,
                bytes: Bytes::from_static(b"commit 7")
            })
        );
        out.clear();
        e.record(&vec![1u8; 10_000], Some(1200), &mut out);
        assert!(out.is_empty(), "nothing before the burst ends");
        e.flush(Some(1200), &mut out);
        assert_eq!(e.offset(), 10_008);
        let Ok(Datagram::Repair { shape, .. }) = Datagram::decode(out[0].clone()) else {
            panic!("not a repair");
        };
        assert_eq!(shape.start, 8);
        assert_eq!(shape.len, 10_000);
        assert_eq!(usize::from(shape.shard_size), 1200 - REPAIR_HEADER - 1);
        assert_eq!(out.len(), usize::from(shape.recovery_count));
        // No datagrams possible: the offsets still advance.
        out.clear();
        e.record(b"abc", None, &mut out);
        e.flush(None, &mut out);
        assert!(out.is_empty());
        assert_eq!(e.offset(), 10_011);
    }

    #[test]
    fn a_window_closes_at_its_cap() {
        let mut e = Encoder::new(FecParams {
            window_cap: 50_000,
            ..FecParams::default()
        });
        let mut out = Vec::new();
        e.record(&vec![3u8; 120_000], Some(1400), &mut out);
        let starts: std::collections::BTreeSet<u64> = out
            .iter()
            .filter_map(|d| match Datagram::decode(d.clone()) {
                Ok(Datagram::Repair { shape, .. }) => Some(shape.start),
                _ => None,
            })
            .collect();
        assert_eq!(starts.into_iter().collect::<Vec<_>>(), vec![0, 50_000]);
    }
}
