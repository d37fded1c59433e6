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

/// One stored document, as listed by [`DocumentStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentInfo {
    /// Document name.
    pub name: String,
    /// The document's current ownership epoch.
    pub epoch: Epoch,
}

/// A page of [`DocumentStore::list`]: the names starting with `prefix` that sort after `after`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only names starting with this (compared as bytes: no wildcards). Empty: every name.
    pub prefix: String,
    /// Only names sorting strictly after this one (byte order): the last name of the previous
    /// page, or `None` for the first page.
    pub after: Option<String>,
    /// At most this many documents. Callers bound it; `0` returns nothing.
    pub limit: usize,
}

impl ListQuery {
    /// Rejects a `prefix` or `after` that no stored name can match in every backend (see
    /// [`check_name`]).
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        check_name(&self.prefix)?;
        self.after.as_deref().map_or(Ok(()), check_name)
    }

    /// The exclusive upper bound of the names starting with `prefix`: `prefix` with its last
    /// character that is not `char::MAX` replaced by the next character and the rest dropped,
    /// or `None` when there is no such character (an empty prefix, or only `char::MAX`), in
    /// which case every name `>= prefix` starts with `prefix`. Byte order of UTF-8 is code point
    /// order, so `prefix <= name < end` holds exactly for the names starting with `prefix`.
    pub(crate) fn prefix_end(&self) -> Option<String> {
        let mut end = self.prefix.clone();
        while let Some(last) = end.pop() {
            // the next scalar value (skipping the surrogate gap); `None` only after char::MAX
            if let Some(next) =
                (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32)
            {
                end.push(next);
                return Some(end);
            }
        }
        None
    }

    /// The lower bound of the page: `(bound, strict)`, i.e. names `> bound` when `strict`, else
    /// names `>= bound`. It is `after` when that sorts at or after `prefix` (a name after it
    /// and below [`ListQuery::prefix_end`] starts with `prefix`), else `prefix`.
    pub(crate) fn lower_bound(&self) -> (&str, bool) {
        match &self.after {
            Some(after) if after.as_str() >= self.prefix.as_str() => (after, true),
            _ => (&self.prefix, false),
        }
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
    /// The database could not be reached or the statement failed; retrying may succeed. The
    /// message includes the cause, which is therefore not also its `source()` (an error chain
    /// printed with `{:#}` names each cause once).
    #[error("database error: {0}")]
    Database(Box<dyn std::error::Error + Send + Sync>),
    /// The database could not be opened or reached when the store was created: `cause` is the
    /// first connection's error, in one line (the file path and its directory for SQLite).
    #[error("{cause}")]
    Open {
        /// What went wrong, with the path or host it concerns.
        cause: String,
    },
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

    /// Lists the documents that have stored content (a snapshot or at least one logged update),
    /// sorted by name in byte order: those whose name starts with `query.prefix` (literally;
    /// `%` and `_` are ordinary characters) and sorts strictly after `query.after`, at most
    /// `query.limit` of them. Rows without content (acquired but never written, or deleted) are
    /// not listed. [`StoreError::Invalid`] if `prefix` or `after` contains NUL. Never writes.
    async fn list(&self, query: &ListQuery) -> Result<Vec<DocumentInfo>, StoreError>;

    /// Deletes the document's content under `epoch`: in one transaction, iff `epoch` is the
    /// document's current epoch, removes its snapshot and every logged update and increments
    /// its epoch. The row stays, empty, as a tombstone: every writer (the deleting one
    /// included) is fenced from then on, and the next owner's [`DocumentStore::acquire_epoch`]
    /// issues a newer epoch and loads an empty document.
    ///
    /// Returns `Ok(true)` if there was content, `Ok(false)` if there was none (the epoch is
    /// still incremented when the row exists, and a document without a row deleted under
    /// [`UNSTORED`] changes nothing). A stale `epoch` is [`StoreError::Fenced`] and changes
    /// nothing; on a document without a row, any epoch but [`UNSTORED`] is fenced with
    /// `current = 0`.
    async fn delete(&self, name: &str, epoch: Epoch) -> Result<bool, StoreError>;

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

#[cfg(test)]
mod tests {
    use super::ListQuery;

    fn q(prefix: &str, after: Option<&str>) -> ListQuery {
        ListQuery {
            prefix: prefix.to_owned(),
            after: after.map(str::to_owned),
            limit: 1,
        }
    }

    #[test]
    fn prefix_end_is_the_least_string_above_every_name_with_the_prefix() {
        let end = |p: &str| q(p, None).prefix_end();
        assert_eq!(end(""), None);
        assert_eq!(end("a"), Some("b".into()));
        assert_eq!(end("ab%"), Some("ab&".into()));
        assert_eq!(end("a\u{7f}"), Some("a\u{80}".into()));
        assert_eq!(end("\u{d7ff}"), Some("\u{e000}".into()));
        assert_eq!(end("a\u{10ffff}"), Some("b".into()));
        assert_eq!(end("\u{10ffff}\u{10ffff}"), None);
        for (prefix, name) in [("a", "a\u{10ffff}\u{10ffff}"), ("a\u{7f}", "a\u{7f}\u{7f}")] {
            let end = end(prefix).unwrap_or_default();
            assert!(name.starts_with(prefix) && name < end.as_str());
        }
    }

    #[test]
    fn lower_bound_is_the_later_of_prefix_and_after() {
        assert_eq!(q("p/", None).lower_bound(), ("p/", false));
        assert_eq!(q("p/", Some("a")).lower_bound(), ("p/", false));
        assert_eq!(q("p/", Some("p/")).lower_bound(), ("p/", true));
        assert_eq!(q("p/", Some("p/3")).lower_bound(), ("p/3", true));
        assert_eq!(q("", Some("")).lower_bound(), ("", true));
    }
}
