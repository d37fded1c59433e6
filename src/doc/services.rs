//! [`DocServices`]: what the document layer uses of the node, handed to the registry and to
//! every document task (instead of the whole server's state).

use std::sync::Arc;

use super::committer::Committer;
use super::ownership::Ownership;
use super::registry::Registry;
use tokio::sync::oneshot;

use super::direct::DirectConnection;
use super::{DocCommand, DocHandle, LoadError};
use crate::config::Config;
use crate::hooks::{Context, Extensions};
use crate::metrics::Metrics;
use crate::storage::DocumentStore;

/// The node's services as document tasks see them.
#[derive(Debug)]
pub(crate) struct DocServices {
    /// The node's configuration (limits, durability, timings).
    pub config: Config,
    /// The extension chain (load, change, store and unload hooks).
    pub extensions: Extensions,
    /// Where documents are read from and written to.
    pub store: Arc<dyn DocumentStore>,
    /// The node's metrics.
    pub metrics: Metrics,
    /// The group commit of durable appends.
    pub committer: Committer,
    /// The loaded documents.
    pub registry: Registry,
    /// Document ownership across nodes; `None` on a single node.
    pub ownership: Option<Arc<dyn Ownership>>,
    /// Groups a document's sends to many connections; `None` on a single node.
    pub burst: Option<Arc<dyn Burst>>,
}

/// Lets what a document sends to many connections in one go (a broadcast) travel together: a
/// frame for several clients of the same remote node leaves as one message. The document
/// holds the guard of [`Burst::begin`] for the length of a synchronous loop of sends, never
/// across an `.await`.
pub(crate) trait Burst: Send + Sync + std::fmt::Debug {
    /// Starts a burst; it ends when the guard is dropped.
    fn begin(&self) -> BurstGuard;
}

/// The guard of a [`Burst`].
pub(crate) type BurstGuard = Box<dyn Send>;

impl DocServices {
    /// Returns the document's task, loading it first if needed (see [`Registry::open`]).
    pub(crate) async fn open(
        self: &Arc<Self>,
        name: &str,
        context: &Context,
    ) -> Result<DocHandle, LoadError> {
        self.registry.open(self, name, context).await
    }

    /// Opens a direct connection to `name` (loading it if needed), which keeps it loaded until
    /// the connection closes. Retries a few times when the document unloads meanwhile.
    pub(crate) async fn open_direct(
        self: &Arc<Self>,
        name: &str,
        context: Context,
    ) -> Result<DirectConnection, LoadError> {
        for _ in 0..10 {
            let handle = self.open(name, &context).await?;
            let (tx, rx) = oneshot::channel();
            if handle.send(DocCommand::DirectOpen(tx)).await && matches!(rx.await, Ok(Ok(()))) {
                return Ok(DirectConnection::new(handle, context));
            }
        }
        Err(LoadError::Unavailable("kept closing while being opened"))
    }
}
