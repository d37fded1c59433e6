//! A Hocuspocus-style `documents(name, data)` table in SQLite or PostgreSQL, where `data` is
//! one Yjs update holding the document's whole state (`Y.encodeStateAsUpdate`), as
//! `@hocuspocus/extension-sqlite` and the usual `@hocuspocus/extension-database` set-ups keep
//! it.
//!
//! The table name is spliced into SQL text, so it must be an identifier, optionally qualified
//! by a schema (`archive.documents`); it is quoted in every statement. Names are read in pages
//! in byte order, with each row's size first, so a row larger than the caller's bound is never
//! fetched.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, SqlSafeStr};

use super::TransferError;

/// The longest table name accepted (PostgreSQL's identifier limit).
const MAX_IDENT: usize = 63;

/// An open `documents(name, data)` table.
pub struct Table {
    pool: Pool,
    /// The quoted (and schema-qualified) name, ready for SQL text.
    quoted: String,
    /// The URL with its password hidden, for messages.
    shown: String,
}

enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// True when `source` names a database (`sqlite:`, `postgres://`, `postgresql://`) rather than
/// a directory.
pub fn is_database_url(source: &str) -> bool {
    source.starts_with("sqlite:")
        || source.starts_with("postgres://")
        || source.starts_with("postgresql://")
}

/// `name` quoted for SQL, or why it is not a table name.
fn quote(name: &str) -> Result<String, TransferError> {
    let parts: Vec<&str> = name.split('.').collect();
    let ident = |p: &&str| crate::storage::sql::is_plain_identifier(p, MAX_IDENT);
    if parts.len() > 2 || !parts.iter().all(ident) {
        return Err(TransferError::Invalid(format!(
            "--table {name:?}: expected a table name (letters, digits and _), optionally \
             schema.table"
        )));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

impl Table {
    /// Opens table `name` in `url`. `create`: create the database file (SQLite) and the table
    /// when missing (export); otherwise the file is opened read-only and the table must exist.
    pub async fn open(url: &str, name: &str, create: bool) -> Result<Table, TransferError> {
        let quoted = quote(name)?;
        let shown = crate::storage::sql::redact_url(url);
        let db = |source| TransferError::Database {
            what: shown.clone(),
            source,
        };
        let pool = if url.starts_with("sqlite:") {
            if name.contains('.') {
                return Err(TransferError::Invalid(format!(
                    "--table {name:?}: SQLite tables have no schema"
                )));
            }
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(db)?
                .read_only(!create)
                .create_if_missing(create);
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(opts)
                    .await
                    .map_err(db)?,
            )
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).map_err(db)?;
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(opts)
                    .await
                    .map_err(db)?,
            )
        } else {
            return Err(TransferError::Invalid(format!(
                "{shown}: expected sqlite://PATH or postgres://…"
            )));
        };
        let table = Table {
            pool,
            quoted,
            shown,
        };
        if create {
            table.create().await?;
        }
        Ok(table)
    }

    fn err(&self, source: sqlx::Error) -> TransferError {
        TransferError::Database {
            what: format!("{} table {}", self.shown, self.quoted),
            source,
        }
    }

    /// Runs a statement built from constant text and the quoted table name.
    fn sql(&self, text: String) -> impl SqlSafeStr {
        AssertSqlSafe(text)
    }

    async fn create(&self) -> Result<(), TransferError> {
        let t = &self.quoted;
        let result = match &self.pool {
            // the schema @hocuspocus/extension-sqlite creates
            Pool::Sqlite(p) => sqlx::query(self.sql(format!(
                "CREATE TABLE IF NOT EXISTS {t} (\"name\" varchar(255) NOT NULL, \
                 \"data\" blob NOT NULL, UNIQUE(name))"
            )))
            .execute(p)
            .await
            .map(drop),
            Pool::Postgres(p) => sqlx::query(self.sql(format!(
                "CREATE TABLE IF NOT EXISTS {t} (name varchar(255) NOT NULL PRIMARY KEY, \
                 data bytea NOT NULL)"
            )))
            .execute(p)
            .await
            .map(drop),
        };
        result.map_err(|e| self.err(e))
    }

    /// How many rows the table has.
    pub async fn count(&self) -> Result<u64, TransferError> {
        let sql = format!("SELECT count(*) FROM {}", self.quoted);
        let n: i64 = match &self.pool {
            Pool::Sqlite(p) => sqlx::query_scalar(self.sql(sql)).fetch_one(p).await,
            Pool::Postgres(p) => sqlx::query_scalar(self.sql(sql)).fetch_one(p).await,
        }
        .map_err(|e| self.err(e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Up to `limit` names after `after` (byte order) with the size of their data in bytes.
    pub async fn page(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, i64)>, TransferError> {
        let t = &self.quoted;
        let after = after.unwrap_or("");
        let limit = i64::from(limit);
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query_as(self.sql(format!(
                "SELECT CAST(name AS TEXT), length(CAST(data AS BLOB)) FROM {t} \
                 WHERE CAST(name AS TEXT) > ?1 ORDER BY CAST(name AS TEXT) LIMIT ?2"
            )))
            .bind(after)
            .bind(limit)
            .fetch_all(p)
            .await
            .map_err(|e| self.err(e)),
            Pool::Postgres(p) => sqlx::query_as(self.sql(format!(
                "SELECT name::text, octet_length(data)::bigint FROM {t} \
                 WHERE name::text COLLATE \"C\" > $1 ORDER BY name::text COLLATE \"C\" LIMIT $2"
            )))
            .bind(after)
            .bind(limit)
            .fetch_all(p)
            .await
            .map_err(|e| self.err(e)),
        }
    }

    /// The data of `name` (`None` when the row is gone).
    pub async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, TransferError> {
        let t = &self.quoted;
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query_scalar(self.sql(format!(
                "SELECT CAST(data AS BLOB) FROM {t} WHERE CAST(name AS TEXT) = ?1"
            )))
            .bind(name)
            .fetch_optional(p)
            .await
            .map_err(|e| self.err(e)),
            Pool::Postgres(p) => {
                sqlx::query_scalar(self.sql(format!("SELECT data FROM {t} WHERE name::text = $1")))
                    .bind(name)
                    .fetch_optional(p)
                    .await
                    .map_err(|e| self.err(e))
            }
        }
    }

    /// Stores `data` as `name`'s row, replacing what was there.
    pub async fn write(&self, name: &str, data: &[u8]) -> Result<(), TransferError> {
        let t = &self.quoted;
        let sql = format!(
            "INSERT INTO {t} (name, data) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET data = excluded.data"
        );
        let result = match &self.pool {
            Pool::Sqlite(p) => sqlx::query(self.sql(sql))
                .bind(name)
                .bind(data)
                .execute(p)
                .await
                .map(drop),
            Pool::Postgres(p) => sqlx::query(self.sql(sql))
                .bind(name)
                .bind(data)
                .execute(p)
                .await
                .map(drop),
        };
        result.map_err(|e| self.err(e))
    }

    /// Closes the connection.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn table_names_are_identifiers() {
        assert_eq!(quote("documents").ok().as_deref(), Some("\"documents\""));
        assert_eq!(
            quote("archive.docs_2").ok().as_deref(),
            Some("\"archive\".\"docs_2\"")
        );
        for bad in ["", "a.b.c", "x\"y", "1a", "a b", "a;drop", ".a", "é"] {
            assert!(quote(bad).is_err(), "{bad:?}");
        }
    }
}
