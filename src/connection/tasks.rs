//! [`Tasks`]: the results of a socket's background tasks (authentications, token syncs), on
//! a queue that exists only while one of them runs.
//!
//! A socket starts such tasks rarely: once per document it opens, and on a token refresh.
//! Keeping their queue for the socket's whole life would cost every idle socket its shared
//! header, so the queue is made when the first task starts and dropped once every task that
//! was given a sender has answered.
//!
//! **Invariant:** while a task holds a sender from [`Tasks::sender`], the queue exists and
//! [`Tasks::poll_next`] watches it; a task that never answers (it panicked) only keeps the
//! queue alive.

use std::task::{Context, Poll};

use crate::outbox::queue::{QueueReceiver, QueueSender, queue};

/// The receiving side of a socket's background tasks; see the module documentation.
#[derive(Debug)]
pub(crate) struct Tasks<T> {
    rx: Option<QueueReceiver<T>>,
    /// Senders handed out whose task has not answered yet.
    running: u32,
}

impl<T> Default for Tasks<T> {
    fn default() -> Self {
        Self {
            rx: None,
            running: 0,
        }
    }
}

impl<T> Tasks<T> {
    /// A sender for one more task, which must send exactly one result (or be dropped).
    pub(crate) fn sender(&mut self) -> QueueSender<T> {
        self.running = self.running.saturating_add(1);
        match &self.rx {
            Some(rx) => rx.sender(),
            None => {
                let (tx, rx) = queue();
                self.rx = Some(rx);
                tx
            }
        }
    }

    /// True while a task given a sender has not answered.
    #[cfg(test)]
    fn is_running(&self) -> bool {
        self.rx.is_some()
    }

    /// The next task's result. Pending without a waker while no task runs: a task is only
    /// started by the socket's own loop, which polls again after starting it. Cancel-safe.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        let Some(rx) = &mut self.rx else {
            return Poll::Pending;
        };
        let item = std::task::ready!(rx.poll_recv(cx));
        self.running = self.running.saturating_sub(1);
        if self.running == 0 {
            self.rx = None;
        }
        Poll::Ready(item)
    }

    /// Waits for the next task's result (see [`poll_next`](Self::poll_next)).
    pub(crate) fn next(&mut self) -> impl std::future::Future<Output = T> + Send + '_
    where
        T: Send,
    {
        std::future::poll_fn(|cx| self.poll_next(cx))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_queue_lives_only_while_a_task_runs() {
        let mut tasks: Tasks<u32> = Tasks::default();
        assert!(!tasks.is_running());
        let a = tasks.sender();
        let b = tasks.sender();
        assert!(tasks.is_running());
        tokio::spawn(async move { a.send(1) })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tasks.next().await, 1);
        assert!(tasks.is_running(), "one task has not answered");
        b.send(2).unwrap();
        assert_eq!(tasks.next().await, 2);
        assert!(
            !tasks.is_running(),
            "every task answered: the queue is gone"
        );
        // a later task gets a fresh queue
        let c = tasks.sender();
        c.send(3).unwrap();
        assert_eq!(tasks.next().await, 3);
        assert!(!tasks.is_running());
    }

    #[tokio::test]
    async fn nothing_waits_while_no_task_runs() {
        let mut tasks: Tasks<u32> = Tasks::default();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), tasks.next()).await;
        assert!(waited.is_err());
    }

    #[tokio::test]
    async fn a_result_sent_after_the_wait_began_wakes_it() {
        let mut tasks: Tasks<u32> = Tasks::default();
        let tx = tasks.sender();
        let send = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            tx.send(7).unwrap();
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.next()).await;
        assert_eq!(got.unwrap(), 7);
        send.await.unwrap();
    }
}
