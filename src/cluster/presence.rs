//! Node presence: at most one live process per node id.
//!
//! Every node keeps `<prefix>:node:<id>` = its incarnation (16 hex digits) with a time-to-live
//! of `lock_ttl`, refreshed every third of it (`hearth cluster status` lists these keys). Two
//! processes with the same id would overwrite each other's record, and operators, logs, metrics
//! and `hearth cluster owner` could no longer tell them apart, so a node registers atomically at
//! start-up:
//!
//! 1. `SET key <incarnation> NX PX ttl`: nobody holds the id — registered.
//! 2. Otherwise the key names another incarnation. It is **alive** if its inbox channel
//!    `<prefix>:inbox:<id>:<incarnation>` has a subscriber (`PUBSUB NUMSUB`): a node subscribes
//!    its inbox before it registers and keeps it subscribed until it exits. Alive → refuse to
//!    start ([`ClusterError::NodeIdInUse`]).
//! 3. No subscriber: that process is gone (after SIGKILL the kernel closes its connections at
//!    once, while its record lingers until the TTL), so take the record over with a
//!    compare-and-set on the old value; if it changed meanwhile (another process racing for the
//!    same id), start again from 1, a bounded number of times.
//!
//! A frozen process (SIGSTOP) keeps its connections, so it counts as alive; so does one whose
//! connection Redis has not noticed is dead yet. The check can be fooled the other way by a live
//! node whose subscriber is reconnecting at that very moment: then both run, and the refresh
//! below makes the old one log an error every period instead of taking the record back.
//!
//! Refresh and release are conditional on the record still being this incarnation's, so a
//! process never overwrites or deletes another's record (a missing record, after a Redis
//! restart, is re-created).
//!
//! With sharded pub/sub (`redis_pubsub`, a Redis Cluster) the subscriber count is
//! `PUBSUB SHARDNUMSUB`, asked once per channel so that each question goes to the master that
//! serves the channel's slot (only that node knows its shard's subscribers; classic
//! `PUBSUB NUMSUB` on a cluster only counts the node asked). Right after a master failover the
//! promoted replica has no subscriber on its channels until every node has re-subscribed them,
//! so a count of 0 there is evidence only once it has stayed 0 for [`CONFIRM_EXIT`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{
    ClientLike as _, KeysInterface as _, LuaInterface as _, PubsubInterface as _,
};
use fred::types::{Expiration, SetOptions, Value};
use hearth_proxy::{Incarnation, Keys, NodeAddr};
use tracing::{debug, error, info};

use super::ClusterError;

/// How many times registration retries after losing a race for the record.
const ATTEMPTS: usize = 3;

/// With sharded pub/sub, how long a channel must keep showing no subscriber before its process
/// counts as exited: longer than a node takes to re-subscribe after a master failover (its
/// reconnect backoff is at most 2 s).
pub(super) const CONFIRM_EXIT: Duration = Duration::from_secs(3);

/// How often the count is asked again while [`CONFIRM_EXIT`] runs.
const CONFIRM_STEP: Duration = Duration::from_millis(300);

/// Replace the record only if it still holds the incarnation found dead.
const TAKE_OVER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Extend the record if it is ours (or re-create it if it is gone); else return its value.
const REFRESH: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return false
end
return v
";

/// Delete the record only if it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// This process's registration under its node id.
#[derive(Debug)]
pub(super) struct Presence {
    redis: Client,
    /// Subscriber counts with `PUBSUB SHARDNUMSUB` (sharded pub/sub) instead of `NUMSUB`.
    sharded: bool,
    key: String,
    value: String,
    ttl_ms: i64,
    /// Another incarnation holds the record (logged once per change).
    superseded: AtomicBool,
}

fn redis_err(e: fred::error::Error) -> ClusterError {
    ClusterError::Redis(e.to_string())
}

impl Presence {
    /// Registers `me` under its node id, or fails with [`ClusterError::NodeIdInUse`] while
    /// another live process holds the id. Call it after this process's inbox is subscribed.
    pub(super) async fn register(
        redis: Client,
        keys: &Keys,
        me: &NodeAddr,
        ttl: Duration,
        sharded: bool,
    ) -> Result<Presence, ClusterError> {
        let presence = Presence {
            sharded,
            key: keys.node_key(&me.id),
            value: me.inc.to_string(),
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1),
            superseded: AtomicBool::new(false),
            redis,
        };
        let mut holder = String::new();
        for _ in 0..ATTEMPTS {
            let set: Option<String> = presence
                .redis
                .set(
                    &presence.key,
                    presence.value.as_str(),
                    Some(Expiration::PX(presence.ttl_ms)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .map_err(redis_err)?;
            if set.is_some() {
                return Ok(presence);
            }
            let current: Option<String> =
                presence.redis.get(&presence.key).await.map_err(redis_err)?;
            let Some(current) = current else {
                continue; // expired in between: try SET NX again
            };
            if current == presence.value {
                return Ok(presence);
            }
            if presence.is_alive(keys, me, &current).await? {
                return Err(ClusterError::NodeIdInUse {
                    node: me.id.to_string(),
                    incarnation: current,
                });
            }
            let swapped: i64 = presence
                .redis
                .eval(
                    TAKE_OVER,
                    presence.key.as_str(),
                    vec![
                        current.clone(),
                        presence.value.clone(),
                        presence.ttl_ms.to_string(),
                    ],
                )
                .await
                .map_err(redis_err)?;
            if swapped == 1 {
                info!(
                    node = %me,
                    previous = %current,
                    "took over the node id from a previous incarnation that has exited \
                     (its inbox had no subscriber)"
                );
                return Ok(presence);
            }
            holder = current;
        }
        Err(ClusterError::NodeIdInUse {
            node: me.id.to_string(),
            incarnation: if holder.is_empty() {
                "unknown (contended)".into()
            } else {
                holder
            },
        })
    }

    /// Whether the incarnation `value` of our node id has a subscriber on its inbox. A value
    /// that is not an incarnation cannot be a live node's.
    async fn is_alive(
        &self,
        keys: &Keys,
        me: &NodeAddr,
        value: &str,
    ) -> Result<bool, ClusterError> {
        let Ok(inc) = u64::from_str_radix(value, 16) else {
            debug!(key = %self.key, value, "node record is not an incarnation; replacing it");
            return Ok(false);
        };
        self.is_running(keys, &NodeAddr::new(me.id.clone(), Incarnation(inc)))
            .await
    }

    /// Whether there is evidence that the process `addr` has exited: its inbox has no
    /// subscriber while `me`'s own inbox has one. The second check guards against Redis having
    /// just restarted (every subscription is gone until the nodes resubscribe). `false` when
    /// Redis cannot be asked.
    pub(super) async fn has_exited(&self, keys: &Keys, addr: &NodeAddr, me: &NodeAddr) -> bool {
        !self
            .exited_of(keys, std::slice::from_ref(addr), me)
            .await
            .is_empty()
    }

    /// Of `addrs`, those with evidence of having exited (as [`Presence::has_exited`]), asked for
    /// all of them and `me` at once. Empty when Redis cannot be asked or `me`'s own inbox shows
    /// no subscriber. With sharded pub/sub a process counts as exited only when its inbox shows
    /// no subscriber in every check for [`CONFIRM_EXIT`] (a master failover empties a shard's
    /// subscriptions until the nodes re-subscribe).
    pub(super) async fn exited_of(
        &self,
        keys: &Keys,
        addrs: &[NodeAddr],
        me: &NodeAddr,
    ) -> Vec<NodeAddr> {
        let mut candidates = self.exited_once(keys, addrs, me).await;
        if !self.sharded || candidates.is_empty() {
            return candidates;
        }
        let deadline = tokio::time::Instant::now() + CONFIRM_EXIT;
        while !candidates.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(CONFIRM_STEP).await;
            candidates = self.exited_once(keys, &candidates, me).await;
        }
        if !candidates.is_empty() {
            debug!(
                exited = candidates.len(),
                "inboxes without a subscriber for the whole confirmation period"
            );
        }
        candidates
    }

    /// One check of [`Presence::exited_of`].
    async fn exited_once(&self, keys: &Keys, addrs: &[NodeAddr], me: &NodeAddr) -> Vec<NodeAddr> {
        if addrs.is_empty() {
            return Vec::new();
        }
        let mut channels: Vec<String> = addrs.iter().map(|a| keys.inbox(a)).collect();
        channels.push(keys.inbox(me));
        let counts = match self.subscribers(channels).await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "liveness check failed");
                return Vec::new();
            }
        };
        if counts.len() != addrs.len() + 1 || counts.last().is_none_or(|&mine| mine == 0) {
            return Vec::new();
        }
        addrs
            .iter()
            .zip(&counts)
            .filter(|(_, n)| **n == 0)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// The subscriber count of each of `channels`, in order: one `PUBSUB NUMSUB` for all of
    /// them, or with sharded pub/sub one `PUBSUB SHARDNUMSUB` per channel (each routed to the
    /// master serving its slot), asked concurrently.
    async fn subscribers(&self, channels: Vec<String>) -> Result<Vec<i64>, ClusterError> {
        // [channel, count, channel, count, …] in the order asked
        let counts = |reply: Vec<Value>| -> Vec<i64> {
            reply
                .chunks(2)
                .map(|pair| pair.get(1).and_then(Value::as_i64).unwrap_or(0))
                .collect()
        };
        if !self.sharded {
            let reply: Vec<Value> = self
                .redis
                .pubsub_numsub(channels)
                .await
                .map_err(redis_err)?;
            return Ok(counts(reply));
        }
        let asks = channels
            .into_iter()
            .map(|c| self.redis.pubsub_shardnumsub::<Vec<Value>, _>(c));
        let mut out = Vec::new();
        for reply in futures_util::future::join_all(asks).await {
            out.extend(counts(reply.map_err(redis_err)?).first().copied());
        }
        Ok(out)
    }

    /// Whether the process `addr` runs: its inbox channel has a subscriber (`PUBSUB NUMSUB`, or
    /// `SHARDNUMSUB` confirmed over [`CONFIRM_EXIT`] with sharded pub/sub). A process subscribes
    /// its inbox before it registers and keeps it subscribed until it exits, and Redis drops the
    /// subscription as soon as the process's connection closes, so `false` is evidence that it
    /// has exited. A frozen process still counts as running.
    async fn is_running(&self, keys: &Keys, addr: &NodeAddr) -> Result<bool, ClusterError> {
        let deadline = tokio::time::Instant::now() + CONFIRM_EXIT;
        loop {
            let subscribers = self
                .subscribers(vec![keys.inbox(addr)])
                .await?
                .first()
                .copied()
                .unwrap_or(0);
            if subscribers > 0 {
                return Ok(true);
            }
            if !self.sharded || tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(CONFIRM_STEP).await;
        }
    }

    /// Extends the record (every `lock_ttl/3`). Logs an error when another incarnation holds it:
    /// a second process runs with this node id.
    pub(super) async fn refresh(&self) {
        let r: Result<Option<String>, _> = self
            .redis
            .eval(
                REFRESH,
                self.key.as_str(),
                vec![self.value.clone(), self.ttl_ms.to_string()],
            )
            .await;
        match r {
            Ok(None) => {
                self.superseded.store(false, Ordering::Relaxed);
            }
            Ok(Some(other)) => {
                if !self.superseded.swap(true, Ordering::Relaxed) {
                    error!(
                        key = %self.key,
                        other,
                        "another process registered this node id; two nodes run with the \
                         same HEARTH_NODE_ID"
                    );
                }
            }
            Err(e) => debug!(error = %e, "node key refresh failed"),
        }
    }

    /// The Redis client the record is kept with.
    pub(super) fn redis(&self) -> &Client {
        &self.redis
    }

    /// Deletes the record if it is still ours (graceful shutdown).
    pub(super) async fn release(&self) {
        let r: Result<i64, _> = self
            .redis
            .eval(RELEASE, self.key.as_str(), vec![self.value.clone()])
            .await;
        if let Err(e) = r {
            debug!(error = %e, "node key release failed (it will expire)");
        }
    }
}

/// Every node record under `keys`' prefix as (node id, incarnation), sorted.
pub(super) async fn scan_nodes(
    redis: &Client,
    keys: &Keys,
) -> Result<Vec<(String, String)>, ClusterError> {
    let probe = keys.node_key(&hearth_proxy::NodeId::new("x")?);
    let prefix = probe.strip_suffix('x').unwrap_or(&probe).to_owned();
    let mut out = Vec::new();
    if redis.is_clustered() {
        // SCAN walks one node's keys: ask every master (the record keys carry no hash tag,
        // so they are spread over the cluster)
        use futures_util::StreamExt as _;
        let mut found = Vec::new();
        let mut stream =
            std::pin::pin!(redis.scan_cluster_buffered(format!("{prefix}*"), Some(500), None));
        while let Some(key) = stream.next().await {
            let key = key.map_err(redis_err)?;
            if let Some(key) = key.as_str() {
                found.push(key.to_owned());
            }
            if found.len() > 1_000_000 {
                break;
            }
        }
        for key in found {
            let inc: Option<String> = redis.get(&key).await.map_err(redis_err)?;
            if let (Some(id), Some(inc)) = (key.strip_prefix(&prefix), inc) {
                out.push((id.to_owned(), inc));
            }
        }
        out.sort();
        return Ok(out);
    }
    let mut cursor = "0".to_owned();
    for _ in 0..10_000 {
        let (next, batch): (String, Vec<String>) = redis
            .custom(
                fred::cmd!("SCAN"),
                vec![
                    cursor.clone(),
                    "MATCH".into(),
                    format!("{prefix}*"),
                    "COUNT".into(),
                    "500".into(),
                ],
            )
            .await
            .map_err(redis_err)?;
        for key in batch {
            let inc: Option<String> = redis.get(&key).await.map_err(redis_err)?;
            if let (Some(id), Some(inc)) = (key.strip_prefix(&prefix), inc) {
                out.push((id.to_owned(), inc));
            }
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    out.sort();
    Ok(out)
}

impl Presence {
    /// The live nodes' addresses (records whose incarnation parses).
    pub(super) async fn live_nodes(&self, keys: &Keys) -> Result<Vec<NodeAddr>, ClusterError> {
        let mut out = Vec::new();
        for (id, inc) in scan_nodes(&self.redis, keys).await? {
            let (Ok(id), Ok(inc)) = (hearth_proxy::NodeId::new(id), u64::from_str_radix(&inc, 16))
            else {
                continue;
            };
            out.push(NodeAddr::new(id, hearth_proxy::Incarnation(inc)));
        }
        Ok(out)
    }
}
