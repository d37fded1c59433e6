//! [`Dedicated`]: one database connection kept for one kind of work (SQLite's writes, the
//! PostgreSQL group commit), outside any sqlx pool.
//!
//! Why not a pool of one: sqlx's pool tests every connection it gets back (a spawned task and
//! a `ping` round trip per release). On the group commit's path that is a second hand-over to
//! SQLite's worker thread, or a second network round trip to PostgreSQL, for every commit.
//!
//! **Invariants.** Users take turns in FIFO order (`tokio::sync::Mutex`), each waiting at most
//! the acquire timeout. The connection is opened on first use and again after it was
//! discarded; one that sat unused for [`IDLE_CHECK`] is pinged first (a server or a proxy may
//! have closed it meanwhile), and opened again if the ping fails. A user that got a database
//! error, or that was cancelled before it said it finished ([`WriterGuard::finish`]), discards
//! the connection: its transaction bookkeeping may be wrong (SQLite rolled back on its own, a
//! statement stopped half-way), and a new connection is the only state known to be clean.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use sqlx::{ConnectOptions, Connection};
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

use super::db_err;
use crate::storage::StoreError;

/// A connection unused for this long is pinged before its next use.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(10);

/// The connection and when it was last given back.
struct Slot<C> {
    conn: Option<C>,
    used: Instant,
}

/// One connection, taken in turns; see the module documentation.
pub(super) struct Dedicated<C: Connection> {
    slot: Mutex<Slot<C>>,
    options: C::Options,
    wait: Duration,
}

impl<C: Connection> Dedicated<C> {
    /// A dedicated connection opened with `options` (now, so that a bad URL fails at start-up),
    /// whose users wait at most `wait` for their turn.
    pub(super) async fn open(options: C::Options, wait: Duration) -> Result<Self, StoreError> {
        let conn = options.connect().await.map_err(db_err)?;
        Ok(Self {
            slot: Mutex::new(Slot {
                conn: Some(conn),
                used: Instant::now(),
            }),
            options,
            wait,
        })
    }

    /// Waits for the connection, opening it again if the last user discarded it (or it fails
    /// its idle check). Waiting for the turn and opening each take at most the acquire timeout.
    pub(super) async fn lock(&self) -> Result<WriterGuard<'_, C>, StoreError> {
        let timed_out = |what: &str| {
            StoreError::Database(format!("timed out after {:?} {what}", self.wait).into())
        };
        let mut slot = tokio::time::timeout(self.wait, self.slot.lock())
            .await
            .map_err(|_| timed_out("waiting for the writer connection"))?;
        if slot.used.elapsed() >= IDLE_CHECK
            && let Some(conn) = slot.conn.as_mut()
        {
            let alive = tokio::time::timeout(self.wait, conn.ping()).await;
            if !matches!(alive, Ok(Ok(()))) {
                slot.conn = None;
            }
        }
        if slot.conn.is_none() {
            let conn = tokio::time::timeout(self.wait, self.options.connect())
                .await
                .map_err(|_| timed_out("opening the writer connection"))?
                .map_err(db_err)?;
            slot.conn = Some(conn);
        }
        Ok(WriterGuard {
            slot,
            finished: false,
        })
    }

    /// Closes the connection (waiting for the current user to finish).
    pub(super) async fn close(&self) {
        if let Some(conn) = self.slot.lock().await.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// A turn on a [`Dedicated`] connection. Dereferences to the connection; call
/// [`finish`](Self::finish) with the work's result, or the connection is discarded on drop.
pub(super) struct WriterGuard<'a, C: Connection> {
    slot: MutexGuard<'a, Slot<C>>,
    finished: bool,
}

impl<C: Connection> WriterGuard<'_, C> {
    /// Ends the turn: the connection is kept unless `result` is a database error.
    pub(super) fn finish<T>(mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.finished = !matches!(result, Err(StoreError::Database(_)));
        result
    }
}

impl<C: Connection> Deref for WriterGuard<'_, C> {
    type Target = C;

    fn deref(&self) -> &C {
        match self.slot.conn.as_ref() {
            Some(conn) => conn,
            // `lock` fills the slot and only `drop` empties it
            None => unreachable!("a writer guard always holds a connection"),
        }
    }
}

impl<C: Connection> DerefMut for WriterGuard<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        match self.slot.conn.as_mut() {
            Some(conn) => conn,
            None => unreachable!("a writer guard always holds a connection"),
        }
    }
}

impl<C: Connection> Drop for WriterGuard<'_, C> {
    fn drop(&mut self) {
        self.slot.used = Instant::now();
        if !self.finished {
            // dropping the connection closes it: SQLite's worker thread ends, PostgreSQL's
            // server rolls back whatever the connection had open
            self.slot.conn = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::SqliteConnection;
    use sqlx::sqlite::SqliteConnectOptions;

    use super::*;

    /// A temporary table lives as long as the connection that made it, so whether the
    /// connection was kept shows in whether the table is still there.
    async fn dedicated() -> Dedicated<SqliteConnection> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").expect("options");
        Dedicated::open(options, Duration::from_secs(5))
            .await
            .expect("open")
    }

    async fn make_table(d: &Dedicated<SqliteConnection>) -> WriterGuard<'_, SqliteConnection> {
        let mut conn = d.lock().await.expect("lock");
        sqlx::query("CREATE TEMP TABLE IF NOT EXISTS marker (x INTEGER)")
            .execute(&mut *conn)
            .await
            .expect("create");
        conn
    }

    async fn table_survived(d: &Dedicated<SqliteConnection>) -> bool {
        let mut conn = d.lock().await.expect("lock");
        let found: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_temp_master WHERE type = 'table' AND name = 'marker'",
        )
        .fetch_optional(&mut *conn)
        .await
        .expect("query");
        conn.finish(Ok(())).expect("finish");
        found.is_some()
    }

    #[tokio::test]
    async fn a_finished_turn_keeps_the_connection() {
        let d = dedicated().await;
        make_table(&d).await.finish(Ok(())).expect("finish");
        assert!(table_survived(&d).await);
        // an error that is not the database's keeps it too
        let _ = make_table(&d)
            .await
            .finish::<()>(Err(StoreError::Corrupt("x".into())));
        assert!(table_survived(&d).await);
    }

    #[tokio::test]
    async fn a_database_error_or_a_dropped_turn_discards_it() {
        let d = dedicated().await;
        let _ = make_table(&d)
            .await
            .finish::<()>(Err(StoreError::Database("gone".into())));
        assert!(!table_survived(&d).await, "kept after a database error");

        drop(make_table(&d).await);
        assert!(!table_survived(&d).await, "kept after an unfinished turn");
    }

    #[tokio::test]
    async fn turns_wait_at_most_the_acquire_timeout() {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").expect("options");
        let d = Dedicated::<SqliteConnection>::open(options, Duration::from_millis(50))
            .await
            .expect("open");
        let held = d.lock().await.expect("lock");
        let waited = d.lock().await;
        assert!(matches!(waited, Err(StoreError::Database(_))));
        held.finish(Ok(())).expect("finish");
        assert!(d.lock().await.is_ok());
    }
}
