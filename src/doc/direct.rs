//! Server-side direct connections (Hocuspocus's `openDirectConnection`): edit a document without
//! a socket. An open direct connection keeps the document loaded; its changes are broadcast to
//! clients, trigger `on_change` and are stored like any other change.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{DocCommand, DocHandle, TransactError};
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
        let (done, rx) = oneshot::channel();
        let cmd = DocCommand::Transact {
            f: Box::new(f),
            context: self.context.clone(),
            done,
        };
        if !self.handle.send(cmd).await {
            return Err(TransactError::Closed);
        }
        rx.await.unwrap_or(Err(TransactError::Closed))
    }

    /// Stores the document now and closes the connection; the document unloads if nobody else
    /// uses it.
    pub async fn disconnect(mut self) {
        self.open = false;
        let (done, rx) = oneshot::channel();
        if self.handle.send(DocCommand::DirectClose(done)).await {
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
