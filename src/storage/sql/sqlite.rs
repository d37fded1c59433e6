//! SQLite dialect of [`super::SqlStore`].
//!
//! Two ways into one file: a single **writer** connection ([`Dedicated`]; every write
//! transaction queues there, in FIFO order, instead of racing for the SQLite write lock and
//! backing off on `SQLITE_BUSY`) and a **reader** pool for `load`, `list`, `current_epoch` and
//! `ping` (WAL readers never block the writer and see a consistent snapshot per statement). Write
//! transactions start with `BEGIN IMMEDIATE`, so the database write lock is held *before* the
//! epoch is read, which also keeps fencing correct when another process writes the same file;
//! the one-statement group commit is a single writing statement, which takes the lock as it
//! starts.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqliteConnection, Transaction};

use super::dedicated::Dedicated;
use super::{
    LoadRow, SqlOptions, Synchronous, Tables, assemble, db_err, fenced_by, hand_out_seqs,
    list_limit, list_sql, migrate_err,
};
use crate::storage::{
    Append, AppendOutcome, DocumentInfo, Epoch, ListQuery, LogSeq, StoreError, StoredDocument,
};

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

/// Migration 3: nothing on SQLite. `TEXT` compares with the `BINARY` collation (`memcmp` of the
/// UTF-8 bytes), so the primary key's index already orders names by bytes for `list`; PostgreSQL
/// needs an index of its own. Frozen like migration 1.
const MIGRATION_3: &str = "-- the primary key index already orders names by bytes\n";

/// How often opening a SQLite file is retried after a database error (see `connect`).
const MIGRATE_ATTEMPTS: u64 = 5;

fn migrator(t: &Tables) -> Migrator {
    super::migrator([MIGRATION_1, MIGRATION_2, MIGRATION_3], t)
}

#[derive(Clone)]
pub(super) struct Pools {
    writer: Arc<Dedicated<SqliteConnection>>,
    reader: SqlitePool,
    t: Tables,
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
pub(super) async fn connect(url: &str, opts: &SqlOptions, t: Tables) -> Result<Pools, StoreError> {
    let mut attempt = 0;
    loop {
        match connect_once(url, opts, &t).await {
            Err(e @ StoreError::Database(_)) if attempt < MIGRATE_ATTEMPTS => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "opening SQLite raced another process; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            Err(StoreError::Database(cause)) => {
                return Err(StoreError::Open {
                    cause: open_failure(url, &*cause),
                });
            }
            other => return other,
        }
    }
}

/// Why the file of `url` could not be opened, in one line: its path, the cause, and what is
/// wrong with its directory when that explains it.
fn open_failure(url: &str, cause: &(dyn std::error::Error + 'static)) -> String {
    let path = SqliteConnectOptions::from_str(url)
        .map(|o| o.get_filename().to_path_buf())
        .unwrap_or_default();
    let mut line = format!("cannot open {}: {}", path.display(), super::cause_of(cause));
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => std::path::Path::new("."),
        Some(d) => d,
        None => return line,
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            line.push_str(&format!(
                " (the directory {} does not exist)",
                dir.display()
            ));
        }
        Ok(m) if !m.is_dir() => {
            line.push_str(&format!(" ({} is not a directory)", dir.display()));
        }
        Ok(m) if m.permissions().readonly() => {
            line.push_str(&format!(" (the directory {} is read-only)", dir.display()));
        }
        _ => {}
    }
    line
}

async fn connect_once(url: &str, opts: &SqlOptions, t: &Tables) -> Result<Pools, StoreError> {
    let connect = SqliteConnectOptions::from_str(url)
        .map_err(db_err)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match opts.sqlite_synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(opts.sqlite_busy_timeout);

    // One connection to a local file, outside any pool: a pool would ping it (a round trip to
    // its worker thread) every time it is given back, i.e. once per commit.
    let writer = Dedicated::open(connect.clone(), opts.acquire_timeout).await?;
    let mut conn = writer.lock().await?;
    let prepared = async {
        if let Some(refusal) = foreign_documents_table(&mut conn, t).await? {
            return Ok(Some(refusal));
        }
        migrator(t).run(&mut *conn).await.map_err(|e| match e {
            // another process migrating the new file at the same moment: retryable
            sqlx::migrate::MigrateError::ExecuteMigration(e, _) => db_err(e),
            other => migrate_err(other),
        })?;
        Ok(None)
    }
    .await;
    if let Some(refusal) = conn.finish(prepared)? {
        return Err(refusal);
    }
    let reader = SqlitePoolOptions::new()
        .max_connections(opts.max_connections.max(1))
        .acquire_timeout(opts.acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(db_err)?;
    Ok(Pools {
        writer: Arc::new(writer),
        reader,
        t: t.clone(),
    })
}

/// The refusal when the file's `documents` table is not Hearth's.
async fn foreign_documents_table(
    conn: &mut SqliteConnection,
    t: &Tables,
) -> Result<Option<StoreError>, StoreError> {
    let table = t.documents();
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info($1)")
        .bind(&table)
        .fetch_all(conn)
        .await
        .map_err(db_err)?;
    Ok(super::foreign_table(&table, &columns))
}

/// A write transaction holding the database write lock from its first statement.
async fn begin_write(conn: &mut SqliteConnection) -> Result<Transaction<'_, Sqlite>, StoreError> {
    sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE")
        .await
        .map_err(db_err)
}

/// Runs a write on the single writer connection. After a database error (or a cancelled
/// write) the connection is closed and the next write opens a new one: when SQLite rolled back
/// by itself (e.g. a disk I/O error in COMMIT), the connection's transaction bookkeeping is
/// wrong and every later BEGIN would fail until the process restarted.
macro_rules! with_writer {
    ($p:expr, |$conn:ident| $body:expr) => {{
        let mut guard = $p.writer.lock().await?;
        let result = {
            let $conn: &mut SqliteConnection = &mut guard;
            $body.await
        };
        guard.finish(result)
    }};
}

pub(super) async fn acquire_epoch(p: &Pools, name: &str) -> Result<Epoch, StoreError> {
    with_writer!(p, |conn| acquire_epoch_on(conn, &p.t, name))
}

async fn acquire_epoch_on(
    conn: &mut SqliteConnection,
    t: &Tables,
    name: &str,
) -> Result<Epoch, StoreError> {
    sqlx::query_scalar(t.sql(
        "INSERT INTO documents (name, epoch) VALUES ($1, 1) \
         ON CONFLICT (name) DO UPDATE SET epoch = documents.epoch + 1, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         RETURNING epoch",
    ))
    .bind(name)
    .fetch_one(conn)
    .await
    .map_err(db_err)
}

pub(super) async fn create_epoch(p: &Pools, name: &str) -> Result<Option<Epoch>, StoreError> {
    with_writer!(p, |conn| create_epoch_on(conn, &p.t, name))
}

async fn create_epoch_on(
    conn: &mut SqliteConnection,
    t: &Tables,
    name: &str,
) -> Result<Option<Epoch>, StoreError> {
    sqlx::query_scalar(t.sql(
        "INSERT INTO documents (name, epoch) VALUES ($1, 1) \
         ON CONFLICT (name) DO NOTHING RETURNING epoch",
    ))
    .bind(name)
    .fetch_optional(conn)
    .await
    .map_err(db_err)
}

pub(super) async fn current_epoch(p: &Pools, name: &str) -> Result<Option<Epoch>, StoreError> {
    sqlx::query_scalar(p.t.sql("SELECT epoch FROM documents WHERE name = $1"))
        .bind(name)
        .fetch_optional(&p.reader)
        .await
        .map_err(db_err)
}

pub(super) async fn load(p: &Pools, name: &str) -> Result<StoredDocument, StoreError> {
    let rows: Vec<LoadRow> = sqlx::query_as(p.t.sql(
        "SELECT 0 AS kind, snapshot_seq AS seq, snapshot AS data FROM documents WHERE name = $1 \
         UNION ALL \
         SELECT 1, seq, data FROM document_updates WHERE name = $1 \
         ORDER BY kind, seq",
    ))
    .bind(name)
    .fetch_all(&p.reader)
    .await
    .map_err(db_err)?;
    assemble(rows)
}

pub(super) async fn append(p: &Pools, batch: &[Append]) -> Result<Vec<AppendOutcome>, StoreError> {
    with_writer!(p, |conn| async {
        match append_one_statement(conn, &p.t, batch).await? {
            Some(outcomes) => Ok(outcomes),
            None => append_on(conn, &p.t, batch).await,
        }
    })
}

/// The epochs of the documents named in `$1` (a JSON array of names).
const READ_EPOCHS: &str = "\
SELECT name, epoch, snapshot_seq FROM documents \
WHERE name IN (SELECT value FROM json_each($1))";

/// The log rows with seqs in `($1, $2]`, in seq order: what one statement just wrote.
const WRITTEN_ROWS: &str = "\
SELECT seq, name, epoch FROM document_updates WHERE seq > $1 AND seq <= $2 ORDER BY seq";

/// The most log rows one `INSERT` writes, in either form of the group commit (three or four
/// variables each, far below SQLite's limit); larger batches take [`append_on`].
const MAX_INSERT_ROWS: usize = 256;

/// Group commit in one statement, the common case: every item carries updates and there are at
/// most [`MAX_INSERT_ROWS`] of them. A single `INSERT … SELECT` in autocommit mode checks
/// every item's epoch against `documents` and writes the rows of the items that hold it, in
/// batch order, as one transaction: SQLite takes the write lock at the start of a writing
/// statement, so the epochs it reads cannot change before its rows are committed. The whole
/// commit is therefore one hand-over to the connection's worker thread instead of four
/// (`BEGIN`, epoch read, `INSERT`, `COMMIT`), which is most of a small commit's cost, and it
/// returns no rows (each row would be a message, and a wake-up, of its own).
///
/// What was written follows from the statement's row count and last rowid: `seq` is
/// `AUTOINCREMENT` and the write lock is held, so the rows of one statement take consecutive
/// seqs in insertion (batch) order. When every row was written (nothing fenced) the seqs are
/// known without reading anything back; otherwise the rows just written are read back to see
/// which items they belong to.
///
/// Returns `None` when the batch is not of that shape. Items that wrote nothing were fenced (or
/// name a document with no row); they are decided again by [`append_on`], which reads the
/// epoch that fenced them inside its own transaction.
async fn append_one_statement(
    conn: &mut SqliteConnection,
    t: &Tables,
    batch: &[Append],
) -> Result<Option<Vec<AppendOutcome>>, StoreError> {
    let rows: usize = batch.iter().map(|a| a.updates.len()).sum();
    if rows > MAX_INSERT_ROWS || batch.iter().any(|a| a.updates.is_empty()) {
        return Ok(None);
    }
    // Statement sizes are powers of two (few distinct statements get prepared); the rows past
    // the batch's own are NULL and join nothing.
    let size = rows.next_power_of_two();
    // built from constant text only: no input reaches the statement but through binds
    let mut query = sqlx::query(t.sql_owned(one_statement_sql(size)));
    let mut ord: i64 = 0;
    for item in batch {
        for u in &item.updates {
            query = query
                .bind(ord)
                .bind(item.name.as_str())
                .bind(u.as_ref())
                .bind(item.epoch);
            ord += 1;
        }
    }
    for _ in rows..size {
        query = query
            .bind(None::<i64>)
            .bind(None::<&str>)
            .bind(None::<&[u8]>)
            .bind(None::<i64>);
    }
    let done = query.execute(&mut *conn).await.map_err(db_err)?;
    let affected = done.rows_affected();
    let last: LogSeq = done.last_insert_rowid();
    if affected == rows as u64 {
        // nothing fenced: item after item, each took the next `len` seqs
        let mut seq = last - rows as LogSeq;
        return Ok(Some(
            batch
                .iter()
                .map(|item| {
                    seq += item.updates.len() as LogSeq;
                    AppendOutcome::Committed(seq)
                })
                .collect(),
        ));
    }
    let written: Vec<(LogSeq, String, Epoch)> = if affected == 0 {
        Vec::new()
    } else {
        sqlx::query_as(t.sql(WRITTEN_ROWS))
            .bind(last - affected as LogSeq)
            .bind(last)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?
    };
    if written.len() as u64 != affected {
        return Err(StoreError::Database(
            "the rows of a group commit could not be read back".into(),
        ));
    }
    let held: std::collections::HashSet<(&str, Epoch)> =
        written.iter().map(|(_, n, e)| (n.as_str(), *e)).collect();

    let mut out: Vec<Option<AppendOutcome>> = Vec::with_capacity(batch.len());
    let mut next = written.iter();
    let mut fenced: Vec<Append> = Vec::new();
    for item in batch {
        if !held.contains(&(item.name.as_str(), item.epoch)) {
            fenced.push(item.clone());
            out.push(None);
            continue;
        }
        let mut last = None;
        for _ in &item.updates {
            match next.next() {
                Some((seq, name, epoch)) if *name == item.name && *epoch == item.epoch => {
                    last = Some(*seq);
                }
                _ => {
                    return Err(StoreError::Database(
                        "log rows came back out of batch order".into(),
                    ));
                }
            }
        }
        out.push(last.map(AppendOutcome::Committed));
    }
    if next.next().is_some() {
        return Err(StoreError::Database(
            "more log rows written than updates".into(),
        ));
    }
    if !fenced.is_empty() {
        let mut decided = append_on(conn, t, &fenced).await?.into_iter();
        for slot in out.iter_mut().filter(|o| o.is_none()) {
            *slot = decided.next();
        }
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Database("an item was left undecided".into())))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `INSERT … SELECT` of `rows` `(ord, name, data, epoch)` tuples whose epoch is the document's
/// current one, in `ord` order.
fn one_statement_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO document_updates (name, data, epoch) \
         SELECT v.column2, v.column3, v.column4 FROM (VALUES ",
    );
    push_tuples(&mut sql, rows, "(?, ?, ?, ?)");
    sql.push_str(
        ") AS v JOIN documents AS d ON d.name = v.column2 AND d.epoch = v.column4 \
         ORDER BY v.column1",
    );
    sql
}

/// Group commit in a handful of statements whatever the number of updates: `BEGIN IMMEDIATE`,
/// one read of every document's epoch, one multi-row `INSERT` per [`MAX_INSERT_ROWS`] updates
/// (statement sizes are powers of two, so few distinct statements are prepared), `COMMIT`.
/// Items of a stale epoch are fenced and write nothing.
async fn append_on(
    conn: &mut SqliteConnection,
    t: &Tables,
    batch: &[Append],
) -> Result<Vec<AppendOutcome>, StoreError> {
    let mut names: Vec<&str> = batch.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let names_json = serde_json::to_string(&names)
        .map_err(|e| StoreError::Database(format!("encoding names: {e}").into()))?;

    let mut tx = begin_write(conn).await?;
    let rows: Vec<(String, Epoch, LogSeq)> = sqlx::query_as(t.sql(READ_EPOCHS))
        .bind(&names_json)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
    let docs: std::collections::HashMap<&str, (Epoch, LogSeq)> = rows
        .iter()
        .map(|(n, e, s)| (n.as_str(), (*e, *s)))
        .collect();

    // Decide every item; flatten the updates of those that commit, in batch order.
    let mut rows_in: Vec<(&str, &[u8], Epoch)> = Vec::new();
    let mut fenced: Vec<Option<Epoch>> = Vec::with_capacity(batch.len());
    for item in batch {
        let fence = fenced_by(&docs, item);
        if fence.is_none() {
            for u in &item.updates {
                rows_in.push((&item.name, u.as_ref(), item.epoch));
            }
        }
        fenced.push(fence);
    }

    // Last logged seq of each document before this batch, for items that append nothing.
    let mut last: std::collections::HashMap<&str, LogSeq> = std::collections::HashMap::new();
    for (item, fenced) in batch.iter().zip(&fenced) {
        if fenced.is_none() && item.updates.is_empty() && !last.contains_key(item.name.as_str()) {
            let logged: Option<LogSeq> =
                sqlx::query_scalar(t.sql("SELECT MAX(seq) FROM document_updates WHERE name = $1"))
                    .bind(&item.name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db_err)?;
            let snapshot_seq = docs.get(item.name.as_str()).map_or(0, |d| d.1);
            last.insert(&item.name, logged.unwrap_or(snapshot_seq));
        }
    }

    // Rows of one INSERT get increasing seqs in VALUES order: sorted, they line up with it.
    let mut seqs: Vec<LogSeq> = Vec::with_capacity(rows_in.len());
    let mut rest = rows_in.as_slice();
    while !rest.is_empty() {
        let n = chunk_rows(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        // built from constant text only: no input reaches the statement but through binds
        let mut query = sqlx::query_scalar::<_, LogSeq>(t.sql_owned(insert_sql(n)));
        for (name, data, epoch) in chunk {
            query = query.bind(*name).bind(*data).bind(*epoch);
        }
        let mut got = query.fetch_all(&mut *tx).await.map_err(db_err)?;
        if got.len() != n {
            return Err(StoreError::Database(
                format!("inserted {n} log rows, got {} seqs back", got.len()).into(),
            ));
        }
        got.sort_unstable();
        seqs.extend(got);
    }

    let out = hand_out_seqs(batch, fenced, &seqs, last)?;
    tx.commit().await.map_err(db_err)?;
    Ok(out)
}

/// How many of `remaining` rows the next `INSERT` writes: the largest power of two that fits,
/// at most [`MAX_INSERT_ROWS`].
fn chunk_rows(remaining: usize) -> usize {
    let n = remaining.min(MAX_INSERT_ROWS);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// `INSERT … VALUES (?, ?, ?) × rows RETURNING seq`.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO document_updates (name, data, epoch) VALUES ");
    push_tuples(&mut sql, rows, "(?, ?, ?)");
    sql.push_str(" RETURNING seq");
    sql
}

/// Appends `rows` copies of `tuple`, comma-separated: the `VALUES` list of a multi-row insert.
fn push_tuples(sql: &mut String, rows: usize, tuple: &str) {
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(tuple);
    }
}

pub(super) async fn compact(
    p: &Pools,
    name: &str,
    epoch: Epoch,
    state: &[u8],
    upto: LogSeq,
) -> Result<(), StoreError> {
    with_writer!(p, |conn| compact_on(conn, &p.t, name, epoch, state, upto))
}

async fn compact_on(
    conn: &mut SqliteConnection,
    t: &Tables,
    name: &str,
    epoch: Epoch,
    state: &[u8],
    upto: LogSeq,
) -> Result<(), StoreError> {
    let mut tx = begin_write(conn).await?;
    let updated = sqlx::query(t.sql(
        "UPDATE documents SET snapshot = $3, snapshot_seq = MAX(snapshot_seq, $4), \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE name = $1 AND epoch = $2",
    ))
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
            sqlx::query_scalar(t.sql("SELECT epoch FROM documents WHERE name = $1"))
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
    sqlx::query(t.sql("DELETE FROM document_updates WHERE name = $1 AND seq <= $2"))
        .bind(name)
        .bind(upto)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)
}

/// Reads a page of names on the reader pool: one statement, a range scan of the primary key's
/// index (`BINARY` collation: byte order).
pub(super) async fn list(p: &Pools, query: &ListQuery) -> Result<Vec<DocumentInfo>, StoreError> {
    let sql = list_sql(query, "name", |_| "?".to_owned());
    // built from constant text only: the bounds and the limit are bound
    let mut q = sqlx::query_as::<_, (String, Epoch)>(p.t.sql_owned(sql))
        .bind(query.lower_bound().0.to_owned());
    if let Some(end) = query.prefix_end() {
        q = q.bind(end);
    }
    let rows = q
        .bind(list_limit(query))
        .fetch_all(&p.reader)
        .await
        .map_err(db_err)?;
    Ok(rows
        .into_iter()
        .map(|(name, epoch)| DocumentInfo { name, epoch })
        .collect())
}

pub(super) async fn delete(p: &Pools, name: &str, epoch: Epoch) -> Result<bool, StoreError> {
    with_writer!(p, |conn| delete_on(conn, &p.t, name, epoch))
}

/// Under the write lock: check the epoch, drop the log, empty the row and increment its epoch.
async fn delete_on(
    conn: &mut SqliteConnection,
    t: &Tables,
    name: &str,
    epoch: Epoch,
) -> Result<bool, StoreError> {
    let mut tx = begin_write(conn).await?;
    let row: Option<(Epoch, bool)> =
        sqlx::query_as(t.sql("SELECT epoch, snapshot IS NOT NULL FROM documents WHERE name = $1"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
    let had_snapshot = match super::may_delete(row, epoch) {
        Ok(Some(had_snapshot)) => had_snapshot,
        verdict => {
            tx.rollback().await.map_err(db_err)?;
            return verdict.map(|_| false);
        }
    };
    let logged = sqlx::query(t.sql("DELETE FROM document_updates WHERE name = $1"))
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
    sqlx::query(t.sql(
        "UPDATE documents SET epoch = epoch + 1, snapshot = NULL, snapshot_seq = 0, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE name = $1",
    ))
    .bind(name)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(had_snapshot || logged > 0)
}

pub(super) async fn ping(p: &Pools) -> Result<(), StoreError> {
    sqlx::query(p.t.sql("SELECT 1"))
        .execute(&p.reader)
        .await
        .map_err(db_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn insert_chunks_are_powers_of_two_that_cover_every_row() {
        for total in 1..1000usize {
            let mut left = total;
            let mut sizes = Vec::new();
            while left > 0 {
                let n = super::chunk_rows(left);
                assert!(n.is_power_of_two() && n <= super::MAX_INSERT_ROWS && n <= left);
                sizes.push(n);
                left -= n;
            }
            assert_eq!(sizes.iter().sum::<usize>(), total);
        }
        assert_eq!(super::insert_sql(2).matches("(?, ?, ?)").count(), 2);
    }
}
