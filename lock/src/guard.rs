//! [`LockGuard`]: a held lease, its refresh task, and loss detection.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, trace, warn};

use crate::client::{LockClient, RefreshReply};
use crate::observer::{LockObserver, LossReason, RefreshOutcome, ReleaseOutcome};
use crate::{HolderId, LockError};

/// A held lease. While it lives, a tokio task refreshes the key every
/// [`LockTiming::refresh_every`](crate::LockTiming::refresh_every).
///
/// * [`is_valid`](Self::is_valid) is a synchronous check of the local monotonic deadline: call it
///   (or [`check`](Self::check)) before every write.
/// * [`lost`](Self::lost) / [`subscribe_lost`](Self::subscribe_lost) notify as soon as the lease
///   is lost: a refresh found the key gone or foreign, or no refresh succeeded within
///   `ttl − margin` of the send time of the last successful one.
/// * Once invalid, a guard never becomes valid again; acquire a new one.
/// * Dropping the guard aborts the refresh task (the key then expires after at most one TTL).
///   [`release`](Self::release) also deletes the key if it is still ours.
#[must_use = "dropping the guard stops refreshing the lease"]
pub struct LockGuard {
    status: LeaseStatus,
    lock: LockClient,
    value: String,
    task: JoinHandle<()>,
}

/// A cloneable, read-only view of a lease's state, for tasks that must check validity or wait
/// for loss without owning the [`LockGuard`]. It stays usable after the guard is gone (it then
/// reports [`LossReason::Released`]).
#[derive(Clone)]
pub struct LeaseStatus {
    shared: Arc<Shared>,
}

struct Shared {
    resource: String,
    key: String,
    holder: HolderId,
    state: Mutex<State>,
    lost_tx: watch::Sender<bool>,
    observer: Arc<dyn LockObserver>,
}

struct State {
    /// `send time of the last successful SET/refresh + ttl − margin`.
    deadline: Instant,
    /// Set once, never cleared.
    lost: Option<LossReason>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock, and `State` is valid at every point anyway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The loss reason, if any. Marks the lease [`LossReason::Expired`] first if its deadline
    /// has passed, so validity turns false exactly at the deadline even if the refresh task has
    /// not woken up yet.
    fn loss(&self) -> Option<LossReason> {
        let (reason, newly_expired) = {
            let mut st = self.state();
            let newly = st.lost.is_none() && Instant::now() >= st.deadline;
            if newly {
                st.lost = Some(LossReason::Expired);
            }
            (st.lost.clone(), newly)
        };
        if newly_expired {
            self.announce(&LossReason::Expired);
        }
        reason
    }

    /// Marks the lease lost (first reason wins). Returns whether this call did it.
    fn mark_lost(&self, reason: LossReason) -> bool {
        {
            let mut st = self.state();
            if st.lost.is_some() {
                return false;
            }
            st.lost = Some(reason.clone());
        }
        self.announce(&reason);
        true
    }

    /// Moves the deadline to `sent + validity` after a successful refresh, unless the lease is
    /// already lost or its deadline has passed (validity never comes back).
    fn extend(&self, sent: Instant, validity: Duration) -> Result<Instant, LossReason> {
        let mut st = self.state();
        if let Some(reason) = &st.lost {
            return Err(reason.clone());
        }
        if Instant::now() >= st.deadline {
            st.lost = Some(LossReason::Expired);
            drop(st);
            self.announce(&LossReason::Expired);
            return Err(LossReason::Expired);
        }
        st.deadline = st.deadline.max(sent + validity);
        Ok(st.deadline)
    }

    fn deadline(&self) -> Instant {
        self.state().deadline
    }

    /// Logs, tells the observer, then wakes watchers (observer first, so a woken watcher sees
    /// the observer already updated).
    fn announce(&self, reason: &LossReason) {
        if *reason == LossReason::Released {
            debug!(resource = ?self.resource, key = %self.key, holder = %self.holder, "lock released");
        } else {
            warn!(resource = ?self.resource, key = %self.key, holder = %self.holder, reason = reason.as_str(), %reason, "lock lost");
            self.observer.on_lost(&self.resource, reason);
        }
        self.lost_tx.send_replace(true);
    }
}

impl LeaseStatus {
    /// The resource name the lease is for.
    pub fn resource(&self) -> &str {
        &self.shared.resource
    }

    /// The Redis key of the lease.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The holder identity the lease was taken with.
    pub fn holder(&self) -> &HolderId {
        &self.shared.holder
    }

    /// `true` while the lease is held: not lost, and the monotonic clock is before
    /// `send time of the last successful refresh + ttl − margin`. Synchronous and cheap; call it
    /// before every write. Once `false`, always `false`.
    pub fn is_valid(&self) -> bool {
        self.shared.loss().is_none()
    }

    /// `Ok(())` while valid, else [`LockError::Lost`] with the reason. Handy as `status.check()?`.
    pub fn check(&self) -> Result<(), LockError> {
        match self.shared.loss() {
            None => Ok(()),
            Some(reason) => Err(LockError::Lost(reason)),
        }
    }

    /// How long the lease stays valid if no further refresh succeeds; `None` once lost.
    pub fn remaining_validity(&self) -> Option<Duration> {
        if self.shared.loss().is_some() {
            return None;
        }
        Some(
            self.shared
                .deadline()
                .saturating_duration_since(Instant::now()),
        )
    }

    /// Why the lease was lost, or `None` while it is valid.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.shared.loss()
    }

    /// Resolves when the lease is lost (immediately if it already is), with the reason.
    ///
    /// Resolves at the validity deadline even if the refresh task is starved, because it also
    /// sleeps until the deadline itself.
    pub async fn lost(&self) -> LossReason {
        let mut rx = self.shared.lost_tx.subscribe();
        loop {
            if let Some(reason) = self.shared.loss() {
                return reason;
            }
            let deadline = self.shared.deadline();
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // Cannot happen while `self` keeps the sender alive; don't spin.
                        sleep_until(deadline).await;
                    }
                }
                () = sleep_until(deadline) => {}
            }
        }
    }

    /// A watch receiver that turns `true` when the lease is lost or released. It is already
    /// `true` if that has happened. The channel closes only after the guard and every
    /// [`LeaseStatus`] are gone, by which time it reads `true`.
    pub fn subscribe_lost(&self) -> watch::Receiver<bool> {
        // Expire first if the deadline passed, so a new subscriber never reads a stale `false`.
        let _ = self.shared.loss();
        self.shared.lost_tx.subscribe()
    }
}

impl fmt::Debug for LeaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseStatus")
            .field("resource", &self.shared.resource)
            .field("key", &self.shared.key)
            .field("holder", &self.shared.holder)
            .field("loss_reason", &self.shared.loss())
            .finish()
    }
}

impl LockGuard {
    /// Starts the refresh task for a lease whose `SET` was sent at `sent`.
    pub(crate) fn start(
        lock: LockClient,
        resource: String,
        key: String,
        value: String,
        sent: Instant,
    ) -> Self {
        let (lost_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            resource,
            key,
            holder: lock.holder.clone(),
            state: Mutex::new(State {
                deadline: sent + lock.timing.validity(),
                lost: None,
            }),
            lost_tx,
            observer: Arc::clone(&lock.observer),
        });
        let task = tokio::spawn(refresh_loop(
            lock.clone(),
            Arc::clone(&shared),
            value.clone(),
            sent,
        ));
        Self {
            status: LeaseStatus { shared },
            lock,
            value,
            task,
        }
    }

    /// The resource name the lease is for.
    pub fn resource(&self) -> &str {
        self.status.resource()
    }

    /// The Redis key of the lease.
    pub fn key(&self) -> &str {
        self.status.key()
    }

    /// The holder identity the lease was taken with.
    pub fn holder(&self) -> &HolderId {
        self.status.holder()
    }

    /// See [`LeaseStatus::is_valid`].
    pub fn is_valid(&self) -> bool {
        self.status.is_valid()
    }

    /// See [`LeaseStatus::check`].
    pub fn check(&self) -> Result<(), LockError> {
        self.status.check()
    }

    /// See [`LeaseStatus::remaining_validity`].
    pub fn remaining_validity(&self) -> Option<Duration> {
        self.status.remaining_validity()
    }

    /// See [`LeaseStatus::loss_reason`].
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.status.loss_reason()
    }

    /// See [`LeaseStatus::lost`].
    pub async fn lost(&self) -> LossReason {
        self.status.lost().await
    }

    /// See [`LeaseStatus::subscribe_lost`].
    pub fn subscribe_lost(&self) -> watch::Receiver<bool> {
        self.status.subscribe_lost()
    }

    /// A cloneable read-only view of this lease.
    pub fn status(&self) -> LeaseStatus {
        self.status.clone()
    }

    /// Stops refreshing, marks the lease [`LossReason::Released`] (so `is_valid()` is `false`
    /// from here on), then deletes the key with a compare-and-delete script.
    ///
    /// Returns `Ok(true)` if the key still held this lease and was deleted, `Ok(false)` if it was
    /// already gone or held by someone else (a foreign value is never deleted). Works after a
    /// loss too: after an [`LossReason::Expired`] loss the key may still be ours in Redis, and
    /// releasing frees it for others sooner. Bounded by
    /// [`LockTiming::validity`](crate::LockTiming::validity).
    pub async fn release(self) -> Result<bool, LockError> {
        self.task.abort();
        self.status.shared.mark_lost(LossReason::Released);
        let shared = &self.status.shared;
        let limit = self.lock.timing.validity();
        let started = Instant::now();
        let result = timeout(limit, self.lock.release_once(&shared.key, &self.value)).await;
        let latency = started.elapsed();
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(LockError::Timeout {
                op: "release",
                timeout: limit,
            }),
        };
        let outcome = match &result {
            Ok(true) => ReleaseOutcome::Released,
            Ok(false) => ReleaseOutcome::NotHeld,
            Err(_) => ReleaseOutcome::Failed,
        };
        self.lock.observer.on_release(latency, outcome);
        match &result {
            Ok(deleted) => {
                debug!(resource = ?shared.resource, key = %shared.key, holder = %shared.holder, deleted, ?latency, "lock release finished");
            }
            Err(error) => {
                warn!(resource = ?shared.resource, key = %shared.key, holder = %shared.holder, %error, "lock release failed; the key expires by itself");
            }
        }
        result
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.task.abort();
        self.status.shared.mark_lost(LossReason::Released);
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Refreshes the lease until it is lost. Aborted when the guard is released or dropped.
async fn refresh_loop(lock: LockClient, shared: Arc<Shared>, value: String, acquired_at: Instant) {
    let timing = lock.timing;
    let mut next = acquired_at + timing.refresh_every();
    loop {
        // Wait for the next refresh; after failed refreshes `next` may lie past the deadline.
        sleep_until(next.min(shared.deadline())).await;
        if shared.loss().is_some() {
            return;
        }

        let sent = Instant::now();
        let deadline = shared.deadline();
        let reply = tokio::select! {
            reply = lock.refresh_once(&shared.key, &value) => Some(reply),
            () = sleep_until(deadline) => None,
        };
        let latency = sent.elapsed();
        match reply {
            None => {
                // No answer before the deadline: `loss()` marks it expired.
                lock.observer.on_refresh(latency, RefreshOutcome::Failed);
                if shared.loss().is_some() {
                    return;
                }
            }
            Some(Ok(RefreshReply::Refreshed)) => {
                lock.observer.on_refresh(latency, RefreshOutcome::Refreshed);
                match shared.extend(sent, timing.validity()) {
                    Ok(deadline) => {
                        trace!(resource = ?shared.resource, holder = %shared.holder, ?latency, valid_for = ?deadline.saturating_duration_since(Instant::now()), "lock refreshed");
                        next = sent + timing.refresh_every();
                    }
                    Err(_) => return,
                }
            }
            Some(Ok(RefreshReply::Missing)) => {
                lock.observer.on_refresh(latency, RefreshOutcome::NotHeld);
                shared.mark_lost(LossReason::Missing);
                return;
            }
            Some(Ok(RefreshReply::Taken(by))) => {
                lock.observer.on_refresh(latency, RefreshOutcome::NotHeld);
                shared.mark_lost(LossReason::Taken { by });
                return;
            }
            Some(Err(error)) => {
                lock.observer.on_refresh(latency, RefreshOutcome::Failed);
                warn!(resource = ?shared.resource, key = %shared.key, holder = %shared.holder, %error, "lock refresh failed; retrying until the validity deadline");
                next = Instant::now() + timing.retry_delay();
            }
        }
    }
}
