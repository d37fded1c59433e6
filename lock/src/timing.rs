//! Lease timing: one validated struct holding every duration the lock uses.

use std::time::Duration;

use crate::LockError;

/// The lease TTL, refresh period and safety margin, validated together.
///
/// Invariants (checked by [`LockTiming::new`]):
///
/// * `ttl` is at least 1 ms (it is rounded down to whole milliseconds, the unit of `PX`);
/// * `margin > 0` and `margin < ttl`;
/// * `refresh_every > 0` and `refresh_every < ttl − margin`, so at least one refresh is attempted
///   before the local validity deadline.
///
/// A lease is locally valid until `send time of the last successful refresh + ttl − margin`
/// (monotonic clock). Redis cannot expire the key before `that send time + ttl`, so the margin is
/// the slack between "we stop writing" and "someone else may acquire".
///
/// ```
/// use std::time::Duration;
/// use hearth_lock::LockTiming;
///
/// // Defaults: ttl 10 s, refresh every ttl/3, margin ttl/5.
/// let t = LockTiming::default();
/// assert_eq!(t.ttl(), Duration::from_secs(10));
/// assert!(t.refresh_every() < t.ttl() - t.margin());
/// assert_eq!(t.validity(), Duration::from_secs(8));
///
/// // Refreshing less often than the validity window is rejected...
/// let too_slow = LockTiming::new(
///     Duration::from_secs(10),
///     Duration::from_secs(9),
///     Duration::from_secs(2),
/// );
/// assert!(too_slow.is_err());
///
/// // ...and so is a zero margin.
/// assert!(LockTiming::new(Duration::from_secs(10), Duration::from_secs(3), Duration::ZERO).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockTiming {
    ttl: Duration,
    refresh_every: Duration,
    margin: Duration,
}

impl LockTiming {
    /// The default TTL: 10 s.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

    /// Builds and validates a timing. Fails with [`LockError::InvalidTiming`] unless
    /// `0 < margin < ttl` and `0 < refresh_every < ttl − margin` (ttl rounded down to whole ms).
    pub fn new(
        ttl: Duration,
        refresh_every: Duration,
        margin: Duration,
    ) -> Result<Self, LockError> {
        let ttl = Duration::from_millis(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        if ttl.is_zero() {
            return Err(invalid("ttl must be at least 1 ms"));
        }
        if i64::try_from(ttl.as_millis()).is_err() {
            return Err(invalid("ttl does not fit in i64 milliseconds"));
        }
        if margin.is_zero() {
            return Err(invalid("margin must be greater than zero"));
        }
        if margin >= ttl {
            return Err(invalid(format!(
                "margin ({margin:?}) must be smaller than ttl ({ttl:?})"
            )));
        }
        if refresh_every.is_zero() {
            return Err(invalid("refresh_every must be greater than zero"));
        }
        if refresh_every >= ttl - margin {
            return Err(invalid(format!(
                "refresh_every ({refresh_every:?}) must be smaller than ttl − margin ({:?})",
                ttl - margin
            )));
        }
        Ok(Self {
            ttl,
            refresh_every,
            margin,
        })
    }

    /// The default ratios applied to a given TTL: refresh every `ttl/3`, margin `ttl/5`.
    ///
    /// With these, the validity window is `0.8 · ttl`, and refreshes are attempted at `ttl/3`
    /// and `2·ttl/3` before it closes: one failed refresh is tolerated, two in a row fence.
    pub fn from_ttl(ttl: Duration) -> Result<Self, LockError> {
        Self::new(ttl, ttl / 3, ttl / 5)
    }

    /// The key's time to live in Redis (`PX`), in whole milliseconds.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long after the send time of the last successful refresh (or acquire) the next
    /// refresh is sent.
    pub fn refresh_every(&self) -> Duration {
        self.refresh_every
    }

    /// The safety margin subtracted from the TTL for the local validity deadline.
    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// `ttl − margin`: how long a lease stays locally valid after the send time of its last
    /// successful refresh. Also the time limit of every Redis call the crate makes.
    pub fn validity(&self) -> Duration {
        self.ttl - self.margin
    }

    /// Delay before retrying after a refresh failed with a Redis error: `refresh_every / 4`
    /// (at least 1 ms). Retries stop at the validity deadline.
    pub fn retry_delay(&self) -> Duration {
        (self.refresh_every / 4).max(Duration::from_millis(1))
    }

    pub(crate) fn ttl_ms(&self) -> i64 {
        // Checked in `new`.
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }
}

impl Default for LockTiming {
    /// ttl 10 s, refresh every 3.33 s, margin 2 s (validity 8 s).
    fn default() -> Self {
        Self {
            ttl: Self::DEFAULT_TTL,
            refresh_every: Self::DEFAULT_TTL / 3,
            margin: Self::DEFAULT_TTL / 5,
        }
    }
}

fn invalid(msg: impl Into<String>) -> LockError {
    LockError::InvalidTiming(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn default_is_valid_and_matches_from_ttl() {
        let d = LockTiming::default();
        let f = LockTiming::from_ttl(LockTiming::DEFAULT_TTL).expect("default ratios are valid");
        assert_eq!(d, f);
        assert_eq!(d.margin(), Duration::from_secs(2));
        assert!(d.refresh_every() < d.validity());
        assert_eq!(d.ttl_ms(), 10_000);
    }

    #[test]
    fn ordering_is_enforced() {
        assert!(LockTiming::new(ms(1000), ms(300), ms(200)).is_ok());
        // refresh_every == ttl - margin
        assert!(LockTiming::new(ms(1000), ms(800), ms(200)).is_err());
        // refresh_every > ttl - margin
        assert!(LockTiming::new(ms(1000), ms(900), ms(200)).is_err());
        // zero margin
        assert!(LockTiming::new(ms(1000), ms(300), ms(0)).is_err());
        // margin >= ttl
        assert!(LockTiming::new(ms(1000), ms(300), ms(1000)).is_err());
        // zero refresh
        assert!(LockTiming::new(ms(1000), ms(0), ms(200)).is_err());
        // zero ttl, sub-millisecond ttl
        assert!(LockTiming::new(ms(0), ms(1), ms(1)).is_err());
        assert!(LockTiming::new(Duration::from_micros(900), ms(0), ms(0)).is_err());
    }

    #[test]
    fn ttl_is_rounded_down_to_millis() {
        let t = LockTiming::new(Duration::from_micros(1_500_700), ms(300), ms(200))
            .expect("valid timing");
        assert_eq!(t.ttl(), ms(1500));
        assert_eq!(t.ttl_ms(), 1500);
        // The ordering is checked against the rounded ttl.
        assert!(LockTiming::new(Duration::from_micros(1_000_900), ms(800), ms(200)).is_err());
    }

    #[test]
    fn from_ttl_small_values() {
        let t = LockTiming::from_ttl(ms(900)).expect("valid");
        assert_eq!(t.refresh_every(), ms(300));
        assert_eq!(t.margin(), ms(180));
        assert_eq!(t.retry_delay(), ms(75));
        // Rounds down to a zero ttl.
        assert!(LockTiming::from_ttl(Duration::from_micros(500)).is_err());
    }
}
