//! One client behind a non-owner node floods the owner of its document (docs/cluster.md,
//! "Flow control between nodes"). Nobody else may notice.
//!
//! Three nodes, lock TTL 2 s, signed envelopes. n1 owns three documents: `witness-a`, edited by
//! a witness connected through n2 (every edit crosses Redis twice, on the same inbox
//! subscription of n1 that the attack uses), `witness-b`, edited by a witness connected to n1
//! itself, and `flood`. An attacker connected through n3 floods `flood` for about ten seconds
//! with 1 MiB updates, as fast as its socket takes them, and a second attacker socket floods it
//! with small updates in bursts; each reconnects at once whenever it is closed. (The document
//! soon reaches `max_document_bytes`; from then on its updates are refused, which costs the
//! nodes as much up to the owner's document task.) Meanwhile both witnesses insert a marker,
//! wait for its acknowledgement and measure that round trip, again and again.
//!
//! Asserted afterwards:
//!
//! * every node process is still up and ready;
//! * n1 held all three locks throughout, with the same lease (polled every 100 ms), and lost no
//!   lock (`hearth_cluster_lock_losses_total`);
//! * Redis never disconnected a subscriber: the pub/sub clients are the same connections before
//!   and after (`CLIENT LIST TYPE pubsub`), Redis logged no output-buffer disconnection, and no
//!   node resubscribed, lagged or saw a gap (`hearth_cluster_resyncs_total`);
//! * the attackers are the ones shed: they saw their sockets closed with 1013 ("Try Again
//!   Later", counted in `hearth_cluster_sessions_shed_total`) while the witnesses' sockets were
//!   never closed and every witness edit was acknowledged;
//! * the witnesses' edit → acknowledgement round trip stays under [`p99_limit`] at the 99th
//!   percentile during the attack (measured numbers are printed, with the quiet ones before);
//! * nothing acknowledged to a witness is lost: the stored rows hold every acknowledged marker,
//!   and each witness holds exactly what a fresh client is served.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use cluster_tests::testbed::client::{ServerFrame, ServerMsg, auth_frame, decode_server_frame};
use cluster_tests::testbed::raw::update;
use cluster_tests::testbed::redis::Resp;
use cluster_tests::testbed::witness::{
    assert_undisturbed, cpu_time, lower_priority, percentile, round_trips,
};
use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, LockHolder, Scratch, TestClient, WAIT,
};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use yrs::{Array as _, Doc, ReadTxn as _, StateVector, Transact as _};

/// How long the attack lasts.
const ATTACK: Duration = Duration::from_secs(10);
/// Size of one large attack update.
const BIG: usize = 1 << 20;
/// Bound on the witnesses' 99th percentile edit → acknowledgement round trip under attack:
/// 100 ms on a machine with four cores or more. With fewer, three nodes, Redis, PostgreSQL, the
/// attack (over 100 MB/s of large updates and some 300 000 small frames a second) and the witnesses
/// share two cores, and the bound is 500 ms. Measured there, idle apart from this test, the p99
/// through n2 was 85–240 ms and on n1 70–150 ms over 26 runs (p50 6–9 ms). The slowest round
/// trips fall in the first second, while the flood document grows to its size limit and
/// PostgreSQL spends up to half the machine storing (and compressing) the megabyte updates. On
/// the same kind of machine shared with other work, where the quiet p50 was twice as long, the
/// p99 reached 360 ms. Before the queues between edge and owner were bounded it was 1.4–1.7 s
/// and a witness was disconnected within a second.
fn p99_limit() -> Duration {
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= 4) {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(500)
    }
}
/// Pause between two witness edits.
const EDIT_GAP: Duration = Duration::from_millis(20);
/// The close code of a shed session.
const SHED_CODE: u16 = 1013;

const WITNESS_A: &str = "witness-a";
const WITNESS_B: &str = "witness-b";
const FLOOD: &str = "flood";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_behind_an_edge_is_shed_and_nobody_else_notices() -> anyhow::Result<()> {
    let test = "cluster_edge_flood";
    let scratch = Scratch::new(test)?;
    let spec = ClusterSpec::new(3)
        .lock_ttl_ms(2000)
        .env(
            "HEARTH_CLUSTER_SECRET",
            "k3Jd9Qm2Vx7Lp4Rt8Wn1Zc6Hf0Bs5Yg2Ue7Ia4Oq9Mv3Xb",
        )
        // `flood` stays loaded on n1 between the attacker's connections
        .env("HEARTH_UNLOAD_DELAY_MS", "600000");
    let mut cluster = Cluster::start(&scratch, spec).await?;
    let url = |c: &Cluster, i: usize| c.nodes[i].url();

    // n1 claims every document: the first client of each connects there.
    let anchor = TestClient::connect_with(
        &url(&cluster, 0),
        WITNESS_A,
        ClientOptions::labelled("anchor"),
    )
    .await?;
    anchor.insert_next();
    anchor.wait_all_acked(WAIT).await?;
    let wb = TestClient::connect_with(&url(&cluster, 0), WITNESS_B, ClientOptions::labelled("wb"))
        .await?;
    {
        let claim =
            TestClient::connect_with(&url(&cluster, 0), FLOOD, ClientOptions::labelled("claim"))
                .await?;
        claim.insert_next();
        claim.wait_all_acked(WAIT).await?;
        claim.close().await;
    }
    let wa = TestClient::connect_with(&url(&cluster, 1), WITNESS_A, ClientOptions::labelled("wa"))
        .await?;
    let docs: Vec<String> = [WITNESS_A, WITNESS_B, FLOOD].map(String::from).to_vec();
    let holders_before = cluster.holders(&docs).await?;
    for (doc, h) in docs.iter().zip(&holders_before) {
        let node = h.as_ref().map(|h| h.node.as_str());
        assert_eq!(node, Some("n1"), "{doc} is owned by n1");
    }
    let pubsub_before = pubsub_clients(&cluster).await?;
    assert_eq!(
        pubsub_before.len(),
        3,
        "one subscriber per node: {pubsub_before:?}"
    );

    // Quiet round trips, for comparison.
    let quiet_until = Instant::now() + Duration::from_secs(2);
    let (quiet_a, quiet_b) = tokio::join!(
        round_trips(&wa, quiet_until, EDIT_GAP),
        round_trips(&wb, quiet_until, EDIT_GAP)
    );

    // The attack, on threads and runtimes of its own, at a lower scheduling priority: a real
    // attacker runs on its own machine, and this one shares the test machine's cores with the
    // nodes and the witnesses' measurement.
    let stop = Arc::new(AtomicBool::new(false));
    let edge = url(&cluster, 2);
    let attackers = [Flood::Big, Flood::Small]
        .into_iter()
        .map(|kind| {
            let (stop, edge) = (stop.clone(), edge.clone());
            std::thread::spawn(move || -> anyhow::Result<AttackStats> {
                lower_priority();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(attack(edge, kind, stop)))
            })
        })
        .collect::<Vec<_>>();
    let attack_started = Instant::now();
    let cpu_before: Vec<Duration> = cluster.nodes.iter().map(|n| cpu_time(n.pid())).collect();
    let until = attack_started + ATTACK;
    let monitor = monitor(&cluster, &docs, &holders_before, until);
    let (lat_a, lat_b, watch) = tokio::join!(
        round_trips(&wa, until, EDIT_GAP),
        round_trips(&wb, until, EDIT_GAP),
        monitor
    );
    let watch = watch?;
    let cpu: Vec<Duration> = cluster
        .nodes
        .iter()
        .zip(&cpu_before)
        .map(|(n, before)| cpu_time(n.pid()).saturating_sub(*before))
        .collect();
    let attack_took = attack_started.elapsed();
    stop.store(true, Ordering::Release);
    let mut stats = Vec::new();
    for a in attackers {
        let s = a
            .join()
            .map_err(|_| anyhow::anyhow!("attacker thread panicked"))??;
        stats.push(s);
    }

    // Report.
    for s in &stats {
        eprintln!(
            "[{test}] attacker {:?}: {} connections ({} authenticated), {} frames, {:.1} MiB sent, closes {:?}",
            s.kind,
            s.connects,
            s.authenticated,
            s.frames,
            s.bytes as f64 / f64::from(1 << 20),
            s.closes
        );
    }
    for (who, quiet, busy) in [
        ("wa (via n2)", &quiet_a, &lat_a),
        ("wb (on n1)", &quiet_b, &lat_b),
    ] {
        eprintln!(
            "[{test}] witness {who}: quiet p50 {:?} p99 {:?} (n={}); under attack p50 {:?} p99 {:?} max {:?} (n={}){}",
            percentile(&quiet.durations(), 50),
            percentile(&quiet.durations(), 99),
            quiet.samples.len(),
            percentile(&busy.durations(), 50),
            percentile(&busy.durations(), 99),
            percentile(&busy.durations(), 100),
            busy.samples.len(),
            busy.failure
                .as_ref()
                .map_or(String::new(), |f| format!("; stopped: {f}"))
        );
    }
    for (who, busy) in [("wa", &lat_a), ("wb", &lat_b)] {
        let slowest: Vec<String> = busy
            .slowest(5, attack_started)
            .iter()
            .map(|(at, d)| format!("{d:?} at +{at:?}"))
            .collect();
        eprintln!("[{test}] witness {who}: slowest {slowest:?}");
    }
    eprintln!("[{test}] ownership changes: {:?}", watch.holder_changes);
    eprintln!(
        "[{test}] CPU time of n1, n2, n3 during the {attack_took:?} attack: {cpu:?} ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    eprintln!(
        "[{test}] peak Redis output buffer of a subscriber: {:.1} MiB",
        watch.peak_omem as f64 / f64::from(1 << 20)
    );
    let mut shed = 0.0;
    for i in 0..3 {
        let m = cluster.metrics(i).await?;
        let s = m.sum("hearth_cluster_sessions_shed_total", &[]);
        shed += s;
        let mean = |name: &str, labels: &[(&str, &str)]| {
            let n = m.sum(&format!("{name}_count"), labels);
            if n > 0.0 {
                Duration::from_secs_f64(m.sum(&format!("{name}_sum"), labels) / n)
            } else {
                Duration::ZERO
            }
        };
        eprintln!(
            "[{test}] n{}: shed {s}, resyncs {}, lock losses {}, updates applied {} refused {}, \
             mean append {:?} ({} appends), mean ack wait {:?}",
            i + 1,
            m.sum("hearth_cluster_resyncs_total", &[]),
            m.sum("hearth_cluster_lock_losses_total", &[]),
            m.sum("hearth_updates_applied_total", &[]),
            m.sum("hearth_updates_rejected_total", &[]),
            mean("hearth_store_seconds", &[("op", "append")]),
            m.sum("hearth_store_seconds_count", &[("op", "append")]),
            mean("hearth_ack_seconds", &[]),
        );
    }

    // Every node is up and ready.
    for i in 0..3 {
        assert!(cluster.nodes[i].is_running(), "n{} exited", i + 1);
        assert_eq!(
            cluster.nodes[i].readyz().await?,
            200,
            "n{} is not ready",
            i + 1
        );
    }

    // n1 kept its locks, with the same leases, and lost none.
    assert!(
        watch.holder_changes.is_empty(),
        "ownership changed during the attack: {:?}",
        watch.holder_changes
    );
    assert_eq!(
        cluster.holders(&docs).await?,
        holders_before,
        "lock holders changed"
    );
    let m1 = cluster.metrics(0).await?;
    assert_eq!(m1.sum("hearth_cluster_lock_losses_total", &[]), 0.0);

    // Redis kept every subscriber; no node lost envelopes.
    let pubsub_after = pubsub_clients(&cluster).await?;
    assert_eq!(
        pubsub_after, pubsub_before,
        "a subscriber connection was replaced"
    );
    let redis_log =
        std::fs::read_to_string(scratch.join(&format!("redis-{}.log", cluster.redis().port())))
            .unwrap_or_default();
    assert!(
        !redis_log.contains("output buffer"),
        "Redis disconnected a client for its output buffer:\n{redis_log}"
    );
    for i in 0..3 {
        let m = cluster.metrics(i).await?;
        for reason in ["lagged", "resubscribed", "gap"] {
            assert_eq!(
                m.sum("hearth_cluster_resyncs_total", &[("reason", reason)]),
                0.0,
                "n{}: resyncs for {reason}",
                i + 1
            );
        }
    }

    // The attackers were shed; the witnesses were not disturbed.
    let attacker_codes: Vec<u16> = stats
        .iter()
        .flat_map(|s| s.closes.iter().map(|(c, _)| *c))
        .collect();
    assert!(
        attacker_codes.contains(&SHED_CODE),
        "no attacker was shed with {SHED_CODE}: {attacker_codes:?}"
    );
    assert!(shed >= 1.0, "no node counted a shed session");
    for (who, w) in [("wa", &wa), ("wb", &wb)] {
        assert_undisturbed(w, who).await?;
    }

    // Round trips under attack.
    for (who, trips) in [("wa (via n2)", &lat_a), ("wb (on n1)", &lat_b)] {
        assert!(trips.failure.is_none(), "{who}: {:?}", trips.failure);
        let lat = &trips.durations();
        assert!(
            lat.len() >= 20,
            "{who}: only {} edits under attack",
            lat.len()
        );
        let p99 = percentile(lat, 99);
        assert!(
            p99 < p99_limit(),
            "{who}: p99 edit → ack {p99:?} under attack (limit {:?})",
            p99_limit()
        );
    }

    // Nothing acknowledged is lost.
    for (doc, w) in [(WITNESS_A, &wa), (WITNESS_B, &wb)] {
        let missing = cluster.unstored(doc, &w.acked())?;
        assert!(
            missing.is_empty(),
            "{doc}: acknowledged but not stored: {missing:?}"
        );
        let fresh = TestClient::connect_with(
            &url(&cluster, 0),
            doc,
            ClientOptions::labelled(format!("fresh-{doc}")),
        )
        .await?;
        let mut want = fresh.contents();
        let mut have = w.contents();
        want.sort();
        have.sort();
        assert_eq!(have, want, "{doc}: the witness differs from what n1 serves");
        let acked = w.acked();
        assert!(
            acked.iter().all(|m| want.contains(m)),
            "{doc}: served copy lacks acked markers"
        );
    }
    drop(anchor);
    Ok(())
}

/// What the monitor saw during the attack.
#[derive(Debug, Default)]
struct Watch {
    /// (time since start, holders) whenever they differed from the ones before the attack.
    holder_changes: Vec<(Duration, Vec<Option<LockHolder>>)>,
    /// Largest `omem` of a pub/sub client.
    peak_omem: u64,
}

/// Polls the lock holders and the subscribers' output buffers every 100 ms until `until`.
async fn monitor(
    cluster: &Cluster,
    docs: &[String],
    before: &[Option<LockHolder>],
    until: Instant,
) -> anyhow::Result<Watch> {
    let started = Instant::now();
    let mut w = Watch::default();
    while Instant::now() < until {
        let now = cluster.holders(docs).await?;
        if now != before {
            w.holder_changes.push((started.elapsed(), now));
        }
        for c in pubsub_clients(cluster).await?.values() {
            w.peak_omem = w.peak_omem.max(c.omem);
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(w)
}

/// One line of `CLIENT LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RedisClient {
    addr: String,
    /// Output buffer memory (bytes); not compared.
    omem: u64,
}

/// The pub/sub connections Redis has, by client id. Equality ignores their buffers.
#[derive(Debug)]
struct PubsubClients(std::collections::BTreeMap<u64, RedisClient>);

impl PartialEq for PubsubClients {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((a, x), (b, y))| a == b && x.addr == y.addr)
    }
}

impl PubsubClients {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn values(&self) -> impl Iterator<Item = &RedisClient> {
        self.0.values()
    }
}

async fn pubsub_clients(cluster: &Cluster) -> anyhow::Result<PubsubClients> {
    let text = match cluster
        .redis()
        .command(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .await?
    {
        Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        other => bail!("CLIENT LIST answered {other:?}"),
    };
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .map(str::to_string)
        };
        let id: u64 = field("id").context("client id")?.parse()?;
        let omem: u64 = field("omem").context("omem")?.parse()?;
        let addr = field("addr").context("addr")?;
        out.insert(id, RedisClient { addr, omem });
    }
    Ok(PubsubClients(out))
}

// === the attacker ===

#[derive(Debug, Clone, Copy)]
enum Flood {
    /// 1 MiB updates, each from a fresh client.
    Big,
    /// Small updates of one client, in bursts.
    Small,
}

#[derive(Debug)]
struct AttackStats {
    kind: Flood,
    connects: u64,
    authenticated: u64,
    frames: u64,
    bytes: u64,
    closes: Vec<(u16, String)>,
}

/// A cheap pseudo-random generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A Yjs update from a fresh client that appends `len` pseudo-random letters to the array.
fn big_update(rng: &mut Rng, len: usize) -> Vec<u8> {
    let doc = Doc::with_client_id(1 + rng.next() % (1 << 40));
    let arr = doc.get_or_insert_array(FLOOD);
    let mut s = String::with_capacity(len);
    while s.len() < len {
        let mut x = rng.next();
        for _ in 0..8 {
            s.push(char::from(b'a' + (x % 26) as u8));
            x >>= 8;
        }
    }
    {
        let mut txn = doc.transact_mut();
        arr.push_back(&mut txn, s);
    }
    doc.transact()
        .encode_state_as_update_v1(&StateVector::default())
}

/// Connects through `edge` again and again until `stop`, flooding `flood` on each connection.
async fn attack(edge: String, kind: Flood, stop: Arc<AtomicBool>) -> AttackStats {
    let stats = Arc::new(Mutex::new(AttackStats {
        kind,
        connects: 0,
        authenticated: 0,
        frames: 0,
        bytes: 0,
        closes: Vec::new(),
    }));
    let pool = frame_pool(kind);
    let mut next = 0;
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = one_connection(&edge, &pool, &mut next, &stop, &stats).await {
            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
            if s.closes.len() < 10_000 {
                s.closes.push((0, format!("attacker error: {e}")));
            }
        }
        sleep(Duration::from_millis(20)).await;
    }
    Arc::try_unwrap(stats)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_else(|a| {
            let s = a.lock().unwrap_or_else(|p| p.into_inner());
            AttackStats {
                kind: s.kind,
                connects: s.connects,
                authenticated: s.authenticated,
                frames: s.frames,
                bytes: s.bytes,
                closes: s.closes.clone(),
            }
        })
}

/// The frames an attacker sends, in order and then round and round again (generated up front,
/// so that the attacker spends its time sending): 32 distinct 1 MiB updates, one burst at a
/// time; or 8192 small updates of one client (each depending on the one before), in bursts of
/// 64. Repeats cost the owner as much as new updates up to the apply, which leaves the document
/// unchanged.
struct Pool {
    frames: Vec<Bytes>,
    burst: usize,
}

fn frame_pool(kind: Flood) -> Pool {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ kind as u64);
    match kind {
        Flood::Big => Pool {
            frames: (0..32)
                .map(|_| update(FLOOD, &big_update(&mut rng, BIG)))
                .collect(),
            burst: 1,
        },
        Flood::Small => {
            let small = Doc::with_client_id(1 + rng.next() % (1 << 40));
            let arr = small.get_or_insert_array(FLOOD);
            let frames = (0..8192)
                .map(|i| {
                    let sv = small.transact().state_vector();
                    arr.push_back(&mut small.transact_mut(), format!("s{i}"));
                    update(FLOOD, &small.transact().encode_state_as_update_v1(&sv))
                })
                .collect();
            Pool { frames, burst: 64 }
        }
    }
}

async fn one_connection(
    edge: &str,
    pool: &Pool,
    next: &mut usize,
    stop: &AtomicBool,
    stats: &Mutex<AttackStats>,
) -> anyhow::Result<()> {
    let lock = || stats.lock().unwrap_or_else(|p| p.into_inner());
    let (ws, _) = timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(edge),
    )
    .await
    .context("connect timed out")??;
    lock().connects += 1;
    let (mut sink, mut stream) = ws.split();
    // A write-only flooder: Auth, then updates. (It never asks for the document: answering a
    // sync request with the whole document on every reconnect is a different attack.)
    sink.send(Message::Binary(auth_frame(FLOOD, "", Some("4.8.0"))))
        .await?;
    // Wait for Authenticated; anything else before it is ignored.
    let authed = timeout(Duration::from_secs(5), async {
        while let Some(m) = stream.next().await {
            match m? {
                Message::Binary(b) => {
                    if let Ok(ServerFrame::Addressed {
                        msg: ServerMsg::Authenticated(_),
                        ..
                    }) = decode_server_frame(b)
                    {
                        return anyhow::Ok(None);
                    }
                }
                Message::Close(c) => {
                    return Ok(Some(c.map_or((1005, String::new()), |c| {
                        (u16::from(c.code), c.reason.to_string())
                    })));
                }
                _ => {}
            }
        }
        Ok(Some((1006, "end of stream".to_string())))
    })
    .await
    .context("no Authenticated within 5 s")??;
    if let Some(close) = authed {
        lock().closes.push(close);
        return Ok(());
    }
    lock().authenticated += 1;
    // Read (and drop) whatever the server sends, until it closes.
    let reader = tokio::spawn(async move {
        while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Close(c)) => {
                    return c.map_or((1005, String::new()), |c| {
                        (u16::from(c.code), c.reason.to_string())
                    });
                }
                Ok(_) => {}
                Err(e) => return (1006, e.to_string()),
            }
        }
        (1006, "end of stream".to_string())
    });
    while !stop.load(Ordering::Acquire) && !reader.is_finished() {
        let frames: Vec<Bytes> = (0..pool.burst)
            .map(|i| pool.frames[(*next + i) % pool.frames.len()].clone())
            .collect();
        let n = frames.len() as u64;
        let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
        let sent = timeout(Duration::from_secs(1), async {
            for f in frames {
                sink.feed(Message::Binary(f)).await?;
            }
            sink.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => {
                *next = (*next + pool.burst) % pool.frames.len();
                let mut s = lock();
                s.frames += n;
                s.bytes += bytes;
            }
            Ok(Err(_)) => break,
            Err(_) => {} // the server is not reading right now; try again
        }
    }
    if stop.load(Ordering::Acquire) && !reader.is_finished() {
        reader.abort();
        return Ok(());
    }
    let close = timeout(Duration::from_secs(5), reader)
        .await
        .unwrap_or(Ok((0, "no close within 5 s".into())))
        .unwrap_or((0, "reader failed".into()));
    lock().closes.push(close);
    Ok(())
}
