//! Figures of a protected VM (status, metrics, benchmark).

use crate::engine::verify;
use crate::metrics::VerifyTotals;

#[derive(Debug, Clone, Default)]
pub struct ProtectStats {
    pub state: &'static str,
    pub epochs: u64,
    pub committed: u64,
    pub precopy_epochs: u64,
    pub resyncs: u64,
    pub pause_us: Vec<u64>,
    pub dirty_pages: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub output_held_bytes: usize,
    pub output_released_frames: u64,
    pub output_dropped_frames: u64,
    pub interval_ms: u64,
    pub rtt_ms: Option<f64>,
    /// Replication errors survived (session failures, refused epochs,
    /// failed checkpoints): each one ends in a full resync.
    pub replication_errors: u64,
    /// Synchronisations finished, and the last one's disk figures: its
    /// mode, the disk bytes and blocks it sent (not counting the writes
    /// captured meanwhile), the blocks it compared by hash.
    pub syncs: u64,
    pub sync_mode: &'static str,
    pub sync_disk_bytes: u64,
    pub sync_disk_blocks: u64,
    pub sync_blocks_compared: u64,
    /// Disk bytes sent by all synchronisations.
    pub sync_disk_bytes_total: u64,
    /// The sync under way: disk bytes gone through and in all.
    pub sync_progress: Option<(u64, u64)>,
    /// The last (or running) online verify, and totals over all runs.
    pub verify: Option<verify::VerifyProgress>,
    pub verify_totals: VerifyTotals,
}

impl ProtectStats {
    /// Percentile of recent pause times, in microseconds.
    pub fn pause_percentile(&self, p: f64) -> Option<u64> {
        if self.pause_us.is_empty() {
            return None;
        }
        let mut v = self.pause_us.clone();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        v.get(i).copied()
    }
}
