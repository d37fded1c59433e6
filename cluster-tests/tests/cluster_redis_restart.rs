//! Redis restarted with all its data gone, mid-editing (docs/cluster.md guarantees table, "Redis
//! restart").
//!
//! Three nodes, lock TTL 2 s, three documents, each owned by a different node (its first client
//! connected there), six clients each (the rest through the balancer) inserting markers and
//! reconnecting through the balancer whenever their socket ends. A sampler reads every
//! document's epoch from the database every 100 ms throughout. Redis is killed and restarted
//! empty on the same port. Then:
//!
//! * every node's liveness key comes back and every document is served again (a probe through
//!   the balancer is acknowledged) within `lock_ttl + 5 s` (times printed), each listed by
//!   exactly the node its new lock names;
//! * fencing: every epoch only ever increased, and every document was taken over under a newer
//!   epoch than before the restart (a lease found gone is never silently re-used);
//! * every client converges to what a fresh client is served, which holds every acknowledged
//!   marker, nothing unsent and no duplicate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, Reconnector, Scratch, TestClient, WAIT, Writers,
    assert_nothing_lost, probe_writable, seed, wait_all_acked, wait_until,
};
use tokio::time::Instant;

const CLIENTS_PER_DOC: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_fencing_and_recovers() -> anyhow::Result<()> {
    let test = "cluster_redis_restart";
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let mut cluster = Cluster::start(&scratch, ClusterSpec::new(3).lock_ttl_ms(2000)).await?;
    let lb = cluster.lb.url();
    let docs: Vec<String> = (0..3).map(|d| format!("redis-{d}")).collect();

    let mut clients = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let opts = ClientOptions::labelled(format!("d{d}-c0"));
        clients.push(Arc::new(
            TestClient::connect_with(&cluster.nodes[d].url(), doc, opts).await?,
        ));
        for c in 1..CLIENTS_PER_DOC {
            let opts = ClientOptions::labelled(format!("d{d}-c{c}"));
            clients.push(Arc::new(TestClient::connect_with(&lb, doc, opts).await?));
        }
        let owner = cluster.holder(doc).await?.map(|h| h.node);
        assert_eq!(owner, Some(cluster.nodes[d].id().to_string()));
    }

    let stop = AtomicBool::new(false);
    let db = cluster.store()?;
    let sampler = async {
        let mut series: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        while !stop.load(Ordering::Acquire) {
            if let Ok(rows) = db.query("SELECT name, epoch FROM documents") {
                for r in rows {
                    if let [doc, e] = r.as_slice()
                        && let Ok(e) = e.parse::<i64>()
                    {
                        let s = series.entry(doc.clone()).or_default();
                        if s.last() != Some(&e) {
                            s.push(e);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        series
    };
    let scenario = async {
        let reconnector = Reconnector::start(&clients, &lb);
        let writers = Writers::start(
            &clients,
            Duration::from_millis(10),
            Duration::from_millis(40),
            seed,
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = cluster.epochs()?;
        let restarted_at = Instant::now();
        cluster.redis_mut().restart().await?;
        let redis_back = restarted_at.elapsed();

        // Recovered = the lock is held again and exactly its holder lists the document (the
        // old owners may keep serving from memory until they notice the loss; only a new lock
        // and epoch count), then a probe through the balancer is acknowledged.
        let limit = cluster.lock_ttl() + Duration::from_secs(5);
        let deadline = restarted_at + limit;
        let mut settled = Vec::new();
        for doc in &docs {
            let left = deadline.saturating_duration_since(Instant::now());
            let cluster = &cluster;
            let owner = wait_until(&format!("{doc} re-owned"), left, || async move {
                let holder = cluster.holder(doc).await?.map(|h| h.node);
                let owned = cluster.owned_all().await;
                let listers: Vec<&str> = cluster
                    .nodes
                    .iter()
                    .zip(&owned)
                    .filter(|(_, o)| o.as_ref().is_ok_and(|o| o.contains(doc)))
                    .map(|(n, _)| n.id())
                    .collect();
                anyhow::Ok(match listers[..] {
                    [lister] if holder.as_deref() == Some(lister) => Ok(lister.to_owned()),
                    _ => Err(format!("lock {holder:?}, listed by {listers:?}")),
                })
            })
            .await?;
            settled.push(format!("{doc} by {owner} in {:?}", restarted_at.elapsed()));
        }
        let mut probes = Vec::new();
        let mut served = Vec::new();
        for doc in &docs {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = probe_writable(&lb, doc, &format!("probe-{doc}"), left, &mut probes).await;
            let took = restarted_at.elapsed();
            p?;
            served.push(format!("{doc} in {took:?}"));
        }
        for n in &cluster.nodes {
            let what = format!("node {}'s liveness key refreshed", n.id());
            let cluster = &cluster;
            wait_until(&what, cluster.lock_ttl(), || async move {
                anyhow::Ok(cluster.incarnation(n.id()).await?.is_some())
            })
            .await?;
        }
        eprintln!(
            "[{test}] Redis back empty after {redis_back:?}; re-owned: {settled:?}; probes \
             acknowledged: {served:?} (lock TTL {:?})",
            cluster.lock_ttl()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        writers.stop().await;
        wait_all_acked(&clients, WAIT).await?;
        eprintln!(
            "[{test}] every marker acknowledged {:?} after the restart ({} reconnects)",
            restarted_at.elapsed(),
            reconnector.reconnects()
        );
        reconnector.stop().await;
        anyhow::Ok((before, probes))
    };
    let (series, result) = tokio::join!(sampler, async {
        let r = scenario.await;
        stop.store(true, Ordering::Release);
        r
    });
    let (before, probes) = result?;

    // fencing: epochs only increase, and every document has a newer one than before
    let after = cluster.epochs()?;
    for doc in &docs {
        let s = &series[doc];
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "{doc}: the epoch went back: {s:?}"
        );
        assert!(
            after[doc] > before[doc],
            "{doc}: taken over under epoch {} after the restart, {} before",
            after[doc],
            before[doc]
        );
    }
    let mut fenced = Vec::new();
    for i in 0..cluster.nodes.len() {
        let m = cluster.metrics(i).await?;
        fenced.push(format!(
            "{}: fenced {} lock losses {}",
            cluster.nodes[i].id(),
            m.sum("hearth_fenced_writes_total", &[]),
            m.sum("hearth_cluster_lock_losses_total", &[])
        ));
    }
    eprintln!("[{test}] epochs seen per document: {series:?}; {fenced:?}");

    // one owner each, as the new locks say
    let owned: Vec<_> = cluster
        .owned_all()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    for doc in &docs {
        let holder = cluster.holder(doc).await?.map(|h| h.node);
        let listers: Vec<&str> = cluster
            .nodes
            .iter()
            .zip(&owned)
            .filter(|(_, o)| o.contains(doc))
            .map(|(n, _)| n.id())
            .collect();
        assert!(
            listers.len() == 1 && holder.as_deref() == Some(listers[0]),
            "{doc}: listed by {listers:?}, lock held by {holder:?}"
        );
    }

    assert_nothing_lost(test, &clients, &probes, &lb, &docs).await?;
    Ok(())
}
