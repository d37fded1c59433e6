//! Documents: one task per loaded document owns its `yrs::Doc` and awareness.
//!
//! * [`registry`] — name → [`DocHandle`]; loads each document exactly once (all joiners wait for
//!   the one load); serialises unload and the next load of the same name.
//! * [`actor`] — the document task: applies updates, answers sync, broadcasts, withholds durable
//!   acks until commit, compacts, unloads.
//! * [`committer`] — the node-wide group commit of durable appends.
//! * [`direct`] — server-side direct connections.
//! * [`ownership`] — the claim a document holds while loaded (the cluster implements it).
//! * [`services`] — what the document layer uses of the node.
//!
//! **Invariant:** only the actor touches `yrs::Doc`; no yrs transaction is held across `.await`.

pub mod actor;
pub mod committer;
pub mod direct;
pub(crate) mod offload;
pub(crate) mod ownership;
pub mod registry;
pub(crate) mod services;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::hooks::{Context, DocumentOps, DocumentRef};
use crate::outbox::Outbox;
use crate::protocol::message::SyncMessage;

/// Identifies one document connection (a client attachment), unique in this process.
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A fresh connection id.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// How frames for a connection are framed.
#[derive(Debug, Clone)]
pub enum Framing {
    /// Hocuspocus: every frame starts with this address (name or `name\0session`).
    Hocuspocus(Arc<str>),
    /// y-websocket: no address, no SyncStatus, server step1 on attach.
    YWebsocket,
}

impl Framing {
    /// The address prefix, if any.
    pub fn address(&self) -> Option<&str> {
        match self {
            Framing::Hocuspocus(a) => Some(a),
            Framing::YWebsocket => None,
        }
    }
}

/// Everything the actor needs to serve one connection.
#[derive(Debug)]
pub struct Attach {
    /// Connection id.
    pub conn: ConnId,
    /// Where frames for the client go.
    pub outbox: Outbox,
    /// Framing.
    pub framing: Framing,
    /// Read-only connections cannot change the document.
    pub read_only: bool,
    /// Context from the auth hooks.
    pub context: Arc<Context>,
    /// Socket id (`"server"` for direct connections).
    pub socket_id: Arc<str>,
    /// The hook-facing handle of this connection (Hocuspocus connections).
    pub conn_ref: Option<crate::hooks::ConnectionRef>,
}

/// The document is unloading; load it again.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("document is unloading")]
pub struct Unloading;

/// A request to a document task.
pub enum DocCommand {
    /// Attach a client; answered once the awareness snapshot (and y-websocket step1) is queued.
    Attach(Attach, oneshot::Sender<Result<(), Unloading>>),
    /// A sync message from a connection.
    Sync {
        /// Sender.
        conn: ConnId,
        /// The message.
        msg: SyncMessage,
    },
    /// An awareness update from a connection.
    Awareness {
        /// Sender.
        conn: ConnId,
        /// Raw awareness update.
        update: Bytes,
    },
    /// A stateless message from a connection (runs `on_stateless` in order with its frames).
    Stateless {
        /// Sender.
        conn: ConnId,
        /// The payload.
        payload: String,
    },
    /// QueryAwareness from a connection.
    QueryAwareness {
        /// Sender.
        conn: ConnId,
    },
    /// The connection leaves. With `reply`, the client gets `CLOSE(reply)`.
    Detach {
        /// The connection.
        conn: ConnId,
        /// Close reason to send back, if any.
        reply: Option<String>,
    },
    /// Send a stateless message to every connection.
    BroadcastStateless(String),
    /// Close every connection with `CLOSE(reason)`.
    CloseConnections(String),
    /// A direct connection opens (blocks unloading).
    DirectOpen(oneshot::Sender<Result<(), Unloading>>),
    /// A direct connection closes: store now, then unload if unused.
    DirectClose(oneshot::Sender<()>),
    /// Run a closure against the document (direct connections).
    Transact {
        /// The edit.
        f: Box<dyn FnOnce(&yrs::Doc) + Send>,
        /// Context of the direct connection.
        context: Arc<Context>,
        /// Answered after the change is applied and broadcast (and, with `durable`, committed).
        done: oneshot::Sender<Result<(), TransactError>>,
        /// Answer only once the change is durable (durable mode; memory mode answers at once).
        durable: bool,
    },
    /// Apply a Yjs v1 update from the server side (the admin API), with the same checks as a
    /// client's update; answered once it is durable.
    ApplyUpdate {
        /// The update.
        update: Bytes,
        /// Who sends it (hooks see it).
        context: Arc<Context>,
        /// The outcome.
        done: oneshot::Sender<Result<(), TransactError>>,
    },
    /// Report the document's state (connections, epoch, size).
    Info(oneshot::Sender<DocInfo>),
    /// Delete the stored document: close every connection, store what is pending, remove the
    /// content under the current epoch (which fences this task too) and stop.
    Delete(oneshot::Sender<Result<bool, crate::storage::StoreError>>),
    /// Commit, compact and stop (graceful shutdown).
    Shutdown(oneshot::Sender<()>),
}

impl std::fmt::Debug for DocCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DocCommand::Attach(..) => "Attach",
            DocCommand::Sync { .. } => "Sync",
            DocCommand::Awareness { .. } => "Awareness",
            DocCommand::QueryAwareness { .. } => "QueryAwareness",
            DocCommand::Stateless { .. } => "Stateless",
            DocCommand::Detach { .. } => "Detach",
            DocCommand::BroadcastStateless(_) => "BroadcastStateless",
            DocCommand::CloseConnections(_) => "CloseConnections",
            DocCommand::DirectOpen(_) => "DirectOpen",
            DocCommand::DirectClose(_) => "DirectClose",
            DocCommand::Transact { .. } => "Transact",
            DocCommand::ApplyUpdate { .. } => "ApplyUpdate",
            DocCommand::Info(_) => "Info",
            DocCommand::Delete(_) => "Delete",
            DocCommand::Shutdown(_) => "Shutdown",
        };
        f.write_str(name)
    }
}

/// Why a direct transaction failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransactError {
    /// The closure panicked; the document was reset.
    #[error("the transaction panicked; the document was reset")]
    Panicked,
    /// The document is gone (unloaded, fenced or shutting down).
    #[error("the document is closed")]
    Closed,
    /// The update was refused (malformed, missing dependencies, or over a size limit); nothing
    /// was applied.
    #[error("update refused: {0}")]
    Refused(String),
}

/// A loaded document's state ([`crate::DirectConnection::info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocInfo {
    /// Attached client connections (local sockets and clients of other nodes).
    pub connections: usize,
    /// Open direct connections.
    pub direct: usize,
    /// The ownership epoch the document is written under (0: not stored yet).
    pub epoch: crate::storage::Epoch,
    /// Encoded size estimate in bytes.
    pub size: usize,
}

/// A cheap, cloneable handle to a document task.
#[derive(Debug, Clone)]
pub struct DocHandle {
    name: Arc<str>,
    tx: mpsc::Sender<DocCommand>,
}

/// A handle that does not keep the document task alive (held by the task itself).
#[derive(Debug, Clone)]
pub(crate) struct WeakDocHandle {
    name: Arc<str>,
    tx: mpsc::WeakSender<DocCommand>,
}

impl WeakDocHandle {
    pub(crate) fn upgrade(&self) -> Option<DocHandle> {
        self.tx.upgrade().map(|tx| DocHandle {
            name: self.name.clone(),
            tx,
        })
    }
}

impl DocHandle {
    /// The document's state, or `None` when its task is gone.
    pub async fn info(&self) -> Option<DocInfo> {
        let (tx, rx) = oneshot::channel();
        if !self.send(DocCommand::Info(tx)).await {
            return None;
        }
        rx.await.ok()
    }

    /// The document name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a command, waiting for room (backpressure). False when the task is gone.
    pub async fn send(&self, cmd: DocCommand) -> bool {
        self.tx.send(cmd).await.is_ok()
    }

    /// Sends without waiting; when the queue is full the send continues in the background.
    pub fn send_detached(&self, cmd: DocCommand) {
        match self.tx.try_send(cmd) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(cmd).await;
                });
            }
        }
    }

    /// True once the task has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once the document task has ended.
    #[cfg(test)]
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }

    pub(crate) fn downgrade(&self) -> WeakDocHandle {
        WeakDocHandle {
            name: self.name.clone(),
            tx: self.tx.downgrade(),
        }
    }

    /// A [`DocumentRef`] for hooks.
    pub fn as_ref_for_hooks(&self) -> DocumentRef {
        DocumentRef {
            inner: Arc::new(self.clone()),
        }
    }
}

impl DocumentOps for DocHandle {
    fn broadcast_stateless(&self, payload: &str) {
        self.send_detached(DocCommand::BroadcastStateless(payload.to_owned()));
    }
    fn close_connections(&self) {
        self.send_detached(DocCommand::CloseConnections(
            crate::protocol::Close::ResetConnection.reason().into(),
        ));
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Why a document could not be opened. [`LoadError::client_reason`] is what a client sees in
/// `PermissionDenied`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The node already serves `max_documents` documents.
    #[error("server at document capacity")]
    Capacity,
    /// Another node owns the document (ownership moved between routing and loading): the
    /// client should be routed afresh.
    #[error("another node owns the document")]
    NotOwner,
    /// A hook (`on_load_document`, `after_load_document`) refused the document, with this
    /// reason (empty: none given).
    #[error("refused by a hook: {0}")]
    Refused(String),
    /// The document cannot be served: the ownership lock, the database or the stored state
    /// failed, or it kept closing while being opened. The text is for logs, not for clients.
    #[error("document unavailable: {0}")]
    Unavailable(&'static str),
    /// The server stopped.
    #[error("server stopped")]
    Stopped,
}

impl LoadError {
    /// The reason a client sees in `PermissionDenied`.
    pub fn client_reason(&self) -> &str {
        match self {
            LoadError::Capacity => "server at document capacity",
            LoadError::Refused(reason) if !reason.is_empty() => reason,
            LoadError::Stopped => "server stopped",
            LoadError::NotOwner | LoadError::Refused(_) | LoadError::Unavailable(_) => {
                "permission-denied"
            }
        }
    }
}
