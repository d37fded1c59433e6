//! Failover after SIGKILL of an owner, with the default lock TTL of 10 s (docs/cluster.md
//! "Failover timeline").
//!
//! Three nodes. `failover` is owned by n1 and edited by a client on each node; `reclaim` is
//! owned by n1 too, held open by one client there. n1 is SIGKILLed. Then:
//!
//! * survivors: an edit made on n3 right after the kill reaches the client on n2 long before the
//!   dead node's lock could have expired (n2 or n3 took the document over: the lock names it,
//!   and its `taken_over` route count says so), and neither survivor's socket was closed: they
//!   were moved to the new owner (`hearth_cluster_client_moves_total{outcome="moved"}`);
//! * the killed node's client, reconnecting through the balancer, edits again as fast;
//! * n1 restarted at once reclaims `reclaim` from its own previous incarnation without waiting
//!   for that lease to expire;
//! * every edit is acknowledged, nothing acknowledged is lost, everyone converges.
//!
//! The recovery times are printed. A second test measures the same kill with real
//! `@hocuspocus/provider` clients (`tests/interop/failover.mjs`), and a third the same script
//! against Hocuspocus 4.7 with `@hocuspocus/extension-redis` on three nodes, for comparison.

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, Reconnector, RedisProcess, Scratch, TestClient,
    WAIT, wait_all_acked, wait_converged,
};
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

/// The production default.
const LOCK_TTL_MS: u64 = 10_000;
/// Survivors and the killed node's clients must be editing again well within this: the dead
/// node's lease, refreshed every third of the TTL, lives at least two thirds of it.
const RECOVERY_LIMIT: Duration = Duration::from_secs(4);
/// Survivors, whose sockets stay open, edit again within this.
const SURVIVOR_LIMIT: Duration = Duration::from_secs(2);

async fn moved_clients(cluster: &Cluster, nodes: &[usize]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for &i in nodes {
        let m = cluster.nodes[i].metrics().await?;
        total += m.sum("hearth_cluster_client_moves_total", &[("outcome", "moved")]);
    }
    Ok(total)
}

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
        .wait_for("n3's edit after the kill", SURVIVOR_LIMIT, |s| {
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
    for c in &clients[1..] {
        assert_eq!(
            c.view(|s| s.connects()),
            1,
            "a survivor's socket was closed: it should have been moved to the new owner"
        );
    }
    assert!(
        moved_clients(&cluster, &[1, 2]).await? >= 1.0,
        "the survivors' client proxied to n1 was moved to the new owner"
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

/// The script's next output line (≤ 60 s), kept in `seen` for error messages.
async fn next_line(
    out: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: &mut Vec<String>,
    what: &str,
) -> anyhow::Result<String> {
    match tokio::time::timeout(Duration::from_secs(60), out.next_line()).await {
        Ok(Ok(Some(line))) => {
            seen.push(line.clone());
            Ok(line)
        }
        _ => anyhow::bail!(
            "failover.mjs ended before {what}; its output:\n{}",
            seen.join("\n")
        ),
    }
}

/// What `tests/interop/failover.mjs` measured, in milliseconds.
#[derive(Debug, serde::Deserialize)]
struct ProviderFailover {
    survivor_ms: u64,
    reverse_ms: u64,
    acked_ms: u64,
    killed_ms: u64,
    a_closes: u64,
    b_closes: u64,
}

/// The npm clients' folder, checked.
fn interop_dir() -> anyhow::Result<std::path::PathBuf> {
    let interop = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop");
    anyhow::ensure!(
        interop.join("node_modules/@hocuspocus/provider").is_dir(),
        "the npm clients are missing: run `npm ci --prefix tests/interop` (scripts/test does)"
    );
    Ok(interop)
}

/// Runs `tests/interop/failover.mjs` against three servers (`urls`; the first is the one
/// `kill` SIGKILLs once the providers are ready) and returns what it measured.
async fn provider_failover(
    urls: &[String],
    kill: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<ProviderFailover> {
    use tokio::io::{AsyncWriteExt, BufReader};

    let mut script = tokio::process::Command::new(
        std::env::var("HEARTH_INTEROP_NODE").unwrap_or_else(|_| "node".into()),
    )
    .arg("failover.mjs")
    .current_dir(interop_dir()?)
    .env("HEARTH_NODE_URLS", urls.join(","))
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::inherit())
    .kill_on_drop(true)
    .spawn()?;
    let mut stdin = script.stdin.take().expect("piped");
    let mut out = BufReader::new(script.stdout.take().expect("piped")).lines();
    let mut seen = Vec::new();
    while next_line(&mut out, &mut seen, "READY").await? != "READY" {}
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    kill()?;
    stdin
        .write_all(format!("KILLED {killed_at}\n").as_bytes())
        .await?;
    stdin.flush().await?;
    let result = loop {
        let line = next_line(&mut out, &mut seen, "its RESULT").await?;
        if let Some(json) = line.strip_prefix("RESULT ") {
            break serde_json::from_str::<ProviderFailover>(json)?;
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(30), script.wait()).await??;
    anyhow::ensure!(
        status.success(),
        "failover.mjs failed:\n{}",
        seen.join("\n")
    );
    Ok(result)
}

impl std::fmt::Display for ProviderFailover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "an edit on n3 reached n2 {} ms after the kill, one on n2 reached n3 {} ms later, \
             every edit acknowledged after {} ms; socket closes seen by the survivors' providers: \
             {} and {}; the killed node's provider, reconnecting to a survivor, had its edit seen \
             after {} ms",
            self.survivor_ms,
            self.reverse_ms,
            self.acked_ms,
            self.a_closes,
            self.b_closes,
            self.killed_ms
        )
    }
}

/// The same kill as seen by real `@hocuspocus/provider` clients: one on each survivor, editing
/// through the killed owner, and one on the killed node that reconnects to a survivor. The
/// survivors' edits flow again within two seconds and neither of them sees its socket close;
/// the killed node's provider is editing again within four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_providers_edit_again_soon_after_the_owner_is_killed() -> anyhow::Result<()> {
    let test = "cluster_failover_providers";
    interop_dir()?;
    let scratch = Scratch::new(test)?;
    let mut cluster =
        Cluster::start(&scratch, ClusterSpec::new(3).lock_ttl_ms(LOCK_TTL_MS)).await?;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let result = provider_failover(&urls, || cluster.nodes[0].kill().map(|_| ())).await?;
    eprintln!("[{test}] Hearth, lock TTL {LOCK_TTL_MS} ms, SIGKILL of the owner: {result}");
    assert!(
        Duration::from_millis(result.survivor_ms) < SURVIVOR_LIMIT,
        "survivors waited {} ms",
        result.survivor_ms
    );
    assert_eq!(
        (result.a_closes, result.b_closes),
        (0, 0),
        "the survivors' providers were disconnected"
    );
    assert!(
        Duration::from_millis(result.killed_ms) < RECOVERY_LIMIT,
        "the killed node's provider waited {} ms",
        result.killed_ms
    );
    Ok(())
}

/// The same measurement against Hocuspocus 4.7 scaled out the way it scales out
/// (`@hocuspocus/extension-redis`, three nodes sharing one Redis, no database), for comparison:
/// the figures are printed next to Hearth's; only the run itself is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_kill_with_hocuspocus_and_its_redis_extension() -> anyhow::Result<()> {
    use tokio::io::BufReader;

    let test = "cluster_failover_hocuspocus";
    let interop = interop_dir()?;
    anyhow::ensure!(
        interop
            .join("node_modules/@hocuspocus/extension-redis")
            .is_dir(),
        "@hocuspocus/extension-redis is missing: run `npm ci --prefix tests/interop`"
    );
    let scratch = Scratch::new(test)?;
    let redis = RedisProcess::start(&scratch).await?;
    let mut nodes = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..3 {
        let mut child = tokio::process::Command::new(
            std::env::var("HEARTH_INTEROP_NODE").unwrap_or_else(|_| "node".into()),
        )
        .arg("hocuspocus-cluster-node.mjs")
        .current_dir(&interop)
        .env("REDIS_PORT", redis.port().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
        let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut seen = Vec::new();
        let addr = loop {
            let line = next_line(&mut out, &mut seen, "LISTENING").await?;
            if let Some(rest) = line.strip_prefix("LISTENING ") {
                break rest.to_string();
            }
        };
        urls.push(format!("ws://{addr}/"));
        nodes.push(child);
    }
    // SIGKILL, like `kill -9` of a Hearth node
    let result = provider_failover(&urls, || Ok(nodes[0].start_kill()?)).await?;
    eprintln!("[{test}] Hocuspocus 4.7 + extension-redis, SIGKILL of node 1: {result}");
    Ok(())
}
