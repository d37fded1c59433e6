//! Cluster smoke test (reliability.md T1, short): three nodes sharing one PostgreSQL database
//! and one Redis, clients spread over them by a round-robin load balancer, all on the same
//! documents. Every edit is acknowledged, every client converges, and a fresh client (through
//! the balancer, so on any node) sees everything. It doubles as the self-test of the harness
//! pieces the cluster scenarios use (N nodes, `HEARTH_REDIS_URL`, `HEARTH_LOCK_TTL_MS`, `Lb`).

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, History, Lb, NodeProcess, NodeSpec, PgDatabase, RedisProcess, Scratch,
    TestClient, WAIT, Writers, seed,
};

const NODES: usize = 3;
const DOCS: usize = 2;
const CLIENTS_PER_DOC: usize = 6;

/// Starts `n` nodes on `database_url` sharing `redis`, with test-sized lock timings.
async fn start_cluster(
    scratch: &Scratch,
    n: usize,
    database_url: &str,
    redis: &RedisProcess,
) -> anyhow::Result<Vec<NodeProcess>> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        let spec = NodeSpec::new(format!("n{i}"), database_url)
            .env("HEARTH_REDIS_URL", redis.url())
            .env("HEARTH_LOCK_TTL_MS", "3000");
        nodes.push(NodeProcess::start(scratch, spec).await?);
    }
    Ok(nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_a_balancer_converge() -> anyhow::Result<()> {
    let test = "cluster_smoke";
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let db = PgDatabase::create()?;
    let redis = RedisProcess::start(&scratch).await?;
    let nodes = start_cluster(&scratch, NODES, db.url(), &redis).await?;
    let lb = Lb::start(nodes.iter().map(NodeProcess::addr).collect()).await?;

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
