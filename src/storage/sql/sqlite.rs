//! SQLite dialect of [`super::SqlStore`].
//!
//! Two pools on one file: a **writer** pool with a single connection (every write transaction
//! queues there, in FIFO order, instead of racing for the SQLite write lock and backing off on
//! `SQLITE_BUSY`) and a **reader** pool for `load`, `current_epoch` and `ping` (WAL readers
//! never block the writer and see a consistent snapshot per statement). Write transactions start
//! with `BEGIN IMMEDIATE`, so the database write lock is held *before* the epoch is read, which
//! also keeps fencing correct when another process writes the same file.

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqliteConnection, Transaction};

use super::{LoadRow, SqlOptions, Synchronous, assemble, db_err, migrate_err};
use crate::storage::{Append, AppendOutcome, Epoch, LogSeq, StoreError, StoredDocument};

/// Migration 1. Frozen: sqlx checksums applied migrations; change the schema with a new one.
const MIGRATION_1: &str = "\
CREATE TABLE documents (
    name         TEXT    NOT NULL PRIMARY KEY,
    epoch        INTEGER NOT NULL,
    snapshot     BLOB,
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    updated_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
CREATE TABLE document_updates (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT    NOT NULL,
    data BLOB    NOT NULL
) STRICT;
CREATE INDEX document_updates_name_seq ON document_updates (name, seq);
";

/// Migration 2: the epoch each log row was committed under (forensics: which ownership term
/// wrote what). `NULL` on rows written before it. Frozen like migration 1.
const MIGRATION_2: &str = "ALTER TABLE document_updates ADD COLUMN epoch INTEGER;";

/// How often opening a SQLite file is retried after a database error (see `connect`).
const MIGRATE_ATTEMPTS: u64 = 5;

fn migrator() -> Migrator {
    super::migrator([MIGRATION_1, MIGRATION_2])
}

#[derive(Clone)]
pub(super) struct Pools {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl Pools {
    pub(super) async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// Opens the pools, retrying briefly on database errors: sqlx takes no lock while it migrates
/// SQLite, so processes opening a new file together race (switching to WAL or creating the
/// tables fails with "database is locked" or "table already exists"); once the winner has
/// committed, the others find the file set up.
pub(super) async fn connect(url: &str, opts: &SqlOptions) -> Result<Pools, StoreError> {
    let mut attempt = 0;
    loop {
        match connect_once(url, opts).await {
            Err(e @ StoreError::Database(_)) if attempt < MIGRATE_ATTEMPTS => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "opening SQLite raced another process; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            other => return other,
        }
    }
}

async fn connect_once(url: &str, opts: &SqlOptions) -> Result<Pools, StoreError> {
    let connect = SqliteConnectOptions::from_str(url)
        .map_err(db_err)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match opts.sqlite_synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(opts.sqlite_busy_timeout);

    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(opts.acquire_timeout)
        .connect_with(connect.clone())
        .await
        .map_err(db_err)?;
    migrator().run(&writer).await.map_err(|e| match e {
        // another process migrating the new file at the same moment: retryable
        sqlx::migrate::MigrateError::ExecuteMigration(e, _) => db_err(e),
        other => migrate_err(other),
    })?;
    let reader = SqlitePoolOptions::new()
        .max_connections(opts.max_connections.max(1))
        .acquire_timeout(opts.acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(db_err)?;
    Ok(Pools { writer, reader })
}

/// A write transaction holding the database write lock from its first statement.
async fn begin_write(conn: &mut SqliteConnection) -> Result<Transaction<'_, Sqlite>, StoreError> {
    sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE")
        .await
        .map_err(db_err)
}

/// Runs a write on the single writer connection. After a database error the connection is
/// closed instead of returned to the pool: when SQLite rolled back by itself (e.g. a disk I/O
/// error in COMMIT), the connection's transaction bookkeeping is wrong and every later BEGIN
/// would fail until the process restarted.
macro_rules! with_writer {
    ($p:expr, |$conn:ident| $body:expr) => {{
        let mut pooled = $p.writer.acquire().await.map_err(db_err)?;
        let result = {
            let $conn: &mut SqliteConnection = &mut pooled;
            $body.await
        };
        if matches!(result, Err(StoreError::Database(_))) {
            pooled.close_on_drop();
        }
        result
    }};
}

pub(super) async fn acquire_epoch(p: &Pools, name: &str) -> Result<Epoch, StoreError> {
    with_writer!(p, |conn| acquire_epoch_on(conn, name))
}

async fn acquire_epoch_on(conn: &mut SqliteConnection, name: &str) -> Result<Epoch, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO documents (name, epoch) VALUES ($1, 1) \
         ON CONFLICT (name) DO UPDATE SET epoch = documents.epoch + 1, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         RETURNING epoch",
    )
    .bind(name)
    .fetch_one(conn)
    .await
    .map_err(db_err)
}

pub(super) async fn create_epoch(p: &Pools, name: &str) -> Result<Option<Epoch>, StoreError> {
    with_writer!(p, |conn| create_epoch_on(conn, name))
}

async fn create_epoch_on(
    conn: &mut SqliteConnection,
    name: &str,
) -> Result<Option<Epoch>, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO documents (name, epoch) VALUES ($1, 1) \
         ON CONFLICT (name) DO NOTHING RETURNING epoch",
    )
    .bind(name)
    .fetch_optional(conn)
    .await
    .map_err(db_err)
}

pub(super) async fn current_epoch(p: &Pools, name: &str) -> Result<Option<Epoch>, StoreError> {
    sqlx::query_scalar("SELECT epoch FROM documents WHERE name = $1")
        .bind(name)
        .fetch_optional(&p.reader)
        .await
        .map_err(db_err)
}

pub(super) async fn load(p: &Pools, name: &str) -> Result<StoredDocument, StoreError> {
    let rows: Vec<LoadRow> = sqlx::query_as(
        "SELECT 0 AS kind, snapshot_seq AS seq, snapshot AS data FROM documents WHERE name = $1 \
         UNION ALL \
         SELECT 1, seq, data FROM document_updates WHERE name = $1 \
         ORDER BY kind, seq",
    )
    .bind(name)
    .fetch_all(&p.reader)
    .await
    .map_err(db_err)?;
    assemble(rows)
}

pub(super) async fn append(p: &Pools, batch: &[Append]) -> Result<Vec<AppendOutcome>, StoreError> {
    with_writer!(p, |conn| append_on(conn, batch))
}

async fn append_on(
    conn: &mut SqliteConnection,
    batch: &[Append],
) -> Result<Vec<AppendOutcome>, StoreError> {
    let mut tx = begin_write(conn).await?;
    let mut out = Vec::with_capacity(batch.len());
    for item in batch {
        let row: Option<(Epoch, LogSeq)> =
            sqlx::query_as("SELECT epoch, snapshot_seq FROM documents WHERE name = $1")
                .bind(&item.name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        let snapshot_seq = match row {
            Some((current, snapshot_seq)) if current == item.epoch => snapshot_seq,
            Some((current, _)) => {
                out.push(AppendOutcome::Fenced { current });
                continue;
            }
            None => {
                out.push(AppendOutcome::Fenced { current: 0 });
                continue;
            }
        };
        let mut last: Option<LogSeq> = None;
        for update in &item.updates {
            let seq: LogSeq = sqlx::query_scalar(
                "INSERT INTO document_updates (name, data, epoch) VALUES ($1, $2, $3) RETURNING seq",
            )
            .bind(&item.name)
            .bind(update.as_ref())
            .bind(item.epoch)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
            last = Some(seq);
        }
        let last = match last {
            Some(seq) => seq,
            None => sqlx::query_scalar::<_, Option<LogSeq>>(
                "SELECT MAX(seq) FROM document_updates WHERE name = $1",
            )
            .bind(&item.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?
            .unwrap_or(snapshot_seq),
        };
        out.push(AppendOutcome::Committed(last));
    }
    tx.commit().await.map_err(db_err)?;
    Ok(out)
}

pub(super) async fn compact(
    p: &Pools,
    name: &str,
    epoch: Epoch,
    state: &[u8],
    upto: LogSeq,
) -> Result<(), StoreError> {
    with_writer!(p, |conn| compact_on(conn, name, epoch, state, upto))
}

async fn compact_on(
    conn: &mut SqliteConnection,
    name: &str,
    epoch: Epoch,
    state: &[u8],
    upto: LogSeq,
) -> Result<(), StoreError> {
    let mut tx = begin_write(conn).await?;
    let updated = sqlx::query(
        "UPDATE documents SET snapshot = $3, snapshot_seq = MAX(snapshot_seq, $4), \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE name = $1 AND epoch = $2",
    )
    .bind(name)
    .bind(epoch)
    .bind(state)
    .bind(upto)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?
    .rows_affected();
    if updated == 0 {
        let current: Option<Epoch> =
            sqlx::query_scalar("SELECT epoch FROM documents WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        tx.rollback().await.map_err(db_err)?;
        return Err(StoreError::Fenced {
            current: current.unwrap_or(0),
            mine: epoch,
        });
    }
    sqlx::query("DELETE FROM document_updates WHERE name = $1 AND seq <= $2")
        .bind(name)
        .bind(upto)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)
}

pub(super) async fn ping(p: &Pools) -> Result<(), StoreError> {
    sqlx::query("SELECT 1")
        .execute(&p.reader)
        .await
        .map_err(db_err)?;
    Ok(())
}
