//! One behavioural suite for every [`DocumentStore`] backend: memory, SQLite (a temp file) and
//! PostgreSQL (a fresh schema per test in the database named by `HEARTH_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`, dropped afterwards).
//!
//! PostgreSQL tests **fail** when the server is unreachable, unless `HEARTH_TEST_SKIP_PG=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hearth::storage::{
    Append, AppendOutcome, DocumentInfo, DocumentStore, ListQuery, SqlOptions, SqlStore,
    StoreError, StoredDocument, UNSTORED, open_store,
};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Where one test's data lives; dropping it removes the data.
enum Env {
    Memory(Arc<dyn DocumentStore>),
    Sqlite {
        url: String,
        dir: TempDir,
        prefix: &'static str,
    },
    Postgres {
        url: String,
        _schema: PgSchema,
        prefix: &'static str,
    },
}

/// The table prefix of the `*_prefixed` suites. Their database also holds a Hocuspocus
/// `documents(name, data)` table, which Hearth's prefixed tables must leave alone.
const PREFIX: &str = "hx_";

/// A Hocuspocus `documents` table with one row, as `@hocuspocus/extension-sqlite` creates it.
const HOCUSPOCUS_TABLE: &str = "CREATE TABLE documents (name varchar(255) NOT NULL, \
                                data BYTEA NOT NULL, UNIQUE(name)); \
                                INSERT INTO documents (name, data) VALUES ('theirs', 'xyz')";

impl Env {
    async fn memory() -> Option<Env> {
        let store = open_store("memory://", SqlOptions::default())
            .await
            .unwrap();
        Some(Env::Memory(store))
    }

    async fn sqlite() -> Option<Env> {
        let dir = TempDir::new();
        // A relative-to-cwd path would work too; absolute keeps tests independent of cwd.
        let url = format!("sqlite://{}", dir.path.join("hearth.db").display());
        Some(Env::Sqlite {
            url,
            dir,
            prefix: "",
        })
    }

    /// SQLite with [`PREFIX`], beside a Hocuspocus table.
    async fn sqlite_prefixed() -> Option<Env> {
        use sqlx::Connection;
        let Some(Env::Sqlite { url, dir, .. }) = Env::sqlite().await else {
            unreachable!()
        };
        let mut c = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc"))
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(
            HOCUSPOCUS_TABLE.replace("BYTEA", "blob"),
        ))
        .execute(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();
        Some(Env::Sqlite {
            url,
            dir,
            prefix: PREFIX,
        })
    }

    /// PostgreSQL with [`PREFIX`], beside a Hocuspocus table.
    async fn postgres_prefixed() -> Option<Env> {
        use sqlx::Connection;
        let Env::Postgres { url, _schema, .. } = Env::postgres().await? else {
            unreachable!()
        };
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(HOCUSPOCUS_TABLE)
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        Some(Env::Postgres {
            url,
            _schema,
            prefix: PREFIX,
        })
    }

    /// `name` (a table of Hearth's) as this environment calls it.
    fn table(&self, name: &str) -> String {
        match self {
            Env::Sqlite { prefix, .. } | Env::Postgres { prefix, .. } => format!("{prefix}{name}"),
            Env::Memory(_) => name.to_owned(),
        }
    }

    /// Default options with this environment's table prefix.
    fn options(&self) -> SqlOptions {
        SqlOptions {
            table_prefix: self.table(""),
            ..SqlOptions::default()
        }
    }

    async fn postgres() -> Option<Env> {
        if std::env::var("HEARTH_TEST_SKIP_PG").is_ok_and(|v| v == "1") {
            eprintln!("HEARTH_TEST_SKIP_PG=1: skipping PostgreSQL test");
            return None;
        }
        let base = std::env::var("HEARTH_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into());
        let schema = PgSchema::create(&base).await;
        let sep = if base.contains('?') { '&' } else { '?' };
        // libpq `options` parameter: every pooled connection gets the schema as search_path.
        let url = format!("{base}{sep}options=-c%20search_path%3D{}", schema.name);
        Some(Env::Postgres {
            url,
            _schema: schema,
            prefix: "",
        })
    }

    /// A store on this environment's data (a new connection each call for SQL backends).
    async fn open(&self) -> Arc<dyn DocumentStore> {
        match self {
            Env::Memory(store) => store.clone(),
            Env::Sqlite { url, .. } | Env::Postgres { url, .. } => {
                open_store(url, self.options()).await.unwrap()
            }
        }
    }

    /// A concrete SQL store (for close + reopen), or `None` for memory.
    async fn open_sql(&self, opts: SqlOptions) -> Option<SqlStore> {
        match self {
            Env::Memory(_) => None,
            Env::Sqlite { url, .. } | Env::Postgres { url, .. } => {
                let opts = SqlOptions {
                    table_prefix: self.table(""),
                    ..opts
                };
                Some(SqlStore::connect(url, opts).await.unwrap())
            }
        }
    }

    fn sqlite_dir(&self) -> Option<&std::path::Path> {
        match self {
            Env::Sqlite { dir, .. } => Some(&dir.path),
            _ => None,
        }
    }
}

struct TempDir {
    path: std::path::PathBuf,
}

impl TempDir {
    fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("hearth-storage-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A schema created for one test and dropped (CASCADE) when the test ends, even on panic.
struct PgSchema {
    base_url: String,
    name: String,
}

impl PgSchema {
    async fn create(base_url: &str) -> PgSchema {
        use sqlx::Connection;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!("hearth_test_{now}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(base_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL not reachable at {base_url}: {e}\n\
                 (start it, point HEARTH_TEST_PG_URL elsewhere, or set HEARTH_TEST_SKIP_PG=1)"
                )
            });
        // Sweep schemas leaked by earlier runs that were killed (older than an hour).
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'hearth_test_%' \
             AND split_part(nspname, '_', 3) ~ '^[0-9]+$' \
             AND split_part(nspname, '_', 3)::bigint < extract(epoch FROM now())::bigint - 3600",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        for s in stale {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{s}\" CASCADE"
            )))
            .execute(&mut conn)
            .await;
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        PgSchema {
            base_url: base_url.to_owned(),
            name,
        }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let url = self.base_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async cleanup on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("warning: could not drop test schema {}: {e}", self.name);
        }
    }
}

/// Generates one `#[tokio::test]` per case and backend: `memory::case`, `sqlite::case`,
/// `postgres::case`, and the SQL backends again with a table prefix beside a Hocuspocus table
/// (`sqlite_prefixed::case`, `postgres_prefixed::case`).
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod memory { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let env = super::Env::memory().await.unwrap();
                super::bounded(super::$case(&env)).await;
            }
        )* }
        mod sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let env = super::Env::sqlite().await.unwrap();
                super::bounded(super::$case(&env)).await;
            }
        )* }
        mod postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(env) = super::Env::postgres().await else { return };
                super::bounded(super::$case(&env)).await;
            }
        )* }
        mod sqlite_prefixed { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let env = super::Env::sqlite_prefixed().await.unwrap();
                super::bounded(super::$case(&env)).await;
                super::hocuspocus_table_untouched(&env).await;
            }
        )* }
        mod postgres_prefixed { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(env) = super::Env::postgres_prefixed().await else { return };
                super::bounded(super::$case(&env)).await;
                super::hocuspocus_table_untouched(&env).await;
            }
        )* }
    };
}

suite!(
    epoch_acquire_increments_and_fences,
    append_then_load_in_order,
    group_commit_skips_fenced_items,
    group_commit_with_repeated_document,
    append_to_unacquired_document_is_fenced_and_creates_nothing,
    append_with_no_updates_reports_last_seq,
    compact_replaces_snapshot_and_truncates_exactly,
    compact_with_stale_epoch_changes_nothing,
    load_of_unknown_document_is_empty_and_writes_nothing,
    binary_data_round_trips,
    concurrent_appends_all_land,
    acquire_fences_concurrent_appends,
    data_survives_reopen,
    yrs_document_is_reproduced,
    ping_and_backend_name,
    rows_record_their_epoch_and_newer_migrations_are_tolerated,
    create_epoch_creates_only_an_absent_row,
    a_large_group_commit_keeps_every_document_in_order,
    group_commits_of_every_size_around_one_statement,
    list_orders_by_bytes_and_skips_documents_without_content,
    list_prefix_is_literal,
    list_pages_with_after_and_limit,
    delete_removes_content_and_fences_every_writer,
    delete_with_stale_epoch_changes_nothing,
    delete_of_unknown_or_empty_document,
    delete_fences_concurrent_appends,
);

async fn create_epoch_creates_only_an_absent_row(env: &Env) {
    let s = env.open().await;
    // two writers that both loaded "fresh" empty: exactly one creates the row
    let (a, b) = tokio::join!(s.create_epoch("fresh"), s.create_epoch("fresh"));
    let mut created = [a.unwrap(), b.unwrap()];
    created.sort();
    assert_eq!(created, [None, Some(1)]);
    assert_eq!(s.current_epoch("fresh").await.unwrap(), Some(1));
    // the winner writes under epoch 1; a later owner takes over as usual
    assert!(
        committed(
            s.append(&[item("fresh", 1, &[b"u"])])
                .await
                .unwrap()
                .remove(0)
        ) > 0
    );
    assert_eq!(s.acquire_epoch("fresh").await.unwrap(), 2);
    assert_eq!(s.create_epoch("fresh").await.unwrap(), None);
    assert!(matches!(
        s.append(&[item("fresh", 1, &[b"v"])]).await.unwrap()[0],
        AppendOutcome::Fenced { current: 2 }
    ));
}

/// Fails a test that hangs instead of blocking the whole run.
async fn bounded(case: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(std::time::Duration::from_secs(120), case)
        .await
        .expect("test timed out");
}

fn item(name: &str, epoch: i64, updates: &[&[u8]]) -> Append {
    Append {
        name: name.to_owned(),
        epoch,
        updates: updates.iter().map(|u| Bytes::copy_from_slice(u)).collect(),
    }
}

fn committed(o: AppendOutcome) -> i64 {
    match o {
        AppendOutcome::Committed(seq) => seq,
        other => panic!("expected Committed, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

async fn epoch_acquire_increments_and_fences(env: &Env) {
    let s = env.open().await;
    assert_eq!(s.current_epoch("doc").await.unwrap(), None);
    let e1 = s.acquire_epoch("doc").await.unwrap();
    assert_eq!(e1, 1);
    assert_eq!(s.current_epoch("doc").await.unwrap(), Some(1));
    let seq = committed(s.append(&[item("doc", e1, &[b"a"])]).await.unwrap()[0]);

    let e2 = s.acquire_epoch("doc").await.unwrap();
    assert_eq!(e2, 2);
    assert_eq!(s.current_epoch("doc").await.unwrap(), Some(2));
    // Epochs are per document.
    assert_eq!(s.acquire_epoch("other").await.unwrap(), 1);

    // The old epoch is fenced for appends and compaction.
    let out = s.append(&[item("doc", e1, &[b"stale"])]).await.unwrap();
    assert_eq!(out, vec![AppendOutcome::Fenced { current: 2 }]);
    let err = s.compact("doc", e1, b"stale-state", seq).await.unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                current: 2,
                mine: 1
            }
        ),
        "{err:?}"
    );

    // A future epoch is fenced too (only equality commits).
    let out = s
        .append(&[item("doc", e2 + 1, &[b"future"])])
        .await
        .unwrap();
    assert_eq!(out, vec![AppendOutcome::Fenced { current: 2 }]);

    // The new epoch writes.
    let seq2 = committed(s.append(&[item("doc", e2, &[b"b"])]).await.unwrap()[0]);
    assert!(seq2 > seq);
    let doc = s.load("doc").await.unwrap();
    assert_eq!(doc.updates, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(doc.snapshot, None);
}

async fn append_then_load_in_order(env: &Env) {
    let s = env.open().await;
    let e = s.acquire_epoch("doc").await.unwrap();
    let out = s
        .append(&[item("doc", e, &[b"u1", b"u2", b"u3"])])
        .await
        .unwrap();
    let first = committed(out[0]);
    let doc = s.load("doc").await.unwrap();
    assert_eq!(
        doc.updates,
        vec![b"u1".to_vec(), b"u2".to_vec(), b"u3".to_vec()]
    );
    assert_eq!(doc.last_seq, first);
    assert_eq!(doc.snapshot, None);

    // Many appends, many updates each: order is preserved across and within appends.
    let mut expected = doc.updates.clone();
    let mut last = first;
    for i in 0..20 {
        let a: Vec<Vec<u8>> = (0..(i % 4 + 1))
            .map(|j| format!("{i}-{j}").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = a.iter().map(|v| v.as_slice()).collect();
        let seq = committed(s.append(&[item("doc", e, &refs)]).await.unwrap()[0]);
        assert!(seq >= last + refs.len() as i64, "seq {seq} after {last}");
        last = seq;
        expected.extend(a);
    }
    let doc = s.load("doc").await.unwrap();
    assert_eq!(doc.updates, expected);
    assert_eq!(doc.last_seq, last);
}

async fn group_commit_skips_fenced_items(env: &Env) {
    let s = env.open().await;
    let stale = s.acquire_epoch("fenced").await.unwrap();
    let current = s.acquire_epoch("fenced").await.unwrap();
    let good = s.acquire_epoch("good").await.unwrap();
    let before = s.load("fenced").await.unwrap();

    let out = s
        .append(&[
            item("fenced", stale, &[b"must-not-land-1", b"must-not-land-2"]),
            item("good", good, &[b"g1", b"g2"]),
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0], AppendOutcome::Fenced { current });
    let seq = committed(out[1]);

    let g = s.load("good").await.unwrap();
    assert_eq!(g.updates, vec![b"g1".to_vec(), b"g2".to_vec()]);
    assert_eq!(g.last_seq, seq);
    assert_eq!(s.load("fenced").await.unwrap(), before);
    assert_eq!(s.current_epoch("fenced").await.unwrap(), Some(current));

    // Outcomes follow the batch order, whatever order the backend processes items in.
    let out = s
        .append(&[
            item("good", good, &[b"g3"]),
            item("fenced", stale, &[b"x"]),
            item("fenced", current, &[b"f1"]),
        ])
        .await
        .unwrap();
    assert!(committed(out[0]) > seq);
    assert_eq!(out[1], AppendOutcome::Fenced { current });
    let f = committed(out[2]);
    assert_eq!(
        s.load("fenced").await.unwrap().updates,
        vec![b"f1".to_vec()]
    );
    assert_eq!(s.load("fenced").await.unwrap().last_seq, f);
}

/// More updates in one batch than one statement writes (SQLite: 256 rows per `INSERT`),
/// interleaved over documents, one of them fenced: every committed document has exactly its
/// updates in order, its outcome is the seq of its own last update, and nothing of the fenced
/// item is written.
async fn a_large_group_commit_keeps_every_document_in_order(env: &Env) {
    let s = env.open().await;
    let names = ["d0", "d1", "d2"];
    let mut epochs = Vec::new();
    for n in names {
        epochs.push(s.acquire_epoch(n).await.unwrap());
    }
    let data: Vec<Vec<Vec<u8>>> = (0..3)
        .map(|d| {
            (0..300 + d * 37)
                .map(|i| format!("{d}:{i}").into_bytes())
                .collect()
        })
        .collect();
    let refs: Vec<Vec<&[u8]>> = data
        .iter()
        .map(|d| d.iter().map(Vec::as_slice).collect())
        .collect();
    let out = s
        .append(&[
            item("d0", epochs[0], &refs[0]),
            item("d1", epochs[1] + 1, &refs[1]),
            item("d2", epochs[2], &refs[2]),
        ])
        .await
        .unwrap();
    assert_eq!(out[1], AppendOutcome::Fenced { current: epochs[1] });
    for d in [0, 2] {
        let doc = s.load(names[d]).await.unwrap();
        assert_eq!(doc.updates, data[d], "{}", names[d]);
        assert_eq!(doc.last_seq, committed(out[d]), "{}", names[d]);
    }
    assert!(committed(out[0]) < committed(out[2]));
    assert!(s.load("d1").await.unwrap().updates.is_empty());
}

/// Batches of 3 to 258 rows (SQLite writes up to 256 in one statement, padded to a power of
/// two, and takes a transaction beyond): a document repeated around a fenced item and a document
/// with no row, in one batch. Every committed item's outcome is the seq of its own last update,
/// the fenced and the absent ones write nothing, and each document's log is its items in order.
async fn group_commits_of_every_size_around_one_statement(env: &Env) {
    let s = env.open().await;
    for total in [1usize, 3, 5, 253, 254, 255, 256] {
        // rows in the batch: total + 2
        let (a, b) = (format!("a{total}"), format!("b{total}"));
        let ea = s.acquire_epoch(&a).await.unwrap();
        let eb = s.acquire_epoch(&b).await.unwrap();
        let data: Vec<Vec<u8>> = (0..total)
            .map(|i| format!("{total}:{i}").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        // a's updates split over two items, b's item and two refused items in between
        let (first, rest) = refs.split_at(total / 2);
        let (second, third) = rest.split_at(rest.len() / 2);
        let mut batch = Vec::new();
        if !first.is_empty() {
            batch.push(item(&a, ea, first));
        }
        batch.push(item(&b, eb + 1, &[b"fenced"]));
        batch.push(item("nobody", 1, &[b"absent"]));
        if !second.is_empty() {
            batch.push(item(&b, eb, second));
        }
        batch.push(item(&a, ea, third));
        let out = s.append(&batch).await.unwrap();
        assert_eq!(out.len(), batch.len(), "{total}");
        let mut expect_a: Vec<Vec<u8>> = Vec::new();
        let mut expect_b: Vec<Vec<u8>> = Vec::new();
        let (mut last_a, mut last_b) = (0, 0);
        let mut seen = Vec::new();
        for (it, o) in batch.iter().zip(&out) {
            if it.name == b && it.epoch == eb + 1 {
                assert_eq!(*o, AppendOutcome::Fenced { current: eb }, "{total}");
            } else if it.name == "nobody" {
                assert_eq!(*o, AppendOutcome::Fenced { current: 0 }, "{total}");
            } else {
                let seq = committed(*o);
                seen.push(seq);
                let bytes = it.updates.iter().map(|u| u.to_vec());
                if it.name == a {
                    expect_a.extend(bytes);
                    last_a = seq;
                } else {
                    expect_b.extend(bytes);
                    last_b = seq;
                }
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{total}: {seen:?}");
        let doc_a = s.load(&a).await.unwrap();
        assert_eq!(doc_a.updates, expect_a, "{total}");
        assert_eq!(doc_a.last_seq, last_a, "{total}");
        let doc_b = s.load(&b).await.unwrap();
        assert_eq!(doc_b.updates, expect_b, "{total}");
        if !expect_b.is_empty() {
            assert_eq!(doc_b.last_seq, last_b, "{total}");
        }
        assert_eq!(s.current_epoch("nobody").await.unwrap(), None, "{total}");

        // the same shape with nothing fenced: every row written, seqs known without reading
        // them back; they must be the ones the log holds
        let mut batch = Vec::new();
        if !first.is_empty() {
            batch.push(item(&b, eb, first));
        }
        batch.push(item(&a, ea, &[b"clean"]));
        if !second.is_empty() {
            batch.push(item(&a, ea, second));
        }
        batch.push(item(&b, eb, third));
        let out = s.append(&batch).await.unwrap();
        let seqs: Vec<i64> = out.iter().map(|o| committed(*o)).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{total}: {seqs:?}");
        let last_of = |name: &str| {
            batch
                .iter()
                .zip(&seqs)
                .filter(|(it, _)| it.name == name)
                .map(|(_, seq)| *seq)
                .max()
        };
        for (name, before) in [(&a, &expect_a), (&b, &expect_b)] {
            let doc = s.load(name).await.unwrap();
            let mut expect = before.clone();
            for it in batch.iter().filter(|it| it.name == *name) {
                expect.extend(it.updates.iter().map(|u| u.to_vec()));
            }
            assert_eq!(doc.updates, expect, "{total} {name}");
            assert_eq!(Some(doc.last_seq), last_of(name), "{total} {name}");
        }
    }
}

async fn group_commit_with_repeated_document(env: &Env) {
    let s = env.open().await;
    let e = s.acquire_epoch("doc").await.unwrap();
    let o = s.acquire_epoch("other").await.unwrap();
    let out = s
        .append(&[
            item("doc", e, &[]),
            item("doc", e, &[b"a1", b"a2"]),
            item("other", o, &[b"o1"]),
            item("doc", e, &[]),
            item("doc", e + 7, &[b"fenced"]),
            item("doc", e, &[b"b1"]),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], AppendOutcome::Committed(0));
    let a = committed(out[1]);
    let other = committed(out[2]);
    assert_eq!(
        out[3],
        AppendOutcome::Committed(a),
        "empty item sees earlier items of the batch"
    );
    assert_eq!(out[4], AppendOutcome::Fenced { current: e });
    let b = committed(out[5]);
    assert!(a < b && a != other && b != other);
    let doc = s.load("doc").await.unwrap();
    assert_eq!(
        doc.updates,
        vec![b"a1".to_vec(), b"a2".to_vec(), b"b1".to_vec()]
    );
    assert_eq!(doc.last_seq, b);
    assert_eq!(s.load("other").await.unwrap().updates, vec![b"o1".to_vec()]);
}

async fn append_to_unacquired_document_is_fenced_and_creates_nothing(env: &Env) {
    let s = env.open().await;
    for epoch in [0, 1] {
        let out = s.append(&[item("ghost", epoch, &[b"x"])]).await.unwrap();
        assert_eq!(out, vec![AppendOutcome::Fenced { current: 0 }]);
        let err = s.compact("ghost", epoch, b"state", 10).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Fenced { current: 0, .. }),
            "{err:?}"
        );
    }
    assert_eq!(s.current_epoch("ghost").await.unwrap(), None);
    assert!(s.load("ghost").await.unwrap().is_empty());
    // The first acquire still starts at 1.
    assert_eq!(s.acquire_epoch("ghost").await.unwrap(), 1);
}

async fn append_with_no_updates_reports_last_seq(env: &Env) {
    let s = env.open().await;
    let e = s.acquire_epoch("doc").await.unwrap();
    assert_eq!(
        s.append(&[item("doc", e, &[])]).await.unwrap(),
        vec![AppendOutcome::Committed(0)]
    );
    let seq = committed(s.append(&[item("doc", e, &[b"a", b"b"])]).await.unwrap()[0]);
    assert_eq!(
        s.append(&[item("doc", e, &[])]).await.unwrap(),
        vec![AppendOutcome::Committed(seq)]
    );
    s.compact("doc", e, b"S", seq).await.unwrap();
    assert_eq!(
        s.append(&[item("doc", e, &[])]).await.unwrap(),
        vec![AppendOutcome::Committed(seq)]
    );
    assert!(s.append(&[]).await.unwrap().is_empty());
}

async fn compact_replaces_snapshot_and_truncates_exactly(env: &Env) {
    let s = env.open().await;
    let e = s.acquire_epoch("doc").await.unwrap();
    let mut seqs = Vec::new();
    for u in [b"u1", b"u2", b"u3", b"u4"] {
        seqs.push(committed(
            s.append(&[item("doc", e, &[u])]).await.unwrap()[0],
        ));
    }
    // Another document's log must be untouched by this document's compaction.
    let eo = s.acquire_epoch("other").await.unwrap();
    committed(s.append(&[item("other", eo, &[b"o1"])]).await.unwrap()[0]);

    s.compact("doc", e, b"snap-1", seqs[1]).await.unwrap();
    let doc = s.load("doc").await.unwrap();
    assert_eq!(doc.snapshot.as_deref(), Some(&b"snap-1"[..]));
    assert_eq!(doc.updates, vec![b"u3".to_vec(), b"u4".to_vec()]);
    assert_eq!(doc.last_seq, seqs[3]);

    // A second compaction replaces (not merges) the snapshot.
    s.compact("doc", e, b"snap-2", seqs[3]).await.unwrap();
    let doc = s.load("doc").await.unwrap();
    assert_eq!(doc.snapshot.as_deref(), Some(&b"snap-2"[..]));
    assert!(doc.updates.is_empty());
    assert_eq!(
        doc.last_seq, seqs[3],
        "empty log: last_seq is the compaction point"
    );

    // Appends after compaction keep going above it.
    let after = committed(s.append(&[item("doc", e, &[b"u5"])]).await.unwrap()[0]);
    assert!(after > seqs[3]);
    let doc = s.load("doc").await.unwrap();
    assert_eq!(doc.updates, vec![b"u5".to_vec()]);
    assert_eq!(doc.last_seq, after);

    assert_eq!(s.load("other").await.unwrap().updates, vec![b"o1".to_vec()]);
}

async fn compact_with_stale_epoch_changes_nothing(env: &Env) {
    let s = env.open().await;
    let old = s.acquire_epoch("doc").await.unwrap();
    let seq = committed(
        s.append(&[item("doc", old, &[b"u1", b"u2"])])
            .await
            .unwrap()[0],
    );
    s.compact("doc", old, b"snap-old", seq - 1).await.unwrap();
    let new = s.acquire_epoch("doc").await.unwrap();
    let before = s.load("doc").await.unwrap();

    let err = s
        .compact("doc", old, b"evil-overwrite", seq)
        .await
        .unwrap_err();
    match err {
        StoreError::Fenced { current, mine } => {
            assert_eq!(current, new);
            assert_eq!(mine, old);
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(s.load("doc").await.unwrap(), before);
    assert_eq!(before.snapshot.as_deref(), Some(&b"snap-old"[..]));
    assert_eq!(before.updates, vec![b"u2".to_vec()]);
    assert_eq!(s.current_epoch("doc").await.unwrap(), Some(new));
}

async fn load_of_unknown_document_is_empty_and_writes_nothing(env: &Env) {
    let s = env.open().await;
    let doc = s.load("nobody").await.unwrap();
    assert_eq!(doc, StoredDocument::default());
    assert!(doc.is_empty());
    assert_eq!(doc.last_seq, 0);
    assert_eq!(
        s.current_epoch("nobody").await.unwrap(),
        None,
        "load must not create a row"
    );
    // Still nothing after repeated loads, and acquiring afterwards starts at 1.
    let _ = s.load("nobody").await.unwrap();
    assert_eq!(s.acquire_epoch("nobody").await.unwrap(), 1);
    assert!(s.load("nobody").await.unwrap().is_empty());
}

async fn binary_data_round_trips(env: &Env) {
    let s = env.open().await;
    let e = s.acquire_epoch("bin").await.unwrap();
    let all: Vec<u8> = (0..=255u8).collect();
    let rev: Vec<u8> = (0..=255u8).rev().collect();
    let nul = vec![0u8; 17];
    let big: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let empty: Vec<u8> = Vec::new();
    let updates: Vec<&[u8]> = vec![&all, &rev, &nul, &empty, &big, b"{\"not\":\"json\"}\xff"];
    committed(s.append(&[item("bin", e, &updates)]).await.unwrap()[0]);
    let doc = s.load("bin").await.unwrap();
    assert_eq!(doc.updates.len(), updates.len());
    for (got, want) in doc.updates.iter().zip(&updates) {
        assert_eq!(got.as_slice(), *want);
    }

    let snapshot: Vec<u8> = all.iter().chain(&rev).chain(&nul).copied().collect();
    s.compact("bin", e, &snapshot, doc.last_seq).await.unwrap();
    let doc = s.load("bin").await.unwrap();
    assert_eq!(doc.snapshot.as_deref(), Some(snapshot.as_slice()));
    assert!(doc.updates.is_empty());

    // An empty snapshot is a snapshot, not "no snapshot".
    s.compact("bin", e, &[], doc.last_seq).await.unwrap();
    assert_eq!(s.load("bin").await.unwrap().snapshot, Some(Vec::new()));

    // Names are stored verbatim too (any UTF-8 except NUL, which every backend rejects).
    let odd = "dir/ü 🦀 'quote\" ; DROP TABLE documents; --\u{1}x";
    let e = s.acquire_epoch(odd).await.unwrap();
    committed(s.append(&[item(odd, e, &[&all])]).await.unwrap()[0]);
    assert_eq!(s.load(odd).await.unwrap().updates, vec![all.clone()]);
    let nul = "a\0b";
    assert!(matches!(
        s.acquire_epoch(nul).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(s.load(nul).await, Err(StoreError::Invalid(_))));
    assert!(matches!(
        s.current_epoch(nul).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.append(&[item(nul, 1, &[b"x"])]).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.compact(nul, 1, b"x", 1).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn concurrent_appends_all_land(env: &Env) {
    const TASKS: usize = 16;
    const ROUNDS: usize = 25;
    const DOCS: usize = 4;
    let s = env.open().await;
    let mut epochs = Vec::new();
    for d in 0..DOCS {
        epochs.push(s.acquire_epoch(&format!("doc-{d}")).await.unwrap());
    }
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = s.clone();
        let epochs = epochs.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                // Each batch touches two documents, in an order that differs between tasks,
                // so PostgreSQL row locks are taken in conflicting orders if not sorted.
                let (a, b) = (t % DOCS, (t + 1 + r) % DOCS);
                let mk = |d: usize, k: usize| Append {
                    name: format!("doc-{d}"),
                    epoch: epochs[d],
                    updates: vec![Bytes::from(format!("t{t}-r{r}-k{k}"))],
                };
                let batch = if t % 2 == 0 {
                    vec![mk(a, 0), mk(b, 1)]
                } else {
                    vec![mk(b, 1), mk(a, 0)]
                };
                let out = s.append(&batch).await.unwrap();
                assert!(
                    out.iter().all(|o| matches!(o, AppendOutcome::Committed(_))),
                    "{out:?}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut total = 0;
    for d in 0..DOCS {
        let doc = s.load(&format!("doc-{d}")).await.unwrap();
        total += doc.updates.len();
        // Per task, its updates to this document appear in the order it wrote them.
        for t in 0..TASKS {
            let prefix = format!("t{t}-");
            let rounds: Vec<usize> = doc
                .updates
                .iter()
                .map(|u| String::from_utf8(u.clone()).unwrap())
                .filter(|u| u.starts_with(&prefix))
                .map(|u| u.split('-').nth(1).unwrap()[1..].parse().unwrap())
                .collect();
            assert!(
                rounds.windows(2).all(|w| w[0] <= w[1]),
                "task {t} doc {d}: {rounds:?}"
            );
        }
    }
    assert_eq!(total, TASKS * ROUNDS * 2);
}

async fn acquire_fences_concurrent_appends(env: &Env) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let s = env.open().await;
    let old = s.acquire_epoch("doc").await.unwrap();
    let acquired = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (s, acquired, commits) = (s.clone(), acquired.clone(), commits.clone());
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for r in 0..100_000 {
                // The memory backend never awaits: yield so the acquiring task gets to run.
                tokio::task::yield_now().await;
                let started_after_acquire = acquired.load(Ordering::SeqCst);
                let tag = format!("t{t}-r{r}");
                let out = s
                    .append(&[item("doc", old, &[tag.as_bytes()])])
                    .await
                    .unwrap();
                match out[0] {
                    AppendOutcome::Committed(_) => {
                        assert!(
                            !started_after_acquire,
                            "{tag} committed after the new epoch"
                        );
                        committed.push(tag.into_bytes());
                        commits.fetch_add(1, Ordering::SeqCst);
                    }
                    AppendOutcome::Fenced { current } => {
                        assert_eq!(current, old + 1);
                        return committed;
                    }
                }
            }
            panic!("task {t} was never fenced");
        }));
    }
    // the acquire lands among appends that are under way
    common::wait_until(common::T, "appends committed under the old epoch", || {
        commits.load(Ordering::SeqCst) >= 8
    })
    .await;
    let new = s.acquire_epoch("doc").await.unwrap();
    acquired.store(true, Ordering::SeqCst);
    assert_eq!(new, old + 1);
    let mut committed = Vec::new();
    for t in tasks {
        committed.extend(t.await.unwrap());
    }
    // Every acked append is in the log, and nothing else is.
    let mut logged = s.load("doc").await.unwrap().updates;
    logged.sort();
    committed.sort();
    assert_eq!(logged, committed);
    assert!(!committed.is_empty());
}

async fn data_survives_reopen(env: &Env) {
    let Some(first) = env.open_sql(SqlOptions::default()).await else {
        return; // memory: nothing to reopen
    };
    let e = first.acquire_epoch("doc").await.unwrap();
    let seq = committed(
        first
            .append(&[item("doc", e, &[b"u1", b"u2", b"u3"])])
            .await
            .unwrap()[0],
    );
    first.compact("doc", e, b"snap", seq - 1).await.unwrap();
    first.close().await;
    drop(first);

    if let Some(dir) = env.sqlite_dir() {
        assert!(dir.join("hearth.db").exists());
    }
    // Reopening re-runs the (already applied) migrations: must be a no-op.
    let second = env.open_sql(SqlOptions::default()).await.unwrap();
    let doc = second.load("doc").await.unwrap();
    assert_eq!(doc.snapshot.as_deref(), Some(&b"snap"[..]));
    assert_eq!(doc.updates, vec![b"u3".to_vec()]);
    assert_eq!(doc.last_seq, seq);
    assert_eq!(second.current_epoch("doc").await.unwrap(), Some(e));
    // Sequence numbers keep rising across restarts, epochs continue.
    assert_eq!(second.acquire_epoch("doc").await.unwrap(), e + 1);
    let next = committed(
        second
            .append(&[item("doc", e + 1, &[b"u4"])])
            .await
            .unwrap()[0],
    );
    assert!(next > seq);
    second.close().await;
}

async fn yrs_document_is_reproduced(env: &Env) {
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

    let s = env.open().await;
    let e = s.acquire_epoch("ydoc").await.unwrap();

    // The "live" document; every transaction's v1 update is appended to the log.
    let live = Doc::new();
    let text = live.get_or_insert_text("t");
    type Edit<'a> = Box<dyn Fn(&mut yrs::TransactionMut<'_>) + 'a>;
    let edits: Vec<Edit<'_>> = vec![
        Box::new(|txn| text.insert(txn, 0, "Hello")),
        Box::new(|txn| text.insert(txn, 5, ", world")),
        Box::new(|txn| text.remove_range(txn, 0, 1)),
        Box::new(|txn| text.insert(txn, 0, "J")),
        Box::new(|txn| text.insert(txn, 12, "! ✓")),
    ];
    let mut seqs = Vec::new();
    for (i, edit) in edits.iter().enumerate() {
        let update = {
            let mut txn = live.transact_mut();
            edit(&mut txn);
            txn.encode_update_v1()
        };
        seqs.push(committed(
            s.append(&[item("ydoc", e, &[&update])]).await.unwrap()[0],
        ));
        if i == 2 {
            // Compact what is stored so far: the snapshot is the state of a doc rebuilt from
            // the loaded snapshot + log, exactly what a real compactor does.
            let stored = s.load("ydoc").await.unwrap();
            let rebuilt = rebuild(&stored);
            let state = rebuilt
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            s.compact("ydoc", e, &state, stored.last_seq).await.unwrap();
        }
    }
    let want = text.get_string(&live.transact());
    assert_eq!(want, "Jello, world! ✓");

    let stored = s.load("ydoc").await.unwrap();
    assert!(stored.snapshot.is_some());
    assert_eq!(
        stored.updates.len(),
        2,
        "two edits after the compaction point"
    );
    assert_eq!(stored.last_seq, seqs[4]);
    let doc = rebuild(&stored);
    let got = doc.get_or_insert_text("t").get_string(&doc.transact());
    assert_eq!(got, want);
    // Same state, not just the same text.
    assert_eq!(
        doc.transact().state_vector(),
        live.transact().state_vector()
    );

    fn rebuild(stored: &StoredDocument) -> Doc {
        let doc = Doc::new();
        {
            let mut txn = doc.transact_mut();
            for bytes in stored.snapshot.iter().chain(&stored.updates) {
                txn.apply_update(Update::decode_v1(bytes).unwrap()).unwrap();
            }
        }
        doc
    }
}

/// Migration 2: every log row carries the epoch it was committed under. A database migrated by a
/// newer binary (an unknown migration recorded) still opens: rolling upgrades share a database.
async fn rows_record_their_epoch_and_newer_migrations_are_tolerated(env: &Env) {
    use sqlx::Connection;
    let Some(s) = env.open_sql(SqlOptions::default()).await else {
        return; // memory: no rows
    };
    let e1 = s.acquire_epoch("ep").await.unwrap();
    committed(s.append(&[item("ep", e1, &[b"a", b"b"])]).await.unwrap()[0]);
    let e2 = s.acquire_epoch("ep").await.unwrap();
    committed(s.append(&[item("ep", e2, &[b"c"])]).await.unwrap()[0]);
    let fenced = s.append(&[item("ep", e1, &[b"stale"])]).await.unwrap();
    assert_eq!(fenced[0], AppendOutcome::Fenced { current: e2 });
    s.close().await;

    let select = sqlx::AssertSqlSafe(format!(
        "SELECT epoch FROM {} WHERE name = 'ep' ORDER BY seq",
        env.table("document_updates")
    ));
    let future = format!(
        "INSERT INTO {} (version, description, success, checksum, execution_time) \
         VALUES (99, 'from a newer binary', true, X'00', 0)",
        env.table("_sqlx_migrations")
    );
    let epochs: Vec<Option<i64>> = match env {
        Env::Sqlite { url, .. } => {
            let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
            let v = sqlx::query_scalar(select).fetch_all(&mut c).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(future))
                .execute(&mut c)
                .await
                .unwrap();
            c.close().await.unwrap();
            v
        }
        Env::Postgres { url, .. } => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            let v = sqlx::query_scalar(select).fetch_all(&mut c).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(
                future.replace("X'00'", "'\\x00'::bytea"),
            ))
            .execute(&mut c)
            .await
            .unwrap();
            c.close().await.unwrap();
            v
        }
        Env::Memory(_) => unreachable!(),
    };
    assert_eq!(epochs, vec![Some(e1), Some(e1), Some(e2)]);

    let s = env.open_sql(SqlOptions::default()).await.unwrap();
    assert_eq!(s.load("ep").await.unwrap().updates.len(), 3);
    s.close().await;
}

/// Stores `updates` for `name` under a fresh epoch and returns that epoch.
async fn store_doc(s: &Arc<dyn DocumentStore>, name: &str, updates: &[&[u8]]) -> i64 {
    let e = s.acquire_epoch(name).await.unwrap();
    committed(s.append(&[item(name, e, updates)]).await.unwrap()[0]);
    e
}

fn query(prefix: &str, after: Option<&str>, limit: usize) -> ListQuery {
    ListQuery {
        prefix: prefix.to_owned(),
        after: after.map(str::to_owned),
        limit,
    }
}

async fn names(s: &Arc<dyn DocumentStore>, q: ListQuery) -> Vec<String> {
    s.list(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect()
}

async fn list_orders_by_bytes_and_skips_documents_without_content(env: &Env) {
    let s = env.open().await;
    assert!(s.list(&query("", None, 100)).await.unwrap().is_empty());
    // byte order: uppercase before lowercase, "a b" before "a/x" before "ab", non-ASCII last
    for name in ["b", "ä", "a/x", "B", "ab", "a b", "a"] {
        store_doc(&s, name, &[b"u"]).await;
    }
    // a second epoch is what the listing reports
    let e = store_doc(&s, "b", &[b"v"]).await;
    assert_eq!(e, 2);
    // only a snapshot (the log compacted away entirely): listed
    let es = s.acquire_epoch("snap").await.unwrap();
    let seq = committed(s.append(&[item("snap", es, &[b"x"])]).await.unwrap()[0]);
    s.compact("snap", es, b"S", seq).await.unwrap();
    // rows without content: not listed
    s.acquire_epoch("acquired-only").await.unwrap();
    assert_eq!(s.create_epoch("created-only").await.unwrap(), Some(1));
    let ea = s.acquire_epoch("appended-nothing").await.unwrap();
    committed(
        s.append(&[item("appended-nothing", ea, &[])])
            .await
            .unwrap()[0],
    );
    // a document that was never stored at all: not listed, and listing creates nothing
    let _ = s.load("loaded-only").await.unwrap();

    let all = s.list(&query("", None, 100)).await.unwrap();
    let mut want: Vec<&str> = vec!["b", "ä", "a/x", "B", "ab", "a b", "a", "snap"];
    want.sort_unstable();
    assert_eq!(
        want,
        ["B", "a", "a b", "a/x", "ab", "b", "snap", "ä"],
        "Rust str order is byte order"
    );
    assert_eq!(
        all.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        want
    );
    assert!(all.contains(&DocumentInfo {
        name: "b".into(),
        epoch: 2
    }));
    assert!(all.contains(&DocumentInfo {
        name: "a".into(),
        epoch: 1
    }));
    assert_eq!(s.current_epoch("loaded-only").await.unwrap(), None);
}

async fn list_prefix_is_literal(env: &Env) {
    let s = env.open().await;
    let stored = [
        "100%",
        "100%x",
        "1000",
        "100",
        "a_b",
        "a_bc",
        "axb",
        "a\\b",
        "a\\",
        "ab",
        "\u{e9}1",
        "\u{e9}z",
        "\u{ea}",
        "e\u{301}",
        "\u{d7ff}x",
        "\u{e000}",
        "\u{10ffff}",
        "\u{10ffff}a",
        "\u{10ffff}\u{10ffff}",
        "z",
        "%",
        "_",
    ];
    for name in stored {
        store_doc(&s, name, &[b"u"]).await;
    }
    let cases: &[(&str, &[&str])] = &[
        ("100%", &["100%", "100%x"]),
        ("100", &["100", "100%", "100%x", "1000"]),
        ("a_", &["a_b", "a_bc"]),
        ("a\\", &["a\\", "a\\b"]),
        ("%", &["%"]),
        ("_", &["_"]),
        ("\u{e9}", &["\u{e9}1", "\u{e9}z"]),
        ("\u{d7ff}", &["\u{d7ff}x"]),
        (
            "\u{10ffff}",
            &["\u{10ffff}", "\u{10ffff}a", "\u{10ffff}\u{10ffff}"],
        ),
        ("\u{10ffff}\u{10ffff}", &["\u{10ffff}\u{10ffff}"]),
        ("nothing", &[]),
        ("100%x-longer", &[]),
    ];
    for (prefix, want) in cases {
        assert_eq!(
            names(&s, query(prefix, None, 100)).await,
            *want,
            "prefix {prefix:?}"
        );
    }
    let mut everything: Vec<&str> = stored.to_vec();
    everything.sort_unstable();
    assert_eq!(names(&s, query("", None, 100)).await, everything);

    // no stored name contains NUL: rejected like a NUL in a name, by every backend
    for q in [query("a\0", None, 10), query("", Some("a\0"), 10)] {
        let err = s.list(&q).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }
}

async fn list_pages_with_after_and_limit(env: &Env) {
    let s = env.open().await;
    let pages: Vec<String> = (0..25).map(|i| format!("p/{i:02}")).collect();
    for name in pages
        .iter()
        .map(String::as_str)
        .chain(["o", "p", "p0", "q"])
    {
        store_doc(&s, name, &[b"u"]).await;
    }

    // walk the prefix in pages of 10, each page starting after the previous one's last name
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = names(&s, query("p/", after.as_deref(), 10)).await;
        assert!(page.len() <= 10);
        let Some(last) = page.last().cloned() else {
            break;
        };
        seen.extend(page);
        after = Some(last);
    }
    assert_eq!(seen, pages);

    assert!(names(&s, query("p/", None, 0)).await.is_empty());
    assert!(names(&s, query("", None, 0)).await.is_empty());
    assert_eq!(names(&s, query("", None, 2)).await, ["o", "p"]);
    assert_eq!(names(&s, query("", Some("p/24"), 100)).await, ["p0", "q"]);
    assert!(names(&s, query("", Some("q"), 100)).await.is_empty());
    // `after` is strict, and need not be a stored name
    assert_eq!(
        names(&s, query("p/", Some("p/05"), 2)).await,
        ["p/06", "p/07"]
    );
    assert_eq!(
        names(&s, query("p/", Some("p/05x"), 2)).await,
        ["p/06", "p/07"]
    );
    // `after` before the prefix: the page starts at the prefix
    assert_eq!(names(&s, query("p/", Some("a"), 1)).await, ["p/00"]);
    assert_eq!(names(&s, query("p/", Some("p"), 1)).await, ["p/00"]);
    assert_eq!(names(&s, query("p/", Some(""), 1)).await, ["p/00"]);
    // `after` beyond the prefix's names: nothing
    assert!(names(&s, query("p/", Some("p0"), 10)).await.is_empty());
    assert!(names(&s, query("p/", Some("p/24"), 10)).await.is_empty());
    // a huge limit is fine
    assert_eq!(names(&s, query("p/", None, usize::MAX)).await, pages);
}

async fn delete_removes_content_and_fences_every_writer(env: &Env) {
    let s = env.open().await;
    let e1 = s.acquire_epoch("doc").await.unwrap();
    let first = committed(s.append(&[item("doc", e1, &[b"u1", b"u2"])]).await.unwrap()[0]);
    s.compact("doc", e1, b"snap", first).await.unwrap();
    let old_last = committed(s.append(&[item("doc", e1, &[b"u3"])]).await.unwrap()[0]);
    let other = store_doc(&s, "other", &[b"o1"]).await;

    assert!(s.delete("doc", e1).await.unwrap());
    let deleted = e1 + 1;
    assert_eq!(s.current_epoch("doc").await.unwrap(), Some(deleted));
    assert_eq!(s.load("doc").await.unwrap(), StoredDocument::default());
    assert_eq!(names(&s, query("", None, 10)).await, ["other"]);
    // another document is untouched
    assert_eq!(s.load("other").await.unwrap().updates, vec![b"o1".to_vec()]);
    assert_eq!(s.current_epoch("other").await.unwrap(), Some(other));

    // the deleting writer is fenced like any other old owner
    assert_eq!(
        s.append(&[item("doc", e1, &[b"late"])]).await.unwrap(),
        vec![AppendOutcome::Fenced { current: deleted }]
    );
    let err = s
        .compact("doc", e1, b"late-state", old_last)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { current, mine } if current == deleted && mine == e1),
        "{err:?}"
    );
    let err = s.delete("doc", e1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { current, mine } if current == deleted && mine == e1),
        "{err:?}"
    );
    // the tombstone is a row: a writer that loaded the document empty cannot create it
    assert_eq!(s.create_epoch("doc").await.unwrap(), None);
    assert!(s.load("doc").await.unwrap().is_empty());

    // the next owner takes a newer epoch and starts empty; only its own content is loaded
    let e2 = s.acquire_epoch("doc").await.unwrap();
    assert_eq!(e2, deleted + 1);
    assert!(s.load("doc").await.unwrap().is_empty());
    assert_eq!(
        s.append(&[item("doc", e2, &[])]).await.unwrap(),
        vec![AppendOutcome::Committed(0)]
    );
    let n1 = committed(s.append(&[item("doc", e2, &[b"n1"])]).await.unwrap()[0]);
    assert!(n1 > old_last, "seqs are never reused: {n1} <= {old_last}");
    let doc = s.load("doc").await.unwrap();
    assert_eq!(doc.snapshot, None);
    assert_eq!(doc.updates, vec![b"n1".to_vec()]);
    assert_eq!(doc.last_seq, n1);
    let n2 = committed(s.append(&[item("doc", e2, &[b"n2"])]).await.unwrap()[0]);
    s.compact("doc", e2, b"new-snap", n1).await.unwrap();
    let doc = s.load("doc").await.unwrap();
    assert_eq!(doc.snapshot.as_deref(), Some(&b"new-snap"[..]));
    assert_eq!(doc.updates, vec![b"n2".to_vec()]);
    assert_eq!(doc.last_seq, n2);
    assert_eq!(
        s.list(&query("d", None, 10)).await.unwrap(),
        vec![DocumentInfo {
            name: "doc".into(),
            epoch: e2
        }]
    );

    // deleting again (only a snapshot left after a full compaction) works the same way
    s.compact("doc", e2, b"final", n2).await.unwrap();
    assert!(s.delete("doc", e2).await.unwrap());
    assert_eq!(s.load("doc").await.unwrap(), StoredDocument::default());
    assert_eq!(s.current_epoch("doc").await.unwrap(), Some(e2 + 1));
}

async fn delete_with_stale_epoch_changes_nothing(env: &Env) {
    let s = env.open().await;
    let old = store_doc(&s, "doc", &[b"u1"]).await;
    let new = store_doc(&s, "doc", &[b"u2"]).await;
    let before = s.load("doc").await.unwrap();
    for stale in [old, new + 1, UNSTORED] {
        let err = s.delete("doc", stale).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Fenced { current, mine } if current == new && mine == stale),
            "{err:?}"
        );
    }
    assert_eq!(s.load("doc").await.unwrap(), before);
    assert_eq!(before.updates, vec![b"u1".to_vec(), b"u2".to_vec()]);
    assert_eq!(s.current_epoch("doc").await.unwrap(), Some(new));
    assert_eq!(names(&s, query("", None, 10)).await, ["doc"]);
}

async fn delete_of_unknown_or_empty_document(env: &Env) {
    let s = env.open().await;
    // no row: under UNSTORED nothing to do and nothing created; any other epoch is fenced
    assert!(!s.delete("ghost", UNSTORED).await.unwrap());
    assert_eq!(s.current_epoch("ghost").await.unwrap(), None);
    let err = s.delete("ghost", 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                current: 0,
                mine: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(s.current_epoch("ghost").await.unwrap(), None);
    assert_eq!(s.acquire_epoch("ghost").await.unwrap(), 1);

    // a row without content: nothing deleted, but the epoch still moves on
    let e = s.acquire_epoch("empty").await.unwrap();
    assert!(!s.delete("empty", e).await.unwrap());
    assert_eq!(s.current_epoch("empty").await.unwrap(), Some(e + 1));
    assert_eq!(
        s.append(&[item("empty", e, &[b"x"])]).await.unwrap(),
        vec![AppendOutcome::Fenced { current: e + 1 }]
    );
    assert!(s.load("empty").await.unwrap().is_empty());

    let err = s.delete("bad\0name", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

/// Appends racing a delete under the same epoch either commit before it (and are deleted with
/// the rest) or are fenced: nothing written under that epoch survives.
async fn delete_fences_concurrent_appends(env: &Env) {
    let s = env.open().await;
    let e = store_doc(&s, "doc", &[b"first"]).await;
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for j in 0..10 {
                    let u = format!("w{i}-{j}");
                    outcomes.push(s.append(&[item("doc", e, &[u.as_bytes()])]).await.unwrap()[0]);
                }
                outcomes
            })
        })
        .collect();
    tokio::task::yield_now().await;
    assert!(s.delete("doc", e).await.unwrap());
    for w in writers {
        for outcome in w.await.unwrap() {
            match outcome {
                AppendOutcome::Committed(_) => {}
                AppendOutcome::Fenced { current } => assert_eq!(current, e + 1),
            }
        }
    }
    assert_eq!(s.load("doc").await.unwrap(), StoredDocument::default());
    assert_eq!(s.current_epoch("doc").await.unwrap(), Some(e + 1));
}

async fn ping_and_backend_name(env: &Env) {
    let s = env.open().await;
    s.ping().await.unwrap();
    let want = match env {
        Env::Memory(_) => "memory",
        Env::Sqlite { .. } => "sqlite",
        Env::Postgres { .. } => "postgres",
    };
    assert_eq!(s.backend(), want);
}

// ---------------------------------------------------------------------------------------------
// Backend-specific checks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_scheme_is_a_config_error() {
    let err = open_store("mysql://localhost/x", SqlOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

#[tokio::test]
async fn sqlite_relative_path_is_created_in_working_directory() {
    // Relative to the process's working directory (the package root under `cargo test`).
    let rel = format!("target-test-{}.db", uuid::Uuid::new_v4().simple());
    let cwd = std::env::current_dir().unwrap();
    let s = SqlStore::connect(&format!("sqlite://{rel}"), SqlOptions::default())
        .await
        .unwrap();
    s.acquire_epoch("x").await.unwrap();
    s.close().await;
    let path = cwd.join(&rel);
    assert!(path.exists(), "{} missing", path.display());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[tokio::test]
async fn sqlite_uses_wal_in_both_synchronous_modes() {
    use hearth::storage::Synchronous;
    use sqlx::Connection;
    let dir = TempDir::new();
    let url = format!("sqlite://{}", dir.path.join("h.db").display());
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let opts = SqlOptions {
            sqlite_synchronous: sync,
            ..SqlOptions::default()
        };
        let s = SqlStore::connect(&url, opts).await.unwrap();
        let e = s.acquire_epoch("x").await.unwrap();
        committed(s.append(&[item("x", e, &[b"u"])]).await.unwrap()[0]);
        s.close().await;
    }
    // The journal mode is stored in the file.
    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM document_updates")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_creating_one_sqlite_file_both_start() {
    // Two nodes started together on a new file race to migrate it; both must come up.
    for round in 0..10 {
        let dir = TempDir::new();
        let url = format!(
            "sqlite://{}",
            dir.path.join(format!("race{round}.db")).display()
        );
        let (a, b) = tokio::join!(
            SqlStore::connect(&url, SqlOptions::default()),
            SqlStore::connect(&url, SqlOptions::default())
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let e = a.acquire_epoch("x").await.unwrap();
        committed(a.append(&[item("x", e, &[b"u"])]).await.unwrap()[0]);
        assert!(b.acquire_epoch("x").await.unwrap() > e);
        a.close().await;
        b.close().await;
    }
}

/// The Hocuspocus table of a prefixed environment still holds exactly its one row.
async fn hocuspocus_table_untouched(env: &Env) {
    use sqlx::Connection;
    let query = "SELECT name FROM documents";
    let names: Vec<String> = match env {
        Env::Sqlite { url, .. } => {
            let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::query_scalar(query).fetch_all(&mut c).await.unwrap()
        }
        Env::Postgres { url, .. } => {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query_scalar(query).fetch_all(&mut c).await.unwrap()
        }
        Env::Memory(_) => unreachable!(),
    };
    assert_eq!(names, ["theirs"]);
}

/// Without a prefix, a database whose `documents` table is Hocuspocus's is refused with an
/// error that says what to do, and nothing is created in it.
#[tokio::test]
async fn a_hocuspocus_documents_table_is_refused_without_a_prefix() {
    let mut envs = vec![Env::sqlite_prefixed().await.unwrap()];
    envs.extend(Env::postgres_prefixed().await);
    for env in &envs {
        let (Env::Sqlite { url, .. } | Env::Postgres { url, .. }) = env else {
            unreachable!()
        };
        let err = SqlStore::connect(url, SqlOptions::default())
            .await
            .expect_err("Hearth must not migrate into a Hocuspocus database");
        let text = err.to_string();
        assert!(
            text.contains("Hocuspocus") && text.contains("database_table_prefix"),
            "{text}"
        );
        hocuspocus_table_untouched(env).await;
        // and a bad prefix is refused before anything is opened
        let bad = SqlOptions {
            table_prefix: "x; DROP TABLE documents".into(),
            ..SqlOptions::default()
        };
        assert!(matches!(
            SqlStore::connect(url, bad).await,
            Err(StoreError::Invalid(_))
        ));
        // with the prefix, both live side by side
        let s = env.open().await;
        let e = s.acquire_epoch("mine").await.unwrap();
        committed(s.append(&[item("mine", e, &[b"u"])]).await.unwrap()[0]);
        hocuspocus_table_untouched(env).await;
    }
}
