//! [`queue`]: an unbounded multi-producer, single-consumer queue for a socket task that holds
//! no memory while it is empty.
//!
//! Why not `tokio::sync::mpsc`: its channel allocates a 32-slot block up front and keeps its
//! blocks after a burst, about 2 KB per channel that every idle socket would pay (an idle
//! connection is meant to cost about 8 KB in all). Here the buffer is a `VecDeque` that is
//! allocated on the first message and freed once the consumer has drained it. Senders and the
//! consumer only ever hold the lock for a push or a pop.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// A drained buffer with more capacity than this is freed rather than kept.
const KEEP_CAPACITY: usize = 0;

#[derive(Debug)]
struct Inner<T, X> {
    state: Mutex<State<T>>,
    waker: AtomicWaker,
    /// What the queue's owner shares between its two sides, in the same allocation.
    extra: X,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// The consumer holds an item it took and has not finished with ([`QueueReceiver::idle`]).
    busy: bool,
}

/// The sending side; cheap to clone.
#[derive(Debug)]
pub struct QueueSender<T, X = ()>(Arc<Inner<T, X>>);

/// The receiving side, owned by one task.
#[derive(Debug)]
pub struct QueueReceiver<T, X = ()>(Arc<Inner<T, X>>);

/// Creates an empty queue (allocating only the shared header).
pub fn queue<T>() -> (QueueSender<T>, QueueReceiver<T>) {
    queue_with(())
}

/// [`queue`] whose shared header also holds `extra`, reachable from both sides (one
/// allocation instead of two for a queue that comes with state of its own).
pub fn queue_with<T, X>(extra: X) -> (QueueSender<T, X>, QueueReceiver<T, X>) {
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            items: VecDeque::new(),
            closed: false,
            busy: false,
        }),
        waker: AtomicWaker::new(),
        extra,
    });
    (QueueSender(inner.clone()), QueueReceiver(inner))
}

impl<T, X> Inner<T, X> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // a panic while holding the lock cannot leave the deque inconsistent
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T, X> Clone for QueueSender<T, X> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T, X> QueueSender<T, X> {
    /// The state shared with the receiver ([`queue_with`]).
    pub fn extra(&self) -> &X {
        &self.0.extra
    }

    /// Queues `item`; gives it back when the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        {
            let mut state = self.0.lock();
            if state.closed {
                return Err(item);
            }
            state.items.push_back(item);
        }
        self.0.waker.wake();
        Ok(())
    }

    /// Hands `item` to `pass` instead of queueing it when nothing is ahead of it (the queue is
    /// empty and the consumer is not busy with an item it took), so the order of everything
    /// sent stays the order it is handled in; `pass` returns false to have it queued after all.
    /// `pass` runs under the queue's lock: it must be quick and must not touch this queue.
    /// `Ok(true)`: passed on; `Ok(false)`: queued; `Err`: the receiver is gone.
    pub fn send_or_pass(&self, item: T, pass: impl FnOnce(&T) -> bool) -> Result<bool, T> {
        {
            let mut state = self.0.lock();
            if state.closed {
                return Err(item);
            }
            if state.items.is_empty() && !state.busy && pass(&item) {
                return Ok(true);
            }
            state.items.push_back(item);
        }
        self.0.waker.wake();
        Ok(false)
    }

    /// Wakes the receiver without queueing anything (it has something else to look at).
    pub fn wake(&self) {
        self.0.waker.wake();
    }

    /// True once the receiver has been dropped.
    pub fn is_closed(&self) -> bool {
        self.0.lock().closed
    }
}

impl<T, X> QueueReceiver<T, X> {
    /// Another sender to this queue.
    pub fn sender(&self) -> QueueSender<T, X> {
        QueueSender(self.0.clone())
    }

    /// The state shared with the senders ([`queue_with`]).
    pub fn extra(&self) -> &X {
        &self.0.extra
    }

    /// An item if one is queued now. Taking one marks the consumer busy until
    /// [`idle`](Self::idle).
    pub fn try_recv(&mut self) -> Option<T> {
        let mut state = self.0.lock();
        let item = state.items.pop_front();
        if item.is_some() {
            state.busy = true;
        }
        if state.items.is_empty() && state.items.capacity() > KEEP_CAPACITY {
            state.items = VecDeque::new();
        }
        item
    }

    /// The consumer has finished with every item it took: senders may pass items on directly
    /// again ([`QueueSender::send_or_pass`]) while the queue is empty.
    pub fn idle(&mut self) {
        self.0.lock().busy = false;
    }

    /// Registers `waker` to be woken by the next send or [`QueueSender::wake`].
    pub fn register(&self, waker: &std::task::Waker) {
        self.0.waker.register(waker);
    }

    /// Waits for the next item. Cancel-safe: an item is removed only when it is returned.
    #[cfg(test)]
    pub async fn recv(&mut self) -> T {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Ready while an item is queued; takes nothing. Registers the waker otherwise.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.lock().items.is_empty() {
            return Poll::Ready(());
        }
        self.0.waker.register(cx.waker());
        // an item pushed between the first look and the registration has woken nobody
        if self.0.lock().items.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Polls for the next item (see [`recv`](Self::recv)).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(item) = self.try_recv() {
            return Poll::Ready(item);
        }
        self.0.waker.register(cx.waker());
        // an item pushed between the first look and the registration has woken nobody
        match self.try_recv() {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }
}

impl<T, X> Drop for QueueReceiver<T, X> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.0.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        drop(items); // outside the lock
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn items_pass_on_only_with_nothing_ahead_of_them() {
        let (tx, mut rx) = queue::<u32>();
        let passed = std::sync::Mutex::new(Vec::new());
        let pass = |n: &u32| {
            passed.lock().unwrap().push(*n);
            true
        };
        assert_eq!(tx.send_or_pass(1, pass), Ok(true));
        // refused by `pass`: queued
        assert_eq!(tx.send_or_pass(2, |_| false), Ok(false));
        // something queued ahead: queued, `pass` not asked
        assert_eq!(tx.send_or_pass(3, |_| panic!("asked")), Ok(false));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        // empty, but the consumer still holds what it took
        assert_eq!(tx.send_or_pass(4, |_| panic!("asked")), Ok(false));
        assert_eq!(rx.try_recv(), Some(4));
        rx.idle();
        assert_eq!(tx.send_or_pass(5, pass), Ok(true));
        assert_eq!(*passed.lock().unwrap(), [1, 5]);
        drop(rx);
        assert_eq!(tx.send_or_pass(6, |_| panic!("asked")), Err(6));
    }

    #[tokio::test]
    async fn delivers_in_order_and_wakes_the_receiver() {
        let (tx, mut rx) = queue();
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..100 {
                got.push(rx.recv().await);
            }
            got
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let tx2 = tx.clone();
        for i in 0..50 {
            tx.send(i).unwrap();
        }
        for i in 50..100 {
            tx2.send(i).unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = queue();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        assert!(rx.0.lock().items.capacity() >= 1000);
        while rx.try_recv().is_some() {}
        assert_eq!(rx.0.lock().items.capacity(), 0);
    }

    #[test]
    fn a_dropped_receiver_refuses_and_frees() {
        let (tx, rx) = queue();
        tx.send(1).unwrap();
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(2), Err(2));
        assert!(tx.0.lock().items.is_empty());
    }
}
