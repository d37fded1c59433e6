//! A fleet of connected clients driven by one coordinator: topology (documents × clients,
//! round-robin over target URLs, owner-local or proxied), connection with limited concurrency,
//! and measurement windows (rate → latency percentiles, missing deliveries, CPU per delivery).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

use super::client::{Client, ClientConfig, Handshake, Peer, Plan, Role};
use super::procfs;
use super::stats::{Latency, Path, PeerCursor, Recorded, Recorder, SendLog, now_ns};

/// Options shared by every scenario.
#[derive(Debug, Clone)]
pub struct Target {
    /// WebSocket URLs; client `i` connects to `urls[i % len]`.
    pub urls: Vec<String>,
    /// Auth token.
    pub token: String,
    /// Server processes to measure (CPU and RSS are summed).
    pub pids: Vec<u32>,
    /// A Redis process whose CPU is reported on its own.
    pub redis_pid: Option<u32>,
    /// Document name prefix.
    pub prefix: String,
    /// Concurrent connection attempts.
    pub connect_concurrency: usize,
    /// Connect + handshake limit per client.
    pub handshake_timeout: Duration,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Free text copied into every output line (e.g. "hearth", "hocuspocus").
    pub label: String,
}

/// Documents × clients, and which URL owns each document (`None`: single node).
#[derive(Debug, Clone)]
pub struct Topology {
    /// Documents.
    pub docs: usize,
    /// Clients per document.
    pub clients_per_doc: usize,
    /// Index into `urls` of each document's owner node.
    pub owners: Option<Vec<usize>>,
    /// Publish awareness at connect and renew it like a provider.
    pub awareness: bool,
}

/// Connected clients waiting for a [`Plan`].
#[derive(Debug)]
pub struct Fleet {
    /// Shared counters and histograms.
    pub rec: Arc<Recorder>,
    plan: watch::Sender<Plan>,
    tasks: JoinSet<()>,
    /// Number of clients.
    pub clients: usize,
    /// Handshake durations (ns).
    pub handshakes: Latency,
    /// Clients per [`Path`] class of receiver: `[on owner, proxied]`.
    pub local_clients: [usize; 2],
    target: Target,
}

/// Random distinct non-zero 32-bit client ids (Yjs uses 32-bit ids).
pub fn client_ids(n: usize) -> Vec<u64> {
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let id = u64::from(rand::random::<u32>() >> 1).max(1);
        if seen.insert(id) {
            out.push(id);
        }
    }
    out
}

impl Fleet {
    /// Connects every client of `topo` and waits until all are synced.
    pub async fn connect(target: &Target, topo: &Topology) -> anyhow::Result<Fleet> {
        let n = topo.docs * topo.clients_per_doc;
        if n == 0 || target.urls.is_empty() {
            bail!(
                "nothing to connect: {n} clients, {} urls",
                target.urls.len()
            );
        }
        let rec = Arc::new(Recorder::default());
        let ids = client_ids(n);
        let url_of = |i: usize| i % target.urls.len();
        let local = |i: usize| match &topo.owners {
            Some(o) => o[i / topo.clients_per_doc] == url_of(i),
            None => true,
        };
        let logs: Vec<Arc<SendLog>> = (0..n)
            .map(|i| Arc::new(SendLog::new(ids[i], local(i))))
            .collect();
        let (plan_tx, plan_rx) = watch::channel(Plan::Idle);
        let sem = Arc::new(Semaphore::new(target.connect_concurrency.max(1)));
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<anyhow::Result<Handshake>>();
        let mut tasks = JoinSet::new();
        let mut local_clients = [0usize; 2];
        for i in 0..n {
            let d = i / topo.clients_per_doc;
            let first = d * topo.clients_per_doc;
            let mut fanout = [0u64; 4];
            let mut peers = Vec::with_capacity(topo.clients_per_doc - 1);
            for j in first..first + topo.clients_per_doc {
                if j == i {
                    continue;
                }
                fanout[Path::between(local(i), local(j)) as usize] += 1;
                peers.push(Peer {
                    log: logs[j].clone(),
                    cursor: PeerCursor::default(),
                    path: Path::between(local(j), local(i)),
                });
            }
            local_clients[usize::from(!local(i))] += 1;
            let role = Role {
                me: logs[i].clone(),
                peers,
                fanout,
            };
            let cfg = ClientConfig {
                url: target.urls[url_of(i)].clone(),
                address: format!("{}-{d}", target.prefix),
                token: target.token.clone(),
                client_id: ids[i],
                awareness: topo.awareness,
                renew_awareness: topo.awareness,
                handshake_timeout: target.handshake_timeout,
                source: None,
            };
            let (sem, ready, plan, rec) =
                (sem.clone(), ready_tx.clone(), plan_rx.clone(), rec.clone());
            tasks.spawn(async move {
                let permit = sem.acquire_owned().await;
                let r = Client::connect(cfg).await;
                drop(permit);
                match r {
                    Ok((client, hs)) => {
                        let _ = ready.send(Ok(hs));
                        client.run(role, plan, rec).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
        }
        drop(ready_tx);
        let mut handshakes = Latency::new();
        let started = Instant::now();
        let mut last = Instant::now();
        for k in 0..n {
            match ready_rx.recv().await {
                Some(Ok(hs)) => handshakes.record_ns(hs.acked.saturating_sub(hs.start)),
                Some(Err(e)) => {
                    tasks.abort_all();
                    bail!("client {k} of {n} failed to connect: {e:#}");
                }
                None => bail!("client tasks ended early"),
            }
            if target.progress && last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                eprintln!(
                    "[{}] connecting: {}/{n} synced ({:.1} s)",
                    target.label,
                    k + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Ok(Fleet {
            rec,
            plan: plan_tx,
            tasks,
            clients: n,
            handshakes,
            local_clients,
            target: target.clone(),
        })
    }

    /// Tells every client to close and waits (bounded) for them.
    pub async fn shutdown(mut self) {
        let _ = self.plan.send(Plan::Quit);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }

    /// Inserts at `total_rate` updates/s (spread evenly over all clients) for `warmup`, then
    /// measures for `duration`, stops, and waits up to `drain` for outstanding deliveries and
    /// acknowledgements.
    pub async fn measure(
        &mut self,
        total_rate: f64,
        warmup: Duration,
        duration: Duration,
        drain: Duration,
    ) -> Window {
        let rec = self.rec.clone();
        let per_client = total_rate / self.clients as f64;
        let interval_ns = (1e9 / per_client.max(1e-6)) as u64;
        let _ = self.plan.send(Plan::Send { interval_ns });
        self.sleep_with_progress(warmup, "warmup").await;
        let start = Snapshot::take(&rec, &self.target.pids, self.target.redis_pid);
        rec.take_window(start.at);
        self.sleep_with_progress(duration, "measure").await;
        let sent_end = rec.sent.load(Ordering::Relaxed);
        let send_end_at = now_ns();
        let _ = self.plan.send(Plan::Idle);
        let drain_until = Instant::now() + drain;
        loop {
            let outstanding_acks = rec.sent.load(Ordering::Relaxed)
                - rec.acked.load(Ordering::Relaxed)
                - rec.rejected.load(Ordering::Relaxed);
            if (rec.missing() == 0 && outstanding_acks == 0) || Instant::now() >= drain_until {
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
        let end = Snapshot::take(&rec, &self.target.pids, self.target.redis_pid);
        let hist = rec.take_window(end.at);
        Window {
            total_rate,
            interval_ns,
            start,
            end,
            sent_in_window: sent_end - start.sent,
            send_secs: (send_end_at - start.at) as f64 / 1e9,
            hist,
            missing: rec.missing(),
            missing_by_path: std::array::from_fn(|i| {
                rec.expected[i]
                    .load(Ordering::Relaxed)
                    .saturating_sub(rec.delivered[i].load(Ordering::Relaxed))
            }),
            outstanding_acks: rec.sent.load(Ordering::Relaxed)
                - rec.acked.load(Ordering::Relaxed)
                - rec.rejected.load(Ordering::Relaxed),
            lag_max_ns: rec.lag_max_ns.swap(0, Ordering::Relaxed),
            lagged: rec.lagged.swap(0, Ordering::Relaxed),
        }
    }

    async fn sleep_with_progress(&self, d: Duration, what: &str) {
        let until = Instant::now() + d;
        let mut prev = Snapshot::take(&self.rec, &self.target.pids, self.target.redis_pid);
        while Instant::now() < until {
            let step = (until - Instant::now()).min(Duration::from_secs(1));
            sleep(step).await;
            if !self.target.progress || step < Duration::from_millis(500) {
                continue;
            }
            let now = Snapshot::take(&self.rec, &self.target.pids, self.target.redis_pid);
            let secs = (now.at - prev.at) as f64 / 1e9;
            let p99 = self
                .rec
                .hist
                .lock()
                .map(|h| {
                    let mut all = Latency::new();
                    for l in &h.delivery {
                        all.add(l);
                    }
                    all.summary().p99_ms
                })
                .unwrap_or(0.0);
            eprintln!(
                "[{}] {what}: sent {:.0}/s delivered {:.0}/s acked {:.0}/s missing {} p99 {:.2} ms server {:.2} cores bench {:.2} cores errors {}",
                self.target.label,
                (now.sent - prev.sent) as f64 / secs,
                (now.delivered - prev.delivered) as f64 / secs,
                (now.acked - prev.acked) as f64 / secs,
                self.rec.missing(),
                p99,
                now.server_cpu
                    .zip(prev.server_cpu)
                    .map_or(0.0, |(a, b)| (a - b) / secs),
                now.bench_cpu
                    .zip(prev.bench_cpu)
                    .map_or(0.0, |(a, b)| (a - b) / secs),
                self.rec.errors.load(Ordering::Relaxed),
            );
            prev = now;
        }
    }
}

/// Counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// When (ns since the bench epoch).
    pub at: u64,
    /// Inserts sent.
    pub sent: u64,
    /// Deliveries observed.
    pub delivered: u64,
    /// Acknowledged inserts.
    pub acked: u64,
    /// Server CPU seconds (summed over the pids), if measurable.
    pub server_cpu: Option<f64>,
    /// The system (kernel) part of `server_cpu`.
    pub server_sys_cpu: Option<f64>,
    /// Server RSS KiB.
    pub server_rss: Option<u64>,
    /// Redis CPU seconds, if a Redis pid was given.
    pub redis_cpu: Option<f64>,
    /// Generator CPU seconds.
    pub bench_cpu: Option<f64>,
    /// Busy CPU seconds of the whole machine.
    pub machine_cpu: Option<f64>,
}

impl Snapshot {
    /// Reads the counters and `/proc`.
    pub fn take(rec: &Recorder, pids: &[u32], redis: Option<u32>) -> Snapshot {
        let measurable = !pids.is_empty();
        Snapshot {
            at: now_ns(),
            sent: rec.sent.load(Ordering::Relaxed),
            delivered: Recorder::total(&rec.delivered),
            acked: rec.acked.load(Ordering::Relaxed),
            server_cpu: measurable.then(|| procfs::cpu_sum(pids)).flatten(),
            server_sys_cpu: measurable.then(|| procfs::sys_cpu_sum(pids)).flatten(),
            server_rss: measurable.then(|| procfs::rss_sum(pids)).flatten(),
            redis_cpu: redis.and_then(|pid| procfs::cpu_sum(&[pid])),
            bench_cpu: procfs::self_cpu_seconds(),
            machine_cpu: procfs::machine_busy_seconds(),
        }
    }
}

/// The outcome of one measurement window.
#[derive(Debug)]
pub struct Window {
    /// Target updates/s over all clients.
    pub total_rate: f64,
    /// Interval between inserts of one client.
    pub interval_ns: u64,
    /// Counters when the window opened (after warm-up).
    pub start: Snapshot,
    /// Counters after the drain.
    pub end: Snapshot,
    /// Inserts sent inside the window.
    pub sent_in_window: u64,
    /// Length of the sending part of the window.
    pub send_secs: f64,
    /// Latency histograms of inserts sent inside the window.
    pub hist: Recorded,
    /// Deliveries missing after the drain (cumulative over the run).
    pub missing: u64,
    /// The same, by [`Path`].
    pub missing_by_path: [u64; 4],
    /// Inserts without `SyncStatus` after the drain (cumulative).
    pub outstanding_acks: u64,
    /// Longest delay of a scheduled insert (generator lag).
    pub lag_max_ns: u64,
    /// Inserts sent more than 5 ms late.
    pub lagged: u64,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Window {
    /// All delivery latencies, whatever the path.
    pub fn delivery_all(&self) -> Latency {
        let mut all = Latency::new();
        for l in &self.hist.delivery {
            all.add(l);
        }
        all
    }

    /// All ack latencies.
    pub fn ack_all(&self) -> Latency {
        let mut all = self.hist.ack[0].clone();
        all.add(&self.hist.ack[1]);
        all
    }

    /// The window as one JSON object (the fields every fan-out-like scenario reports).
    pub fn to_json(&self, fleet: &Fleet, by_path: bool) -> Value {
        let secs = (self.end.at - self.start.at) as f64 / 1e9;
        let delivered = self.end.delivered - self.start.delivered;
        let cpu = self
            .end
            .server_cpu
            .zip(self.start.server_cpu)
            .map(|(a, b)| a - b);
        let sys_cpu = self
            .end
            .server_sys_cpu
            .zip(self.start.server_sys_cpu)
            .map(|(a, b)| a - b);
        let redis_cpu = self
            .end
            .redis_cpu
            .zip(self.start.redis_cpu)
            .map(|(a, b)| a - b);
        let bench_cpu = self
            .end
            .bench_cpu
            .zip(self.start.bench_cpu)
            .map(|(a, b)| a - b);
        let machine = self
            .end
            .machine_cpu
            .zip(self.start.machine_cpu)
            .map(|(a, b)| a - b);
        // whatever else ran: the machine's busy time minus server and generator (includes the
        // kernel's network work not charged to either)
        let other = machine.map(|m| m - cpu.unwrap_or(0.0) - bench_cpu.unwrap_or(0.0));
        let sent_rate = self.sent_in_window as f64 / self.send_secs.max(1e-9);
        let mut v = json!({
            "target_rate": round3(self.total_rate),
            "rate_per_client": round3(self.total_rate / fleet.clients as f64),
            "window_s": round3(secs),
            "sent": self.sent_in_window,
            "sent_rate": round3(sent_rate),
            "delivered": delivered,
            "delivery_rate": round3(delivered as f64 / secs.max(1e-9)),
            "missing": self.missing,
            "late": fleet.rec.late.load(Ordering::Relaxed),
            "outstanding_acks": self.outstanding_acks,
            "rejected": fleet.rec.rejected.load(Ordering::Relaxed),
            "errors": fleet.rec.errors.load(Ordering::Relaxed),
            "latency": self.delivery_all().summary(),
            "ack_latency": self.ack_all().summary(),
            "server_cpu_s": cpu.map(round3),
            "server_cpu_cores": cpu.map(|c| round3(c / secs)),
            "server_cpu_us_per_delivery": cpu.filter(|_| delivered > 0).map(|c| round3(c * 1e6 / delivered as f64)),
            "server_sys_cpu_us_per_delivery": sys_cpu.filter(|_| delivered > 0).map(|c| round3(c * 1e6 / delivered as f64)),
            "server_cpu_us_per_update": cpu.filter(|_| self.sent_in_window > 0).map(|c| round3(c * 1e6 / self.sent_in_window as f64)),
            "server_rss_kib": self.end.server_rss,
            "redis_cpu_cores": redis_cpu.map(|c| round3(c / secs)),
            "redis_cpu_us_per_delivery": redis_cpu.filter(|_| delivered > 0).map(|c| round3(c * 1e6 / delivered as f64)),
            "bench_cpu_cores": bench_cpu.map(|c| round3(c / secs)),
            "other_cpu_cores": other.map(|c| round3(c / secs)),
            "send_lag_max_ms": round3(self.lag_max_ns as f64 / 1e6),
            "lagged_sends": self.lagged,
            "generator_limited": sent_rate < 0.95 * self.total_rate,
        });
        if by_path {
            let mut paths = serde_json::Map::new();
            for p in Path::ALL {
                let h = &self.hist.delivery[p as usize];
                if h.count() > 0 || self.missing_by_path[p as usize] > 0 {
                    paths.insert(
                        p.name().into(),
                        json!({"latency": h.summary(), "missing": self.missing_by_path[p as usize]}),
                    );
                }
            }
            v["by_path"] = Value::Object(paths);
            v["ack_latency_owner_clients"] = json!(self.hist.ack[0].summary());
            v["ack_latency_proxied_clients"] = json!(self.hist.ack[1].summary());
        }
        v
    }
}
