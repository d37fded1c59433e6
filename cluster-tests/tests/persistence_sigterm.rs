//! Graceful shutdown.
//!
//! Precise claim under test: **when hearth receives SIGTERM, every update frame that a client
//! had completely written to its socket before the signal was sent is in the database when the
//! process exits — acknowledged or not — and the process exits with status 0.** "Written" means
//! the client's `send` + flush returned (on loopback the bytes are then in the server's kernel
//! receive buffer); the clients are "forgetful": after the restart only a fresh client reads the
//! document, so nothing is re-delivered by the sync exchange.
//!
//! Each round: 3 documents × 2 clients write at a modest rate for a seeded 0.3–1 s, then each
//! client writes a burst of 30 markers back to back (so many are unacknowledged, and some are
//! likely still unread by the server, at the moment of the signal); the test waits until every
//! client's frames are flushed, sends SIGTERM, checks exit status 0 and the 4205 close each
//! client receives, restarts the node on the same database and compares a fresh client's view
//! with **everything sent**.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::node::TERM_TIMEOUT;
use cluster_tests::testbed::{
    ClientOptions, History, NodeProcess, NodeSpec, PgDatabase, Scratch, TestClient, WAIT, Writers,
    seed,
};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

const DOCS: usize = 3;
const CLIENTS_PER_DOC: usize = 2;
const BURST: usize = 30;

/// How the final burst meets the signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Burst {
    /// Burst, flush, SIGTERM at once (the server may or may not have read the burst).
    Live,
    /// SIGSTOP the node, burst, flush (the bytes sit in the node's kernel buffers, certainly
    /// unread), SIGTERM, SIGCONT: the worst case of the same claim, deterministically.
    Paused,
}

/// Runs the rounds. With `strict`, unacknowledged edits written before the signal must be
/// stored too (the full claim); without, only their count is reported and the acknowledged ones
/// are checked.
async fn sigterm_rounds(
    test: &str,
    scratch: &Scratch,
    database_url: &str,
    rounds: usize,
    burst: Burst,
    strict: bool,
) -> anyhow::Result<()> {
    let seed = seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut node = NodeProcess::start(scratch, NodeSpec::new("1", database_url)).await?;
    let docs: Vec<String> = (0..DOCS).map(|d| format!("term-{d}")).collect();
    let mut history = History::default();
    let mut failures = Vec::new();
    let mut reported = BTreeSet::new();

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
        let window = Duration::from_millis(rng.random_range(300..=1000));
        let writers = Writers::start(
            &clients,
            Duration::from_millis(5),
            Duration::from_millis(20),
            rng.random(),
        );
        tokio::time::sleep(window).await;
        writers.stop().await;
        if burst == Burst::Paused {
            node.stop()?;
        }
        for c in &clients {
            for _ in 0..BURST {
                c.insert_next();
            }
        }
        for c in &clients {
            c.wait_flushed(WAIT).await?;
        }
        let unacked_at_signal: usize = clients.iter().map(|c| c.unacked().len()).sum();
        let status = match burst {
            Burst::Live => node.term().await?,
            Burst::Paused => {
                node.send_signal(libc::SIGTERM)?;
                node.cont()?;
                node.wait_exit(TERM_TIMEOUT).await?
            }
        };
        assert!(
            status.success(),
            "round {round}: hearth exited with {status} after SIGTERM; log {}",
            node.log_path().display()
        );
        for c in &clients {
            c.wait_for("socket closed by the shutdown", WAIT, |s| !s.connected())
                .await?;
            let close = c.view(|s| s.socket_close().map(|(code, r)| (code, r.to_string())));
            assert_eq!(
                close.as_ref().map(|(code, _)| *code),
                Some(4205),
                "round {round}: providers must get 4205 Reset Connection on shutdown, got {close:?}"
            );
            history.record(c);
        }
        drop(clients);

        node.restart().await?;
        let mut report = Vec::new();
        for doc in &docs {
            let fresh = TestClient::connect(&node.url(), doc, "").await?;
            let contents = fresh.contents();
            let v = history.check(doc, &contents);
            assert!(
                v.ok(),
                "round {round} (seed {seed}) {doc}: lost acked {:?}, phantom {:?}, duplicates {:?}",
                v.lost,
                v.phantom,
                v.duplicates
            );
            report.push(format!(
                "{doc}: sent {} acked {} present {}",
                v.counts.1, v.counts.0, v.counts.2
            ));
            // markers missing now that were not missing after earlier rounds
            let present: BTreeSet<&String> = contents.iter().collect();
            let missing: Vec<String> = history
                .sent_markers(doc)
                .filter(|m| !present.contains(m) && !reported.contains(*m))
                .cloned()
                .collect();
            if !missing.is_empty() {
                failures.push(format!(
                    "round {round} {doc}: {} unacknowledged markers written before SIGTERM are \
                     missing, e.g. {:?}",
                    missing.len(),
                    &missing[..missing.len().min(5)]
                ));
                reported.extend(missing);
            }
        }
        eprintln!(
            "[{test}] round {round}: {unacked_at_signal} unacked at SIGTERM; {}",
            report.join("; ")
        );
    }
    if !strict {
        if !failures.is_empty() {
            eprintln!(
                "[{test}] (not asserted here) unacknowledged edits written before SIGTERM were \
                 lost:\n{}",
                failures.join("\n")
            );
        }
        return Ok(());
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: edits written to the socket before SIGTERM were not stored:\n{}\nnode log {}",
        failures.join("\n"),
        node.log_path().display()
    );
    Ok(())
}

fn sqlite_url(scratch: &Scratch) -> String {
    format!("sqlite://{}", scratch.join("hearth.db").display())
}

/// Exit 0, 4205 to every client, every acknowledged edit kept, nothing invented or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_keeps_acked_edits_sqlite() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_sigterm_sqlite")?;
    let url = sqlite_url(&scratch);
    sigterm_rounds(
        "persistence_sigterm_sqlite",
        &scratch,
        &url,
        10,
        Burst::Live,
        false,
    )
    .await
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_keeps_acked_edits_postgres() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_sigterm_postgres")?;
    let db = PgDatabase::create()?;
    let test = "persistence_sigterm_postgres";
    sigterm_rounds(test, &scratch, db.url(), 10, Burst::Live, false).await
}

/// The full claim: unacknowledged edits already written to the socket are stored too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stores_unacked_edits_written_before_the_signal() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_sigterm_strict")?;
    let url = sqlite_url(&scratch);
    sigterm_rounds(
        "persistence_sigterm_strict",
        &scratch,
        &url,
        10,
        Burst::Live,
        true,
    )
    .await
}

/// The full claim, deterministically: the burst is written while the node is SIGSTOPped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stores_edits_buffered_while_paused() -> anyhow::Result<()> {
    let scratch = Scratch::new("persistence_sigterm_paused")?;
    let url = sqlite_url(&scratch);
    sigterm_rounds(
        "persistence_sigterm_paused",
        &scratch,
        &url,
        3,
        Burst::Paused,
        true,
    )
    .await
}
