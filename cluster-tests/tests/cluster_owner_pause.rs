//! SIGSTOP of a document's owner for longer than the lock TTL, then SIGCONT (docs/cluster.md
//! guarantees table, "owner paused"): another node takes over and serves; the
//! stale owner commits nothing after it resumes; nothing the new owner acknowledged is lost.
//!
//! Four nodes (n4 outside the balancer), lock TTL 2 s, one document `pause-0` owned by n1. A
//! "stale" client is connected directly to n1 and has written (and had acknowledged) a few
//! markers. Eight more clients enter through the balancer and keep inserting. Then:
//!
//! 1. n1 is SIGSTOPped. While it is frozen the stale client sends more markers into its socket
//!    (they sit in n1's kernel buffer, exactly like edits typed against a frozen server), and the
//!    other clients keep typing.
//! 2. Once n1's lock has expired, a probe connected directly to another node must be served and
//!    acknowledged within `lock_ttl + 5 s` of the freeze (the takeover time is printed); it
//!    writes markers the new owner acknowledges, and the document's epoch must have risen.
//! 3. n1 is SIGCONTed after `lock_ttl + 2 s` in total, and the stale client at once sends a few
//!    more markers. The stale client's socket must be closed with 4205.
//! 4. Before the stale client reconnects anywhere (so nothing but n1 could have stored its
//!    markers): none of its post-freeze markers was acknowledged, none is in any stored row or
//!    snapshot of the document, no other client ever saw one (n1 must not apply them, not even in
//!    memory), the epoch never went back, every marker the new owner acknowledged is stored, and
//!    n1 no longer lists the document.
//! 5. The stale client reconnects through the balancer; everybody converges; the set check holds
//!    (its markers now arrive legitimately through the new owner).
//!
//! Three variants:
//!
//! * `paused_owner_commits_nothing_after_it_resumes` — the writers pause until everything is
//!   acknowledged just before the freeze (so n1 is frozen *between* database transactions) and
//!   resume right after it; the probe goes to n4, which never routed the document. This is the
//!   G3 check in its plainest form.
//! * `paused_owner_is_replaced_on_nodes_that_routed_to_it` — the same, but the
//!   probe goes to n2, which proxied clients to n1 before the freeze and still caches that route.
//! * `paused_owner_is_replaced_when_frozen_mid_commit` — n1 is frozen with one of its group
//!   commits in flight: a session of the test holds the document's row lock until PostgreSQL
//!   shows another session of the test database waiting for it (n1's commit statement), n1 is
//!   frozen, and the lock is released, so the statement runs to its end while n1 cannot read
//!   the reply; the probe goes to n4.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, Reconnector, Scratch, TestClient, WAIT, Writers,
    marker_hits, probe_writable, seed, wait_all_acked, wait_converged, wait_until,
};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Frozen between transactions; the probe goes to n4 (never routed the document).
    Quiesced,
    /// Frozen between transactions; the probe goes to n2 (cached the route to n1).
    CachedRoute,
    /// Frozen inside a group commit; the probe goes to n4.
    MidCommit,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_owner_commits_nothing_after_it_resumes() -> anyhow::Result<()> {
    pause_scenario("cluster_owner_pause", Variant::Quiesced).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_owner_is_replaced_on_nodes_that_routed_to_it() -> anyhow::Result<()> {
    pause_scenario("cluster_owner_pause_cached", Variant::CachedRoute).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_owner_is_replaced_when_frozen_mid_commit() -> anyhow::Result<()> {
    pause_scenario("cluster_owner_pause_midcommit", Variant::MidCommit).await
}

/// Sessions of the test database waiting for a lock.
fn waiting_for_lock(cluster: &Cluster) -> anyhow::Result<usize> {
    let n = cluster.store()?.scalar(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND wait_event_type = 'Lock'",
        cluster.db.name()
    ))?;
    Ok(n.parse()?)
}

/// Freezes n1 while its group commit for `doc` waits for the document's row lock, which a
/// session of the test holds; releases it once n1 is frozen, so the statement completes in
/// PostgreSQL and its reply waits unread in n1's socket. Returns when n1 was frozen.
async fn freeze_mid_commit(cluster: &mut Cluster, doc: &str) -> anyhow::Result<Instant> {
    use sqlx::Connection;
    let mut blocker = sqlx::PgConnection::connect(cluster.db.url()).await?;
    let mut tx = blocker.begin().await?;
    sqlx::query("SELECT 1 FROM documents WHERE name = $1 FOR UPDATE")
        .bind(doc)
        .fetch_one(&mut *tx)
        .await?;
    let waiting = wait_until("n1's group commit waits for the row lock", WAIT, || async {
        Ok(waiting_for_lock(cluster)? > 0)
    })
    .await;
    let at = Instant::now();
    let frozen = waiting.and_then(|()| cluster.nodes[0].stop());
    tx.commit().await?;
    frozen?;
    Ok(at)
}

async fn pause_scenario(test: &str, variant: Variant) -> anyhow::Result<()> {
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let mut cluster = Cluster::start(&scratch, ClusterSpec::new(4).lock_ttl_ms(2000)).await?;
    cluster.lb.remove_backend(cluster.nodes[3].addr());
    let lb = cluster.lb.url();
    let probe_node = match variant {
        Variant::Quiesced | Variant::MidCommit => 3,
        Variant::CachedRoute => 1,
    };
    let doc = "pause-0";

    let stale = Arc::new(
        TestClient::connect_with(
            &cluster.nodes[0].url(),
            doc,
            ClientOptions::labelled("stale"),
        )
        .await?,
    );
    assert_eq!(
        cluster.holder(doc).await?.map(|h| h.node).as_deref(),
        Some("n1")
    );
    for _ in 0..5 {
        stale.insert_next();
    }
    stale.wait_all_acked(WAIT).await?;
    let before_freeze: BTreeSet<String> = stale.sent().into_iter().collect();

    let mut clients = Vec::new();
    for c in 0..8 {
        let opts = ClientOptions::labelled(format!("c{c}"));
        clients.push(Arc::new(TestClient::connect_with(&lb, doc, opts).await?));
    }
    let reconnector = Reconnector::start(&clients, &lb);
    let mut writers = Writers::start(
        &clients,
        Duration::from_millis(20),
        Duration::from_millis(60),
        seed,
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut n1_metrics_before = cluster.metrics(0).await?;
    let epoch_before = cluster.epochs()?[doc];
    if variant == Variant::CachedRoute {
        let proxied = cluster
            .metrics(1)
            .await?
            .sum("hearth_cluster_remote_attachments", &[]);
        assert!(
            proxied > 0.0,
            "n2 proxies clients to n1 (it cached the route)"
        );
    }

    // 1. freeze the owner; the stale client and the others keep typing
    let frozen_at = match variant {
        Variant::Quiesced | Variant::CachedRoute => {
            writers.stop().await;
            wait_all_acked(&clients, WAIT).await?;
            n1_metrics_before = cluster.metrics(0).await?;
            let at = Instant::now();
            cluster.nodes[0].stop()?;
            writers = Writers::start(
                &clients,
                Duration::from_millis(20),
                Duration::from_millis(60),
                seed ^ 1,
            );
            at
        }
        Variant::MidCommit => {
            let at = freeze_mid_commit(&mut cluster, doc).await?;
            eprintln!("[{test}] n1 frozen with a group commit in flight");
            at
        }
    };
    for _ in 0..5 {
        stale.insert_next();
    }
    stale.wait_flushed(WAIT).await?;

    // 2. another node takes over and serves: once the frozen owner's lock has expired, a probe
    //    connects directly to `probe_node`
    let expired = cluster
        .wait_holder_gone(doc, "n1", cluster.lock_ttl() + WAIT)
        .await?;
    let mut probes = Vec::new();
    // + 5 s: an owner frozen inside a compaction's transaction holds the document's row lock
    // until PostgreSQL's idle_in_transaction_session_timeout (5 s, set by hearth) aborts it
    let limit = cluster.lock_ttl() + Duration::from_secs(5) + Duration::from_secs(5);
    let probe_url = cluster.nodes[probe_node].url();
    let probe = probe_writable(&probe_url, doc, "probe", limit, &mut probes).await;
    let takeover = frozen_at.elapsed();
    let probe = probe?;
    for _ in 0..5 {
        probe.insert_next();
    }
    probe.wait_all_acked(WAIT).await?;
    // The probe's node, or another live node a reconnecting client reached first (clients
    // reset by their edges reconnect through the balancer meanwhile); never the frozen one.
    let new_owner = cluster.holder(doc).await?.expect("owned");
    assert_ne!(new_owner.node, "n1", "a live node took the document over");
    if new_owner.node != cluster.nodes[probe_node].id() {
        eprintln!(
            "[{test}] {} claimed {doc} before the probe's node {}",
            new_owner.node,
            cluster.nodes[probe_node].id()
        );
    }
    let epoch_new = cluster.epochs()?[doc];
    assert!(
        epoch_new > epoch_before,
        "the new owner took a newer epoch: {epoch_before} → {epoch_new}"
    );
    eprintln!(
        "[{test}] n1 frozen; its lock expired {expired:?} later; {} serves {doc} {takeover:?} \
         after the freeze (lock TTL {:?}), epoch {epoch_before} → {epoch_new}",
        new_owner.node,
        cluster.lock_ttl()
    );

    // 3. resume the stale owner; the stale client sends more at once
    let pause = cluster.lock_ttl() + Duration::from_secs(2);
    tokio::time::sleep(pause.saturating_sub(frozen_at.elapsed())).await;
    cluster.nodes[0].cont()?;
    let resumed_at = Instant::now();
    for _ in 0..5 {
        stale.insert_next();
    }
    stale
        .wait_for("stale client's socket closed", WAIT, |s| !s.connected())
        .await?;
    let close = stale.view(|s| s.socket_close().map(|(c, r)| (c, r.to_string())));
    eprintln!(
        "[{test}] n1 resumed after {:?}; the stale client's socket ended {:?} later with {close:?}",
        resumed_at - frozen_at,
        resumed_at.elapsed()
    );
    assert_eq!(
        close.as_ref().map(|c| c.0),
        Some(4205),
        "the stale owner resets its client"
    );

    // 4. nothing n1 received after the freeze was acknowledged, stored or passed on
    let stale_markers: Vec<String> = stale
        .sent()
        .into_iter()
        .filter(|m| !before_freeze.contains(m))
        .collect();
    let acked_stale: Vec<String> = stale
        .acked()
        .into_iter()
        .filter(|m| !before_freeze.contains(m))
        .collect();
    assert!(
        acked_stale.is_empty(),
        "the stale owner acknowledged {acked_stale:?}"
    );
    // let whatever n1 might still do happen, then look (a commit n1 started before its lock
    // loss shows nowhere until it lands or fails: no metric counts commits in flight)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = cluster.stored_rows(doc)?;
    let blobs: Vec<&[u8]> = rows.iter().map(|r| r.data.as_slice()).collect();
    // where each stale marker was found: the snapshot, or a log row and its writer's epoch
    // (n1's is `epoch_before`; a fence failure shows as that epoch, a marker carried to the
    // new owner by some client as `epoch_new`)
    let stored_stale: Vec<(String, Vec<String>)> = stale_markers
        .iter()
        .filter_map(|m| {
            let found: Vec<String> = rows
                .iter()
                .filter(|r| marker_hits(&r.data, m) > 0)
                .map(|r| match (r.seq, r.epoch) {
                    (None, _) => "snapshot".to_owned(),
                    (Some(seq), epoch) => format!("seq {seq} epoch {epoch:?}"),
                })
                .collect();
            (!found.is_empty()).then(|| (m.clone(), found))
        })
        .collect();
    assert!(
        stored_stale.is_empty(),
        "markers sent only to the stale owner after its freeze were stored (n1's epoch \
         {epoch_before}, the new owner's {epoch_new}): {stored_stale:?}"
    );
    for c in clients.iter().chain(probes.iter()) {
        let contents: BTreeSet<String> = c.contents().into_iter().collect();
        let leaked: Vec<&String> = stale_markers
            .iter()
            .filter(|m| contents.contains(*m))
            .collect();
        assert!(
            leaked.is_empty(),
            "the stale owner passed {leaked:?} on to client {}",
            c.client_id()
        );
    }
    let epoch_after = cluster.epochs()?[doc];
    assert!(
        epoch_after >= epoch_new,
        "the epoch went back: {epoch_new} → {epoch_after}"
    );
    let probe_acked = probe.acked();
    let lost: Vec<&String> = probe_acked
        .iter()
        .filter(|m| !blobs.iter().any(|b| marker_hits(b, m) > 0))
        .collect();
    assert!(
        lost.is_empty(),
        "markers the new owner acknowledged are not stored: {lost:?}"
    );
    let n1_metrics = cluster.metrics(0).await?;
    let fenced = n1_metrics.sum("hearth_fenced_writes_total", &[])
        - n1_metrics_before.sum("hearth_fenced_writes_total", &[]);
    let losses = n1_metrics.sum("hearth_cluster_lock_losses_total", &[]);
    let append = |m: &cluster_tests::testbed::Metrics, result: &str| {
        m.sum(
            "hearth_store_ops_total",
            &[("op", "append"), ("result", result)],
        )
    };
    let append_ok = append(&n1_metrics, "ok") - append(&n1_metrics_before, "ok");
    let compact_fenced = n1_metrics.sum(
        "hearth_store_ops_total",
        &[("op", "compact"), ("result", "fenced")],
    );
    eprintln!(
        "[{test}] n1 since the freeze: store_ops{{append,ok}} +{append_ok} (group commits, \
         fenced items included), compactions fenced {compact_fenced}"
    );
    eprintln!(
        "[{test}] n1 after resuming: fenced writes +{fenced}, lock losses {losses}; \
         {} stale markers, none acknowledged, stored or passed on",
        stale_markers.len()
    );
    wait_until(&format!("n1 no longer lists {doc}"), WAIT, || async {
        anyhow::Ok(!cluster.owned(0).await?.contains(doc))
    })
    .await?;

    // 5. the stale client comes back through the balancer; everything converges
    stale.reconnect_within(Some(&lb), WAIT).await?;
    writers.stop().await;
    let mut all: Vec<Arc<TestClient>> = clients.clone();
    all.push(stale.clone());
    wait_all_acked(&all, WAIT).await?;
    reconnector.stop().await;
    let mut history = History::default();
    for c in all.iter().chain(probes.iter()) {
        history.record(c);
    }
    all.extend(probes.iter().cloned());
    let served = wait_converged(&all, &lb, doc, "", WAIT).await?;
    let v = history.check(doc, &served);
    assert!(v.ok(), "{v:?}");
    eprintln!(
        "[{test}] converged: acked {} sent {} present {}",
        v.counts.0, v.counts.1, v.counts.2
    );
    for c in &all {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}
