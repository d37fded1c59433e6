//! The crate's error type.

use std::time::Duration;

use crate::LossReason;

/// Everything that can go wrong in this crate.
///
/// Callers usually branch on the variant: [`LockError::Lost`] means "stop writing now",
/// [`LockError::Redis`] and [`LockError::Timeout`] mean "Redis is unhealthy, retry later",
/// and the `Invalid*` variants are configuration mistakes found at startup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Redis (or the connection to it) returned an error.
    #[error("redis error: {0}")]
    Redis(#[from] fred::error::Error),

    /// Redis did not answer within the operation's time limit.
    ///
    /// The command may still run later. For an acquire, the crate then deletes the lease it may
    /// have created (compare-and-delete on the lease's unique value), so nothing is left behind
    /// for longer than one TTL.
    #[error("redis did not answer {op} within {timeout:?}")]
    Timeout {
        /// The operation that timed out (`"acquire"`, `"holder"`, `"release"`).
        op: &'static str,
        /// The limit that was exceeded.
        timeout: Duration,
    },

    /// A [`LockTiming`](crate::LockTiming) violated its ordering rules.
    #[error("invalid lock timing: {0}")]
    InvalidTiming(String),

    /// A node id or nonce for a [`HolderId`](crate::HolderId) was rejected.
    #[error("invalid holder id: {0}")]
    InvalidHolder(String),

    /// The key prefix given to [`LockClient::new`](crate::LockClient::new) was rejected.
    #[error("invalid key prefix: {0}")]
    InvalidPrefix(String),

    /// The lock key holds a value that this crate did not write.
    #[error("lock key {key} holds a value that is not a lease value: {value:?}")]
    MalformedValue {
        /// The Redis key.
        key: String,
        /// The value found there (lossily decoded as UTF-8).
        value: String,
    },

    /// Redis answered with a reply of an unexpected shape.
    #[error("unexpected reply to {op}: {reply}")]
    UnexpectedReply {
        /// The operation.
        op: &'static str,
        /// A debug rendering of the reply.
        reply: String,
    },

    /// The key kept appearing and disappearing between `SET NX` and `GET` during an acquire.
    /// Practically impossible; retry.
    #[error("lock for {resource:?} kept changing hands during acquire; try again")]
    Contended {
        /// The resource name.
        resource: String,
    },

    /// The lease is no longer held (returned by [`LockGuard::check`](crate::LockGuard::check)).
    #[error("lock lost: {0}")]
    Lost(LossReason),
}
