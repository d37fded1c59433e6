//! SIGTERM of a document's owner (docs/cluster.md guarantees table, "owner SIGTERM"):
//! hand-off without waiting for the lock TTL, no acknowledged edit lost, exit status 0.
//!
//! Three nodes with a long lock TTL (6 s, so a hand-off that waited for it would show). Two
//! documents owned by n1, ten clients each (the first on n1, the rest through the balancer),
//! inserting markers every 10–40 ms and reconnecting through the balancer whenever their socket
//! ends. n1 is taken out of the balancer (as an orchestrator does when it terminates a pod) and
//! SIGTERMed mid-editing. Then:
//!
//! * a probe through the balancer is served and acknowledged on each document within a third of
//!   the lock TTL (times printed), by another node;
//! * n1 exits with status 0 within the shutdown bound;
//! * every socket that ended was closed with 4205 (the graceful path), never dropped;
//! * every client converges to what a fresh client is served, which holds every acknowledged
//!   marker, nothing unsent and no duplicate.

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, Reconnector, Scratch, TestClient, WAIT, Writers,
    probe_writable, seed, wait_all_acked, wait_converged,
};
use tokio::time::Instant;

const CLIENTS_PER_DOC: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_sigterm_hands_off_without_waiting_for_the_ttl() -> anyhow::Result<()> {
    let test = "cluster_owner_term";
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let mut cluster = Cluster::start(&scratch, ClusterSpec::new(3).lock_ttl_ms(6000)).await?;
    let lb = cluster.lb.url();
    let docs = ["term-0", "term-1"];

    let mut clients = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let opts = ClientOptions::labelled(format!("d{d}-c0"));
        clients.push(Arc::new(
            TestClient::connect_with(&cluster.nodes[0].url(), doc, opts).await?,
        ));
        for c in 1..CLIENTS_PER_DOC {
            let opts = ClientOptions::labelled(format!("d{d}-c{c}"));
            clients.push(Arc::new(TestClient::connect_with(&lb, doc, opts).await?));
        }
        assert_eq!(
            cluster.holder(doc).await?.map(|h| h.node).as_deref(),
            Some("n1")
        );
    }

    let reconnector = Reconnector::start(&clients, &lb);
    let writers = Writers::start(
        &clients,
        Duration::from_millis(10),
        Duration::from_millis(40),
        seed,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.lb.remove_backend(cluster.nodes[0].addr());
    let termed_at = Instant::now();
    cluster.nodes[0].send_signal(libc::SIGTERM)?;

    let limit = cluster.lock_ttl() / 3;
    let mut probes = Vec::new();
    let mut handoffs = Vec::new();
    for doc in docs {
        let p = probe_writable(&lb, doc, &format!("probe-{doc}"), limit, &mut probes).await;
        let took = termed_at.elapsed();
        p?;
        let h = cluster.holder(doc).await?.expect("owned again");
        assert_ne!(h.node, "n1", "{doc} moved to another node");
        handoffs.push(format!("{doc} → {} in {took:?}", h.node));
    }
    let status = cluster.nodes[0].wait_exit(Duration::from_secs(20)).await?;
    let exited = termed_at.elapsed();
    assert!(status.success(), "SIGTERMed node exited with {status}");
    eprintln!(
        "[{test}] SIGTERM to n1: hand-off {handoffs:?} (lock TTL {:?}); n1 exited 0 after {exited:?}",
        cluster.lock_ttl()
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    writers.stop().await;
    wait_all_acked(&clients, WAIT).await?;
    eprintln!(
        "[{test}] every marker acknowledged {:?} after the SIGTERM ({} reconnects)",
        termed_at.elapsed(),
        reconnector.reconnects()
    );
    reconnector.stop().await;

    let mut history = History::default();
    for c in clients.iter().chain(probes.iter()) {
        history.record(c);
    }
    for doc in docs {
        let served = wait_converged(&clients, &lb, doc, "", WAIT).await?;
        let v = history.check(doc, &served);
        assert!(v.ok(), "{doc}: {v:?}");
        eprintln!(
            "[{test}] {doc}: acked {} sent {} present {}",
            v.counts.0, v.counts.1, v.counts.2
        );
    }
    let mut ends = Vec::new();
    for c in &clients {
        let (anomalies, events) = c.view(|s| (s.anomalies().to_vec(), s.events().to_vec()));
        assert!(anomalies.is_empty(), "{anomalies:?}");
        ends.extend(
            events
                .into_iter()
                .filter(|e| e.starts_with("socket closed") && !e.contains("4205")),
        );
    }
    assert!(
        ends.is_empty(),
        "sockets ended other than by a 4205 close: {ends:?}"
    );
    Ok(())
}
