//! Cluster smoke tests.
//!
//! * `three_nodes_behind_a_balancer_converge`: three nodes sharing one PostgreSQL database and
//!   one Redis, clients spread over them by a round-robin load balancer, all on the same
//!   documents. Every edit is acknowledged, every client converges, and a fresh client (through
//!   the balancer, so on any node) sees everything. It doubles as the self-test of the harness
//!   pieces the cluster scenarios use ([`Cluster`], `HEARTH_REDIS_URL`, `HEARTH_LOCK_TTL_MS`,
//!   `Lb`).
//! * `clients_on_different_nodes_converge_and_share_awareness`: one
//!   client on the owner, one on each of the two other nodes (proxied). Their edits converge;
//!   an awareness state set on one node is seen on another (owner → edge and edge → edge, clock
//!   updates included), and it is removed there when its client leaves — with a close handshake
//!   and without one.

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, Scratch, TestClient, WAIT, Writers, seed,
    wait_converged,
};

const NODES: usize = 3;
const DOCS: usize = 2;
const CLIENTS_PER_DOC: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_a_balancer_converge() -> anyhow::Result<()> {
    let test = "cluster_smoke";
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let cluster = Cluster::start(&scratch, ClusterSpec::new(NODES).lock_ttl_ms(3000)).await?;
    let lb = &cluster.lb;

    let mut clients = Vec::new();
    for d in 0..DOCS {
        for c in 0..CLIENTS_PER_DOC {
            let opts = ClientOptions::labelled(format!("d{d}-c{c}"));
            let doc = format!("shared-{d}");
            clients.push(Arc::new(
                TestClient::connect_with(&lb.url(), &doc, opts).await?,
            ));
        }
    }
    let spread = lb.open_connections();
    assert_eq!(spread.len(), NODES, "clients reach every node: {spread:?}");

    let writers = Writers::start(
        &clients,
        Duration::from_millis(10),
        Duration::from_millis(40),
        seed,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    writers.stop().await;
    let mut history = History::default();
    for c in &clients {
        c.wait_all_acked(WAIT).await?;
        history.record(c);
    }
    for (d, group) in clients.chunks(CLIENTS_PER_DOC).enumerate() {
        let doc = format!("shared-{d}");
        let want = history.sent(&doc);
        for c in group {
            c.wait_for("convergence", WAIT, |s| s.len() as usize == want)
                .await?;
            let v = history.check(&doc, &c.contents());
            assert!(v.ok(), "{doc}: {v:?}");
        }
        let fresh = TestClient::connect(&lb.url(), &doc, "").await?;
        let v = history.check(&doc, &fresh.contents());
        assert!(
            v.ok() && v.counts.2 == want,
            "{doc} through a fresh client: {v:?}"
        );
        eprintln!("[{test}] {doc}: {want} markers from {CLIENTS_PER_DOC} clients, converged");
    }
    for c in &clients {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_different_nodes_converge_and_share_awareness() -> anyhow::Result<()> {
    let test = "cluster_awareness";
    let scratch = Scratch::new(test)?;
    let cluster = Cluster::start(&scratch, ClusterSpec::new(NODES)).await?;
    let doc = "pair";
    let url = |i: usize| cluster.nodes[i].url();

    // The first client decides the owner: it lands on n1, which claims the document.
    let a = TestClient::connect_with(&url(0), doc, ClientOptions::labelled("a")).await?;
    let holder = cluster.holder(doc).await?;
    assert_eq!(
        holder.as_ref().map(|h| h.node.as_str()),
        Some("n1"),
        "the node the first client reached owns the document"
    );
    assert_eq!(cluster.cli_owner(doc).await?.as_deref(), Some("n1"));
    assert_eq!(cluster.cli_owner("nobody-opened-this").await?, None);
    let b = TestClient::connect_with(&url(1), doc, ClientOptions::labelled("b")).await?;
    let c = TestClient::connect_with(&url(2), doc, ClientOptions::labelled("c")).await?;
    for (i, want) in [(0, true), (1, false), (2, false)] {
        let owned = cluster.owned(i).await?;
        assert_eq!(
            owned.contains(doc),
            want,
            "/cluster/owned of n{}: {owned:?}",
            i + 1
        );
    }

    // Edits from all three nodes converge.
    for _ in 0..20 {
        for cl in [&a, &b, &c] {
            cl.insert_next();
        }
    }
    let clients: Vec<Arc<TestClient>> = vec![Arc::new(a), Arc::new(b), Arc::new(c)];
    let mut history = History::default();
    for cl in &clients {
        cl.wait_all_acked(WAIT).await?;
        history.record(cl);
    }
    let served = wait_converged(&clients, &cluster.lb.url(), doc, "", WAIT).await?;
    let v = history.check(doc, &served);
    assert!(v.ok() && v.counts.2 == 60, "{v:?}");
    let (a, b, c) = (&clients[0], &clients[1], &clients[2]);

    // Awareness owner → edge, with a clock update.
    a.set_awareness(Some(r#"{"user":"a","v":1}"#));
    b.wait_for("a's awareness (clock 1) on n2", WAIT, |s| {
        s.awareness().get(&a.client_id()).map(String::as_str) == Some(r#"{"user":"a","v":1}"#)
    })
    .await?;
    a.set_awareness(Some(r#"{"user":"a","v":2}"#));
    for (who, cl) in [("b on n2", b), ("c on n3", c)] {
        cl.wait_for(&format!("a's awareness (clock 2) at {who}"), WAIT, |s| {
            s.awareness().get(&a.client_id()).map(String::as_str) == Some(r#"{"user":"a","v":2}"#)
        })
        .await?;
    }
    // Edge → edge and edge → owner.
    c.set_awareness(Some(r#"{"user":"c"}"#));
    for (who, cl) in [("a on n1", a), ("b on n2", b)] {
        cl.wait_for(&format!("c's awareness at {who}"), WAIT, |s| {
            s.awareness().get(&c.client_id()).map(String::as_str) == Some(r#"{"user":"c"}"#)
        })
        .await?;
    }

    // a (on the owner) leaves with a close handshake: removed on the edges.
    a.close().await;
    for (who, cl) in [("b on n2", b), ("c on n3", c)] {
        cl.wait_for(&format!("a's awareness removed at {who}"), WAIT, |s| {
            !s.awareness().contains_key(&a.client_id())
        })
        .await?;
    }
    // c (on an edge) vanishes without one: removed on the other edge.
    c.drop_connection();
    b.wait_for("c's awareness removed at b on n2", WAIT, |s| {
        !s.awareness().contains_key(&c.client_id())
    })
    .await?;
    for cl in &clients {
        let anomalies = cl.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}
