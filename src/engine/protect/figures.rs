//! Figures of a protected VM for `/status`, `/metrics` and the log.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypervisor::ProtectedGuest;
use tracing::info;
use wan::transport::replication::SenderStatus;

use super::Protector;

impl<G: ProtectedGuest> Protector<G> {
    pub(super) fn set_state(&self, s: &'static str) {
        if let Ok(mut st) = self.stats.lock() {
            st.state = s;
        }
    }

    pub(super) fn publish(&mut self, status: &SenderStatus) {
        let Some(p) = &self.published else { return };
        let now = Instant::now();
        let dt = now.duration_since(self.last_publish.0);
        if dt < Duration::from_millis(500) {
            return;
        }
        let held = self
            .capture
            .io
            .lock()
            .map(|io| io.output.held_bytes())
            .unwrap_or(0);
        let Ok(st) = self.stats.lock() else { return };
        let n = st.epochs.max(1) as f64;
        let v = crate::metrics::VmStatus {
            vm: self.opts.vm.clone(),
            role: "primary".into(),
            state: st.state.into(),
            peer: self.opts.backup.clone(),
            epochs: st.epochs,
            committed_epoch: st.committed,
            epoch_rate_hz: (st.epochs - self.last_publish.1) as f64 / dt.as_secs_f64(),
            pause_p50_us: st.pause_percentile(0.5),
            pause_p99_us: st.pause_percentile(0.99),
            dirty_pages_per_epoch: st.dirty_pages as f64 / n,
            raw_bytes_per_epoch: st.raw_bytes as f64 / n,
            wire_bytes_per_epoch: st.wire_bytes as f64 / n,
            compression_ratio: st.raw_bytes as f64 / st.wire_bytes.max(1) as f64,
            lag_epochs: (self.next_epoch - 1).saturating_sub(st.committed),
            rtt_ms: status.link.as_ref().map(|l| l.rtt.as_secs_f64() * 1e3),
            output_held_bytes: held as u64,
            output_dropped_frames: self.capture.dropped_frames.load(Ordering::Relaxed),
            epochs_rejected: 0,
            interval_ms: self.core.interval().as_millis() as u64,
            fec_redundant_bytes: status.fec.map(|f| f.redundant_bytes_sent),
            fec_datagrams: status.fec.map(|f| f.datagrams_sent),
            fec_rebuilt_shards: None,
            failover: self
                .failover
                .as_ref()
                .map(|f| crate::metrics::FailoverStatus::from_snapshot(&f.arbiter.snapshot())),
            verify: st.verify.clone(),
            verify_totals: st.verify_totals.clone(),
            members: Vec::new(),
        };
        self.last_publish = (now, st.epochs);
        drop(st);
        crate::metrics::publish_vm(p, v);
    }

    pub(super) fn report(&self, status: &SenderStatus) {
        let held = self
            .capture
            .io
            .lock()
            .map(|io| io.output.held_bytes())
            .unwrap_or(0);
        if let Ok(mut st) = self.stats.lock() {
            st.interval_ms = self.core.interval().as_millis() as u64;
            st.output_held_bytes = held;
            st.output_dropped_frames = self.capture.dropped_frames.load(Ordering::Relaxed);
            st.rtt_ms = status.link.as_ref().map(|l| l.rtt.as_secs_f64() * 1e3);
            info!(
                vm = %self.opts.vm,
                epochs = st.epochs,
                committed = st.committed,
                pause_p50_us = st.pause_percentile(0.5),
                pause_p99_us = st.pause_percentile(0.99),
                ratio = format!("{:.1}", st.raw_bytes as f64 / st.wire_bytes.max(1) as f64),
                held_bytes = held,
                interval_ms = st.interval_ms,
                "protecting"
            );
        }
    }
}
