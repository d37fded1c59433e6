//! `hearth import` and `hearth export`: documents into and out of Hearth's database.
//!
//! Both sides of a transfer speak plain Yjs: a document travels as one update holding its
//! whole state. Outside Hearth that is a row of a Hocuspocus-style `documents(name, data)`
//! table ([`table`], SQLite or PostgreSQL) or a file in a directory ([`files`]); inside, the
//! update is appended to the document's log under a freshly acquired epoch, like any write.
//!
//! **Import is a merge.** A document whose stored state already contains the source (every
//! insertion and deletion, as Yjs's `snapshotContainsUpdate` decides) is left alone and counted
//! `unchanged`; otherwise the source update is appended, and Yjs merges it with whatever Hearth
//! had. Importing twice changes nothing the second time, and edits made in Hearth since a first
//! import survive a second one. Every written document is read back and loaded the way a node
//! loads it (guarded decoding) and must then contain the source: that is the verification.
//!
//! Everything read is outside data: sizes are checked before anything is read
//! (`max_document_bytes`), updates are scanned and round-tripped before yrs sees them, and yrs
//! runs under `catch_unwind`. One bad document is reported by name and counted as failed; the
//! others go on.

mod export;
pub mod files;
mod import;
pub mod table;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use yrs::Doc;

pub use export::export;
pub use import::{Import, check_update};

use crate::protocol::scan::ScanLimits;
use crate::protocol::update::apply_guarded;
use crate::storage::StoredDocument;

/// Rows or documents read per page.
const PAGE: u32 = 200;

/// Where documents come from (import) or go to (export).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A `documents(name, data)`-style table (created when missing by an export).
    Table {
        /// `sqlite://PATH` or `postgres://…`.
        url: String,
        /// The table name (optionally `schema.table` on PostgreSQL).
        table: String,
    },
    /// A directory of update files (see [`files`]; created when missing by an export).
    Dir(PathBuf),
}

impl Location {
    /// A database URL (`sqlite:`, `postgres://`) with `table`, or else a directory path.
    pub fn parse(location: &str, table: &str) -> Location {
        if table::is_database_url(location) {
            Location::Table {
                url: location.to_owned(),
                table: table.to_owned(),
            }
        } else {
            Location::Dir(PathBuf::from(location))
        }
    }
}

/// Why a transfer could not run at all (a document that fails is counted, not an error).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A source, target or option that cannot work; the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// The source or target database failed.
    #[error("{what}: {source}")]
    Database {
        /// Which database (URL with its password hidden) or statement.
        what: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Hearth's database failed.
    #[error("Hearth's database: {0}")]
    Store(#[from] crate::storage::StoreError),
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What happened to one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (and, for an import, verified). A dry run counts what it would write.
    Written,
    /// Import only: Hearth's state already contained the source; nothing written.
    Unchanged,
    /// Not transferred; the reason.
    Failed(String),
}

/// Running totals of a transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Documents the source holds (as counted at the start).
    pub total: u64,
    /// Documents written.
    pub written: u64,
    /// Documents already up to date (import).
    pub unchanged: u64,
    /// Documents that failed.
    pub failed: u64,
}

impl Counts {
    /// Documents dealt with so far.
    pub fn done(&self) -> u64 {
        self.written + self.unchanged + self.failed
    }

    fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Written => self.written += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Failed(_) => self.failed += 1,
        }
    }
}

/// Called with every document's name and outcome.
type OnDocument<'a> = Box<dyn FnMut(&str, &Outcome) + Send + 'a>;

/// Where a transfer reports: every document's outcome, and its totals at most once per
/// `every` (and once at the end, by the caller).
pub struct Progress<'a> {
    counts: Counts,
    every: Duration,
    last: Instant,
    on_document: OnDocument<'a>,
    on_tick: Box<dyn FnMut(&Counts) + Send + 'a>,
}

impl<'a> Progress<'a> {
    /// Calls `on_document` for every document and `on_tick` with the totals at most once per
    /// `every`.
    pub fn new(
        every: Duration,
        on_document: impl FnMut(&str, &Outcome) + Send + 'a,
        on_tick: impl FnMut(&Counts) + Send + 'a,
    ) -> Progress<'a> {
        Progress {
            counts: Counts::default(),
            every,
            last: Instant::now(),
            on_document: Box::new(on_document),
            on_tick: Box::new(on_tick),
        }
    }

    /// The totals so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    fn total(&mut self, total: u64) {
        self.counts.total = total;
    }

    fn record(&mut self, name: &str, outcome: &Outcome) {
        self.counts.add(outcome);
        (self.on_document)(name, outcome);
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            (self.on_tick)(&self.counts);
        }
    }
}

/// A stored document loaded into a fresh `Doc` with guarded decoding.
fn load(stored: &StoredDocument, limits: &ScanLimits) -> Result<Doc, String> {
    let doc = Doc::new();
    for part in stored.snapshot.iter().chain(stored.updates.iter()) {
        apply_guarded(&doc, part, limits)
            .map_err(|e| format!("Hearth's stored state does not load: {e}"))?;
    }
    Ok(doc)
}
