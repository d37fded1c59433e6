//! A private Redis Cluster for one test: 3 masters and 3 replicas (`redis-server
//! --cluster-enabled yes`, no persistence, a short `cluster-node-timeout`) on leased loopback
//! ports (client and cluster bus), created with `redis-cli --cluster create …
//! --cluster-replicas 1`. Every node has a directory of its own (`<scratch>/redis-<port>/`, its
//! `nodes.conf` there) and a log (`<scratch>/redis-<port>.log`); all are SIGKILLed on drop.
//!
//! Faults: [`RedisCluster::kill_master_of`] SIGKILLs the master serving a key's slot (its
//! replica is promoted after `cluster-node-timeout`), [`RedisCluster::failover`] runs
//! `CLUSTER FAILOVER` on a replica (a coordinated switch, no data lost). Reading:
//! [`RedisCluster::command`] follows `MOVED` redirections, [`RedisCluster::topology`] parses
//! `CLUSTER NODES`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;
use tokio::time::{Instant, sleep, timeout};

use super::redis::{RedisProcess, Resp, command_on};
use super::{Scratch, wait_until};

/// `cluster-node-timeout` of every node (ms): how long a master may be unreachable before its
/// replica is promoted.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// `$HEARTH_TEST_REDIS_CLI`, else `/usr/bin/redis-cli`.
pub fn redis_cli_bin() -> PathBuf {
    std::env::var_os("HEARTH_TEST_REDIS_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/redis-cli"))
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node's cluster id.
    pub id: String,
    /// Its client port.
    pub port: u16,
    /// A master (`false`: a replica).
    pub master: bool,
    /// Flagged `fail` (or `fail?`) by the node asked.
    pub failing: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served (masters), inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// Six `redis-server`s in cluster mode (see the module docs).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisProcess>,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster (3 masters, one replica each) and waits (≤ 30 s)
    /// until every node reports `cluster_state:ok`, every slot is served and every replica's
    /// link to its master is up.
    pub async fn start(scratch: &Scratch) -> anyhow::Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let extra = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                "nodes.conf".into(),
                "--cluster-node-timeout".into(),
                NODE_TIMEOUT_MS.to_string(),
                // a replica may be promoted however long its link was down
                "--cluster-replica-validity-factor".into(),
                "0".into(),
            ];
            nodes.push(RedisProcess::start_cluster_node(scratch, extra).await?);
        }
        let cluster = RedisCluster { nodes };
        let cli = redis_cli_bin();
        let mut cmd = Command::new(&cli);
        cmd.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port()));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = timeout(Duration::from_secs(30), cmd.output())
            .await
            .context("redis-cli --cluster create ran longer than 30 s")?
            .with_context(|| format!("running {}", cli.display()))?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_healthy(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// `redis-cluster://127.0.0.1:<p1>?node=127.0.0.1:<p2>&…` over every node.
    pub fn url(&self) -> String {
        let mut ports = self.nodes.iter().map(RedisProcess::port);
        let first = ports.next().unwrap_or_default();
        let rest: Vec<String> = ports.map(|p| format!("node=127.0.0.1:{p}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// The node processes; a killed one stays in the list, not running.
    pub fn processes(&self) -> &[RedisProcess] {
        &self.nodes
    }

    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// Runs one command on the node serving its key (the first argument after the command
    /// name), following `MOVED` redirections and retrying while the cluster is down or a node
    /// does not answer (≤ 10 s).
    pub async fn command(&self, args: &[&str]) -> anyhow::Result<Resp> {
        let raw: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut at = 0usize;
        let mut last = String::new();
        while Instant::now() < deadline {
            let port = self.nodes[at % self.nodes.len()].port();
            match command_on(port, &raw).await {
                Ok(Resp::Error(e)) if e.starts_with("MOVED ") => {
                    let target = e
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok())
                        .and_then(|p| self.index_of_port(p));
                    match target {
                        Some(i) => at = i,
                        None => bail!("MOVED to an unknown node: {e}"),
                    }
                    continue;
                }
                Ok(Resp::Error(e)) if e.starts_with("CLUSTERDOWN") || e.starts_with("TRYAGAIN") => {
                    last = e;
                }
                Ok(r) => return Ok(r),
                Err(e) => last = e.to_string(),
            }
            at += 1;
            sleep(Duration::from_millis(50)).await;
        }
        bail!("{:?}: no answer within 10 s (last: {last})", args.first())
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn keyslot(&self, key: &str) -> anyhow::Result<u16> {
        match self.command(&["CLUSTER", "KEYSLOT", key]).await? {
            Resp::Int(n) => Ok(u16::try_from(n)?),
            other => bail!("CLUSTER KEYSLOT answered {other:?}"),
        }
    }

    /// `CLUSTER NODES` as seen by the first node that answers.
    pub async fn topology(&self) -> anyhow::Result<Vec<ClusterNode>> {
        let mut last = String::new();
        for n in &self.nodes {
            match n.command(&["CLUSTER", "NODES"]).await {
                Ok(r) => match r.as_str() {
                    Some(text) => return parse_nodes(&text),
                    None => last = format!("{r:?}"),
                },
                Err(e) => last = e.to_string(),
            }
        }
        bail!("no node answered CLUSTER NODES (last: {last})")
    }

    /// The index (in [`RedisCluster::processes`]) of the master serving `slot`, as the cluster
    /// sees it now.
    pub async fn master_of_slot(&self, slot: u16) -> anyhow::Result<usize> {
        let topo = self.topology().await?;
        let node = topo
            .iter()
            .find(|n| {
                n.master && !n.failing && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .with_context(|| format!("no master serves slot {slot}: {topo:?}"))?;
        self.index_of_port(node.port)
            .with_context(|| format!("unknown port {}", node.port))
    }

    /// The index of the master serving `key`'s slot.
    pub async fn master_of(&self, key: &str) -> anyhow::Result<usize> {
        let slot = self.keyslot(key).await?;
        self.master_of_slot(slot).await
    }

    /// The index of a live replica of the master at index `master`.
    pub async fn replica_of(&self, master: usize) -> anyhow::Result<usize> {
        let topo = self.topology().await?;
        let port = self.nodes[master].port();
        let id = topo
            .iter()
            .find(|n| n.port == port)
            .map(|n| n.id.clone())
            .context("master not in the topology")?;
        let replica = topo
            .iter()
            .find(|n| !n.master && !n.failing && n.master_id.as_deref() == Some(id.as_str()))
            .with_context(|| format!("master on port {port} has no live replica"))?;
        self.index_of_port(replica.port)
            .with_context(|| format!("unknown port {}", replica.port))
    }

    /// SIGKILLs the master serving `key`'s slot; returns its index.
    pub async fn kill_master_of(&mut self, key: &str) -> anyhow::Result<usize> {
        let i = self.master_of(key).await?;
        self.nodes[i].kill();
        Ok(i)
    }

    /// `CLUSTER FAILOVER` on the replica of the master serving `key`'s slot, then waits (≤ 15 s)
    /// until that replica serves the slot; returns (old master, new master) indices.
    pub async fn failover(&self, key: &str) -> anyhow::Result<(usize, usize)> {
        let slot = self.keyslot(key).await?;
        let master = self.master_of_slot(slot).await?;
        let replica = self.replica_of(master).await?;
        let r = self.nodes[replica]
            .command(&["CLUSTER", "FAILOVER"])
            .await?;
        if r != Resp::Simple("OK".into()) {
            bail!("CLUSTER FAILOVER answered {r:?}");
        }
        let what = format!("replica {replica} serving slot {slot}");
        wait_until(&what, Duration::from_secs(15), || async move {
            // no master for the slot is a moment of the switch, not an error
            anyhow::Ok(match self.master_of_slot(slot).await {
                Ok(m) if m == replica => Ok(()),
                other => Err(format!("{other:?}")),
            })
        })
        .await?;
        Ok((master, replica))
    }

    /// Waits (≤ `limit`) until every live node says `cluster_state:ok`, every slot is served
    /// by a live master and every live replica's link to its master is up.
    pub async fn wait_healthy(&self, limit: Duration) -> anyhow::Result<()> {
        wait_until("a healthy Redis Cluster", limit, || async {
            anyhow::Ok(self.health_problem().await.map_or(Ok(()), Err))
        })
        .await
    }

    async fn health_problem(&self) -> Option<String> {
        let mut live = Vec::new();
        for n in &self.nodes {
            if n.is_running() {
                live.push(n);
            }
        }
        for n in &live {
            let info = match n.command(&["CLUSTER", "INFO"]).await {
                Ok(r) => r.as_str().unwrap_or_default(),
                Err(e) => return Some(format!("{}: {e}", n.port())),
            };
            if !info.contains("cluster_state:ok") {
                return Some(format!("{}: cluster_state not ok", n.port()));
            }
        }
        let topo = match self.topology().await {
            Ok(t) => t,
            Err(e) => return Some(e.to_string()),
        };
        let served: u32 = topo
            .iter()
            .filter(|n| n.master && !n.failing && self.is_live_port(n.port))
            .flat_map(|n| n.slots.iter())
            .map(|(a, b)| u32::from(*b) - u32::from(*a) + 1)
            .sum();
        if served != 16384 {
            return Some(format!("{served} slots served by live masters"));
        }
        for n in topo
            .iter()
            .filter(|n| !n.master && self.is_live_port(n.port))
        {
            let info = match command_on(n.port, &[b"INFO", b"replication"]).await {
                Ok(r) => r.as_str().unwrap_or_default(),
                Err(e) => return Some(format!("{}: {e}", n.port)),
            };
            if !info.contains("master_link_status:up") {
                return Some(format!("replica {} not synced", n.port));
            }
        }
        None
    }

    fn is_live_port(&self, port: u16) -> bool {
        self.index_of_port(port)
            .is_some_and(|i| self.nodes[i].is_running())
    }
}

/// Parses `CLUSTER NODES`.
fn parse_nodes(text: &str) -> anyhow::Result<Vec<ClusterNode>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            bail!("short CLUSTER NODES line {line:?}");
        }
        let addr = f[1].split(['@', ',']).next().unwrap_or_default();
        let port: u16 = addr
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("port in {line:?}"))?;
        let flags: Vec<&str> = f[2].split(',').collect();
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue; // a slot being migrated
            }
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            slots.push((a.parse()?, b.parse()?));
        }
        out.push(ClusterNode {
            id: f[0].to_string(),
            port,
            master: flags.contains(&"master"),
            failing: flags.iter().any(|x| x.starts_with("fail")),
            master_id: (f[3] != "-").then(|| f[3].to_string()),
            slots,
        });
    }
    Ok(out)
}
