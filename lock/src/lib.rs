#![doc = include_str!("../README.md")]
#![warn(missing_docs, missing_debug_implementations)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod client;
mod error;
mod guard;
mod holder;
mod key;
mod observer;
mod scripts;
mod timing;

pub use client::{Acquire, LockClient};
pub use error::LockError;
pub use guard::{LeaseStatus, LockGuard};
pub use holder::HolderId;
pub use key::{doc_tag, lock_key};
pub use observer::{
    AcquireOutcome, LockObserver, LossReason, NoopObserver, RefreshOutcome, ReleaseOutcome,
};
pub use timing::LockTiming;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}

    /// The public types can be shared across tasks, and the futures can be spawned.
    #[allow(dead_code)]
    fn types_are_thread_safe(client: LockClient, guard: LockGuard, status: LeaseStatus) {
        assert_send_sync(&client);
        assert_send_sync(&guard);
        assert_send_sync(&status);
        assert_send_sync(&LockTiming::default());
        assert_send_sync(&LockError::InvalidTiming(String::new()));
        assert_send(&client.try_acquire("x"));
        assert_send(&client.try_take_over("x", client.holder_id()));
        assert_send(&client.holder("x"));
        assert_send(&guard.lost());
        assert_send(&status.lost());
        assert_send(&guard.release());
    }
}
