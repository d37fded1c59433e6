//! The cluster seam: one owner per document (`hearth-lock`), client frames proxied to the owner
//! over Redis (`hearth-proxy`). The only module that imports both crates.
//!
//! * **Routing** (`Cluster::route`): a document loaded or claimed here is local; a cached
//!   route points at its owner; otherwise `SET NX` decides — the winner claims the lock (the
//!   claim becomes the document task's lease when it loads), everybody else proxies.
//! * **Edge side**: a socket whose document is owned elsewhere sends `open` and then every raw
//!   client frame for that address to the owner; `out` envelopes come back as frames for the
//!   client. Anything that breaks the link (owner gone, `not_owner`, sequence gap) closes the
//!   client's socket with 4205 so the provider reconnects through the load balancer and resyncs.
//! * **Owner side**: each `open` becomes a remote socket running the same Hocuspocus state
//!   machine as a local one (`connection::hocuspocus::serve_stand_in`), so auth, read-only, acks,
//!   awareness, stateless and close codes are identical. It lives until `detach`, the edge's
//!   silence for `proxy_socket_ttl_ms`, a gap on the link, or ownership loss.
//! * **Fencing**: the lock only routes; correctness comes from the database epoch every write
//!   carries (see `storage`).
//! * **Flow control** (`flow`): every queue between an edge and an owner is bounded per
//!   proxied client, in bytes and frames; a client that fills one is shed (closed with 1013 "Try
//!   Again Later", counted in `hearth_cluster_sessions_shed_total`), not waited for.
//!
//! | file | owns |
//! |---|---|
//! | `cluster.rs` | the [`Cluster`] handle: joining (connect), sending envelopes, shared helpers |
//! | `placement.rs` | where a document is served; claims and leases of documents served here |
//! | `edge.rs` | clients here whose document is owned elsewhere |
//! | `owner.rs` | clients of other nodes attached to documents owned here |
//! | `inbox.rs` | the dispatcher of this node's subscription |
//! | `events.rs` | custom events, here or on the owner |
//! | `lifecycle.rs` | background tasks (dispatch loop, keepalives, reaping), draining and leaving |
//! | `flow.rs` | the bounded queues between an edge and an owner |
//! | `presence.rs` | this node's key in Redis and the node-id collision check |
//! | `fingerprint.rs` | the published fingerprints of each node's cluster secrets |
//! | `metrics.rs` | the cluster's metrics |
//! | `emit.rs`, `cli.rs` | `hearth cluster emit`, `owner`, `status` |
//!
//! **Invariant:** the inbox dispatcher, the one consumer of this node's Redis subscription,
//! never awaits room in a per-document or per-client queue. It hands each envelope on with a
//! non-blocking send and sheds the client whose queue is full, so one document, one client or
//! one slow task cannot stop it; were it stopped, Redis would buffer the node's inbox up to its
//! pub/sub output limit and then disconnect it, resetting every proxied client of the node. The
//! CPU-heavy work of large updates runs off the async workers (`doc::offload`) for the same
//! reason: the dispatcher, the lock refreshes and the keepalives run there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{Builder, ClientLike};
use hearth_lock::{Acquire, HolderId, LockClient, LockGuard, LockTiming};
use hearth_proxy::{
    Body, CloseDoc, ConnId, Inbound, Incarnation, NodeAddr, NodeId, OpenMeta, ProxyError, Route,
    RouteCache, Rpc, RpcErrorCode, RpcFailure, RpcRequest, Session, Transport,
};
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::config::Config;
use crate::connection::shared::Shared;
use crate::hooks::CustomEventPayload;
use crate::outbox::{Outbox, Outgoing};
use crate::protocol::Close;

mod cli;
mod edge;
mod emit;
mod events;
mod fingerprint;
mod flow;
mod inbox;
mod lifecycle;
mod metrics;
mod owner;
mod placement;
pub(crate) use edge::ClusterPlacement;
pub(crate) use owner::TransportBurst;
pub(crate) use placement::LockOwnership;
mod presence;
mod redis;
use crate::connection::stand_in::StandInInput;
pub use cli::{describe_message, listen, live_nodes, owner_of};
pub use emit::{EMITTER_NODE_ID, emit_remote};
pub use events::EmitError;
pub(crate) use events::emit_local;
use flow::RemoteInboxRx;
use flow::{Refused, RemoteInbox, SessionLimits};
use inbox::DISPATCH_YIELD_BYTES;
pub(crate) use metrics::ClusterMetrics;
use metrics::Observer;
pub(crate) use redis::{redis_client, redis_config, redis_tls};

/// Errors of the cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis could not be reached or answered an error.
    #[error("redis: {0}")]
    Redis(String),
    /// Redis could not be reached when this process connected: `url` is `redis_url` with its
    /// password hidden.
    #[error("redis_url {url:?}: cannot connect: {cause}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// Why, in one line.
        cause: String,
    },
    /// Lock layer error.
    #[error(transparent)]
    Lock(#[from] hearth_lock::LockError),
    /// Proxy layer error.
    #[error(transparent)]
    Proxy(#[from] hearth_proxy::ProxyError),
    /// The cluster secrets cannot be read or are too weak.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A lock holder value this build cannot turn into a node address.
    #[error("unexpected lock holder {0}")]
    Holder(String),
    /// Another live process already runs with this node id (docs/cluster.md, "Node ids").
    #[error(
        "node id {node:?} is in use by a live process (incarnation {incarnation}, still \
         subscribed to its inbox); give every node its own HEARTH_NODE_ID, or stop the other \
         process first"
    )]
    NodeIdInUse {
        /// The node id.
        node: String,
        /// The incarnation holding it.
        incarnation: String,
    },
    /// This node is draining: it takes ownership of no document.
    #[error("this node is draining and takes no new documents")]
    Draining,
}

impl ClusterError {
    /// Whether the error comes from the settings (a bad URL, prefix, node id, secret or TLS
    /// file) rather than from Redis or the cluster's state: fixing the configuration, not
    /// waiting, is what helps.
    pub fn is_config(&self) -> bool {
        use hearth_lock::LockError as L;
        use hearth_proxy::ProxyError as P;
        matches!(
            self,
            ClusterError::Config(_)
                | ClusterError::Proxy(P::InvalidNodeId(_) | P::Config(_) | P::WeakSecret(_))
                | ClusterError::Lock(
                    L::InvalidTiming(_) | L::InvalidHolder(_) | L::InvalidPrefix(_)
                )
        )
    }

    /// The exit status of a `hearth cluster` subcommand that failed with this error: 64 for a
    /// configuration error, 1 for a definitive one (an unexpected value in Redis), 2 for one
    /// worth retrying (Redis unreachable or answering errors).
    pub fn exit_status(&self) -> u8 {
        match self {
            e if e.is_config() => 64,
            ClusterError::Holder(_)
            | ClusterError::Lock(hearth_lock::LockError::MalformedValue { .. }) => 1,
            _ => 2,
        }
    }
}

/// A document's home: the node that serves it.
#[derive(Debug, Clone)]
pub(crate) enum Home {
    /// This node.
    Here,
    /// Another node (this process of it).
    Node(NodeAddr),
}

/// A client of another node attached to a document here (owner side).
enum OwnerSession {
    /// Its stand-in socket runs; frames go into its queue.
    Live(RemoteInbox),
    /// Its stand-in socket ended (and told the edge) at this time: frames still on their way
    /// are dropped without another `close_doc` each. Forgotten after a lock TTL.
    Ended(Instant),
}

/// The running cluster membership of this process.
pub struct Cluster {
    me: NodeAddr,
    holder: HolderId,
    lock: LockClient,
    transport: Transport,
    rpc: Rpc,
    routes: RouteCache,
    presence: presence::Presence,
    /// This node's record of its secrets' fingerprints, refreshed with the node key.
    fingerprints: Option<(String, String)>,
    lock_ttl: Duration,
    proxy_ttl: Duration,
    event_ttl: Duration,
    claims: Mutex<HashMap<String, LockGuard>>,
    owner_sessions: Mutex<HashMap<(NodeAddr, ConnId), OwnerSession>>,
    /// Bounds of each proxied client's queues.
    limits: SessionLimits,
    edge_sessions: Mutex<HashMap<ConnId, Arc<edge::EdgeClient>>>,
    peers_seen: Mutex<HashMap<NodeAddr, Instant>>,
    /// Set by a drain: the node claims no document from then on.
    draining: std::sync::atomic::AtomicBool,
    pub(crate) metrics: ClusterMetrics,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // std Mutex: every critical section is a map operation, nothing awaits under it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn holder_addr(h: &HolderId) -> Result<NodeAddr, ClusterError> {
    let id = NodeId::new(h.node_id()).map_err(|_| ClusterError::Holder(h.to_string()))?;
    let inc =
        u64::from_str_radix(h.nonce(), 16).map_err(|_| ClusterError::Holder(h.to_string()))?;
    Ok(NodeAddr::new(id, Incarnation(inc)))
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Publishes this node's secret fingerprints and logs a warning naming the live nodes whose
/// secrets cannot talk with this node's (their envelopes and this node's would be dropped).
async fn check_secrets(
    redis: &fred::clients::Client,
    presence: &presence::Presence,
    keys: &hearth_proxy::Keys,
    me: &NodeAddr,
    secrets: &hearth_proxy::Secrets,
    record: &(String, String),
    lock_ttl: Duration,
) {
    if let Err(e) = fingerprint::publish(redis, record, ttl_ms(lock_ttl)).await {
        debug!(error = %e, "cannot publish the secret fingerprints");
    }
    let nodes = match presence.live_nodes(keys).await {
        Ok(nodes) => nodes,
        Err(e) => {
            debug!(error = %e, "cannot list the live nodes to compare secrets");
            return;
        }
    };
    match fingerprint::mismatched(redis, keys, me, &nodes, secrets).await {
        Ok(bad) if !bad.is_empty() => warn!(
            nodes = %bad.join(","),
            fingerprint = %secrets.current.fingerprint(),
            "cluster_secret does not match the live nodes' secret: these nodes and this one \
             will drop each other's envelopes (check HEARTH_CLUSTER_SECRET or \
             HEARTH_CLUSTER_SECRET_FILE, and cluster_secret_previous during a rotation)"
        ),
        Ok(_) => {}
        Err(e) => debug!(error = %e, "cannot compare secrets with the live nodes"),
    }
}

fn kind_of(body: &Body) -> &'static str {
    body.kind().tag()
}

impl Cluster {
    /// Connects to Redis, subscribes this node's inbox and registers the metrics.
    pub(crate) async fn connect(
        config: &Config,
        registry: &prometheus::Registry,
    ) -> Result<(Arc<Self>, hearth_proxy::InboundReceiver), ClusterError> {
        let node_id = NodeId::new(config.node_id.clone())?;
        let me = NodeAddr::fresh(node_id);
        let holder = HolderId::from_parts(config.node_id.clone(), me.inc.to_string())?;
        let mut tc = emit::transport_config(config, me.clone())?;
        tc.reassembly = hearth_proxy::ReassemblyLimits::new(
            config.max_proxied_frame_bytes.max(config.max_message_bytes),
        );
        if tc.auth.has_previous() {
            info!(
                "cluster secret rotation under way: envelopes signed with the previous secret \
                 are accepted too"
            );
        }
        // Redis first: its failure names redis_url and the cause
        let redis = redis_client(config).await?;
        let (transport, inbound) = Transport::connect(tc).await?;
        let metrics = ClusterMetrics::register(registry)
            .map_err(|e| ClusterError::Redis(format!("metrics: {e}")))?;
        metrics::PublishCollector::register(registry, transport.stats_handle())
            .map_err(|e| ClusterError::Redis(format!("metrics: {e}")))?;
        let lock_ttl = Duration::from_millis(config.lock_ttl_ms);
        let lock = LockClient::new(
            redis.clone(),
            config.redis_prefix.clone(),
            holder.clone(),
            LockTiming::from_ttl(lock_ttl)?,
        )?
        .with_observer(Arc::new(Observer(metrics.clone())));
        let presence = presence::Presence::register(
            redis.clone(),
            transport.keys(),
            &me,
            lock_ttl,
            config.redis_pubsub_sharded(),
        )
        .await?;
        let fingerprints = match config.cluster_secrets() {
            Ok(secrets) => {
                let record = fingerprint::record(transport.keys(), &me, &secrets);
                check_secrets(
                    &redis,
                    &presence,
                    transport.keys(),
                    &me,
                    &secrets,
                    &record,
                    lock_ttl,
                )
                .await;
                Some(record)
            }
            Err(_) => None,
        };
        let cluster = Arc::new(Cluster {
            rpc: Rpc::new(transport.clone()),
            me,
            holder,
            lock,
            transport,
            routes: RouteCache::new(100_000),
            presence,
            fingerprints,
            lock_ttl,
            proxy_ttl: Duration::from_millis(config.proxy_socket_ttl_ms),
            event_ttl: Duration::from_millis(config.custom_event_ttl_ms),
            claims: Mutex::new(HashMap::new()),
            owner_sessions: Mutex::new(HashMap::new()),
            limits: SessionLimits::from_config(config),
            edge_sessions: Mutex::new(HashMap::new()),
            peers_seen: Mutex::new(HashMap::new()),
            draining: Default::default(),
            metrics,
        });
        info!(node = %cluster.me, "joined the cluster");
        Ok((cluster, inbound))
    }

    /// Asks Redis for a `PONG` on the node's own connection: the readiness check of Redis.
    pub(crate) async fn ping_redis(&self) -> Result<(), String> {
        self.presence
            .redis()
            .ping::<fred::types::Value>(None)
            .await
            .map(drop)
            .map_err(|e| redis::cause_of(&e))
    }

    async fn refresh_node_key(&self) {
        self.presence.refresh().await;
        let Some(record) = &self.fingerprints else {
            return;
        };
        let ttl = ttl_ms(self.lock_ttl);
        if let Err(e) = fingerprint::publish(self.presence.redis(), record, ttl).await {
            debug!(error = %e, "secret fingerprint refresh failed");
        }
    }

    fn heard_from_within(&self, node: &NodeAddr, within: Duration) -> bool {
        lock_map(&self.peers_seen)
            .get(node)
            .is_some_and(|t| t.elapsed() < within)
    }

    async fn send_broadcast(&self, body: Body) {
        let kind = kind_of(&body);
        self.metrics.envelopes_out.with_label_values(&[kind]).inc();
        if let Err(e) = self.transport.broadcast(body).await {
            debug!(error = %e, kind, "broadcast failed");
        }
    }

    /// Queues an envelope to `to` without waiting (in order per destination).
    fn post(&self, to: &NodeAddr, body: Body) -> bool {
        let kind = kind_of(&body);
        self.metrics.envelopes_out.with_label_values(&[kind]).inc();
        match self.transport.start_send(to, body) {
            Ok(_) => true,
            Err(e) => {
                warn!(to = %to, error = %e, kind, "cannot queue envelope");
                false
            }
        }
    }

    /// Sends and waits for the publish. `Ok(0)` means the destination is gone (its inbox has no
    /// subscriber); an error means the publish failed and nothing is known about the
    /// destination, so callers must not treat it as gone.
    async fn send(&self, to: &NodeAddr, body: Body) -> Result<u64, ProxyError> {
        let kind = kind_of(&body);
        self.metrics.envelopes_out.with_label_values(&[kind]).inc();
        let sent = self.transport.send(to, body).await;
        if let Err(e) = &sent {
            warn!(to = %to, kind, error = %e, "publish failed");
        }
        sent
    }
}
