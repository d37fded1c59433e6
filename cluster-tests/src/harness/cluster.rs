//! [`Cluster`]: N `hearth` nodes sharing one PostgreSQL database and one Redis behind a
//! round-robin [`Lb`], and everything the cluster tests read from outside (docs/cluster.md):
//!
//! * the Redis ownership lock of a document ([`Cluster::holder`], [`Cluster::holders`]: key
//!   `<prefix>:lock:{<hex16 of sha256(name)>}`, value `node|incarnation|lease`) and each node's
//!   incarnation (`<prefix>:node:<id>`);
//! * each node's own view on its operator listener, `GET /cluster/owned` ([`Cluster::owned`])
//!   and `/metrics` ([`Cluster::metrics`], parsed into [`Metrics`]);
//! * `hearth cluster owner <doc>` ([`Cluster::cli_owner`]) and any other command line
//!   ([`Cluster::cli_with`]: extra environment, stdin, raw stdout, stderr, run time);
//! * the shared database: epochs ([`Cluster::epochs`]) and the stored blobs of a document
//!   ([`Cluster::stored_blobs`]), searched for markers with [`marker_hits`].
//!
//! Also [`Reconnector`] (clients that reconnect through the balancer whenever their socket ends,
//! as providers do after a 4205) and [`wait_converged`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::future::join_all;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::client::{ClientOptions, TestClient};
use super::db::Db;
use super::lb::Lb;
use super::node::{NodeProcess, NodeSpec, hearth_bin};
use super::pg::PgDatabase;
use super::redis::{RedisProcess, Resp};
use super::redis_cluster::RedisCluster;
use super::workload::History;
use super::{Scratch, WAIT, wait_until};

/// What to start: node count, lock TTL, cluster secret, extra settings for every node.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of nodes (ids `n1`, `n2`, …).
    pub nodes: usize,
    /// `HEARTH_LOCK_TTL_MS`.
    pub lock_ttl_ms: u64,
    /// `HEARTH_REDIS_PREFIX`.
    pub prefix: String,
    /// `HEARTH_CLUSTER_SECRET` of every node and of [`Cluster::cli_with`] (a node refuses to
    /// start in a cluster without a strong one). Default: 32 random bytes in hex, fresh per spec.
    pub secret: String,
    /// Further environment variables for every node.
    pub env: Vec<(String, String)>,
    /// Further command-line arguments for every node.
    pub args: Vec<String>,
    /// The server binary of every node (default: [`hearth_bin`]).
    pub bin: Option<PathBuf>,
    /// Run on a private Redis Cluster ([`RedisCluster`], `redis-cluster://` URL) instead of
    /// one `redis-server`.
    pub redis_cluster: bool,
}

impl ClusterSpec {
    /// `nodes` nodes with a 2 s lock TTL and the default prefix.
    pub fn new(nodes: usize) -> ClusterSpec {
        ClusterSpec {
            nodes,
            lock_ttl_ms: 2000,
            prefix: "hearth".into(),
            secret: random_secret(),
            env: Vec::new(),
            args: Vec::new(),
            bin: None,
            redis_cluster: false,
        }
    }

    /// On a private Redis Cluster (3 masters, 3 replicas) instead of one `redis-server`.
    pub fn on_redis_cluster(mut self) -> ClusterSpec {
        self.redis_cluster = true;
        self
    }

    /// Runs `bin` instead of the stock `hearth` on every node (e.g. `hearth-test-server`).
    pub fn binary(mut self, bin: impl Into<PathBuf>) -> ClusterSpec {
        self.bin = Some(bin.into());
        self
    }

    /// With this cluster secret.
    pub fn secret(mut self, secret: impl Into<String>) -> ClusterSpec {
        self.secret = secret.into();
        self
    }

    /// With this lock TTL.
    pub fn lock_ttl_ms(mut self, ms: u64) -> ClusterSpec {
        self.lock_ttl_ms = ms;
        self
    }

    /// With one more environment variable on every node.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> ClusterSpec {
        self.env.push((key.into(), value.into()));
        self
    }

    /// With more command-line arguments on every node.
    pub fn args<I, S>(mut self, args: I) -> ClusterSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A strong cluster secret: 32 random bytes, hex-encoded (what `openssl rand -hex 32` prints).
pub fn random_secret() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A parsed lock value `node|incarnation|lease`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The holder's node id.
    pub node: String,
    /// The holder process's incarnation (16 hex digits).
    pub incarnation: String,
    /// The lease nonce (random per acquire).
    pub lease: String,
}

impl LockHolder {
    /// Parses a lock value; `None` if it does not have three `|`-separated parts.
    pub fn parse(value: &str) -> Option<LockHolder> {
        let mut parts = value.split('|');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(node), Some(inc), Some(lease), None) => Some(LockHolder {
                node: node.to_string(),
                incarnation: inc.to_string(),
                lease: lease.to_string(),
            }),
            _ => None,
        }
    }
}

/// One series of a scrape: name, labels, value.
type Series = (String, Vec<(String, String)>, f64);

/// One scrape of a node's `/metrics` (Prometheus text format).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<Series>,
}

impl Metrics {
    /// Parses the text format (comments skipped, label values without escapes).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.trim_end_matches('}');
                    let labels = inner
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            samples.push((name, labels, value));
        }
        Metrics { samples }
    }

    /// The sum over every series named `name` that carries all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    }
}

/// The Redis a [`Cluster`] runs on.
#[derive(Debug)]
pub enum RedisBackend {
    /// One `redis-server`.
    Single(RedisProcess),
    /// A Redis Cluster.
    Cluster(RedisCluster),
}

/// Nodes `n1..=nN` on one fresh PostgreSQL database and one private Redis (or Redis Cluster),
/// behind a round-robin balancer over all of them. Dropping it kills the nodes first, then
/// Redis, then drops the database (fields drop in declaration order).
#[derive(Debug)]
pub struct Cluster {
    /// The balancer (initially over every node).
    pub lb: Lb,
    /// The nodes, `nodes[i]` has id `n{i+1}`.
    pub nodes: Vec<NodeProcess>,
    /// The Redis server or cluster.
    pub redis_backend: RedisBackend,
    /// The shared database.
    pub db: PgDatabase,
    prefix: String,
    secret: String,
    lock_ttl: Duration,
}

impl Cluster {
    /// Starts Redis, a fresh database and the nodes (concurrently), then the balancer.
    pub async fn start(scratch: &Scratch, spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let db = PgDatabase::create()?;
        let redis = if spec.redis_cluster {
            RedisBackend::Cluster(RedisCluster::start(scratch).await?)
        } else {
            RedisBackend::Single(RedisProcess::start(scratch).await?)
        };
        let redis_url = match &redis {
            RedisBackend::Single(r) => r.url(),
            RedisBackend::Cluster(c) => c.url(),
        };
        let starts = (1..=spec.nodes).map(|i| {
            let mut node = NodeSpec::new(format!("n{i}"), db.url())
                .env("HEARTH_REDIS_URL", redis_url.clone())
                .env("HEARTH_LOCK_TTL_MS", spec.lock_ttl_ms.to_string())
                .env("HEARTH_REDIS_PREFIX", spec.prefix.clone())
                .env("HEARTH_CLUSTER_SECRET", spec.secret.clone())
                .args(spec.args.iter().cloned());
            node.bin = spec.bin.clone();
            for (k, v) in &spec.env {
                node = node.env(k.clone(), v.clone());
            }
            NodeProcess::start(scratch, node)
        });
        let mut nodes = Vec::new();
        for n in join_all(starts).await {
            nodes.push(n?);
        }
        let lb = Lb::start(nodes.iter().map(NodeProcess::addr).collect()).await?;
        Ok(Cluster {
            lb,
            nodes,
            redis_backend: redis,
            db,
            prefix: spec.prefix,
            secret: spec.secret,
            lock_ttl: Duration::from_millis(spec.lock_ttl_ms),
        })
    }

    /// The single `redis-server` the nodes run on.
    ///
    /// # Panics
    ///
    /// On a Redis Cluster ([`ClusterSpec::on_redis_cluster`]): use [`Cluster::redis_cluster`].
    pub fn redis(&self) -> &RedisProcess {
        match &self.redis_backend {
            RedisBackend::Single(r) => r,
            RedisBackend::Cluster(_) => panic!("this cluster runs on a Redis Cluster"),
        }
    }

    /// [`Cluster::redis`], mutable (restart, kill).
    ///
    /// # Panics
    ///
    /// On a Redis Cluster.
    pub fn redis_mut(&mut self) -> &mut RedisProcess {
        match &mut self.redis_backend {
            RedisBackend::Single(r) => r,
            RedisBackend::Cluster(_) => panic!("this cluster runs on a Redis Cluster"),
        }
    }

    /// The Redis Cluster the nodes run on.
    ///
    /// # Panics
    ///
    /// On a single `redis-server`.
    pub fn redis_cluster(&mut self) -> &mut RedisCluster {
        match &mut self.redis_backend {
            RedisBackend::Cluster(c) => c,
            RedisBackend::Single(_) => panic!("this cluster runs on one redis-server"),
        }
    }

    /// The URL the nodes were given (`redis://…` or `redis-cluster://…`).
    pub fn redis_url(&self) -> String {
        match &self.redis_backend {
            RedisBackend::Single(r) => r.url(),
            RedisBackend::Cluster(c) => c.url(),
        }
    }

    /// Runs one Redis command: on the single server, or on the Redis Cluster node serving the
    /// command's key.
    pub async fn redis_command(&self, args: &[&str]) -> anyhow::Result<Resp> {
        match &self.redis_backend {
            RedisBackend::Single(r) => r.command(args).await,
            RedisBackend::Cluster(c) => c.command(args).await,
        }
    }

    /// The cluster secret the nodes run with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The lock TTL the nodes run with.
    pub fn lock_ttl(&self) -> Duration {
        self.lock_ttl
    }

    /// The Redis key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The index in [`Cluster::nodes`] of node `id`.
    pub fn index(&self, id: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.id() == id)
            .with_context(|| format!("no node {id:?} in this cluster"))
    }

    /// The node with id `id`.
    pub fn node(&self, id: &str) -> anyhow::Result<&NodeProcess> {
        Ok(&self.nodes[self.index(id)?])
    }

    /// The lock key of `doc`: `<prefix>:lock:{<hex16 of sha256(doc)>}`.
    pub fn lock_key(&self, doc: &str) -> String {
        format!("{}:lock:{{{}}}", self.prefix, hearth_proxy::doc_tag(doc))
    }

    /// The current lock holder of `doc`, read from Redis.
    pub async fn holder(&self, doc: &str) -> anyhow::Result<Option<LockHolder>> {
        Ok(self
            .holders(&[doc.to_string()])
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    /// The lock holders of `docs`, read with one `MGET` (one atomic snapshot of Redis); on a
    /// Redis Cluster, where the keys live on different masters, with one `GET` each.
    pub async fn holders(&self, docs: &[String]) -> anyhow::Result<Vec<Option<LockHolder>>> {
        let keys: Vec<String> = docs.iter().map(|d| self.lock_key(d)).collect();
        if let RedisBackend::Cluster(c) = &self.redis_backend {
            let mut out = Vec::new();
            for k in &keys {
                let v = c.command(&["GET", k]).await?;
                out.push(v.as_str().and_then(|s| LockHolder::parse(&s)));
            }
            return Ok(out);
        }
        let mut args: Vec<&str> = vec!["MGET"];
        args.extend(keys.iter().map(String::as_str));
        match self.redis().command(&args).await? {
            Resp::Array(Some(items)) if items.len() == docs.len() => Ok(items
                .iter()
                .map(|v| v.as_str().and_then(|s| LockHolder::parse(&s)))
                .collect()),
            other => bail!("MGET answered {other:?}"),
        }
    }

    /// Waits (≤ `limit`) until the lock of `doc` has a holder satisfying `pred`.
    pub async fn wait_holder(
        &self,
        doc: &str,
        limit: Duration,
        pred: impl Fn(&LockHolder) -> bool,
    ) -> anyhow::Result<LockHolder> {
        let pred = &pred;
        wait_until(
            &format!("the wanted holder of {doc:?}'s lock"),
            limit,
            || async move {
                anyhow::Ok(match self.holder(doc).await? {
                    Some(h) if pred(&h) => Ok(h),
                    other => Err(format!("holder {other:?}")),
                })
            },
        )
        .await
    }

    /// Waits (≤ `limit`) until the lock of `doc` no longer names node `node` (expired, released
    /// or taken by another node); returns how long that took.
    pub async fn wait_holder_gone(
        &self,
        doc: &str,
        node: &str,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let what = format!("the lock of {doc:?} no longer held by {node}");
        wait_until(&what, limit, || async move {
            anyhow::Ok(match self.holder(doc).await? {
                Some(h) if h.node == node => Err(format!("held by {h:?}")),
                _ => Ok(()),
            })
        })
        .await?;
        Ok(started.elapsed())
    }

    /// The incarnation node `id` last published (`<prefix>:node:<id>`), if its key is alive.
    pub async fn incarnation(&self, id: &str) -> anyhow::Result<Option<String>> {
        let key = format!("{}:node:{id}", self.prefix);
        Ok(self.redis_command(&["GET", &key]).await?.as_str())
    }

    /// `GET /cluster/owned` on node `i`'s operator listener: the documents it says it serves.
    pub async fn owned(&self, i: usize) -> anyhow::Result<BTreeSet<String>> {
        let (status, body) = self.nodes[i].operator_get("/cluster/owned").await?;
        if status != 200 {
            bail!("/cluster/owned on {} answered {status}", self.nodes[i].id());
        }
        Ok(body
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// [`owned`](Self::owned) of every node, concurrently (an error for a node that does not
    /// answer, e.g. a stopped one).
    pub async fn owned_all(&self) -> Vec<anyhow::Result<BTreeSet<String>>> {
        join_all((0..self.nodes.len()).map(|i| self.owned(i))).await
    }

    /// One scrape of node `i`'s `/metrics` (operator listener).
    pub async fn metrics(&self, i: usize) -> anyhow::Result<Metrics> {
        self.nodes[i].metrics().await
    }

    /// Runs `hearth <args…>` with this cluster's Redis settings and secret (≤ 10 s): exit code,
    /// stdout.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
        let run = self
            .cli_with(args, &[], None, Duration::from_secs(10))
            .await?;
        Ok((
            run.code,
            String::from_utf8_lossy(&run.stdout).trim().to_string(),
        ))
    }

    /// Runs `hearth <args…>` with this cluster's Redis settings and secret plus `env` (which may
    /// override them; an empty value unsets), writing `stdin` (if any) to its standard input;
    /// kills it after `limit`. Unlike [`Cluster::cli`], stdout is kept byte for byte and stderr
    /// and the run time are returned too.
    pub async fn cli_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
        limit: Duration,
    ) -> anyhow::Result<CliRun> {
        use tokio::io::AsyncWriteExt as _;
        let mut cmd = tokio::process::Command::new(hearth_bin()?);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HEARTH_") {
                cmd.env_remove(&k);
            }
        }
        cmd.args(args)
            .env("HEARTH_REDIS_URL", self.redis_url())
            .env("HEARTH_REDIS_PREFIX", &self.prefix)
            .env("HEARTH_CLUSTER_SECRET", &self.secret)
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting hearth")?;
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(bytes)
                .await
                .context("writing hearth's stdin")?;
        }
        let out = timeout(limit, child.wait_with_output())
            .await
            .with_context(|| format!("`hearth {}` ran longer than {limit:?}", args.join(" ")))??;
        Ok(CliRun {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }

    /// `hearth cluster owner <doc>`: the owner's node id, `None` when it exits 1 with no output.
    pub async fn cli_owner(&self, doc: &str) -> anyhow::Result<Option<String>> {
        match self.cli(&["cluster", "owner", doc]).await? {
            (Some(0), out) if !out.is_empty() => Ok(Some(out)),
            (Some(1), out) if out.is_empty() => Ok(None),
            other => bail!("`hearth cluster owner {doc}` gave {other:?}"),
        }
    }

    /// The shared database, for SQL from the test.
    pub fn store(&self) -> anyhow::Result<Db> {
        Db::from_url(self.db.url())
    }

    /// `documents.epoch` of every document row.
    pub fn epochs(&self) -> anyhow::Result<BTreeMap<String, i64>> {
        let rows = self.store()?.query("SELECT name, epoch FROM documents")?;
        let mut out = BTreeMap::new();
        for r in rows {
            if let [name, epoch] = r.as_slice() {
                out.insert(name.clone(), epoch.parse()?);
            }
        }
        Ok(out)
    }

    /// Every stored blob of `doc`: its snapshot (if any), then its log rows in `seq` order.
    pub fn stored_blobs(&self, doc: &str) -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(self.stored_rows(doc)?.into_iter().map(|r| r.data).collect())
    }

    /// Those of `markers` that no stored blob of `doc` holds (acknowledged edits that were
    /// lost, when `markers` are a client's acknowledged ones).
    pub fn unstored(&self, doc: &str, markers: &[String]) -> anyhow::Result<Vec<String>> {
        let blobs = self.stored_blobs(doc)?;
        Ok(markers
            .iter()
            .filter(|m| blobs.iter().map(|b| marker_hits(b, m)).sum::<usize>() == 0)
            .cloned()
            .collect())
    }

    /// Like [`stored_blobs`](Self::stored_blobs), with where each blob came from: the snapshot,
    /// or a log row and the epoch it was committed under.
    pub fn stored_rows(&self, doc: &str) -> anyhow::Result<Vec<StoredRow>> {
        let db = self.store()?;
        let name = doc.replace('\'', "''");
        let mut rows = Vec::new();
        let snap = db.query(&format!(
            "SELECT {} FROM documents WHERE name = '{name}' AND snapshot IS NOT NULL",
            db.hex_of("snapshot")
        ))?;
        for row in &snap {
            if let Some(hex) = row.first() {
                rows.push(StoredRow {
                    seq: None,
                    epoch: None,
                    data: unhex(hex)?,
                });
            }
        }
        let log = db.query(&format!(
            "SELECT seq, coalesce(epoch, -1), {} FROM document_updates WHERE name = '{name}' \
             ORDER BY seq",
            db.hex_of("data")
        ))?;
        for row in &log {
            if let [seq, epoch, hex] = row.as_slice() {
                let epoch: i64 = epoch.parse()?;
                rows.push(StoredRow {
                    seq: Some(seq.parse()?),
                    epoch: (epoch >= 0).then_some(epoch),
                    data: unhex(hex)?,
                });
            }
        }
        Ok(rows)
    }
}

/// One stored blob of a document (see [`Cluster::stored_rows`]).
#[derive(Debug, Clone)]
pub struct StoredRow {
    /// The log row's `seq`; `None` for the snapshot.
    pub seq: Option<i64>,
    /// The epoch the log row was committed under; `None` for the snapshot (and old rows).
    pub epoch: Option<i64>,
    /// The Yjs v1 update.
    pub data: Vec<u8>,
}

fn unhex(hex: &str) -> anyhow::Result<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        bail!("odd-length hex");
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).context("bad hex"))
        .collect()
}

/// How many times `marker` occurs in a stored Yjs v1 update as an array element: the lib0
/// `Any` string encoding `0x77 | varuint(len) | utf-8 bytes` (the length prefix keeps `c:1` from
/// matching inside `c:17`).
pub fn marker_hits(blob: &[u8], marker: &str) -> usize {
    let mut needle = vec![0x77u8];
    let mut n = marker.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            needle.push(b);
            break;
        }
        needle.push(b | 0x80);
    }
    needle.extend_from_slice(marker.as_bytes());
    blob.windows(needle.len()).filter(|w| *w == needle).count()
}

/// One finished run of the `hearth` command line ([`Cluster::cli_with`]).
#[derive(Debug, Clone)]
pub struct CliRun {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output, as written.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: String,
    /// From spawn to exit.
    pub elapsed: Duration,
}

/// Reconnects clients through a URL (the balancer) whenever their socket ends, after a short
/// jittered pause, like providers after a 4205 close. Counts the reconnects.
#[derive(Debug)]
pub struct Reconnector {
    stop: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    reconnects: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Reconnector {
    /// One task per client: wait until its socket is gone, pause 50–150 ms, reconnect to `url`
    /// (retrying until it is synced again), repeat.
    pub fn start(clients: &[Arc<TestClient>], url: &str) -> Reconnector {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let reconnects = Arc::new(AtomicU64::new(0));
        let tasks = clients
            .iter()
            .map(|c| {
                let (c, stop, held, count, url) = (
                    c.clone(),
                    stop.clone(),
                    held.clone(),
                    reconnects.clone(),
                    url.to_string(),
                );
                tokio::spawn(async move {
                    // bounded: at most one reconnect attempt per 50 ms for 10 minutes
                    for _ in 0..12_000u32 {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        if c.view(|s| s.connected()) {
                            let _ = c
                                .wait_for("socket gone", Duration::from_millis(100), |s| {
                                    !s.connected()
                                })
                                .await;
                            continue;
                        }
                        let pause = 50 + rand::random::<u64>() % 100;
                        sleep(Duration::from_millis(pause)).await;
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        if held.load(Ordering::Acquire) {
                            continue;
                        }
                        if c.reconnect(Some(&url)).await.is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Reconnector {
            stop,
            held,
            reconnects,
            tasks,
        }
    }

    /// Holds every reconnect back (`true`) until released (`false`): while held, no client
    /// whose socket ended comes back, so nothing routes its document anew.
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Release);
    }

    /// Successful reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Stops every task (an attempt in progress is abandoned; its socket stays as it is).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            let abort = t.abort_handle();
            if timeout(Duration::from_secs(1), t).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Waits (≤ `limit`) until every client of `doc` in `clients` is connected and holds exactly what
/// a fresh client (connecting to `url` with `token`) is served; returns that content. The error
/// lists, per client, what it lacks and has extra compared with the server.
pub async fn wait_converged(
    clients: &[Arc<TestClient>],
    url: &str,
    doc: &str,
    token: &str,
    limit: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + limit;
    let mine: Vec<&Arc<TestClient>> = clients.iter().filter(|c| c.doc_name() == doc).collect();
    let mut last_problem = String::from("no fresh client could connect");
    loop {
        let opts = ClientOptions {
            sync_timeout: Duration::from_secs(3),
            ..ClientOptions::labelled("fresh").token(token)
        };
        if let Ok(fresh) = TestClient::connect_with(url, doc, opts).await {
            let served = fresh.contents();
            let want: BTreeSet<&String> = served.iter().collect();
            let mut problems = Vec::new();
            for c in &mine {
                let (connected, have) = c.view(|s| (s.connected(), s.contents()));
                let have: BTreeSet<&String> = have.iter().collect();
                if !connected || have != want {
                    let lacks = want.difference(&have).count();
                    let extra: Vec<&&String> = have.difference(&want).take(5).collect();
                    problems.push(format!(
                        "client {} connected={connected} lacks {lacks} has {} extra {extra:?}",
                        c.client_id(),
                        have.difference(&want).count()
                    ));
                }
            }
            if problems.is_empty() {
                return Ok(served);
            }
            last_problem = format!(
                "server has {} markers; {}",
                served.len(),
                problems.join("; ")
            );
        }
        if Instant::now() >= deadline {
            bail!("{doc}: clients did not converge within {limit:?}: {last_problem}");
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// The end check of a workload: every marker `clients` and `probes` had acknowledged is present
/// exactly once in what `url` serves for each of `docs`, every client converged to it (within
/// `WAIT`), and no client saw an anomaly. Prints the counts per document, tagged `test`.
pub async fn assert_nothing_lost(
    test: &str,
    clients: &[Arc<TestClient>],
    probes: &[Arc<TestClient>],
    url: &str,
    docs: &[impl AsRef<str>],
) -> anyhow::Result<()> {
    let mut history = History::default();
    for c in clients.iter().chain(probes.iter()) {
        history.record(c);
    }
    for doc in docs.iter().map(AsRef::as_ref) {
        let served = wait_converged(clients, url, doc, "", WAIT).await?;
        let v = history.check(doc, &served);
        assert!(v.ok(), "{doc}: {v:?}");
        eprintln!(
            "[{test}] {doc}: acked {} sent {} present {}",
            v.counts.0, v.counts.1, v.counts.2
        );
    }
    for c in clients {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}

/// Waits until every client has all its markers acknowledged (≤ `limit` overall).
pub async fn wait_all_acked(clients: &[Arc<TestClient>], limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    for c in clients {
        let left = deadline.saturating_duration_since(Instant::now());
        c.wait_all_acked(left.max(Duration::from_millis(1))).await?;
    }
    Ok(())
}

/// Connects a probe client to `url` (retrying every 50 ms, each try bounded by `WAIT`/4), inserts
/// `marker` and waits for its acknowledgement, until `limit` has passed. Returns the client that
/// succeeded (its marker acknowledged); `tried` collects every probe client made, so their
/// markers can be recorded in a history.
pub async fn probe_writable(
    url: &str,
    doc: &str,
    label: &str,
    limit: Duration,
    tried: &mut Vec<Arc<TestClient>>,
) -> anyhow::Result<Arc<TestClient>> {
    let deadline = Instant::now() + limit;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let opts = ClientOptions {
            sync_timeout: WAIT / 4,
            connect_timeout: Duration::from_secs(2),
            ..ClientOptions::labelled(format!("{label}-{attempt}"))
        };
        if let Ok(c) = TestClient::connect_with(url, doc, opts).await {
            let c = Arc::new(c);
            tried.push(c.clone());
            c.insert_next();
            let left = deadline.saturating_duration_since(Instant::now());
            if c.wait_all_acked(left.min(WAIT / 4)).await.is_ok() {
                return Ok(c);
            }
        }
        if Instant::now() >= deadline {
            bail!("{doc}: no probe through {url} was served and acknowledged within {limit:?}");
        }
        sleep(Duration::from_millis(50)).await;
    }
}
