//! Server-side direct connections (Hocuspocus's `openDirectConnection`): edit a document without
//! a socket. An open direct connection keeps the document loaded; its changes are broadcast to
//! clients, trigger `on_change` and are stored like any other change.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{DocCommand, DocHandle, DocInfo, TransactError};
use crate::hooks::Context;

/// An open direct connection. Call [`DirectConnection::disconnect`] when done (dropping it
/// disconnects too, without waiting for the store).
#[derive(Debug)]
pub struct DirectConnection {
    handle: DocHandle,
    context: Arc<Context>,
    open: bool,
}

impl DirectConnection {
    pub(crate) fn new(handle: DocHandle, context: Context) -> Self {
        Self {
            handle,
            context: Arc::new(context),
            open: true,
        }
    }

    /// The document name.
    pub fn document_name(&self) -> &str {
        self.handle.name()
    }

    /// Runs `f` against the document inside its task. Create transactions in `f` as usual
    /// (`doc.transact_mut()`); every change is broadcast and stored. Resolves once applied.
    pub async fn transact<F>(&self, f: F) -> Result<(), TransactError>
    where
        F: FnOnce(&yrs::Doc) + Send + 'static,
    {
        self.run(f, false).await
    }

    /// Like [`DirectConnection::transact`], but resolves only once the change is durable: in
    /// durable mode after the database transaction holding it has committed (the guarantee a
    /// client's `SyncStatus` acknowledgement gives), in memory mode once applied.
    pub async fn transact_durable<F>(&self, f: F) -> Result<(), TransactError>
    where
        F: FnOnce(&yrs::Doc) + Send + 'static,
    {
        self.run(f, true).await
    }

    async fn run<F>(&self, f: F, durable: bool) -> Result<(), TransactError>
    where
        F: FnOnce(&yrs::Doc) + Send + 'static,
    {
        let (done, rx) = oneshot::channel();
        let cmd = DocCommand::Transact {
            f: Box::new(f),
            context: self.context.clone(),
            done,
            durable,
        };
        if !self.handle.send(cmd).await {
            return Err(TransactError::Closed);
        }
        rx.await.unwrap_or(Err(TransactError::Closed))
    }

    /// Applies a Yjs v1 update with the checks a client's update gets (bounded scan, known
    /// dependencies, document size); resolves once it is durable. A refused update changes
    /// nothing ([`TransactError::Refused`]).
    pub async fn apply_update(&self, update: Vec<u8>) -> Result<(), TransactError> {
        let (done, rx) = oneshot::channel();
        let cmd = DocCommand::ApplyUpdate {
            update: update.into(),
            context: self.context.clone(),
            done,
        };
        if !self.handle.send(cmd).await {
            return Err(TransactError::Closed);
        }
        rx.await.unwrap_or(Err(TransactError::Closed))
    }

    /// The document's state: connections, epoch, size.
    pub async fn info(&self) -> Option<DocInfo> {
        self.handle.info().await
    }

    /// Runs `f` on the document inside its task without changing it and returns its result
    /// (reading its content as JSON, encoding its state).
    pub async fn read<R, F>(&self, f: F) -> Result<R, TransactError>
    where
        F: FnOnce(&yrs::Doc) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.run(
            move |doc| {
                let _ = tx.send(f(doc));
            },
            false,
        )
        .await?;
        rx.await.map_err(|_| TransactError::Closed)
    }

    /// Stores the document now and closes the connection; the document unloads if nobody else
    /// uses it.
    pub async fn disconnect(mut self) {
        let (done, rx) = oneshot::channel();
        // closed only once the close is queued: dropped while waiting for room, `Drop` sends it
        if self.handle.send(DocCommand::DirectClose(done)).await {
            self.open = false;
            let _ = rx.await;
        }
    }
}

impl Drop for DirectConnection {
    fn drop(&mut self) {
        if self.open {
            let (done, _) = oneshot::channel();
            self.handle.send_detached(DocCommand::DirectClose(done));
        }
    }
}
