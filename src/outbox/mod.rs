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

/// The direct path of an outbox: sends a frame now, or returns false to have it queued. Runs
/// in the sender's task under the queue's lock: quick, and no side effects when it refuses.
pub type Direct = Arc<dyn Fn(&Bytes) -> bool + Send + Sync>;

/// Sender side; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: QueueSender<Outgoing>,
    shared: Arc<Shared>,
    direct: Option<Direct>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("shared", &self.shared)
            .field("direct", &self.direct.is_some())
            .finish()
    }
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
    build(limit, None)
}

/// [`outbox`] with a direct path (see the module docs).
pub fn outbox_direct(limit: usize, direct: Direct) -> (Outbox, OutboxReceiver) {
    build(limit, Some(direct))
}

fn build(limit: usize, direct: Option<Direct>) -> (Outbox, OutboxReceiver) {
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
            direct,
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
        let sent = match &self.direct {
            None => self.tx.send(Outgoing::Frame(frame)).map(|()| false),
            Some(direct) => self.tx.send_or_pass(Outgoing::Frame(frame), |m| match m {
                Outgoing::Frame(f) => direct(f),
                _ => false,
            }),
        };
        if !matches!(sent, Ok(false)) {
            // passed on directly (it never waited in the queue) or refused: not queued
            self.shared.queued.fetch_sub(len, Ordering::AcqRel);
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

    /// The socket task has finished with every message it took: frames may take the direct
    /// path again while nothing is queued.
    pub fn idle(&mut self) {
        self.rx.idle();
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
