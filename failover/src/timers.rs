//! The failover timers and why their defaults are what they are.

use std::time::Duration;

/// Timers of the failover protocol. The safety argument needs
/// `lease <= detection_timeout` (so a dead primary's lease has run out by
/// the time the backup asks for it) and `renew_interval < lease` (so a
/// healthy holder never lets it lapse); [`Timers::validate`] checks both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Period of heartbeats between the two sites.
    pub heartbeat_interval: Duration,
    /// Silence after which the backup considers the primary failed, and
    /// the primary considers itself unprotected.
    pub detection_timeout: Duration,
    /// Validity of a lease granted by the witness.
    pub lease: Duration,
    /// Period of lease renewals (and of takeover requests).
    pub renew_interval: Duration,
    /// Subtracted from every locally computed validity, to absorb clock
    /// rate differences between parties.
    pub clock_margin: Duration,
}

impl Default for Timers {
    /// Defaults for WAN links of up to ~100 ms RTT: a heartbeat every
    /// 200 ms means a 3 s detection timeout tolerates ~14 consecutive lost
    /// heartbeats (a loss burst, a routing flap) before a takeover; the
    /// 2 s lease is renewed every 500 ms, i.e. three renewals may be lost
    /// before the primary has to rely on the backup's promise.
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(200),
            detection_timeout: Duration::from_secs(3),
            lease: Duration::from_secs(2),
            renew_interval: Duration::from_millis(500),
            clock_margin: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimersError {
    #[error("lease ({lease:?}) must not exceed detection_timeout ({detection:?}): a dead primary's lease must have run out when the backup asks for it")]
    LeaseLongerThanDetection {
        lease: Duration,
        detection: Duration,
    },
    #[error("renew_interval ({renew:?}) must be shorter than lease ({lease:?})")]
    RenewTooSlow { renew: Duration, lease: Duration },
    #[error(
        "heartbeat_interval ({heartbeat:?}) must be shorter than detection_timeout ({detection:?})"
    )]
    HeartbeatTooSlow {
        heartbeat: Duration,
        detection: Duration,
    },
    #[error("clock_margin ({margin:?}) must be shorter than lease ({lease:?})")]
    MarginTooLarge { margin: Duration, lease: Duration },
}

impl Timers {
    pub fn validate(&self) -> Result<(), TimersError> {
        if self.lease > self.detection_timeout {
            return Err(TimersError::LeaseLongerThanDetection {
                lease: self.lease,
                detection: self.detection_timeout,
            });
        }
        if self.renew_interval >= self.lease {
            return Err(TimersError::RenewTooSlow {
                renew: self.renew_interval,
                lease: self.lease,
            });
        }
        if self.heartbeat_interval >= self.detection_timeout {
            return Err(TimersError::HeartbeatTooSlow {
                heartbeat: self.heartbeat_interval,
                detection: self.detection_timeout,
            });
        }
        if self.clock_margin >= self.lease {
            return Err(TimersError::MarginTooLarge {
                margin: self.clock_margin,
                lease: self.lease,
            });
        }
        Ok(())
    }
}
