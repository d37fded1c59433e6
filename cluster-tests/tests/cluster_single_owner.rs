//! Exactly one owner per document (docs/cluster.md "Ownership timeline").
//!
//! Three nodes, 150 clients (50 per node) entering through the round-robin balancer, spread over
//! 15 documents, all inserting markers for about 5 s. Five more documents have one "churning"
//! client each that writes a few markers, leaves (the document unloads and releases its lock)
//! and comes back through the balancer (so usually to another node, which claims it anew), over
//! and over: ownership keeps moving there. Meanwhile a sampler repeatedly reads every
//! node's own view (`GET /cluster/owned`, all three concurrently) and *then* the Redis lock of
//! every document (one `MGET`, an atomic snapshot). Per sample and document:
//!
//! * the **listers** are the nodes whose `/cluster/owned` names the document;
//! * the **holder** is the node (and incarnation) in the lock value.
//!
//! What is allowed, precisely:
//!
//! 1. *Holder but no lister* — a claim not yet loaded (the lock is taken before the load; the
//!    registry lists a document only once it is loaded). Allowed while it lasts at most one lock
//!    TTL.
//! 2. *A lister that is not the holder* (the lock names another node, another incarnation, or
//!    nobody) — the unloading window: a stopping document task releases the lock (and publishes
//!    `released`) before it leaves the registry, and a fenced task is listed until it finishes.
//!    Because the lists are read *before* the lock, a load completing between the two reads can
//!    never produce this case; only a release can. Allowed only as an episode that ends with that
//!    node no longer listing the document (or holding it again) within [`UNLOAD_WINDOW`].
//! 3. *Two listers* — only as a consequence of 2: at most one of them may be the holder, and every
//!    other one must be in an allowed unloading episode.
//!
//! Everything else fails: a node listing a document the lock gives to another node for longer
//! than the window, two nodes listing one document beyond the window, a lock value naming an
//! unknown incarnation, a node not answering. At the end every document must be listed by exactly
//! its holder, all clients converge, every acknowledged marker is present, and nothing is
//! duplicated or invented.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, History, LockHolder, Reconnector, Scratch, TestClient,
    WAIT, Writers, seed, wait_all_acked, wait_converged,
};
use tokio::time::Instant;

const NODES: usize = 3;
const CLIENTS_PER_NODE: usize = 50;
const DOCS: usize = 20;
/// Documents `owned-0 .. owned-{STEADY-1}` get the 150 clients; the rest one churning client each.
const STEADY: usize = 15;
const HAMMER: Duration = Duration::from_secs(5);
/// Longest allowed "listed by a node that does not hold the lock" episode (case 2 above).
const UNLOAD_WINDOW: Duration = Duration::from_millis(500);

struct Sample {
    at: Instant,
    owned: Vec<BTreeSet<String>>,
    holders: Vec<Option<LockHolder>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_document_has_exactly_one_owner() -> anyhow::Result<()> {
    let test = "cluster_single_owner";
    let seed = seed(test);
    let scratch = Scratch::new(test)?;
    let cluster = Cluster::start(&scratch, ClusterSpec::new(NODES).lock_ttl_ms(3000)).await?;
    let docs: Vec<String> = (0..DOCS).map(|d| format!("owned-{d}")).collect();
    let mut incarnations = HashMap::new();
    for n in &cluster.nodes {
        let inc = cluster.incarnation(n.id()).await?;
        incarnations.insert(n.id().to_string(), inc.expect("node key present"));
    }

    let started = Instant::now();
    let mut clients = Vec::new();
    for batch in 0..(NODES * CLIENTS_PER_NODE) / 10 {
        let connects = (0..10).map(|k| {
            let i = batch * 10 + k;
            let doc = docs[i % STEADY].clone();
            let url = cluster.lb.url();
            async move {
                TestClient::connect_with(&url, &doc, ClientOptions::labelled(format!("c{i}"))).await
            }
        });
        for c in futures_util::future::join_all(connects).await {
            clients.push(Arc::new(c?));
        }
    }
    let spread = cluster.lb.open_connections();
    eprintln!(
        "[{test}] {} clients connected in {:?}: {spread:?}",
        clients.len(),
        started.elapsed()
    );
    assert!(
        spread.len() == NODES && spread.iter().all(|(_, n)| *n == CLIENTS_PER_NODE),
        "the balancer spreads clients evenly: {spread:?}"
    );

    let reconnector = Reconnector::start(&clients, &cluster.lb.url());
    let stop = AtomicBool::new(false);
    let sampler = async {
        let mut samples = Vec::new();
        let mut failures = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let at = Instant::now();
            let owned = cluster.owned_all().await;
            let holders = cluster.holders(&docs).await;
            match (
                owned.into_iter().collect::<anyhow::Result<Vec<_>>>(),
                holders,
            ) {
                (Ok(owned), Ok(holders)) => samples.push(Sample { at, owned, holders }),
                (o, h) => failures.push(format!("{:?} / {:?}", o.err(), h.err())),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (samples, failures)
    };
    let mut churners = Vec::new();
    for (k, doc) in docs[STEADY..].iter().enumerate() {
        let opts = ClientOptions::labelled(format!("churn{k}"));
        churners.push(Arc::new(
            TestClient::connect_with(&cluster.lb.url(), doc, opts).await?,
        ));
    }
    let churn_stop = Arc::new(AtomicBool::new(false));
    let churn_tasks: Vec<_> = churners
        .iter()
        .map(|c| {
            let (c, stop, url) = (c.clone(), churn_stop.clone(), cluster.lb.url());
            tokio::spawn(async move {
                let mut rounds = 0u32;
                while !stop.load(Ordering::Acquire) && rounds < 1000 {
                    rounds += 1;
                    for _ in 0..3 {
                        c.insert_next();
                    }
                    c.wait_all_acked(WAIT).await?;
                    c.close().await;
                    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 50)).await;
                    c.reconnect_within(Some(&url), WAIT).await?;
                }
                anyhow::Ok(rounds)
            })
        })
        .collect();
    let workload = async {
        let writers = Writers::start(
            &clients,
            Duration::from_millis(50),
            Duration::from_millis(150),
            seed,
        );
        tokio::time::sleep(HAMMER).await;
        writers.stop().await;
        churn_stop.store(true, Ordering::Release);
        let mut rounds = Vec::new();
        for t in churn_tasks {
            rounds.push(t.await.map_err(anyhow::Error::from).and_then(|r| r));
        }
        // keep sampling while the last acknowledgements come in
        let acked = wait_all_acked(&clients, WAIT).await;
        stop.store(true, Ordering::Release);
        (acked, rounds)
    };
    let ((samples, failures), (acked, rounds)) = tokio::join!(sampler, workload);
    acked?;
    let rounds: Vec<u32> = rounds.into_iter().collect::<anyhow::Result<_>>()?;
    assert!(failures.is_empty(), "samples failed: {failures:?}");

    // --- the single-owner check over the samples ---
    let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id().to_string()).collect();
    let mut violations = Vec::new();
    // (doc, node) → start of the current "listed but not holder" episode
    let mut open_unload: HashMap<(usize, usize), Instant> = HashMap::new();
    let mut unload_episodes = 0usize;
    // upper bound of the longest closed episode: first sample listing it → first one not listing it
    let mut longest_unload = Duration::ZERO;
    let mut double_listed = 0usize;
    // doc → start of the current "holder but not listed" episode
    let mut open_claim: HashMap<usize, Instant> = HashMap::new();
    let mut longest_claim = Duration::ZERO;
    // ownership moves seen (the lock naming a different node than the last one seen)
    let mut last_holder: HashMap<usize, String> = HashMap::new();
    let mut moves = 0usize;
    for s in &samples {
        for (d, doc) in docs.iter().enumerate() {
            let holder = s.holders[d].as_ref();
            if let Some(h) = holder
                && let Some(prev) = last_holder.insert(d, h.node.clone())
                && prev != h.node
            {
                moves += 1;
            }
            if let Some(h) = holder
                && incarnations.get(&h.node) != Some(&h.incarnation)
            {
                violations.push(format!(
                    "{doc}: lock value names {h:?}, not a live incarnation"
                ));
            }
            let listers: Vec<usize> = (0..ids.len())
                .filter(|&n| s.owned[n].contains(doc))
                .collect();
            if listers.len() > 1 {
                double_listed += 1;
            }
            for (n, id) in ids.iter().enumerate() {
                let listed = listers.contains(&n);
                let holds = holder.is_some_and(|h| &h.node == id);
                if listed && !holds {
                    open_unload.entry((d, n)).or_insert_with(|| {
                        unload_episodes += 1;
                        s.at
                    });
                } else if let Some(since) = open_unload.remove(&(d, n)) {
                    let lasted = s.at - since;
                    longest_unload = longest_unload.max(lasted);
                    if lasted > UNLOAD_WINDOW {
                        violations.push(format!(
                            "{doc}: {id} listed it for {lasted:?} while the lock said {holder:?}"
                        ));
                    }
                }
            }
            let claimed_unlisted =
                holder.is_some_and(|h| !listers.iter().any(|&n| ids[n] == h.node));
            if claimed_unlisted {
                let since = *open_claim.entry(d).or_insert(s.at);
                longest_claim = longest_claim.max(s.at - since);
            } else {
                open_claim.remove(&d);
            }
        }
    }
    let end = samples.last().map_or_else(Instant::now, |s| s.at);
    for ((d, n), since) in &open_unload {
        if end - *since > UNLOAD_WINDOW {
            violations.push(format!(
                "{}: {} still listed it {:?} after the lock moved away",
                docs[*d],
                ids[*n],
                end - *since
            ));
        }
    }
    if longest_claim > cluster.lock_ttl() {
        violations.push(format!(
            "a lock was held for {longest_claim:?} with its holder not serving the document"
        ));
    }
    let period = samples
        .last()
        .map(|l| l.at - samples[0].at)
        .unwrap_or_default();
    eprintln!(
        "[{test}] {} samples over {period:?}; ownership moves seen {moves}; unloading episodes \
         {unload_episodes} (longest < {longest_unload:?}), samples with \
         two listers {double_listed}, longest claim without listing {longest_claim:?}; \
         reconnects {}; churn rounds {rounds:?}",
        samples.len(),
        reconnector.reconnects()
    );
    assert!(
        samples.len() >= 50,
        "too few samples ({}) to check anything",
        samples.len()
    );
    assert!(
        violations.is_empty(),
        "single-owner violations: {violations:#?}"
    );

    // --- steady state: each document listed by exactly its holder ---
    let owned: Vec<BTreeSet<String>> = cluster
        .owned_all()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let holders = cluster.holders(&docs).await?;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for (d, doc) in docs.iter().enumerate() {
        let listers: Vec<&str> = (0..ids.len())
            .filter(|&n| owned[n].contains(doc))
            .map(|n| ids[n].as_str())
            .collect();
        let holder = holders[d].as_ref().map(|h| h.node.as_str());
        assert!(
            listers.len() == 1 && Some(listers[0]) == holder,
            "{doc}: listed by {listers:?}, lock held by {holder:?}"
        );
        *per_node.entry(listers[0]).or_default() += 1;
    }
    eprintln!("[{test}] documents per owner: {per_node:?}");

    // --- convergence and the set check ---
    reconnector.stop().await;
    clients.extend(churners);
    let mut history = History::default();
    for c in &clients {
        history.record(c);
    }
    for doc in &docs {
        let served = wait_converged(&clients, &cluster.lb.url(), doc, "", WAIT).await?;
        let v = history.check(doc, &served);
        assert!(
            v.ok() && v.counts.0 == v.counts.1,
            "{doc}: every marker acknowledged and present: {v:?}"
        );
    }
    for c in &clients {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    eprintln!(
        "[{test}] {} markers acknowledged and present, {:?} in all",
        history.total_acked(),
        started.elapsed()
    );
    Ok(())
}
