//! One live process per node id (docs/cluster.md, "Node ids").
//!
//! Node n1 runs. A second process started as n1 against the same Redis exits non-zero with a
//! message naming the id, while n1 keeps its record and keeps serving, locally and to clients
//! proxied through n2. The same holds while n1 is frozen (SIGSTOP: its connections stay open).
//! After SIGKILL, n1's record lingers until its TTL, but a restart as n1 takes it over at once,
//! because the old incarnation's inbox has no subscriber any more.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use cluster_tests::testbed::node::hearth_bin;
use cluster_tests::testbed::{ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, WAIT};
use tokio::time::{Instant, timeout};

/// Long enough that a record left by SIGKILL is still there when the node restarts.
const LOCK_TTL_MS: u64 = 10_000;

/// Runs another `hearth` as node `id` on the cluster's Redis and database (≤ 20 s): exit code
/// and standard error.
async fn start_duplicate(cluster: &Cluster, id: &str) -> anyhow::Result<(Option<i32>, String)> {
    let mut cmd = tokio::process::Command::new(hearth_bin()?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(&k);
        }
    }
    cmd.args(["--listen", "127.0.0.1:0", "--node-id", id])
        .args(["--database-url", cluster.db.url()])
        .env("HEARTH_REDIS_URL", cluster.redis().url())
        .env("HEARTH_REDIS_PREFIX", cluster.prefix())
        .env("HEARTH_CLUSTER_SECRET", cluster.secret())
        .env("HEARTH_LOCK_TTL_MS", LOCK_TTL_MS.to_string())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = timeout(Duration::from_secs(20), cmd.output())
        .await
        .context("the duplicate node kept running")??;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Ok((out.status.code(), text))
}

fn assert_refused(run: &(Option<i32>, String), incarnation: &str) {
    let (code, text) = run;
    assert!(
        code.is_some_and(|c| c != 0),
        "the duplicate exited with {code:?}: {text}"
    );
    assert!(
        text.contains(r#"node id "n1" is in use by a live process"#) && text.contains(incarnation),
        "unexpected message: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_node_id_refuses_to_start() -> anyhow::Result<()> {
    let test = "cluster_node_id";
    let scratch = Scratch::new(test)?;
    let mut cluster =
        Cluster::start(&scratch, ClusterSpec::new(2).lock_ttl_ms(LOCK_TTL_MS)).await?;
    let inc = cluster
        .incarnation("n1")
        .await?
        .context("n1 has no node record")?;
    let doc = "ids";
    let a = TestClient::connect_with(&cluster.nodes[0].url(), doc, ClientOptions::labelled("a"))
        .await?;

    // A second n1 while n1 runs: refused, and n1's record is untouched.
    let run = start_duplicate(&cluster, "n1").await?;
    assert_refused(&run, &inc);
    eprintln!("[{test}] duplicate refused: {}", run.1.trim());
    assert_eq!(
        cluster.incarnation("n1").await?.as_deref(),
        Some(inc.as_str())
    );

    // n1 keeps serving: its own client, and a client proxied to it through n2.
    let b = TestClient::connect_with(&cluster.nodes[1].url(), doc, ClientOptions::labelled("b"))
        .await?;
    let (ma, mb) = (a.insert_next(), b.insert_next());
    a.wait_all_acked(WAIT).await?;
    b.wait_all_acked(WAIT).await?;
    for (c, want) in [(&a, &mb), (&b, &ma)] {
        c.wait_for(want, WAIT, |s| s.contents().contains(want))
            .await?;
    }
    assert_eq!(cluster.nodes[0].readyz().await?, 200);

    // Frozen, n1 still holds its connections: still refused.
    cluster.nodes[0].stop()?;
    let frozen = start_duplicate(&cluster, "n1").await;
    cluster.nodes[0].cont()?;
    assert_refused(&frozen?, &inc);

    // Killed, n1 leaves its record behind until the TTL, but a restart takes it over at once.
    cluster.nodes[0].kill()?;
    assert_eq!(
        cluster.incarnation("n1").await?.as_deref(),
        Some(inc.as_str()),
        "the record of the killed node should linger"
    );
    let started = Instant::now();
    cluster.nodes[0].restart().await?;
    let took = started.elapsed();
    let now = cluster
        .incarnation("n1")
        .await?
        .context("no record after restart")?;
    assert_ne!(now, inc, "the restarted node registered a new incarnation");
    assert!(
        took < Duration::from_millis(LOCK_TTL_MS),
        "restart took {took:?}"
    );
    assert!(
        cluster.nodes[0]
            .log_text()
            .contains("took over the node id from a previous incarnation"),
        "no take-over logged"
    );
    eprintln!("[{test}] restart after SIGKILL took {took:?} (record TTL {LOCK_TTL_MS} ms)");
    Ok(())
}
