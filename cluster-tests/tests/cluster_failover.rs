//! Failover after SIGKILL of an owner, with the default lock TTL of 10 s (docs/cluster.md
//! "Failover timeline").
//!
//! Three nodes. `failover` is owned by n1 and edited by a client on each node; `reclaim` is
//! owned by n1 too, held open by one client there. n1 is SIGKILLed. Then:
//!
//! * survivors: an edit made on n3 right after the kill reaches the client on n2 long before the
//!   dead node's lock could have expired (n2 or n3 took the document over: the lock names it,
//!   and its `taken_over` route count says so);
//! * the killed node's client, reconnecting through the balancer, edits again as fast;
//! * n1 restarted at once reclaims `reclaim` from its own previous incarnation without waiting
//!   for that lease to expire;
//! * every edit is acknowledged, nothing acknowledged is lost, everyone converges.
//!
//! The recovery times are printed.

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, Reconnector, Scratch, TestClient, WAIT,
    wait_all_acked, wait_converged,
};
use tokio::time::Instant;

/// The production default.
const LOCK_TTL_MS: u64 = 10_000;
/// Survivors and the killed node's clients must be editing again well within this: the dead
/// node's lease, refreshed every third of the TTL, lives at least two thirds of it.
const RECOVERY_LIMIT: Duration = Duration::from_secs(4);

async fn taken_over(cluster: &Cluster, nodes: &[usize]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for &i in nodes {
        let m = cluster.nodes[i].metrics().await?;
        total += m.sum(
            "hearth_cluster_route_lookups_total",
            &[("outcome", "taken_over")],
        );
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_is_replaced_without_waiting_for_its_lock() -> anyhow::Result<()> {
    let test = "cluster_failover";
    let scratch = Scratch::new(test)?;
    let mut cluster =
        Cluster::start(&scratch, ClusterSpec::new(3).lock_ttl_ms(LOCK_TTL_MS)).await?;
    let lb = cluster.lb.url();
    let doc = "failover";

    let mut clients = Vec::new();
    for (i, label) in ["on-n1", "on-n2", "on-n3"].into_iter().enumerate() {
        let url = cluster.nodes[i].url();
        let opts = ClientOptions::labelled(label);
        clients.push(Arc::new(TestClient::connect_with(&url, doc, opts).await?));
    }
    let keeper = Arc::new(
        TestClient::connect_with(
            &cluster.nodes[0].url(),
            "reclaim",
            ClientOptions::labelled("keeper"),
        )
        .await?,
    );
    keeper.insert("kept");
    let old = cluster.holder(doc).await?.expect("failover is owned");
    assert_eq!(old.node, "n1");
    let old_reclaim = cluster.holder("reclaim").await?.expect("reclaim is owned");
    assert_eq!(old_reclaim.incarnation, old.incarnation);
    for c in &clients {
        c.insert_next();
    }
    wait_all_acked(&clients, WAIT).await?;
    wait_all_acked(std::slice::from_ref(&keeper), WAIT).await?;

    let reconnector = Reconnector::start(&clients, &lb);
    let killed_at = Instant::now();
    cluster.nodes[0].kill()?;
    clients[2].insert("n3-after-kill");
    clients[0].insert("n1-after-kill");

    // survivors: n3's edit reaches n2
    clients[1]
        .wait_for("n3's edit after the kill", RECOVERY_LIMIT, |s| {
            s.contents().iter().any(|m| m == "n3-after-kill")
        })
        .await?;
    let survivors = killed_at.elapsed();
    // the killed node's client, back through the balancer
    clients[1]
        .wait_for("n1's client's edit after the kill", RECOVERY_LIMIT, |s| {
            s.contents().iter().any(|m| m == "n1-after-kill")
        })
        .await?;
    let killed_clients = killed_at.elapsed();
    let new = cluster.holder(doc).await?.expect("failover is owned again");
    assert!(new.node != "n1", "a surviving node owns it: {new:?}");
    assert!(
        taken_over(&cluster, &[1, 2]).await? >= 1.0,
        "the new owner took the lock over rather than waiting for it to expire"
    );

    // n1 comes back and reclaims what its previous incarnation held
    cluster.nodes[0].restart().await?;
    let restarted = killed_at.elapsed();
    keeper.reconnect(Some(&cluster.nodes[0].url())).await?;
    let reclaimed = killed_at.elapsed();
    let holder = cluster.holder("reclaim").await?.expect("reclaim is owned");
    assert_eq!(holder.node, "n1");
    assert_ne!(holder.incarnation, old_reclaim.incarnation);
    assert!(
        taken_over(&cluster, &[0]).await? >= 1.0,
        "the restarted node took its old lease over rather than waiting for it to expire"
    );
    assert!(
        keeper.contents().iter().any(|m| m == "kept"),
        "reclaim lost its content"
    );
    eprintln!(
        "[{test}] lock TTL {LOCK_TTL_MS} ms; after SIGKILL of the owner: survivors' edits \
         flowed again after {survivors:?}, the killed node's client's after {killed_clients:?} \
         ({} took over); n1 restarted after {restarted:?} and held its old document again \
         after {reclaimed:?}",
        new.node
    );

    // nothing lost, everyone converges
    for c in &clients {
        c.insert_next();
    }
    wait_all_acked(&clients, WAIT).await?;
    reconnector.stop().await;
    let mut history = History::default();
    for c in &clients {
        history.record(c);
    }
    let served = wait_converged(&clients, &lb, doc, "", WAIT).await?;
    let v = history.check(doc, &served);
    assert!(v.ok(), "{doc}: {v:?}");
    for c in &clients {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}
