//! Which QEMU releases the COLO sink can work with.
//!
//! - Before 9.0, TCG's dirty tracking loses pages (the bitmap sync clears
//!   bits without re-arming the TLB's dirty-tracking, fixed in 9.0): a
//!   replica would silently miss writes. KVM tracks dirty pages itself, so
//!   older releases are fine there.
//! - 10.0 and 10.1 never enter COLO: commit 4881411136 ("migration: Always
//!   set DEVICE state") left `migration_completion` testing for the ACTIVE
//!   state, which is DEVICE by then, so the migration simply completes
//!   (fixed upstream in November 2025 by "migration: Fix transition to
//!   COLO state from precopy"). Observed here with Debian's 10.0.2: status
//!   `completed` right after the initial stream.

/// A QEMU release (QMP `query-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Why COLO mode is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("QEMU {0} loses dirty pages under TCG (fixed in 9.0); use KVM, QEMU >= 9.0, or dirty tracking \"compare\"")]
    TcgDirtyBug(QemuVersion),
    #[error("QEMU {0} never enters COLO (the migration completes instead; broken in 10.0 and 10.1 by \"migration: Always set DEVICE state\", fixed after 10.1); use QEMU 9.x or >= 10.2, or dirty tracking \"compare\"")]
    ColoBroken(QemuVersion),
}

/// Whether the COLO sink works with QEMU `v` under accelerator `accel`.
pub fn check(v: QemuVersion, accel: &str) -> Result<(), Unsupported> {
    if accel == "tcg" && v.major < 9 {
        return Err(Unsupported::TcgDirtyBug(v));
    }
    if v.major == 10 && v.minor <= 1 {
        return Err(Unsupported::ColoBroken(v));
    }
    Ok(())
}

/// The version in a `query-version` reply.
pub fn from_qmp(reply: &serde_json::Value) -> Option<QemuVersion> {
    let q = reply.get("qemu")?;
    let n = |k: &str| {
        q.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as u32)
    };
    Some(QemuVersion {
        major: n("major")?,
        minor: n("minor")?,
        micro: n("micro")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> QemuVersion {
        QemuVersion {
            major,
            minor,
            micro: 0,
        }
    }

    #[test]
    fn the_gate() {
        assert!(matches!(
            check(v(7, 2), "tcg"),
            Err(Unsupported::TcgDirtyBug(_))
        ));
        assert!(check(v(7, 2), "kvm").is_ok());
        assert!(check(v(9, 2), "tcg").is_ok());
        assert!(matches!(
            check(v(10, 0), "tcg"),
            Err(Unsupported::ColoBroken(_))
        ));
        assert!(matches!(
            check(v(10, 1), "kvm"),
            Err(Unsupported::ColoBroken(_))
        ));
        assert!(check(v(10, 2), "tcg").is_ok());
        let r = serde_json::json!({"qemu": {"major": 10, "minor": 0, "micro": 2}});
        assert_eq!(
            from_qmp(&r),
            Some(QemuVersion {
                major: 10,
                minor: 0,
                micro: 2
            })
        );
    }
}
