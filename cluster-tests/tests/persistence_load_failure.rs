//! Load failure on corrupt stored bytes: an empty document must never overwrite the stored one
//! when the load fails.
//!
//! Claims under test (docs/persistence.md, "Loading"): when a document's stored state does not
//! apply,
//! 1. a client gets `Authenticated` followed by `PermissionDenied` — never a sync step2, i.e.
//!    never an empty (or partial) document it could edit;
//! 2. nothing is written for that document: its snapshot, `snapshot_seq` and log rows are
//!    byte-for-byte unchanged after repeated attempts, a write attempt by the refused client and
//!    a graceful shutdown (which stores every loaded document). Only the epoch may advance;
//! 3. other documents on the same node are unaffected.
//!
//! Two corruptions, on SQLite and on PostgreSQL: garbage in the compacted **snapshot** (written by
//! the shutdown compaction), and garbage in one **log** row (written by durable appends; the node
//! is SIGKILLed before any compaction).

use std::time::Duration;

use cluster_tests::testbed::db::Db;
use cluster_tests::testbed::{
    ClientOptions, NodeProcess, NodeSpec, PgDatabase, Scratch, TestClient, WAIT,
};

const VICTIM: &str = "victim";
const BYSTANDER: &str = "bystander";
/// Not a Yjs v1 update: the leading varint claims ~2^34 client blocks.
const GARBAGE: &[u8] = b"\xde\xad\xbe\xef\x7fnot a yjs update";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corrupt {
    Snapshot,
    Log,
}

/// Everything stored for `name` except the epoch: (snapshot hex, snapshot_seq, [(seq, hex)]).
fn stored_bytes(db: &Db, name: &str) -> anyhow::Result<(String, String, Vec<Vec<String>>)> {
    let row = db.query(&format!(
        "SELECT CASE WHEN snapshot IS NULL THEN 'NULL' ELSE {} END, snapshot_seq \
         FROM documents WHERE name = '{name}'",
        db.hex_of("snapshot")
    ))?;
    anyhow::ensure!(row.len() == 1, "no documents row for {name}: {row:?}");
    let log = db.query(&format!(
        "SELECT seq, {} FROM document_updates WHERE name = '{name}' ORDER BY seq",
        db.hex_of("data")
    ))?;
    Ok((row[0][0].clone(), row[0][1].clone(), log))
}

/// Writes `n` acknowledged markers; the client stays connected (so the document stays loaded
/// and is not compacted on unload) until the returned handle drops.
async fn write_markers(url: &str, doc: &str, n: usize) -> anyhow::Result<TestClient> {
    let c = TestClient::connect_with(url, doc, ClientOptions::labelled(doc)).await?;
    for _ in 0..n {
        c.insert_next();
    }
    c.wait_all_acked(WAIT).await?;
    Ok(c)
}

async fn load_failure(
    test: &str,
    scratch: &Scratch,
    database_url: &str,
    corrupt: Corrupt,
) -> anyhow::Result<()> {
    let db = Db::from_url(database_url)?;
    // No compaction while running: the log variant needs log rows (its writer stays connected,
    // so no unload compaction either, until the SIGKILL); the snapshot variant gets its
    // snapshot from the shutdown compaction.
    let spec = NodeSpec::new("1", database_url).args([
        "--debounce-ms",
        "600000",
        "--max-debounce-ms",
        "600000",
    ]);
    let mut node = NodeProcess::start(scratch, spec).await?;
    let writer = write_markers(&node.url(), VICTIM, 20).await?;
    let bystander_markers = write_markers(&node.url(), BYSTANDER, 5).await?.sent();

    match corrupt {
        Corrupt::Snapshot => {
            drop(writer);
            let status = node.term().await?;
            anyhow::ensure!(status.success(), "exit status {status}");
            let (snapshot, _, _) = stored_bytes(&db, VICTIM)?;
            anyhow::ensure!(snapshot != "NULL", "the shutdown did not compact {VICTIM}");
            db.exec(&format!(
                "UPDATE documents SET snapshot = {} WHERE name = '{VICTIM}'",
                db.blob_literal(GARBAGE)
            ))?;
        }
        Corrupt::Log => {
            node.kill()?;
            drop(writer);
            let (snapshot, _, log) = stored_bytes(&db, VICTIM)?;
            anyhow::ensure!(
                snapshot == "NULL" && log.len() >= 20,
                "expected only log rows for {VICTIM}: snapshot {snapshot}, {} log rows",
                log.len()
            );
            // a row in the middle: the ones after it depend on it
            let seq = &log[log.len() / 2][0];
            db.exec(&format!(
                "UPDATE document_updates SET data = {} WHERE seq = {seq}",
                db.blob_literal(GARBAGE)
            ))?;
        }
    }
    let before = stored_bytes(&db, VICTIM)?;
    let epoch_before = db.scalar(&format!(
        "SELECT epoch FROM documents WHERE name = '{VICTIM}'"
    ))?;

    node.restart().await?;
    for attempt in 0..3 {
        let c = TestClient::start(&node.url(), VICTIM, ClientOptions::default()).await?;
        c.wait_for("PermissionDenied", WAIT, |s| !s.denied().is_empty())
            .await?;
        // the refused client tries to write anyway (queued for a new Auth, never applied)
        c.insert("written after the refusal");
        // nothing answers a refused document's update: a wrong answer needs time to show
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.view(|s| {
            let auth: Vec<&String> = s
                .events()
                .iter()
                .filter(|e| e.starts_with("Authenticated") || e.starts_with("PermissionDenied"))
                .collect();
            assert!(
                auth.len() == 2
                    && auth[0].starts_with("Authenticated")
                    && auth[1].starts_with("PermissionDenied"),
                "attempt {attempt}: expected Authenticated then PermissionDenied, got {:?}",
                s.events()
            );
            assert!(
                !s.synced() && s.contents() == ["written after the refusal"],
                "attempt {attempt}: the client was served a document: {s:?}"
            );
        });
    }
    // Other documents load and serve normally on the same node.
    let other = TestClient::connect(&node.url(), BYSTANDER, "").await?;
    let mut got = other.contents();
    got.sort();
    let mut want = bystander_markers;
    want.sort();
    assert_eq!(got, want, "{BYSTANDER} is unaffected");
    drop(other);

    // A graceful shutdown stores every loaded document: still nothing for the victim.
    let status = node.term().await?;
    assert!(status.success(), "exit status {status}");
    let after = stored_bytes(&db, VICTIM)?;
    assert_eq!(
        before, after,
        "the stored bytes of {VICTIM} changed after failed loads (snapshot, snapshot_seq, log)"
    );
    let epoch_after = db.scalar(&format!(
        "SELECT epoch FROM documents WHERE name = '{VICTIM}'"
    ))?;
    eprintln!("[{test}] {VICTIM}: bytes unchanged; epoch {epoch_before} -> {epoch_after}");
    Ok(())
}

fn sqlite_url(scratch: &Scratch) -> String {
    format!("sqlite://{}", scratch.join("hearth.db").display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshot_is_refused_and_left_alone_sqlite() -> anyhow::Result<()> {
    let test = "persistence_load_failure_snapshot_sqlite";
    let scratch = Scratch::new(test)?;
    load_failure(test, &scratch, &sqlite_url(&scratch), Corrupt::Snapshot).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_row_is_refused_and_left_alone_sqlite() -> anyhow::Result<()> {
    let test = "persistence_load_failure_log_sqlite";
    let scratch = Scratch::new(test)?;
    load_failure(test, &scratch, &sqlite_url(&scratch), Corrupt::Log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshot_is_refused_and_left_alone_postgres() -> anyhow::Result<()> {
    let test = "persistence_load_failure_snapshot_postgres";
    let scratch = Scratch::new(test)?;
    let db = PgDatabase::create()?;
    load_failure(test, &scratch, db.url(), Corrupt::Snapshot).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_row_is_refused_and_left_alone_postgres() -> anyhow::Result<()> {
    let test = "persistence_load_failure_log_postgres";
    let scratch = Scratch::new(test)?;
    let db = PgDatabase::create()?;
    load_failure(test, &scratch, db.url(), Corrupt::Log).await
}
