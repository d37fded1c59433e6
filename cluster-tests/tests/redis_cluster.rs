//! Three Hearth nodes on a real Redis Cluster (3 masters, 3 replicas, `cluster-node-timeout`
//! 2 s, `redis-cluster://` URL, so sharded pub/sub), docs/cluster.md "Redis deployments".
//! Each test starts its own Redis Cluster; the tests of this file run one at a time.
//!
//! * `ownership_proxy_and_events`: documents opened from every node have exactly one owner (the
//!   lock holder, the only node listing it in `/cluster/owned`, and what `hearth cluster owner`
//!   says), clients on the other nodes edit through the proxy and converge; `hearth cluster
//!   emit` reaches the owner of each document (reply = the owner's id) and its `append` reaches
//!   every client and the database.
//! * `owner_sigkill_under_edits`: the owner of two documents is SIGKILLed while clients on every
//!   node write; another node takes over, nothing acknowledged is lost, everyone converges.
//! * `redis_master_sigkill_under_edits`: the Redis master serving the owner's inbox channel and
//!   the documents' lock keys is SIGKILLed mid-edits; its replica is promoted, editing resumes,
//!   nothing acknowledged is lost, each document has a single owner afterwards. How long the
//!   steady writers saw no acknowledgement is printed.
//! * `redis_manual_failover_under_edits`: the same with `CLUSTER FAILOVER` on that master's
//!   replica (the old master becomes a replica and drops its shard channels' subscribers).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, Reconnector, Scratch, TestClient, WAIT, Writers,
    assert_nothing_lost, probe_writable, seed, wait_all_acked, wait_converged, wait_until,
};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

/// One Redis Cluster and three nodes at a time on this machine.
static SERIAL: Mutex<()> = Mutex::const_new(());

const CLI_LIMIT: Duration = Duration::from_secs(20);
/// Editing must resume within this after a Redis master is lost.
const RESUME_LIMIT: Duration = Duration::from_secs(30);

fn spec() -> ClusterSpec {
    ClusterSpec::new(3)
        .on_redis_cluster()
        .binary(env!("CARGO_BIN_EXE_hearth-test-server"))
}

/// Waits (≤ `limit`) until each of `docs` has exactly one owner: the lock names a node, that
/// node lists the document in `/cluster/owned`, no other live node does, and `hearth cluster
/// owner` agrees. Returns the owners' ids.
async fn single_owners(
    cluster: &Cluster,
    docs: &[String],
    live: &[usize],
    limit: Duration,
) -> anyhow::Result<Vec<String>> {
    wait_until("a single owner of each document", limit, || async move {
        let mut owners = Vec::new();
        let holders = cluster.holders(docs).await?;
        let mut owned = Vec::new();
        for &i in live {
            owned.push((cluster.nodes[i].id().to_string(), cluster.owned(i).await?));
        }
        for (doc, holder) in docs.iter().zip(&holders) {
            let listing: Vec<&String> = owned
                .iter()
                .filter(|(_, set)| set.contains(doc))
                .map(|(id, _)| id)
                .collect();
            match holder {
                Some(h) if listing.len() == 1 && *listing[0] == h.node => {
                    owners.push(h.node.clone());
                }
                other => return Ok(Err(format!("{doc}: lock {other:?}, listed by {listing:?}"))),
            }
        }
        for (doc, owner) in docs.iter().zip(&owners) {
            let cli = cluster.cli_owner(doc).await?;
            if cli.as_deref() != Some(owner.as_str()) {
                return Ok(Err(format!("{doc}: hearth cluster owner says {cli:?}")));
            }
        }
        anyhow::Ok(Ok(owners))
    })
    .await
}

/// A client that inserts a marker, waits for its acknowledgement, and does it again, recording
/// when each acknowledgement came: the longest gap between two is how long editing stopped.
struct Pacer {
    stop: Arc<AtomicBool>,
    acks: Arc<std::sync::Mutex<Vec<Instant>>>,
    task: JoinHandle<()>,
}

impl Pacer {
    fn start(client: Arc<TestClient>) -> Pacer {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acks.clone());
        let task = tokio::spawn(async move {
            // bounded: at most one marker per 20 ms for 5 minutes
            for _ in 0..15_000u32 {
                if s.load(Ordering::Acquire) {
                    break;
                }
                client.insert_next();
                if client.wait_all_acked(Duration::from_secs(60)).await.is_ok() {
                    a.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
                sleep(Duration::from_millis(20)).await;
            }
        });
        Pacer { stop, acks, task }
    }

    /// Stops the task; returns the longest time without an acknowledgement after `from`
    /// (counting from `from` itself).
    async fn stop(self, from: Instant) -> Duration {
        self.stop.store(true, Ordering::Release);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut last = from;
        let mut longest = Duration::ZERO;
        for t in acks.into_iter().filter(|t| *t > from) {
            longest = longest.max(t - last);
            last = t;
        }
        longest
    }
}

/// Documents (`<stem>-<n>`) whose lock keys are served by the Redis master at index `master`.
async fn docs_on_master(
    cluster: &mut Cluster,
    stem: &str,
    master: usize,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for n in 0..1000 {
        let doc = format!("{stem}-{n}");
        let key = cluster.lock_key(&doc);
        if cluster.redis_cluster().master_of(&key).await? == master {
            out.push(doc);
            if out.len() == count {
                return Ok(out);
            }
        }
    }
    anyhow::bail!("fewer than {count} of 1000 names have their lock on master {master}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_proxy_and_events() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new("redis_cluster_ownership")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let docs: Vec<String> = (0..6).map(|i| format!("rc-doc-{i}")).collect();

    // the first client of each document decides its owner: n1, n2, n3, n1, …
    let mut clients = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        for k in 0..3 {
            let node = (d + k) % 3;
            let opts = ClientOptions::labelled(format!("d{d}-n{}", node + 1));
            let url = cluster.nodes[node].url();
            clients.push(Arc::new(TestClient::connect_with(&url, doc, opts).await?));
        }
    }
    let owners = single_owners(&cluster, &docs, &[0, 1, 2], WAIT).await?;
    for (d, owner) in owners.iter().enumerate() {
        assert_eq!(*owner, format!("n{}", d % 3 + 1), "{}", docs[d]);
    }
    for _ in 0..5 {
        for c in &clients {
            c.insert_next();
        }
    }
    wait_all_acked(&clients, WAIT).await?;

    // custom events from outside the cluster reach each owner, and their edits everyone
    for (doc, owner) in docs.iter().zip(&owners) {
        let who = cluster
            .cli_with(&["cluster", "emit", doc, "whoami"], &[], None, CLI_LIMIT)
            .await?;
        assert_eq!(who.code, Some(0), "{who:?}");
        assert_eq!(String::from_utf8_lossy(&who.stdout), *owner, "{doc}");
        let marker = format!("cli:{doc}");
        let run = cluster
            .cli_with(
                &["cluster", "emit", doc, "append", "--payload", &marker],
                &[],
                None,
                CLI_LIMIT,
            )
            .await?;
        assert_eq!(run.code, Some(0), "{run:?}");
        for c in clients.iter().filter(|c| c.doc_name() == *doc) {
            c.wait_for(&format!("{marker} at a client"), WAIT, |s| {
                s.contents().contains(&marker)
            })
            .await?;
        }
    }

    let lb = cluster.lb.url();
    let mut history = History::default();
    for c in &clients {
        history.record(c);
    }
    for doc in &docs {
        let served = wait_converged(&clients, &lb, doc, "", WAIT).await?;
        let marker = format!("cli:{doc}");
        let plain: Vec<String> = served.iter().filter(|m| **m != marker).cloned().collect();
        let v = history.check(doc, &plain);
        assert!(v.ok(), "{doc}: {v:?}");
        assert!(
            cluster
                .unstored(doc, std::slice::from_ref(&marker))?
                .is_empty(),
            "{marker} not stored"
        );
    }
    assert_eq!(
        single_owners(&cluster, &docs, &[0, 1, 2], WAIT).await?,
        owners
    );
    for c in &clients {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_sigkill_under_edits() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let test = "redis_cluster_owner_kill";
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let mut cluster = Cluster::start(&scratch, spec().lock_ttl_ms(2000)).await?;
    let lb = cluster.lb.url();
    let docs: Vec<String> = vec!["rc-kill-0".into(), "rc-kill-1".into()];
    let mut clients = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        for k in 0..3 {
            let opts = ClientOptions::labelled(format!("d{d}-c{k}"));
            let url = cluster.nodes[k].url();
            clients.push(Arc::new(TestClient::connect_with(&url, doc, opts).await?));
        }
    }
    assert_eq!(
        single_owners(&cluster, &docs, &[0, 1, 2], WAIT).await?,
        ["n1", "n1"]
    );
    let reconnector = Reconnector::start(&clients, &lb);
    let writers = Writers::start(
        &clients,
        Duration::from_millis(10),
        Duration::from_millis(40),
        seed,
    );
    sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    cluster.nodes[0].kill()?;

    let mut probes = Vec::new();
    let limit = cluster.lock_ttl() + Duration::from_secs(10);
    for doc in &docs {
        probe_writable(&lb, doc, &format!("probe-{doc}"), limit, &mut probes).await?;
    }
    let recovery = killed_at.elapsed();
    sleep(Duration::from_millis(500)).await;
    writers.stop().await;
    wait_all_acked(&clients, WAIT).await?;
    reconnector.stop().await;
    let owners = single_owners(&cluster, &docs, &[1, 2], WAIT).await?;
    assert!(owners.iter().all(|o| o != "n1"), "{owners:?}");
    eprintln!("[{test}] owner n1 SIGKILLed; both documents writable again after {recovery:?}");

    assert_nothing_lost(test, &clients, &probes, &lb, &docs).await?;
    Ok(())
}

/// How a Redis master is taken away in [`master_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    Sigkill,
    ManualFailover,
}

/// Clients on every node edit two documents owned by n1 whose locks live on the Redis master
/// that also serves n1's inbox channel; that master is lost; editing must resume with nothing
/// acknowledged lost and a single owner per document.
async fn master_loss(test: &str, loss: Loss) -> anyhow::Result<()> {
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    // the production lock TTL: a Redis failover is shorter than the lease
    let mut cluster = Cluster::start(&scratch, spec().lock_ttl_ms(10_000)).await?;
    let lb = cluster.lb.url();
    let inc = cluster
        .incarnation("n1")
        .await?
        .ok_or_else(|| anyhow::anyhow!("n1 has no node record"))?;
    let inbox = format!("{}:inbox:n1:{inc}", cluster.prefix());
    let target = cluster.redis_cluster().master_of(&inbox).await?;
    let docs = docs_on_master(&mut cluster, "rc-master", target, 2).await?;

    let mut clients = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        for k in 0..3 {
            let opts = ClientOptions::labelled(format!("d{d}-c{k}"));
            let url = cluster.nodes[k].url();
            clients.push(Arc::new(TestClient::connect_with(&url, doc, opts).await?));
        }
    }
    assert_eq!(
        single_owners(&cluster, &docs, &[0, 1, 2], WAIT).await?,
        ["n1", "n1"]
    );
    // steady writers, one per document, entering through non-owners
    let mut pacers = Vec::new();
    let mut paced = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let opts = ClientOptions::labelled(format!("pace{d}"));
        let c = Arc::new(TestClient::connect_with(&cluster.nodes[1 + d].url(), doc, opts).await?);
        paced.push(c.clone());
    }
    let all: Vec<Arc<TestClient>> = clients.iter().chain(paced.iter()).cloned().collect();
    let reconnector = Reconnector::start(&all, &lb);
    let writers = Writers::start(
        &clients,
        Duration::from_millis(20),
        Duration::from_millis(60),
        seed,
    );
    for c in &paced {
        pacers.push(Pacer::start(c.clone()));
    }
    sleep(Duration::from_millis(1500)).await;

    let lost_at = Instant::now();
    let (old, new) = match loss {
        Loss::Sigkill => {
            let redis = cluster.redis_cluster();
            let replica = redis.replica_of(target).await?;
            redis.kill_master_of(&inbox).await?;
            // promoted after cluster-node-timeout
            redis.wait_healthy(Duration::from_secs(30)).await?;
            let now = redis.master_of(&inbox).await?;
            assert_eq!(now, replica, "the replica was promoted");
            (target, now)
        }
        Loss::ManualFailover => cluster.redis_cluster().failover(&inbox).await?,
    };
    let promoted = lost_at.elapsed();

    let mut probes = Vec::new();
    for doc in &docs {
        probe_writable(&lb, doc, &format!("probe-{doc}"), RESUME_LIMIT, &mut probes).await?;
    }
    let resumed = lost_at.elapsed();
    sleep(Duration::from_secs(2)).await;
    let mut stops = Vec::new();
    for p in pacers {
        stops.push(p.stop(lost_at - Duration::from_secs(1)).await);
    }
    writers.stop().await;
    wait_all_acked(&all, Duration::from_secs(30)).await?;
    let reconnects = reconnector.reconnects();
    reconnector.stop().await;
    let owners = single_owners(&cluster, &docs, &[0, 1, 2], WAIT).await?;
    eprintln!(
        "[{test}] {loss:?} of Redis master {old} (n1's inbox and the documents' locks): \
         node {new} serves the slots after {promoted:?}; probes through the balancer \
         acknowledged after {resumed:?}; longest time without an acknowledgement for the \
         steady writers: {stops:?}; owners afterwards {owners:?}; {reconnects} client \
         reconnects"
    );

    assert_nothing_lost(test, &all, &probes, &lb, &docs).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_master_sigkill_under_edits() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    master_loss("redis_cluster_master_kill", Loss::Sigkill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_manual_failover_under_edits() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    master_loss("redis_cluster_manual_failover", Loss::ManualFailover).await
}
