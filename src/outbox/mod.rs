//! [`Outbox`]: the byte-bounded queue from document tasks to one socket's writer.
//!
//! **Invariant:** a send never blocks and never drops silently. When the queued bytes would
//! exceed the limit, the socket is marked overflowed and its task disconnects the client (a slow
//! reader is disconnected, never skipped); every later send is refused.
//!
//! An outbox may have a **direct path** ([`outbox_direct`]): a frame with nothing queued ahead
//! of it is handed to it in the sender's task instead of waking the socket task (a client on
//! another node: its frames go straight to the transport, and a document's broadcast reaches
//! the transport for all such clients in one go). Order is kept: a frame takes the direct path
//! only while the queue is empty and the socket task holds nothing it took and has not
//! finished ([`OutboxReceiver::idle`]).

pub(crate) mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;

use self::queue::{QueueReceiver, QueueSender, queue_with};
use crate::protocol::Close;

/// Something for the socket task to do, in order with the frames.
#[derive(Debug)]
pub enum Outgoing {
    /// A binary frame to write.
    Frame(Bytes),
    /// The document connection for this address was closed by the server: forget its route.
    DocClosed {
        /// The address (as the client spells it).
        address: Arc<str>,
        /// The connection that was closed (a newer one on the same address is kept).
        conn: u64,
    },
    /// Close the whole socket.
    CloseSocket(Close),
}

/// What every handle of one outbox shares, in the queue's own allocation: a handle is one
/// pointer (documents keep one per connection).
struct Shared {
    queued: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    direct: Option<Direct>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queued", &self.queued)
            .field("limit", &self.limit)
            .field("overflowed", &self.overflowed)
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

/// The direct path of an outbox: sends a frame now, or returns false to have it queued. Runs
/// in the sender's task under the queue's lock: quick, and no side effects when it refuses.
pub type Direct = Arc<dyn Fn(&Bytes) -> bool + Send + Sync>;

/// Sender side; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    /// The queue, whose header also holds the byte accounting and the direct path
    /// ([`Shared`]).
    tx: QueueSender<Outgoing, Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("shared", self.tx.extra())
            .finish()
    }
}

/// Receiver side, owned by the socket task.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: QueueReceiver<Outgoing, Shared>,
}

/// Creates a queue that holds at most `limit` bytes of frames.
pub fn outbox(limit: usize) -> (Outbox, OutboxReceiver) {
    build(limit, None)
}

/// [`outbox`] with a direct path (see the module docs).
pub fn outbox_direct(limit: usize, direct: Direct) -> (Outbox, OutboxReceiver) {
    build(limit, Some(direct))
}

fn build(limit: usize, direct: Option<Direct>) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = queue_with(Shared {
        queued: AtomicUsize::new(0),
        limit,
        overflowed: AtomicBool::new(false),
        direct,
    });
    (Outbox { tx }, OutboxReceiver { rx })
}

impl Outbox {
    /// Queues a frame. Returns false when the socket is gone or has overflowed.
    pub fn send(&self, frame: Bytes) -> bool {
        let shared = self.tx.extra();
        if shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.len();
        let before = shared.queued.fetch_add(len, Ordering::AcqRel);
        // The bound is on falling behind, not on frame size: a frame is refused only when the
        // queue already holds `limit` bytes, so one frame larger than the limit (a joiner's
        // step2 of a large document) still goes out. The queue never exceeds limit + one frame.
        if before >= shared.limit {
            shared.queued.fetch_sub(len, Ordering::AcqRel);
            shared.overflowed.store(true, Ordering::Release);
            // the receiver's own waker: no waiter of its own to keep per socket
            self.tx.wake();
            return false;
        }
        let sent = match &shared.direct {
            None => self.tx.send(Outgoing::Frame(frame)).map(|()| false),
            Some(direct) => self.tx.send_or_pass(Outgoing::Frame(frame), |m| match m {
                Outgoing::Frame(f) => direct(f),
                _ => false,
            }),
        };
        if !matches!(sent, Ok(false)) {
            // passed on directly (it never waited in the queue) or refused: not queued
            shared.queued.fetch_sub(len, Ordering::AcqRel);
        }
        sent.is_ok()
    }

    /// Queues a control message (not counted against the byte limit).
    pub fn control(&self, msg: Outgoing) -> bool {
        self.tx.send(msg).is_ok()
    }

    /// True once the socket task has gone away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl OutboxReceiver {
    /// The next message, whether or not the queue overflowed. Cancel-safe.
    #[cfg(test)]
    pub async fn recv(&mut self) -> Outgoing {
        let msg = self.rx.recv().await;
        self.account(&msg);
        msg
    }

    /// A message if one is ready now.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let msg = self.rx.try_recv();
        if let Some(m) = &msg {
            self.account(m);
        }
        msg
    }

    fn account(&self, msg: &Outgoing) {
        if let Outgoing::Frame(f) = msg {
            self.rx.extra().queued.fetch_sub(f.len(), Ordering::AcqRel);
        }
    }

    /// The socket task has finished with every message it took: frames may take the direct
    /// path again while nothing is queued.
    pub fn idle(&mut self) {
        self.rx.idle();
    }

    fn overflowed(&self) -> bool {
        self.rx.extra().overflowed.load(Ordering::Acquire)
    }

    /// `None` once a sender found the queue over its limit, else what `poll` gives. The
    /// overflow is looked at first, and again when `poll` is pending (it registers the
    /// receiver's waker then): an overflow in between has woken nobody.
    fn poll_unless_overflowed<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: impl FnOnce(&mut Self, &mut std::task::Context<'_>) -> std::task::Poll<R>,
    ) -> std::task::Poll<Option<R>> {
        if self.overflowed() {
            return std::task::Poll::Ready(None);
        }
        match poll(self, cx) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
            std::task::Poll::Pending if self.overflowed() => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// Ready once a sender found the queue over its limit. It shares the receiver's waker
    /// with the waits for messages: both may be polled by the one task that owns the receiver.
    pub fn poll_overflowed(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.poll_unless_overflowed(cx, |this, cx| {
            this.rx.register(cx.waker());
            std::task::Poll::<()>::Pending
        })
        .map(|_| ())
    }

    /// The socket task's wait on its outbox, taking nothing: false once a sender found the
    /// queue over its limit (looked at first), true when a message is queued. Cancel-safe.
    pub async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            // nothing is taken, so an overflow meanwhile still wins
            self.poll_unless_overflowed(cx, |this, cx| this.rx.poll_ready(cx))
                .map(|r| r.is_some() && !self.overflowed())
        })
        .await
    }

    /// The socket task's wait on its outbox: `None` once a sender found the queue over its
    /// limit (looked at first), else the next message when `take` is true. With `take` false
    /// it only watches for the overflow (the socket cannot write now). Cancel-safe.
    pub async fn next(&mut self, take: bool) -> Option<Outgoing> {
        std::future::poll_fn(|cx| {
            if !take {
                return self.poll_overflowed(cx).map(|()| None);
            }
            self.poll_unless_overflowed(cx, |this, cx| {
                this.rx.poll_recv(cx).map(|msg| {
                    this.account(&msg);
                    msg
                })
            })
        })
        .await
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.rx.extra().queued.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_handle_is_one_pointer() {
        // documents keep a handle per connection; what the handles share lives in the queue
        assert_eq!(std::mem::size_of::<Outbox>(), std::mem::size_of::<usize>());
    }

    #[tokio::test]
    async fn overflow_is_reported_not_dropped_silently() {
        let (tx, mut rx) = outbox(10);
        assert!(tx.send(Bytes::from_static(b"12345")));
        assert!(
            tx.send(Bytes::from_static(b"123456")),
            "one frame may cross the limit"
        );
        assert!(
            !tx.send(Bytes::from_static(b"1")),
            "queue already at the limit"
        );
        let overflowed = tokio::time::timeout(std::time::Duration::from_secs(1), rx.next(true));
        assert!(
            overflowed.await.unwrap().is_none(),
            "the overflow comes first"
        );
        let watched = tokio::time::timeout(std::time::Duration::from_secs(1), rx.next(false));
        assert!(watched.await.unwrap().is_none());
        assert!(!tx.send(Bytes::from_static(b"1")), "stays refused");
        assert!(matches!(rx.recv().await, Outgoing::Frame(_)));
        assert_eq!(rx.queued_bytes(), 6);
    }

    #[tokio::test]
    async fn an_overflow_wakes_a_waiting_receiver() {
        for take in [true, false] {
            let (tx, mut rx) = outbox(4);
            let waiter = tokio::spawn(async move { rx.next(take).await.is_none() });
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            if take {
                // taken by the waiter: not an overflow
                assert!(tx.send(Bytes::from_static(b"1234")));
                assert!(!waiter.await.unwrap(), "a frame, not an overflow");
                continue;
            }
            assert!(tx.send(Bytes::from_static(b"1234")));
            assert!(
                !waiter.is_finished(),
                "not taking: a frame does not end the wait"
            );
            assert!(!tx.send(Bytes::from_static(b"5")));
            let overflowed = tokio::time::timeout(std::time::Duration::from_secs(5), waiter);
            assert!(overflowed.await.unwrap().unwrap());
        }
    }

    #[tokio::test]
    async fn ready_takes_nothing_and_reports_the_overflow() {
        let (tx, mut rx) = outbox(4);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), rx.ready());
        assert!(pending.await.is_err(), "nothing queued");
        assert!(tx.send(Bytes::from_static(b"1234")));
        assert!(rx.ready().await);
        assert!(rx.ready().await, "still there");
        assert!(matches!(rx.try_recv(), Some(Outgoing::Frame(_))));
        assert!(tx.send(Bytes::from_static(b"1234")));
        assert!(!tx.send(Bytes::from_static(b"5")));
        assert!(!rx.ready().await, "the overflow comes first");
    }

    #[tokio::test]
    async fn closed_receiver_is_visible() {
        let (tx, rx) = outbox(10);
        drop(rx);
        assert!(tx.is_closed());
        assert!(!tx.send(Bytes::from_static(b"x")));
    }
}
