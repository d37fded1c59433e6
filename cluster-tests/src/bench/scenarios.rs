//! The scenarios: `fanout`, `maxrate`, `acklatency`, `conns`, `coldload`, `proxied`. Each
//! writes JSON lines through an [`Out`] and returns an error only when it could not run at all.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

use super::client::{Client, ClientConfig, Handshake};
use super::docgen;
use super::fleet::{Fleet, Target, Topology, client_ids};
use super::procfs;
use super::stats::{Latency, Recorder, now_ns};

/// Where result lines go (stdout in the binary; collected in tests).
pub trait Out: Send {
    /// Emits one JSON object as a line.
    fn line(&mut self, v: Value);
}

/// Writes JSON lines to stdout, flushing each.
#[derive(Debug, Default)]
pub struct Stdout;

impl Out for Stdout {
    fn line(&mut self, v: Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
}

impl Out for Vec<Value> {
    fn line(&mut self, v: Value) {
        self.push(v);
    }
}

fn header(t: &Target, scenario: &str, kind: &str) -> Value {
    json!({"type": kind, "scenario": scenario, "label": t.label})
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Fan-out timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Sending before the window opens.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Longest wait for outstanding deliveries after sending stops.
    pub drain: Duration,
}

/// `fanout`: D docs × C clients at a fixed rate; one result line.
pub async fn fanout(
    t: &Target,
    topo: &Topology,
    total_rate: f64,
    timing: Timing,
    out: &mut dyn Out,
) -> anyhow::Result<()> {
    let mut fleet = Fleet::connect(t, topo).await?;
    let w = fleet
        .measure(total_rate, timing.warmup, timing.duration, timing.drain)
        .await;
    let body = w.to_json(&fleet, topo.owners.is_some());
    out.line(merge(
        merge(header(t, "fanout", "result"), topology_json(topo, &fleet)),
        body,
    ));
    fleet.shutdown().await;
    Ok(())
}

fn topology_json(topo: &Topology, fleet: &Fleet) -> Value {
    json!({
        "docs": topo.docs,
        "clients_per_doc": topo.clients_per_doc,
        "clients": fleet.clients,
        "handshake": fleet.handshakes.summary(),
    })
}

/// `acklatency`: the same fleet at several total rates; one line per rate (ack latency is the
/// figure of interest: durable vs memory acknowledgement).
pub async fn acklatency(
    t: &Target,
    topo: &Topology,
    rates: &[f64],
    timing: Timing,
    out: &mut dyn Out,
) -> anyhow::Result<()> {
    let mut fleet = Fleet::connect(t, topo).await?;
    for &rate in rates {
        let w = fleet
            .measure(rate, timing.warmup, timing.duration, timing.drain)
            .await;
        let body = w.to_json(&fleet, false);
        out.line(merge(
            merge(header(t, "acklatency", "step"), topology_json(topo, &fleet)),
            body,
        ));
    }
    fleet.shutdown().await;
    Ok(())
}

/// `maxrate` settings.
#[derive(Debug, Clone, Copy)]
pub struct Ramp {
    /// First total rate.
    pub start: f64,
    /// Multiplier between steps.
    pub factor: f64,
    /// Most steps (before refinement).
    pub max_steps: usize,
    /// Bisection steps between the last pass and the first failure.
    pub refine: usize,
    /// A step fails when its delivery p99 exceeds this (ms).
    pub p99_limit_ms: f64,
}

/// `maxrate`: raise the total rate until p99 > limit or deliveries go missing.
pub async fn maxrate(
    t: &Target,
    topo: &Topology,
    ramp: Ramp,
    timing: Timing,
    out: &mut dyn Out,
) -> anyhow::Result<()> {
    let mut fleet = Fleet::connect(t, topo).await?;
    let mut best: Option<(f64, Value)> = None;
    let mut fail: Option<(f64, String)> = None;
    let mut rate = ramp.start;
    let mut steps = 0;
    let mut refining = 0;
    let mut missing_before = 0;
    loop {
        let w = fleet
            .measure(rate, timing.warmup, timing.duration, timing.drain)
            .await;
        let body = w.to_json(&fleet, false);
        let p99 = w.delivery_all().summary().p99_ms;
        let new_missing = w.missing.saturating_sub(missing_before);
        missing_before = w.missing;
        let reason = if new_missing > 0 {
            Some(format!("{new_missing} deliveries missing"))
        } else if p99 > ramp.p99_limit_ms {
            Some(format!("p99 {p99:.1} ms > {} ms", ramp.p99_limit_ms))
        } else if body["generator_limited"] == json!(true) {
            Some("generator could not send at the target rate".into())
        } else if fleet.rec.errors.load(Ordering::Relaxed) > 0 {
            Some("client errors".into())
        } else {
            None
        };
        out.line(merge(
            merge(
                header(t, "maxrate", "step"),
                json!({"pass": reason.is_none(), "fail_reason": reason}),
            ),
            body.clone(),
        ));
        steps += 1;
        match reason {
            None => best = Some((rate, body)),
            Some(r) => fail = Some((rate, r)),
        }
        if fleet.rec.errors.load(Ordering::Relaxed) > 0 && fail.is_some() {
            break;
        }
        let next = match (&best, &fail) {
            (_, None) if steps < ramp.max_steps => rate * ramp.factor,
            (Some((lo, _)), Some((hi, _))) if refining < ramp.refine && hi / lo > 1.04 => {
                refining += 1;
                (lo * hi).sqrt()
            }
            _ => break,
        };
        // a refinement that passes raises the floor, one that fails lowers the ceiling
        if let (Some((lo, _)), Some((hi, _))) = (&best, &fail)
            && (next <= *lo || next >= *hi)
        {
            break;
        }
        rate = next;
    }
    let summary = json!({
        "max_sustained_rate": best.as_ref().map(|b| b.0),
        "first_failing_rate": fail.as_ref().map(|f| f.0),
        "limit_reason": fail.as_ref().map(|f| f.1.clone()),
        "p99_limit_ms": ramp.p99_limit_ms,
        "at_max": best.map(|b| b.1),
    });
    out.line(merge(
        merge(header(t, "maxrate", "result"), topology_json(topo, &fleet)),
        summary,
    ));
    fleet.shutdown().await;
    Ok(())
}

/// `conns` settings.
#[derive(Debug, Clone, Copy)]
pub struct Conns {
    /// Connections to open.
    pub conns: usize,
    /// Documents they spread over.
    pub docs: usize,
    /// Wait after the last connection before the first RSS sample.
    pub settle: Duration,
    /// How long to hold the connections (idle CPU is measured over this).
    pub hold: Duration,
    /// Publish one awareness state per connection (like a provider with a user).
    pub awareness: bool,
    /// Connect from this many loopback addresses, `127.0.0.1` upwards, in turn (1: let the
    /// kernel pick). Beyond about 28,000 connections to one address a single source runs out
    /// of ephemeral ports.
    pub sources: u8,
}

/// `conns`: K idle providers; server RSS per connection.
pub async fn conns(t: &Target, c: Conns, out: &mut dyn Out) -> anyhow::Result<()> {
    let rec = Arc::new(Recorder::default());
    let rss0 = procfs::rss_sum(&t.pids);
    let cpu0 = procfs::cpu_sum(&t.pids);
    let ids = client_ids(c.conns);
    let sem = Arc::new(Semaphore::new(t.connect_concurrency.max(1)));
    let (quit_tx, quit_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<anyhow::Result<Handshake>>();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let cfg = ClientConfig {
            url: t.urls[i % t.urls.len()].clone(),
            address: format!("{}-{}", t.prefix, i % c.docs.max(1)),
            token: t.token.clone(),
            client_id: *id,
            awareness: c.awareness,
            renew_awareness: false,
            handshake_timeout: t.handshake_timeout,
            source: (c.sources > 1).then(|| {
                // i % sources < 255: 127.0.0.1 ..= 127.0.0.255
                let host = (i % usize::from(c.sources)) as u8 + 1;
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, host))
            }),
        };
        let (sem, ready, quit, rec) = (sem.clone(), ready_tx.clone(), quit_rx.clone(), rec.clone());
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await;
            let r = Client::connect(cfg).await;
            drop(permit);
            match r {
                Ok((client, hs)) => {
                    let _ = ready.send(Ok(hs));
                    client.idle(quit, rec).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        });
    }
    drop(ready_tx);
    let mut hs_lat = Latency::new();
    let mut failed = 0usize;
    let mut first_error = None;
    let mut last = Instant::now();
    for k in 0..c.conns {
        match ready_rx.recv().await {
            Some(Ok(hs)) => hs_lat.record_ns(hs.acked.saturating_sub(hs.start)),
            Some(Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            None => break,
        }
        if t.progress && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            eprintln!(
                "[{}] conns: {}/{} open, {failed} failed, server RSS {:?} KiB",
                t.label,
                k + 1,
                c.conns,
                procfs::rss_sum(&t.pids)
            );
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    sleep(c.settle).await;
    let rss1 = procfs::rss_sum(&t.pids);
    let cpu1 = procfs::cpu_sum(&t.pids);
    let bench1 = procfs::self_cpu_seconds();
    let hold_start = now_ns();
    sleep(c.hold).await;
    let hold_secs = (now_ns() - hold_start) as f64 / 1e9;
    let rss2 = procfs::rss_sum(&t.pids);
    let cpu2 = procfs::cpu_sum(&t.pids);
    let bench2 = procfs::self_cpu_seconds();
    let open = c.conns - failed;
    let per_conn = |after: Option<u64>| {
        after
            .zip(rss0)
            .filter(|_| open > 0)
            .map(|(a, b)| (a.saturating_sub(b) as f64 * 1024.0 / open as f64).round())
    };
    let bench_rss = procfs::rss_kib(std::process::id());
    let _ = quit_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    out.line(merge(
        header(t, "conns", "result"),
        json!({
            "conns": c.conns,
            "docs": c.docs,
            "open": open,
            "failed": failed,
            "first_error": first_error,
            "dropped_while_idle": rec.errors.load(Ordering::Relaxed),
            "connect_s": connect_secs,
            "connect_rate": open as f64 / connect_secs.max(1e-9),
            "handshake": hs_lat.summary(),
            "server_rss_before_kib": rss0,
            "server_rss_settled_kib": rss1,
            "server_rss_after_hold_kib": rss2,
            "rss_bytes_per_conn": per_conn(rss2),
            "rss_bytes_per_conn_settled": per_conn(rss1),
            "server_cpu_connect_s": cpu1.zip(cpu0).map(|(a, b)| a - b),
            "server_idle_cpu_cores": cpu2.zip(cpu1).map(|(a, b)| (a - b) / hold_secs),
            "bench_idle_cpu_cores": bench2.zip(bench1).map(|(a, b)| (a - b) / hold_secs),
            "bench_rss_kib": bench_rss,
        }),
    ));
    if open == 0 {
        bail!("no connection could be opened");
    }
    Ok(())
}

/// `coldload` phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Store the documents.
    Seed,
    /// Load them (run after restarting the server: the first load is cold).
    Measure,
    /// Both, without a restart in between.
    All,
}

/// `coldload` settings.
#[derive(Debug, Clone, Copy)]
pub struct ColdLoad {
    /// Which part to run.
    pub phase: Phase,
    /// Documents (one cold sample each).
    pub docs: usize,
    /// Encoded size of each document.
    pub bytes: usize,
    /// Generator seed.
    pub seed: u64,
    /// Pause between closing a client and reconnecting (lets the server unload).
    pub unload_wait: Duration,
}

/// `coldload`: time for a new client to sync a stored document.
pub async fn coldload(t: &Target, c: ColdLoad, out: &mut dyn Out) -> anyhow::Result<()> {
    let gen_start = Instant::now();
    let g = docgen::generate(c.bytes, c.seed);
    let gen_secs = gen_start.elapsed().as_secs_f64();
    let ids = client_ids(c.docs * 3 + 1);
    let mut next_id = ids.into_iter();
    let mut cfg = |d: usize| ClientConfig {
        url: t.urls[d % t.urls.len()].clone(),
        address: format!("{}-{d}", t.prefix),
        token: t.token.clone(),
        client_id: next_id.next().unwrap_or(1),
        awareness: true,
        renew_awareness: false,
        handshake_timeout: t.handshake_timeout.max(Duration::from_secs(60)),
        source: None,
    };
    if c.phase != Phase::Measure {
        let start = Instant::now();
        for d in 0..c.docs {
            let (mut client, _) = Client::connect(cfg(d)).await?;
            if !client.send_update_and_wait(&g.update).await? {
                bail!("seeding {}-{d}: update rejected", t.prefix);
            }
            client.close().await;
            if t.progress {
                eprintln!("[{}] coldload: seeded {}/{}", t.label, d + 1, c.docs);
            }
        }
        out.line(merge(
            header(t, "coldload", "seed"),
            json!({"docs": c.docs, "doc_bytes": g.update.len(), "text_len": g.text_len,
                   "edits": g.edits, "generate_s": gen_secs, "seed_s": start.elapsed().as_secs_f64()}),
        ));
        if c.phase == Phase::Seed {
            return Ok(());
        }
        // give the server time to store and unload what was just seeded
        sleep(c.unload_wait.max(Duration::from_secs(1))).await;
    }
    let rss0 = procfs::rss_sum(&t.pids);
    let mut cold = Latency::new();
    let mut warm = Latency::new();
    let mut hot = Latency::new();
    let mut cold_apply = Latency::new();
    let mut cold_samples = Vec::new();
    let mut bad = 0usize;
    let total = |hs: &Handshake| hs.step2.saturating_sub(hs.start);
    for d in 0..c.docs {
        let (first, hs) = Client::connect(cfg(d)).await.context("cold load")?;
        cold.record_ns(total(&hs));
        cold_apply.record_ns(hs.applied.saturating_sub(hs.step2));
        cold_samples.push(total(&hs) as f64 / 1e6);
        if first.text_len("content") != g.text_len as usize {
            bad += 1;
        }
        first.close().await;
        sleep(c.unload_wait).await;
        let (holder, hs) = Client::connect(cfg(d)).await.context("warm load")?;
        warm.record_ns(total(&hs));
        let (second, hs) = Client::connect(cfg(d)).await.context("hot load")?;
        hot.record_ns(total(&hs));
        if second.text_len("content") != g.text_len as usize {
            bad += 1;
        }
        second.close().await;
        holder.close().await;
        sleep(c.unload_wait).await;
        if t.progress {
            eprintln!(
                "[{}] coldload: {}/{} cold {:.1} ms",
                t.label,
                d + 1,
                c.docs,
                total(&hs) as f64 / 1e6
            );
        }
    }
    out.line(merge(
        header(t, "coldload", "result"),
        json!({
            "docs": c.docs,
            "doc_bytes": g.update.len(),
            "after_restart": c.phase == Phase::Measure,
            "cold": cold.summary(),
            "cold_samples_ms": cold_samples,
            "warm": warm.summary(),
            "hot": hot.summary(),
            "client_apply": cold_apply.summary(),
            "content_mismatches": bad,
            "server_rss_before_kib": rss0,
            "server_rss_after_kib": procfs::rss_sum(&t.pids),
        }),
    ));
    if bad > 0 {
        bail!("{bad} loads returned different content");
    }
    Ok(())
}

/// Finds each document's owner by running `cmd` with `{doc}` replaced; the output is a URL
/// index, or text contained in exactly one URL (e.g. `127.0.0.1:4001`).
pub async fn owners(t: &Target, docs: usize, cmd: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::with_capacity(docs);
    for d in 0..docs {
        let doc = format!("{}-{d}", t.prefix);
        let o = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd.replace("{doc}", &doc))
            .output()
            .await
            .with_context(|| format!("running owner command for {doc}"))?;
        if !o.status.success() {
            bail!(
                "owner command for {doc} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        out.push(parse_owner(&String::from_utf8_lossy(&o.stdout), &t.urls)?);
    }
    Ok(out)
}

/// Maps the owner command's output to a URL index.
pub fn parse_owner(text: &str, urls: &[String]) -> anyhow::Result<usize> {
    let s = text.trim();
    if let Ok(i) = s.parse::<usize>()
        && i < urls.len()
    {
        return Ok(i);
    }
    let hits: Vec<usize> = (0..urls.len())
        .filter(|i| !s.is_empty() && (urls[*i].contains(s) || s.contains(urls[*i].as_str())))
        .collect();
    match hits.as_slice() {
        [i] => Ok(*i),
        _ => bail!("owner {s:?} matches {} of the target URLs", hits.len()),
    }
}

/// Round trips of `PING` to a Redis server (the physical floor of a proxied hop).
pub async fn redis_rtt(addr: &str, n: usize) -> anyhow::Result<Latency> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to redis at {addr}"))?;
    s.set_nodelay(true)?;
    let mut h = Latency::new();
    let mut buf = [0u8; 7];
    for _ in 0..n {
        let t0 = now_ns();
        s.write_all(b"PING\r\n").await?;
        s.read_exact(&mut buf).await?;
        if &buf != b"+PONG\r\n" {
            bail!(
                "unexpected redis answer {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        h.record_ns(now_ns() - t0);
    }
    Ok(h)
}

/// `proxied`: fan-out over a cluster, latencies split by owner-local and proxied clients.
pub async fn proxied(
    t: &Target,
    mut topo: Topology,
    total_rate: f64,
    timing: Timing,
    owner_cmd: Option<&str>,
    redis: Option<&str>,
    out: &mut dyn Out,
) -> anyhow::Result<()> {
    let floor = match redis {
        Some(a) => Some(redis_rtt(a, 2000).await?.summary()),
        None => None,
    };
    // A document has no owner until a client opens it: one silent client per document, on the
    // node of the document's first fleet client, opens (and so claims) it and holds it open for
    // the whole run, so the owners asked for below are the ones the fleet meets.
    let mut pins = Vec::new();
    if owner_cmd.is_some() {
        for d in 0..topo.docs {
            let cfg = ClientConfig {
                url: t.urls[(d * topo.clients_per_doc) % t.urls.len()].clone(),
                address: format!("{}-{d}", t.prefix),
                token: t.token.clone(),
                // Yjs client ids have 53 bits; these stay clear of the random 31-bit ones
                client_id: (1 << 52) - 1 - d as u64,
                awareness: false,
                renew_awareness: false,
                handshake_timeout: t.handshake_timeout,
                source: None,
            };
            let (client, _) = Client::connect(cfg)
                .await
                .with_context(|| format!("opening {}-{d} before asking its owner", t.prefix))?;
            pins.push(client);
        }
    }
    if let Some(cmd) = owner_cmd {
        topo.owners = Some(owners(t, topo.docs, cmd).await?);
    }
    let known = topo.owners.is_some();
    if !known {
        // unknown owners: report every path as "local"
        topo.owners = None;
    }
    let mut fleet = Fleet::connect(t, &topo).await?;
    let w = fleet
        .measure(total_rate, timing.warmup, timing.duration, timing.drain)
        .await;
    let body = w.to_json(&fleet, true);
    out.line(merge(
        merge(header(t, "proxied", "result"), topology_json(&topo, &fleet)),
        merge(
            json!({
                "nodes": t.urls.len(),
                "owners_known": known,
                "owner_clients": fleet.local_clients[0],
                "proxied_clients": fleet.local_clients[1],
                "redis_rtt": floor,
            }),
            body,
        ),
    ));
    fleet.shutdown().await;
    for pin in pins {
        pin.close().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn owner_output_maps_to_urls() {
        let urls: Vec<String> = ["ws://127.0.0.1:4001/", "ws://127.0.0.1:4002/"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(parse_owner("1\n", &urls).unwrap(), 1);
        assert_eq!(parse_owner("127.0.0.1:4001", &urls).unwrap(), 0);
        assert!(parse_owner("127.0.0.1", &urls).is_err());
        assert!(parse_owner("", &urls).is_err());
    }
}
