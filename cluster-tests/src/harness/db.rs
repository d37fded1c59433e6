//! Reading and writing a node's database from a test, through the `sqlite3` and `psql`
//! command-line clients (so a test never shares a connection pool or a schema type with the
//! server under test). Blobs travel as lowercase hex.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use super::pg::psql;

/// A database named by a hearth `--database-url`.
#[derive(Debug, Clone)]
pub enum Db {
    /// `sqlite://PATH`.
    Sqlite(PathBuf),
    /// `postgres://…`.
    Postgres(String),
}

impl Db {
    /// The database of a hearth `--database-url` (`sqlite://…` or `postgres(ql)://…`).
    pub fn from_url(url: &str) -> anyhow::Result<Db> {
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = rest.split('?').next().unwrap_or(rest);
            Ok(Db::Sqlite(PathBuf::from(path)))
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.split('?').next().unwrap_or(rest);
            Ok(Db::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Db::Postgres(url.to_string()))
        } else {
            bail!("not an SQL database URL: {url}")
        }
    }

    /// Runs `sql`; returns the rows, columns split on `|`.
    pub fn query(&self, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        let out = match self {
            Db::Sqlite(path) => {
                let out = Command::new("sqlite3")
                    .args([
                        "-batch",
                        "-bail",
                        "-noheader",
                        "-list",
                        "-cmd",
                        ".timeout 10000",
                    ])
                    .arg(path)
                    .arg(sql)
                    .stdin(Stdio::null())
                    .output()
                    .context("running sqlite3 (is it installed?)")?;
                if !out.status.success() {
                    bail!(
                        "sqlite3 {} {sql:?}: {}",
                        path.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            Db::Postgres(url) => psql(url, sql)?,
        };
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect())
    }

    /// Runs a statement.
    pub fn exec(&self, sql: &str) -> anyhow::Result<()> {
        self.query(sql).map(|_| ())
    }

    /// The single value of a one-row, one-column query.
    pub fn scalar(&self, sql: &str) -> anyhow::Result<String> {
        let rows = self.query(sql)?;
        match rows.as_slice() {
            [row] if row.len() == 1 => Ok(row[0].clone()),
            _ => bail!("{sql:?} returned {rows:?}, expected one value"),
        }
    }

    /// An SQL expression giving `column` (a blob) as lowercase hex.
    pub fn hex_of(&self, column: &str) -> String {
        match self {
            Db::Sqlite(_) => format!("lower(hex({column}))"),
            Db::Postgres(_) => format!("encode({column}, 'hex')"),
        }
    }

    /// An SQL literal for `bytes` as a blob.
    pub fn blob_literal(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match self {
            Db::Sqlite(_) => format!("X'{hex}'"),
            Db::Postgres(_) => format!("'\\x{hex}'::bytea"),
        }
    }

    /// Table names in the database (the `public` schema on PostgreSQL).
    pub fn tables(&self) -> anyhow::Result<Vec<String>> {
        let sql = match self {
            Db::Sqlite(_) => "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
            Db::Postgres(_) => {
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
            }
        };
        Ok(self
            .query(sql)?
            .into_iter()
            .map(|mut r| r.remove(0))
            .collect())
    }
}

/// A SQLite database made unwritable with `chattr +i` (immutable: even root cannot write,
/// also through file descriptors that are already open). Undone on drop.
///
/// The database must live in a directory of its own: the directory is frozen too, so SQLite
/// cannot create a new `-wal` or `-journal` file either. Reads keep working. The `-shm` file is
/// left alone: it is memory-mapped, and a write fault on a mapped immutable page kills the
/// process with SIGBUS, which is not the fault this simulates.
#[derive(Debug)]
pub struct FrozenSqlite {
    paths: Vec<PathBuf>,
}

impl FrozenSqlite {
    /// Freezes the directory of `db` and every file in it. Fails (freezing nothing) when
    /// `chattr` is missing or not permitted (it needs CAP_LINUX_IMMUTABLE, i.e. root, and a file
    /// system with the attribute, such as ext4, xfs or btrfs).
    pub fn freeze(db: &std::path::Path) -> anyhow::Result<FrozenSqlite> {
        let dir = db
            .parent()
            .context("the database path has no directory")?
            .to_path_buf();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && !p.to_string_lossy().ends_with("-shm"))
            .collect();
        paths.push(dir);
        let mut frozen = FrozenSqlite { paths: Vec::new() };
        for p in &paths {
            let out = Command::new("chattr")
                .arg("+i")
                .arg(p)
                .stdin(Stdio::null())
                .output()
                .context("running chattr")?;
            if !out.status.success() {
                bail!(
                    "chattr +i {}: {}",
                    p.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            frozen.paths.push(p.clone());
        }
        Ok(frozen)
    }

    /// Makes everything writable again.
    pub fn thaw(mut self) -> anyhow::Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> anyhow::Result<()> {
        let mut err = None;
        for p in self.paths.drain(..).rev() {
            let ok = Command::new("chattr")
                .arg("-i")
                .arg(&p)
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                err = Some(anyhow::anyhow!("chattr -i {} failed", p.display()));
            }
        }
        err.map_or(Ok(()), Err)
    }
}

impl Drop for FrozenSqlite {
    fn drop(&mut self) {
        let _ = self.undo();
    }
}
