//! Database outage (docs/persistence.md, "How durable mode works", item "Database
//! unavailable").
//!
//! Claims under test, durable mode:
//! 1. while the database is down the node keeps running and keeps serving: clients stay
//!    connected and see each other's edits (broadcast does not wait for the disk);
//! 2. no acknowledgement is sent for anything that is not committed: no `SyncStatus(1)` arrives
//!    once the outage has begun (after a short grace period for commits that completed just
//!    before it), and never for an edit made after the database was already down;
//! 3. `/readyz` turns 503 during the outage and 200 after it (with `readiness_outage_ms` 0: by
//!    default a short outage leaves the node ready, see `readiness_db_blip.rs`);
//! 4. once the database is back, every edit made before or during the outage is acknowledged
//!    (bounded wait) and is served by the node after a kill -9 and restart — i.e. it really is in
//!    the database.
//!
//! Variants: PostgreSQL in a private cluster stopped with `pg_ctl stop -m immediate`; SQLite made
//! unwritable with `chattr +i` (as root, chmod does not stop writes; without the capability the
//! SQLite variant is skipped with a printed reason).

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::db::FrozenSqlite;
use cluster_tests::testbed::{
    ClientOptions, History, NodeProcess, NodeSpec, PgCluster, Scratch, TestClient, WAIT, Writers,
    seed, wait_until,
};
use tokio::time::{Instant, sleep};

const DOCS: usize = 2;
const CLIENTS_PER_DOC: usize = 2;
/// How long the outage lasts while the clients keep writing.
const OUTAGE: Duration = Duration::from_secs(4);
/// Commits that completed just before the outage began may still be acknowledged this long
/// after it began.
const GRACE: Duration = Duration::from_millis(500);
/// Bound for everything to be acknowledged after the database is back (store retry backoff is
/// at most 5 s).
const RECOVERY: Duration = Duration::from_secs(30);

/// Waits (≤ `limit`) until `/readyz` answers `want`.
async fn wait_readyz(node: &NodeProcess, want: u16, limit: Duration) -> anyhow::Result<()> {
    wait_until(&format!("/readyz answering {want}"), limit, || async {
        // an error is seen, not fatal: a node that died shows as refused connections
        anyhow::Ok(match node.readyz().await {
            Ok(code) if code == want => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await
}

/// The scenario; `outage(true)` takes the database away, `outage(false)` brings it back.
/// Returns how many "compaction failed" warnings the node logged up to the end of the outage.
async fn outage_scenario(
    test: &str,
    scratch: &Scratch,
    database_url: &str,
    args: &[&str],
    outage: &mut dyn FnMut(bool) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let seed = seed(test);
    let spec = NodeSpec::new("1", database_url)
        .args(["--readiness-outage-ms", "0"])
        .args(args.iter().copied());
    let mut node = NodeProcess::start(scratch, spec).await?;
    let docs: Vec<String> = (0..DOCS).map(|d| format!("outage-{d}")).collect();
    let mut clients = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        for c in 0..CLIENTS_PER_DOC {
            let opts = ClientOptions::labelled(format!("d{d}-c{c}"));
            clients.push(Arc::new(
                TestClient::connect_with(&node.url(), doc, opts).await?,
            ));
        }
    }
    wait_readyz(&node, 200, WAIT).await?;

    // Healthy phase: acks flow.
    let writers = Writers::start(
        &clients,
        Duration::from_millis(10),
        Duration::from_millis(30),
        seed,
    );
    for c in &clients {
        c.wait_for("some acks before the outage", WAIT, |s| s.acked_count() > 5)
            .await?;
    }

    // Outage.
    outage(true)?;
    let down_at = Instant::now();
    let sent_at_down: Vec<usize> = clients.iter().map(|c| c.view(|s| s.sent().len())).collect();
    // the claim's grace period: what committed just before the outage may still be acked
    sleep(GRACE).await;
    let statuses_after_grace: Vec<u64> =
        clients.iter().map(|c| c.view(|s| s.statuses().0)).collect();
    wait_readyz(&node, 503, OUTAGE).await?;
    let left = OUTAGE.saturating_sub(down_at.elapsed());
    sleep(left).await;

    assert!(node.is_running(), "hearth died during the database outage");
    for (i, c) in clients.iter().enumerate() {
        c.view(|s| {
            assert!(
                s.connected(),
                "client {i} was disconnected during the outage: {s:?}"
            );
            assert!(s.anomalies().is_empty(), "client {i}: {:?}", s.anomalies());
            assert_eq!(
                s.statuses().0,
                statuses_after_grace[i],
                "client {i}: SyncStatus(1) arrived while the database was down"
            );
            let falsely_acked: Vec<&String> = s.sent()[sent_at_down[i]..]
                .iter()
                .filter(|m| s.acked().contains(m))
                .collect();
            assert!(
                falsely_acked.is_empty(),
                "client {i}: edits made after the database went down were acknowledged: \
                 {falsely_acked:?}"
            );
            assert!(
                s.sent().len() > sent_at_down[i] + 10,
                "client {i} barely wrote during the outage"
            );
        });
    }
    // Collaboration continues: each client has its peer's outage-time edits.
    for pair in clients.chunks(CLIENTS_PER_DOC) {
        let (a, b) = (&pair[0], &pair[1]);
        let b_sent = b.sent();
        a.wait_for("the peer's outage-time edits", WAIT, |s| {
            let have: std::collections::HashSet<String> = s.contents().into_iter().collect();
            b_sent.iter().all(|m| have.contains(m))
        })
        .await?;
    }
    eprintln!(
        "[{test}] outage: {} markers written while the database was down, none acknowledged",
        clients
            .iter()
            .zip(&sent_at_down)
            .map(|(c, n)| c.view(|s| s.sent().len()) - n)
            .sum::<usize>()
    );

    let compaction_failures = node.log_text().matches("compaction failed").count();

    // Recovery.
    outage(false)?;
    let up_at = Instant::now();
    sleep(Duration::from_millis(500)).await;
    writers.stop().await;
    for c in &clients {
        c.wait_all_acked(RECOVERY).await?;
    }
    eprintln!(
        "[{test}] every edit acknowledged {:?} after the database came back",
        up_at.elapsed()
    );
    wait_readyz(&node, 200, RECOVERY).await?;

    // Everything is in the database: kill -9 (no shutdown store) and read it back fresh.
    let mut history = History::default();
    for c in &clients {
        history.record(c);
    }
    drop(clients);
    node.kill()?;
    node.restart().await?;
    for doc in &docs {
        let fresh = TestClient::connect(&node.url(), doc, "").await?;
        let contents = fresh.contents();
        let v = history.check(doc, &contents);
        assert!(v.ok(), "{doc}: {v:?}");
        assert_eq!(
            v.counts.0, v.counts.1,
            "{doc}: everything sent was acknowledged"
        );
        eprintln!(
            "[{test}] {doc}: {} markers, all present after kill -9 + restart",
            v.counts.1
        );
    }
    Ok(compaction_failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_withholds_acks_and_recovers() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_db_down_postgres")?;
    let mut pg = PgCluster::start(&scratch)?;
    let url = pg.create_database("hearth")?;
    let mut outage = |down: bool| {
        if down {
            pg.stop_immediate()
        } else {
            pg.start_again()
        }
    };
    let test = "persistence_db_down_postgres";
    outage_scenario(test, &scratch, &url, &[], &mut outage).await?;
    Ok(())
}

/// With a short debounce the outage outlasts `max_debounce_ms`, so compactions fail as well (on
/// PostgreSQL each attempt waits for the pool's acquire timeout). Everything must still recover,
/// and compaction attempts stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_with_failing_compactions_recovers() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_db_down_pg_compaction")?;
    let mut pg = PgCluster::start(&scratch)?;
    let url = pg.create_database("hearth")?;
    let mut outage = |down: bool| {
        if down {
            pg.stop_immediate()
        } else {
            pg.start_again()
        }
    };
    let test = "persistence_db_down_pg_compaction";
    let failures = outage_scenario(test, &scratch, &url, &SHORT_DEBOUNCE, &mut outage).await?;
    eprintln!("[{test}] {failures} failed compactions logged during a {OUTAGE:?} outage");
    assert!(
        failures <= RETRY_BOUND,
        "{failures} failed compactions (bound {RETRY_BOUND})"
    );
    Ok(())
}

/// Debounce settings that make compactions fall due during the outage.
const SHORT_DEBOUNCE: [&str; 4] = ["--debounce-ms", "200", "--max-debounce-ms", "600"];
/// At most ~10 compaction attempts per document and second of outage (backoff from 50 ms
/// doubling to 5 s makes it about 7 per document in total).
const RETRY_BOUND: usize = DOCS * 10 * OUTAGE.as_secs() as usize;

/// Failed compactions must be retried with backoff (docs/persistence.md: "A failed compaction
/// is retried"), not in a loop. SQLite made unwritable fails each
/// attempt at once, which exposes a missing backoff. Only the outage phase is checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_compactions_back_off() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_db_down_compaction_backoff")?;
    let Some(db) = sqlite_in_freezable_dir(&scratch, "failed_compactions_back_off")? else {
        return Ok(());
    };
    let url = format!("sqlite://{}", db.display());
    let spec = NodeSpec::new("1", &url).args(SHORT_DEBOUNCE);
    let node = NodeProcess::start(&scratch, spec).await?;
    let mut clients = Vec::new();
    for d in 0..DOCS {
        let c = TestClient::connect(&node.url(), &format!("backoff-{d}"), "").await?;
        clients.push(Arc::new(c));
    }
    let writers = Writers::start(
        &clients,
        Duration::from_millis(10),
        Duration::from_millis(30),
        1,
    );
    for c in &clients {
        c.wait_for("some acks before the freeze", WAIT, |s| s.acked_count() > 5)
            .await?;
    }
    let frozen = FrozenSqlite::freeze(&db)?;
    let before = node.log_text().matches("compaction failed").count();
    sleep(OUTAGE).await;
    let failures = node.log_text().matches("compaction failed").count() - before;
    frozen.thaw()?;
    writers.stop().await;
    eprintln!("{failures} failed compactions logged during a {OUTAGE:?} outage");
    assert!(
        failures <= RETRY_BOUND,
        "{failures} failed compactions in a {OUTAGE:?} outage of {DOCS} documents (bound \
         {RETRY_BOUND}): compaction retries do not back off; log {}",
        node.log_path().display()
    );
    Ok(())
}

/// A database path in its own directory, if this process can `chattr +i` there; else prints
/// why the calling test is skipped and returns `None`.
fn sqlite_in_freezable_dir(
    scratch: &Scratch,
    test: &str,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    let probe_dir = scratch.join("probe");
    std::fs::create_dir_all(&probe_dir)?;
    std::fs::write(probe_dir.join("p"), b"x")?;
    if let Err(e) = FrozenSqlite::freeze(&probe_dir.join("p")).and_then(FrozenSqlite::thaw) {
        eprintln!(
            "SKIPPED {test}: cannot make the database unwritable ({e:#}). chmod does not stop \
             root or already-open descriptors; the test needs `chattr +i` (root with \
             CAP_LINUX_IMMUTABLE, on ext4/xfs/btrfs)."
        );
        return Ok(None);
    }
    let dir = scratch.join("db");
    std::fs::create_dir_all(&dir)?;
    Ok(Some(dir.join("hearth.db")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_unwritable_withholds_acks_and_recovers() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_db_down_sqlite")?;
    let test = "persistence_db_down_sqlite";
    let Some(db) = sqlite_in_freezable_dir(&scratch, test)? else {
        return Ok(());
    };
    let mut frozen: Option<FrozenSqlite> = None;
    let db2 = db.clone();
    let mut outage = move |down: bool| -> anyhow::Result<()> {
        if down {
            frozen = Some(FrozenSqlite::freeze(&db2)?);
        } else if let Some(f) = frozen.take() {
            f.thaw()?;
        }
        Ok(())
    };
    let url = format!("sqlite://{}", db.display());
    outage_scenario(test, &scratch, &url, &[], &mut outage).await?;
    Ok(())
}
