//! Document storage: the [`DocumentStore`] trait and its backends.
//!
//! A stored document is a compacted **snapshot** (a Yjs v1 update of the whole state) plus an
//! append-only **log** of v1 updates written since that snapshot. Every document row carries an
//! ownership **epoch**: a node that takes ownership of a document first calls
//! [`DocumentStore::acquire_epoch`], which increments it, and every later write names that epoch.
//! The backend checks the epoch in the same transaction as the write, so a node that lost
//! ownership (paused, partitioned, fooled by a Redis restart) can never commit anything again.
//!
//! **Invariant:** no write reaches the database unless its epoch equals the document's current
//! epoch at commit time. Backends enforce it; callers never pre-check.

pub mod memory;
pub mod sql;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use memory::MemoryStore;
pub use sql::{SqlOptions, SqlStore, Synchronous};

/// An ownership term of one document, issued by the database. Strictly increasing per document.
pub type Epoch = i64;

/// The epoch of a document loaded empty and not stored yet: its first write creates the row
/// with [`DocumentStore::create_epoch`] (and is fenced if someone else created it first).
pub const UNSTORED: Epoch = 0;

/// Position of an update in a document's log (backend-assigned, strictly increasing per
/// document). `0` means "nothing logged".
pub type LogSeq = i64;

/// What [`DocumentStore::load`] returns: the snapshot and the log after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDocument {
    /// The compacted state (a v1 update), if the document was ever compacted.
    pub snapshot: Option<Vec<u8>>,
    /// Updates appended since the snapshot, oldest first.
    pub updates: Vec<Vec<u8>>,
    /// The sequence number of the last entry in `updates` (or the compaction point when the log is
    /// empty). Pass it to [`DocumentStore::compact`] to drop exactly what was loaded.
    pub last_seq: LogSeq,
}

impl StoredDocument {
    /// True when nothing at all is stored for the document.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.updates.is_empty()
    }
}

/// One document's share of a group commit: updates to append under `epoch`.
#[derive(Debug, Clone)]
pub struct Append {
    /// Document name.
    pub name: String,
    /// The writer's ownership epoch.
    pub epoch: Epoch,
    /// Updates (Yjs v1), in the order they were applied.
    pub updates: Vec<Bytes>,
}

/// The result of one [`Append`] inside a group commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Committed; the last update got this sequence number.
    Committed(LogSeq),
    /// Rejected: the document's epoch is no longer the writer's. Nothing was written for it.
    Fenced {
        /// The epoch the database holds now.
        current: Epoch,
    },
}

/// Errors from a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The writer's epoch is stale: another owner took the document. Never retry this.
    #[error("write fenced: document epoch is {current}, writer holds {mine}")]
    Fenced {
        /// The epoch in the database.
        current: Epoch,
        /// The epoch the writer presented.
        mine: Epoch,
    },
    /// The database could not be reached or the statement failed; retrying may succeed.
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Stored bytes are not what this version of Hearth wrote (or the migration failed).
    #[error("storage corrupt or incompatible: {0}")]
    Corrupt(String),
    /// The request or the configuration is invalid (unknown URL scheme, unparsable URL, a
    /// document name no backend can store). Retrying the same call is pointless.
    #[error("invalid storage request or configuration: {0}")]
    Invalid(String),
}

impl StoreError {
    /// True when the write was rejected by fencing (retrying is pointless).
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }
}

/// Rejects document names that some backend cannot store, so that every backend accepts the
/// same names: a NUL character (PostgreSQL `TEXT` cannot hold it). The server validates names
/// more strictly at the edge; this is the storage layer's own guard.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    if name.contains('\0') {
        return Err(StoreError::Invalid(
            "document name contains a NUL character".into(),
        ));
    }
    Ok(())
}

/// A persistence backend. Implementations must be cheap to share (`Arc<dyn DocumentStore>`).
///
/// All writes are conditional on the writer's epoch being the document's current epoch,
/// checked in the same transaction as the write.
#[async_trait]
pub trait DocumentStore: Send + Sync + fmt::Debug + 'static {
    /// Takes ownership of `name`: creates its row if needed and increments its epoch, returning
    /// the new value. Older epochs are fenced from this moment.
    async fn acquire_epoch(&self, name: &str) -> Result<Epoch, StoreError>;

    /// The document's current epoch, or `None` if it has no row.
    async fn current_epoch(&self, name: &str) -> Result<Option<Epoch>, StoreError>;

    /// Creates the document's row with epoch 1 iff it has none, and returns that epoch; `None`
    /// when a row exists already (another writer stored the document first). A document that
    /// was empty when loaded is written under the epoch this returns, so opening a document
    /// that is never edited stores nothing.
    async fn create_epoch(&self, name: &str) -> Result<Option<Epoch>, StoreError>;

    /// Reads the snapshot and the log. Never writes.
    async fn load(&self, name: &str) -> Result<StoredDocument, StoreError>;

    /// Group commit: appends every item's updates in **one** transaction. Items whose epoch is
    /// stale are skipped and reported as [`AppendOutcome::Fenced`]; the others commit. An `Err`
    /// means nothing was committed, with one unavoidable exception: if the connection breaks
    /// while the database is committing, the outcome is unknown. Re-appending is safe then,
    /// because applying the same Yjs update twice is a no-op.
    async fn append(&self, batch: &[Append]) -> Result<Vec<AppendOutcome>, StoreError>;

    /// Compaction: replaces the snapshot with `state` and deletes log entries with
    /// `seq <= upto`, in one transaction, iff `epoch` is current (else [`StoreError::Fenced`]).
    async fn compact(
        &self,
        name: &str,
        epoch: Epoch,
        state: &[u8],
        upto: LogSeq,
    ) -> Result<(), StoreError>;

    /// Cheap liveness probe used by `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Short backend name for logs and metrics (`memory`, `sqlite`, `postgres`).
    fn backend(&self) -> &'static str;
}

/// Opens the backend named by `url`'s scheme:
///
/// * `memory://` (anything after the scheme is ignored): a fresh [`MemoryStore`];
/// * `sqlite://PATH` or `sqlite:PATH`: [`SqlStore`] on SQLite (file created if missing);
/// * `postgres://…` or `postgresql://…`: [`SqlStore`] on PostgreSQL.
///
/// SQL backends apply their embedded migrations before this returns. `opts` is ignored for
/// `memory://`.
pub async fn open_store(url: &str, opts: SqlOptions) -> Result<Arc<dyn DocumentStore>, StoreError> {
    if url.starts_with("memory:") {
        return Ok(Arc::new(MemoryStore::new()));
    }
    Ok(Arc::new(SqlStore::connect(url, opts).await?))
}
