//! Observability hooks, so the server can record metrics without this crate knowing Prometheus.

use std::fmt;
use std::time::Duration;

/// Why a lease stopped being valid.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// A refresh found the key gone: it expired, was deleted, or Redis lost its data.
    Missing,
    /// A refresh found the key holding another value (another holder took over).
    Taken {
        /// The value found under the key.
        by: String,
    },
    /// No refresh succeeded within `ttl − margin` of the send time of the last successful one
    /// (Redis unreachable, paused, or too slow; or this process stalled).
    Expired,
    /// The owner released or dropped the guard. Not reported to [`LockObserver::on_lost`].
    Released,
}

impl LossReason {
    /// A short, fixed label (`missing`, `taken`, `expired`, `released`), suitable as a metric
    /// label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Taken { .. } => "taken",
            Self::Expired => "expired",
            Self::Released => "released",
        }
    }
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("lock key is gone"),
            Self::Taken { by } => write!(f, "lock key now holds {by:?}"),
            Self::Expired => f.write_str("no successful refresh within ttl − margin"),
            Self::Released => f.write_str("released by its owner"),
        }
    }
}

/// Result of one acquire attempt, for [`LockObserver::on_acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcquireOutcome {
    /// The lease was created.
    Acquired,
    /// Someone (possibly this same holder) already holds it.
    HeldByOther,
    /// Redis error or timeout.
    Failed,
}

/// Result of one refresh attempt, for [`LockObserver::on_refresh`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshOutcome {
    /// The key still held our value and its TTL was reset.
    Refreshed,
    /// The key was gone or foreign; the lease is lost.
    NotHeld,
    /// Redis error, or no answer before the validity deadline.
    Failed,
}

/// Result of a release, for [`LockObserver::on_release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseOutcome {
    /// Our key was deleted.
    Released,
    /// The key was already gone or held by someone else; nothing was deleted.
    NotHeld,
    /// Redis error or timeout.
    Failed,
}

/// Callbacks for metrics. Every method has a no-op default; implement the ones you need.
///
/// Called synchronously from the lock's tasks, so implementations must be quick and must not
/// block (incrementing Prometheus counters and observing histograms is fine). Resource names are
/// passed for logging; don't use them as metric labels.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
/// use hearth_lock::{LockObserver, LossReason, RefreshOutcome};
///
/// #[derive(Default)]
/// struct Counters { refresh_failures: AtomicU64, losses: AtomicU64 }
///
/// impl LockObserver for Counters {
///     fn on_refresh(&self, _latency: Duration, outcome: RefreshOutcome) {
///         if outcome != RefreshOutcome::Refreshed {
///             self.refresh_failures.fetch_add(1, Ordering::Relaxed);
///         }
///     }
///     fn on_lost(&self, _resource: &str, _reason: &LossReason) {
///         self.losses.fetch_add(1, Ordering::Relaxed);
///     }
/// }
/// ```
pub trait LockObserver: Send + Sync {
    /// After each acquire attempt, with its round-trip latency.
    fn on_acquire(&self, latency: Duration, outcome: AcquireOutcome) {
        let _ = (latency, outcome);
    }

    /// After each refresh attempt, with its round-trip latency.
    fn on_refresh(&self, latency: Duration, outcome: RefreshOutcome) {
        let _ = (latency, outcome);
    }

    /// Once per lease, when it is lost for any reason other than [`LossReason::Released`].
    fn on_lost(&self, resource: &str, reason: &LossReason) {
        let _ = (resource, reason);
    }

    /// After each explicit release, with its round-trip latency.
    fn on_release(&self, latency: Duration, outcome: ReleaseOutcome) {
        let _ = (latency, outcome);
    }
}

/// The default observer: does nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl LockObserver for NoopObserver {}
