//! [`Outbox`]: the byte-bounded queue from document tasks to one socket's writer.
//!
//! **Invariant:** a send never blocks and never drops silently. When the queued bytes would
//! exceed the limit, the socket is marked overflowed and its task disconnects the client (a slow
//! reader is disconnected, never skipped); every later send is refused.

pub(crate) mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;

use self::queue::{QueueReceiver, QueueSender, queue};
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

#[derive(Debug)]
struct Shared {
    queued: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    notify: Notify,
}

/// Sender side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: QueueSender<Outgoing>,
    shared: Arc<Shared>,
}

/// Receiver side, owned by the socket task.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: QueueReceiver<Outgoing>,
    shared: Arc<Shared>,
}

/// Resolves when the outbox overflowed (see [`OutboxReceiver::overflow_signal`]).
#[derive(Debug, Clone)]
pub struct OverflowSignal(Arc<Shared>);

impl OverflowSignal {
    /// Waits until the queue overflowed.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.0.overflowed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// Creates a queue that holds at most `limit` bytes of frames.
pub fn outbox(limit: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = queue();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        limit,
        overflowed: AtomicBool::new(false),
        notify: Notify::new(),
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        OutboxReceiver { rx, shared },
    )
}

impl Outbox {
    /// Queues a frame. Returns false when the socket is gone or has overflowed.
    pub fn send(&self, frame: Bytes) -> bool {
        if self.shared.overflowed.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.len();
        let before = self.shared.queued.fetch_add(len, Ordering::AcqRel);
        // The bound is on falling behind, not on frame size: a frame is refused only when the
        // queue already holds `limit` bytes, so one frame larger than the limit (a joiner's
        // step2 of a large document) still goes out. The queue never exceeds limit + one frame.
        if before >= self.shared.limit {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            self.shared.overflowed.store(true, Ordering::Release);
            self.shared.notify.notify_one();
            return false;
        }
        if self.tx.send(Outgoing::Frame(frame)).is_err() {
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
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
    /// The next message. Cancel-safe.
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
            self.shared.queued.fetch_sub(f.len(), Ordering::AcqRel);
        }
    }

    /// A handle that resolves when a sender found the queue over its limit.
    pub fn overflow_signal(&self) -> OverflowSignal {
        OverflowSignal(self.shared.clone())
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            rx.overflow_signal().wait(),
        )
        .await
        .unwrap();
        assert!(!tx.send(Bytes::from_static(b"1")), "stays refused");
        assert!(matches!(rx.recv().await, Outgoing::Frame(_)));
        assert_eq!(rx.queued_bytes(), 6);
    }

    #[tokio::test]
    async fn closed_receiver_is_visible() {
        let (tx, rx) = outbox(10);
        drop(rx);
        assert!(tx.is_closed());
        assert!(!tx.send(Bytes::from_static(b"x")));
    }
}
