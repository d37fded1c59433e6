//! SIGKILL of a document's owner mid-editing (docs/cluster.md guarantees table, "owner SIGKILL").
//!
//! Three nodes, lock TTL 2 s. `kill-0` is owned by n1 (its first client connected there),
//! `kill-1` by n2 (a bystander). Ten clients per document, the others entering through the
//! round-robin balancer, insert markers every 10–40 ms and reconnect through the balancer whenever
//! their socket ends. n1 is SIGKILLed mid-editing (and stays in the balancer's list: connections
//! to it are refused and skipped). Then:
//!
//! * 300 ms after the kill — with every reconnect held back, so the dead node's own clients
//!   have re-delivered nothing yet — every marker acknowledged so far is already in the database
//!   rows of `kill-0` (durable acks). The clients proxied to n1 from the survivors are moved to
//!   the node that takes `kill-0` over within that time, and what it acknowledges is in the rows
//!   as well;
//! * a probe through the balancer is served and acknowledged within `lock_ttl + 5 s` of the kill
//!   (the recovery time is printed), by a node other than n1 (lock holder and
//!   `hearth cluster owner` agree);
//! * every client is back, every marker acknowledged; all clients of each document converge to
//!   what a fresh client is served, which holds every acknowledged marker, nothing unsent and no
//!   duplicate.

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, Reconnector, Scratch, TestClient, WAIT, Writers,
    assert_nothing_lost, marker_hits, probe_writable, seed, wait_all_acked,
};
use tokio::time::Instant;

const CLIENTS_PER_DOC: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_sigkill_loses_no_acknowledged_edit() -> anyhow::Result<()> {
    let test = "cluster_owner_kill";
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let mut cluster = Cluster::start(&scratch, ClusterSpec::new(3).lock_ttl_ms(2000)).await?;
    let lb = cluster.lb.url();
    let docs = ["kill-0", "kill-1"];

    let mut clients = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        // the first client decides the owner: n1 for kill-0, n2 for kill-1
        let first = cluster.nodes[d].url();
        let opts = ClientOptions::labelled(format!("d{d}-c0"));
        clients.push(Arc::new(TestClient::connect_with(&first, doc, opts).await?));
        for c in 1..CLIENTS_PER_DOC {
            let opts = ClientOptions::labelled(format!("d{d}-c{c}"));
            clients.push(Arc::new(TestClient::connect_with(&lb, doc, opts).await?));
        }
    }
    let old = cluster.holder(docs[0]).await?.expect("kill-0 is owned");
    assert_eq!(old.node, "n1");
    assert_eq!(
        cluster.holder(docs[1]).await?.map(|h| h.node).as_deref(),
        Some("n2")
    );

    let reconnector = Reconnector::start(&clients, &lb);
    let writers = Writers::start(
        &clients,
        Duration::from_millis(10),
        Duration::from_millis(40),
        seed,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    reconnector.hold(true);
    let killed_at = Instant::now();
    cluster.nodes[0].kill()?;

    // Durable acks: everything acknowledged (by the dead owner, or by the new owner of the
    // clients moved there) is already in the rows. Acks n1 sent just before it died may still
    // be on their way (through Redis to the proxied clients, which stay connected; nothing marks
    // the last one): let them arrive so the check covers them too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut acked_by_dead = History::default();
    for c in clients.iter().filter(|c| c.doc_name() == docs[0]) {
        acked_by_dead.record(c);
    }
    let blobs = cluster.stored_blobs(docs[0])?;
    let missing: Vec<&String> = acked_by_dead
        .acked_markers(docs[0])
        .filter(|m| !blobs.iter().any(|b| marker_hits(b, m) > 0))
        .collect();
    reconnector.hold(false);
    assert!(
        missing.is_empty(),
        "{} of {} markers acknowledged before the kill are not in the database: {:?}",
        missing.len(),
        acked_by_dead.acked(docs[0]),
        &missing[..missing.len().min(10)]
    );

    // Recovery: a probe through the balancer is served and acknowledged.
    let mut probes = Vec::new();
    let limit = cluster.lock_ttl() + Duration::from_secs(5);
    let probe = probe_writable(&lb, docs[0], "probe", limit, &mut probes).await;
    let recovery = killed_at.elapsed();
    probe?;
    let new = cluster
        .holder(docs[0])
        .await?
        .expect("kill-0 is owned again");
    assert!(new.node != "n1", "a live node took over: {new:?}");
    assert_eq!(
        cluster.cli_owner(docs[0]).await?.as_deref(),
        Some(new.node.as_str())
    );
    eprintln!(
        "[{test}] owner n1 SIGKILLed; {} markers it had acknowledged were all stored; \
         {} serves kill-0 again {recovery:?} after the kill (lock TTL {:?})",
        acked_by_dead.acked(docs[0]),
        new.node,
        cluster.lock_ttl()
    );

    // Everyone is back and caught up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    writers.stop().await;
    wait_all_acked(&clients, WAIT).await?;
    let full = killed_at.elapsed();
    for c in &clients {
        c.wait_for("connected", WAIT, |s| s.connected() && s.synced())
            .await?;
    }
    eprintln!(
        "[{test}] every client reconnected and every marker acknowledged {full:?} after the \
         kill ({} reconnects)",
        reconnector.reconnects()
    );
    reconnector.stop().await;

    assert_nothing_lost(test, &clients, &probes, &lb, &docs).await?;
    Ok(())
}
