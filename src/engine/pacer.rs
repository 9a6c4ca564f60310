//! When to take the next checkpoint.
//!
//! The configured interval is the target. When the backup falls behind
//! (epochs in flight reach the limit, or the bytes in flight would take
//! longer than one interval to drain at the measured goodput), the interval
//! stretches, doubling up to a ceiling, so the primary never queues
//! without bound; it shrinks back by a quarter per epoch once the link
//! keeps up. A full output buffer asks for a checkpoint at once (output
//! waits for the checkpoint, so taking it early releases it sooner).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Take a checkpoint now.
    Checkpoint,
    /// Wait until then (or for an acknowledgement).
    WaitUntil(Instant),
    /// Too many epochs in flight: wait for an acknowledgement.
    WaitForAck,
}

#[derive(Debug)]
pub struct Pacer {
    target: Duration,
    max: Duration,
    current: Duration,
    max_in_flight: u32,
    last_checkpoint: Instant,
    stretched_logged: bool,
}

impl Pacer {
    pub fn new(target: Duration, max_in_flight: u32, now: Instant) -> Self {
        Self {
            target,
            max: (target * 16).max(Duration::from_secs(2)),
            current: target,
            max_in_flight: max_in_flight.max(1),
            last_checkpoint: now,
            stretched_logged: false,
        }
    }

    /// The interval in force now.
    pub fn interval(&self) -> Duration {
        self.current
    }

    pub fn is_stretched(&self) -> bool {
        self.current > self.target
    }

    /// Decides, given the epochs in flight and whether the output buffer
    /// is under pressure.
    pub fn decide(&self, now: Instant, in_flight: u32, output_pressure: bool) -> Decision {
        if in_flight >= self.max_in_flight {
            return Decision::WaitForAck;
        }
        let due = self.last_checkpoint + self.current;
        if output_pressure || now >= due {
            Decision::Checkpoint
        } else {
            Decision::WaitUntil(due)
        }
    }

    /// A checkpoint was taken at `now`; `backlog` is how long the link
    /// needs to drain what is in flight (bytes in flight / goodput).
    pub fn checkpoint_taken(&mut self, now: Instant, in_flight: u32, backlog: Duration) {
        self.last_checkpoint = now;
        let behind = in_flight + 1 >= self.max_in_flight || backlog > self.current;
        if behind {
            let next = (self.current * 2).min(self.max);
            if next != self.current && !self.stretched_logged {
                tracing::warn!(
                    interval_ms = next.as_millis() as u64,
                    target_ms = self.target.as_millis() as u64,
                    backlog_ms = backlog.as_millis() as u64,
                    "backup link cannot keep up: stretching the epoch interval"
                );
                self.stretched_logged = true;
            }
            self.current = next;
        } else if self.current > self.target {
            self.current = (self.current - self.current / 4).max(self.target);
            if self.current == self.target {
                tracing::info!(
                    interval_ms = self.target.as_millis() as u64,
                    "backup link keeps up again: epoch interval back to target"
                );
                self.stretched_logged = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn checkpoints_at_the_target_interval_when_the_link_keeps_up() {
        let t0 = Instant::now();
        let mut p = Pacer::new(MS(100), 4, t0);
        assert_eq!(
            p.decide(t0 + MS(50), 0, false),
            Decision::WaitUntil(t0 + MS(100))
        );
        assert_eq!(p.decide(t0 + MS(100), 0, false), Decision::Checkpoint);
        p.checkpoint_taken(t0 + MS(100), 1, MS(10));
        assert_eq!(p.interval(), MS(100));
    }

    #[test]
    fn waits_for_acks_at_the_in_flight_limit() {
        let t0 = Instant::now();
        let p = Pacer::new(MS(100), 4, t0);
        assert_eq!(p.decide(t0 + MS(500), 4, true), Decision::WaitForAck);
    }

    #[test]
    fn stretches_when_behind_and_recovers_when_caught_up() {
        let t0 = Instant::now();
        let mut p = Pacer::new(MS(100), 4, t0);
        let mut now = t0;
        for _ in 0..10 {
            now += p.interval();
            p.checkpoint_taken(now, 2, MS(5000));
        }
        assert!(p.is_stretched());
        assert_eq!(
            p.interval(),
            Duration::from_secs(2),
            "bounded by the ceiling"
        );
        for _ in 0..30 {
            now += p.interval();
            p.checkpoint_taken(now, 0, MS(1));
        }
        assert_eq!(p.interval(), MS(100));
    }

    #[test]
    fn output_pressure_checkpoints_early() {
        let t0 = Instant::now();
        let p = Pacer::new(MS(100), 4, t0);
        assert_eq!(p.decide(t0 + MS(1), 1, true), Decision::Checkpoint);
    }
}
