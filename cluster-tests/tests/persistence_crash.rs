//! kill -9 during writes on one node: nothing acknowledged is lost.
//!
//! Claim under test (durable mode, the default): **every update acknowledged with
//! `SyncStatus(1)` before the process was SIGKILLed is served after a restart on the same
//! database** — to a fresh client that never saw it, so nothing is re-delivered by the clients
//! that wrote it ("forgetful" clients). Also: nothing appears that nobody sent, and no marker
//! appears twice.
//!
//! Each round: 3 documents × 2 clients insert markers every 5–20 ms; after a seeded random
//! 0.3–1.5 s the node is SIGKILLed; the node restarts on the same database; one fresh client per
//! document reads it and the set check runs over everything acknowledged in every round so far.
//! Every other round runs with `--debounce-ms 20 --max-debounce-ms 100`, so kills also hit
//! compactions. 20 rounds per backend (SQLite file, fresh PostgreSQL database).
//!
//! Memory-ack mode (`--durability memory`) is *allowed* to lose acknowledged edits on kill -9
//! (they are stored by debounced compaction); its test only reports the loss and checks the
//! rest (no phantom, no duplicate).

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, History, NodeProcess, NodeSpec, PgDatabase, Scratch, TestClient, WAIT, Writers,
    seed,
};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

const DOCS: usize = 3;
const CLIENTS_PER_DOC: usize = 2;

/// Runs `rounds` kill-9 rounds against a node on `database_url`; returns the history and the
/// number of acknowledged markers missing after the last round (only non-zero when
/// `allow_loss`).
async fn crash_rounds(
    test: &str,
    scratch: &Scratch,
    database_url: &str,
    extra_args: &[&str],
    rounds: usize,
    allow_loss: bool,
) -> anyhow::Result<(History, usize)> {
    let seed = seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = NodeSpec::new("1", database_url).args(extra_args.iter().copied());
    let mut node = NodeProcess::start(scratch, spec).await?;
    let docs: Vec<String> = (0..DOCS).map(|d| format!("crash-{d}")).collect();
    let mut history = History::default();
    let mut lost_total = 0;

    for round in 0..rounds {
        let mut clients = Vec::new();
        for (d, doc) in docs.iter().enumerate() {
            for c in 0..CLIENTS_PER_DOC {
                let opts = ClientOptions::labelled(format!("r{round}-d{d}-c{c}"));
                clients.push(Arc::new(
                    TestClient::connect_with(&node.url(), doc, opts).await?,
                ));
            }
        }
        let window = Duration::from_millis(rng.random_range(300..=1500));
        let writers = Writers::start(
            &clients,
            Duration::from_millis(5),
            Duration::from_millis(20),
            rng.random(),
        );
        tokio::time::sleep(window).await;
        node.kill()?;
        writers.stop().await;
        // Acks the server wrote before it died may still be in flight on loopback: wait until
        // every socket has been seen to end, then record.
        for c in &clients {
            c.wait_for("socket closed after the kill", WAIT, |s| !s.connected())
                .await?;
            history.record(c);
            let anomalies = c.view(|s| s.anomalies().to_vec());
            assert!(anomalies.is_empty(), "protocol anomalies: {anomalies:?}");
        }
        let acked_this_round: usize = clients.iter().map(|c| c.view(|s| s.acked_count())).sum();
        drop(clients);

        // Odd rounds compact every few tens of milliseconds, so kills also land in the middle
        // of compactions (snapshot write + log deletion in one transaction); even rounds use
        // the defaults (2 s debounce: the log only grows).
        let mut args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        if round % 2 == 0 {
            args.extend(["--debounce-ms", "20", "--max-debounce-ms", "100"].map(String::from));
        }
        node.spec_mut().args = args;
        node.restart().await?;
        let mut report = Vec::new();
        let mut lost_now = 0;
        for doc in &docs {
            let fresh = TestClient::connect(&node.url(), doc, "").await?;
            let contents = fresh.contents();
            let v = history.check(doc, &contents);
            report.push(format!(
                "{doc}: acked {} sent {} present {}",
                v.counts.0, v.counts.1, v.counts.2
            ));
            assert!(
                v.phantom.is_empty() && v.duplicates.is_empty(),
                "round {round} (seed {seed}) {doc}: phantom {:?} duplicates {:?}",
                v.phantom,
                v.duplicates
            );
            if !v.lost.is_empty() {
                lost_now += v.lost.len();
                assert!(
                    allow_loss,
                    "round {round} (seed {seed}) {doc}: {} acknowledged markers lost after kill -9, \
                     e.g. {:?}; node log {}",
                    v.lost.len(),
                    &v.lost[..v.lost.len().min(10)],
                    node.log_path().display()
                );
            }
        }
        lost_total = lost_now;
        eprintln!(
            "[{test}] round {round}: killed after {window:?}, {acked_this_round} acked this round; {}",
            report.join("; ")
        );
    }
    assert!(
        history.total_acked() > rounds * 10,
        "the workload got almost nothing acknowledged ({} of {} sent): the test proves nothing",
        history.total_acked(),
        history.total_sent()
    );
    node.kill()?;
    Ok((history, lost_total))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acked_edit_sqlite() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_crash_sqlite")?;
    let url = format!("sqlite://{}", scratch.join("hearth.db").display());
    crash_rounds("persistence_crash_sqlite", &scratch, &url, &[], 20, false).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acked_edit_postgres() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_crash_postgres")?;
    let db = PgDatabase::create()?;
    crash_rounds(
        "persistence_crash_postgres",
        &scratch,
        db.url(),
        &[],
        20,
        false,
    )
    .await?;
    Ok(())
}

/// Memory-ack mode may lose acknowledged edits on kill -9 (documented); it must still never
/// invent or duplicate anything, and must come back up on the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_memory_ack_mode_reports_loss_only() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_crash_memory_ack")?;
    let url = format!("sqlite://{}", scratch.join("hearth.db").display());
    let (history, lost) = crash_rounds(
        "persistence_crash_memory_ack",
        &scratch,
        &url,
        &["--durability", "memory"],
        5,
        true,
    )
    .await?;
    eprintln!(
        "[persistence_crash_memory_ack] after 5 kill -9 rounds, {lost} of {} acknowledged \
         markers are missing (allowed in this mode)",
        history.total_acked()
    );
    Ok(())
}
