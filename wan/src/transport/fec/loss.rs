//! The packet loss rate the connection measures, smoothed, for sizing the
//! redundancy.
//!
//! Fed with quinn's cumulative sent / lost packet counters. quinn counts a
//! packet dropped by a full bottleneck queue as lost too (BBR overflows
//! its queue while it saturates a path, tens of percent in the benchmark),
//! and redundancy cannot help there: it only adds to the queue. So the
//! estimate is capped (2 % by default, [`super::FecParams::max_loss`]);
//! FEC is for random loss of the order of a percent, retransmission
//! handles the rest. With the `loss-tolerant` controller (the default)
//! nothing overflows the queue after start-up, so these counters are
//! mostly the random loss and the estimate follows the link (20 ms / 0 %:
//! 0.8-1.9 % redundancy instead of BBR's 7 %).

/// Smallest number of newly sent packets that makes a sample: fewer gives
/// a rate too coarse to use (one loss in 20 packets reads as 5 %).
const MIN_SAMPLE_PACKETS: u64 = 200;
/// Weight of a new sample.
const GAIN: f64 = 0.25;

#[derive(Debug, Clone)]
pub struct LossEstimate {
    rate: f64,
    max_rate: f64,
    last: Option<(u64, u64)>,
}

impl LossEstimate {
    /// Starts at `initial` (before any sample), never reports more than
    /// `max_rate`.
    pub fn new(initial: f64, max_rate: f64) -> Self {
        Self {
            rate: initial.clamp(0.0, max_rate),
            max_rate,
            last: None,
        }
    }

    /// The smoothed loss rate (0..=max_rate).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes the connection's cumulative counters.
    pub fn observe(&mut self, sent_packets: u64, lost_packets: u64) {
        let Some((s0, l0)) = self.last else {
            self.last = Some((sent_packets, lost_packets));
            return;
        };
        if sent_packets < s0 || lost_packets < l0 {
            // Counters of another connection: start over from here.
            self.last = Some((sent_packets, lost_packets));
            return;
        }
        let sent = sent_packets - s0;
        if sent < MIN_SAMPLE_PACKETS {
            return;
        }
        let sample = ((lost_packets - l0) as f64 / sent as f64).min(self.max_rate);
        self.rate += (sample - self.rate) * GAIN;
        self.last = Some((sent_packets, lost_packets));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converges_on_the_measured_rate_and_stays_capped() {
        let mut e = LossEstimate::new(0.01, 0.03);
        let (mut s, mut l) = (0, 0);
        e.observe(s, l);
        for _ in 0..40 {
            s += 1000;
            l += 5;
            e.observe(s, l);
        }
        assert!((e.rate() - 0.005).abs() < 1e-4, "{}", e.rate());
        for _ in 0..40 {
            s += 1000;
            l += 400;
            e.observe(s, l);
        }
        assert!((e.rate() - 0.03).abs() < 1e-4);
        // Small samples wait; counters going back start over.
        e.observe(s + 10, l + 10);
        assert!((e.rate() - 0.03).abs() < 1e-4);
        e.observe(0, 0);
        e.observe(1000, 0);
        assert!(e.rate() < 0.03);
    }
}
