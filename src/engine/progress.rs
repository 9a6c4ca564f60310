//! Progress of a synchronisation's disk: a line in the logs every
//! [`LOG_EVERY`] (bytes gone through, total, rate, bytes sent), and a
//! progress bar on stderr when stderr is a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a progress line is logged during a sync.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct SyncProgress {
    started: Instant,
    last_log: Instant,
    mode: &'static str,
    bar: Option<ProgressBar>,
}

impl Default for SyncProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncProgress {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            last_log: Instant::now(),
            mode: "",
            bar: None,
        }
    }

    /// A sync of a `total`-byte disk starts.
    pub fn start(&mut self, total: u64, mode: &'static str) {
        self.finish();
        self.started = Instant::now();
        self.last_log = Instant::now();
        self.mode = mode;
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("disk sync ({mode})"));
            self.bar = Some(bar);
        }
    }

    /// `done` of `total` disk bytes gone through, `sent` sent.
    pub fn update(&mut self, done: u64, total: u64, sent: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
        if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                mode = self.mode,
                done_bytes = done,
                total_bytes = total,
                sent_bytes = sent,
                percent = format!("{:.1}", done as f64 * 100.0 / total.max(1) as f64),
                rate_mib_s = format!("{:.1}", done as f64 / secs / (1 << 20) as f64),
                "disk sync progress"
            );
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
