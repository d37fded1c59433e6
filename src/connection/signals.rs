//! [`Signals`]: the server-wide events every socket task reacts to — stop (shutdown or drain)
//! and a grown revocation list — behind one waiter per socket ([`SignalWait`]).
//!
//! One word of state and one [`Notify`]: a socket holds a single registered waiter for both
//! events for as long as it lives, instead of one waiter per event, because an idle socket's
//! memory is mostly what its task keeps registered while it waits.
//!
//! **Invariant:** the state changes before waiters are woken, and a waiter is created before
//! the state it compares against is read, so no event is missed between the two.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// The state bit set once sockets must stop; the bits below count revocation rounds.
const STOP: u64 = 1 << 63;

/// Server-wide socket events.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    state: AtomicU64,
    notify: Notify,
}

impl Signals {
    /// Every socket must close (shutdown or drain). Sticky.
    pub(crate) fn stop(&self) {
        self.state.fetch_or(STOP, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// The revocation list grew: every socket checks its connections again.
    pub(crate) fn revoked(&self) {
        // 2^63 rounds would be needed to reach the stop bit
        self.state.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// A waiter for the events after now.
    pub(crate) fn wait(&self) -> SignalWait<'_> {
        // registered with the Notify before the state is read (see the invariant)
        let notified = Box::pin(self.notify.notified());
        SignalWait {
            signals: self,
            seen: self.state.load(Ordering::SeqCst),
            notified,
        }
    }
}

/// Forwards `stop` (cancelled at a shutdown or drain) and each change of the revocation
/// list's generation (`revocations`) to `signals`, until the stop. One per server.
pub(crate) async fn forward(
    signals: Arc<Signals>,
    stop: CancellationToken,
    mut revocations: watch::Receiver<u64>,
) {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            changed = revocations.changed() => match changed {
                Ok(()) => signals.revoked(),
                // the list is gone: only the stop is left to forward
                Err(_) => {
                    stop.cancelled().await;
                    break;
                }
            },
        }
    }
    signals.stop();
}

/// What a [`SignalWait`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Sockets must close.
    Stop,
    /// The revocation list grew since the last report.
    Revoked,
}

/// One socket's waiter on [`Signals`]. As a future it reports each event once (after a
/// [`Signal::Revoked`] it waits for the next); it may be polled again after it was ready.
/// The waiter is boxed so the wait is `Unpin` and can be polled by reference.
pub(crate) struct SignalWait<'a> {
    signals: &'a Signals,
    /// The state last reported.
    seen: u64,
    notified: Pin<Box<Notified<'a>>>,
}

impl std::fmt::Debug for SignalWait<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalWait")
            .field("seen", &self.seen)
            .finish()
    }
}

impl SignalWait<'_> {
    /// Ready with the state once `ready` holds for it; the waiter is re-armed after each
    /// wake-up, before the state is read again.
    fn poll_until(&mut self, cx: &mut Context<'_>, ready: impl Fn(u64) -> bool) -> Poll<u64> {
        loop {
            let now = self.signals.state.load(Ordering::SeqCst);
            if ready(now) {
                return Poll::Ready(now);
            }
            match self.notified.as_mut().poll(cx) {
                Poll::Ready(()) => self.notified.set(self.signals.notify.notified()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Ready once sockets must stop. A revocation seen meanwhile is not consumed: the next
    /// poll as a future reports it.
    pub(crate) fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_until(cx, |now| now & STOP != 0).map(|_| ())
    }
}

impl Future for SignalWait<'_> {
    type Output = Signal;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Signal> {
        let this = self.get_mut();
        let seen = this.seen;
        let now = std::task::ready!(this.poll_until(cx, |now| now & STOP != 0 || now != seen));
        if now & STOP != 0 {
            return Poll::Ready(Signal::Stop);
        }
        this.seen = now;
        Poll::Ready(Signal::Revoked)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn each_revocation_is_reported_and_stop_wins() {
        let s = Signals::default();
        let mut w = s.wait();
        let quiet = tokio::time::timeout(Duration::from_millis(20), &mut w).await;
        assert!(quiet.is_err(), "nothing happened yet");
        s.revoked();
        assert_eq!(w.await_next().await, Signal::Revoked);
        let quiet = tokio::time::timeout(Duration::from_millis(20), &mut w).await;
        assert!(quiet.is_err(), "a revocation is reported once");
        // two rounds before the next poll: one report
        s.revoked();
        s.revoked();
        assert_eq!(w.await_next().await, Signal::Revoked);
        s.revoked();
        s.stop();
        assert_eq!(w.await_next().await, Signal::Stop);
        assert_eq!(w.await_next().await, Signal::Stop, "stop is sticky");
        // a waiter made after the stop sees it at once
        assert_eq!(s.wait().await_next().await, Signal::Stop);
    }

    #[tokio::test]
    async fn a_waiter_woken_from_another_task_sees_the_event() {
        let s = std::sync::Arc::new(Signals::default());
        let s2 = s.clone();
        let waiter = tokio::spawn(async move {
            let mut w = s2.wait();
            std::future::poll_fn(|cx| w.poll_stop(cx)).await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        s.revoked(); // not a stop: the waiter keeps waiting
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        s.stop();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_revocation_seen_by_poll_stop_is_still_reported() {
        let s = Signals::default();
        let mut w = s.wait();
        s.revoked();
        let stopped = std::future::poll_fn(|cx| Poll::Ready(w.poll_stop(cx))).await;
        assert!(stopped.is_pending());
        assert_eq!(w.await_next().await, Signal::Revoked);
    }

    impl SignalWait<'_> {
        async fn await_next(&mut self) -> Signal {
            tokio::time::timeout(Duration::from_secs(5), self)
                .await
                .unwrap()
        }
    }
}
