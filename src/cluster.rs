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
//!   machine as a local one (`connection::hocuspocus::spawn_remote`), so auth, read-only, acks,
//!   awareness, stateless and close codes are identical. It lives until `detach`, the edge's
//!   silence for `proxy_socket_ttl_ms`, a gap on the link, or ownership loss.
//! * **Fencing**: the lock only routes; correctness comes from the database epoch every write
//!   carries (see `storage`).
//! * **Flow control** (`flow`): every queue between an edge and an owner is bounded per
//!   proxied client, in bytes and frames; a client that fills one is shed (closed with 1013 "Try
//!   Again Later", counted in `hearth_cluster_sessions_shed_total`), not waited for.
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
use fred::prelude::{Builder, ClientLike, ReconnectPolicy};
use fred::types::config::Config as RedisConfig;
use hearth_lock::{Acquire, HolderId, LockClient, LockGuard, LockTiming};
use hearth_proxy::{
    Body, CloseDoc, ConnId, Inbound, Incarnation, NodeAddr, NodeId, OpenMeta, Route, RouteCache,
    Rpc, RpcErrorCode, RpcFailure, RpcRequest, Session, Transport,
};
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, warn};

use crate::config::Config;
use crate::connection::outbox::{Outbox, Outgoing};
use crate::hooks::CustomEventPayload;
use crate::protocol::Close;
use crate::shared::Shared;

mod emit;
mod flow;
mod presence;
pub use emit::{EMITTER_NODE_ID, RemoteEmitError, emit_remote};
use flow::{Refused, RemoteInbox, SessionLimits};
pub(crate) use flow::{RemoteIn, RemoteInboxRx};

/// Errors of the cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis could not be reached or answered an error.
    #[error("redis: {0}")]
    Redis(String),
    /// Lock layer error.
    #[error("lock: {0}")]
    Lock(#[from] hearth_lock::LockError),
    /// Proxy layer error.
    #[error("proxy: {0}")]
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
}

/// Where a document is served.
#[derive(Debug, Clone)]
pub(crate) enum Placement {
    /// Here.
    Local,
    /// By this process.
    Remote(NodeAddr),
}

struct EdgeSession {
    owner: NodeAddr,
    doc: String,
    outbox: Outbox,
    authenticated: Arc<AtomicBool>,
    /// The client's frames in the transport (`edge_out`, see [`flow`]).
    backlog: hearth_proxy::Backlog,
}

/// A client of another node attached to a document here (owner side).
enum OwnerSession {
    /// Its stand-in socket runs; frames go into its queue.
    Live(RemoteInbox),
    /// Its stand-in socket ended (and told the edge) at this time: frames still on their way
    /// are dropped without another `close_doc` each. Forgotten after a lock TTL.
    Ended(Instant),
}

/// Approximate bytes the inbox dispatcher handles before it lets other tasks of its worker run.
const DISPATCH_YIELD_BYTES: usize = 4 << 20;
/// What one event counts towards [`DISPATCH_YIELD_BYTES`] besides its payload.
const DISPATCH_EVENT_BYTES: usize = 1024;

/// Cluster metrics, registered into the server's registry.
#[derive(Debug, Clone)]
pub(crate) struct ClusterMetrics {
    owned: IntGauge,
    owner_sessions: IntGauge,
    edge_sessions: IntGauge,
    peers: IntGauge,
    envelopes_in: IntCounterVec,
    envelopes_out: IntCounterVec,
    rejected: IntCounterVec,
    resyncs: IntCounterVec,
    routes: IntCounterVec,
    lock_ops: IntCounterVec,
    lock_losses: IntCounterVec,
    shed: IntCounterVec,
}

impl ClusterMetrics {
    fn register(r: &prometheus::Registry) -> prometheus::Result<Self> {
        let g = |n: &str, h: &str| -> prometheus::Result<IntGauge> {
            let x = IntGauge::new(n, h)?;
            r.register(Box::new(x.clone()))?;
            Ok(x)
        };
        let c = |n: &str, h: &str, l: &[&str]| -> prometheus::Result<IntCounterVec> {
            let x = IntCounterVec::new(Opts::new(n, h), l)?;
            r.register(Box::new(x.clone()))?;
            Ok(x)
        };
        Ok(Self {
            owned: g(
                "hearth_cluster_owned_documents",
                "Documents this node holds the ownership lock for",
            )?,
            owner_sessions: g(
                "hearth_cluster_proxied_attachments",
                "Clients of other nodes attached to documents owned here",
            )?,
            edge_sessions: g(
                "hearth_cluster_remote_attachments",
                "Clients here attached to documents owned elsewhere",
            )?,
            peers: g(
                "hearth_cluster_known_peers",
                "Processes (nodes, emit callers) this node keeps link state for",
            )?,
            envelopes_in: c(
                "hearth_cluster_envelopes_in_total",
                "Envelopes received by kind",
                &["kind"],
            )?,
            envelopes_out: c(
                "hearth_cluster_envelopes_out_total",
                "Envelopes sent by kind",
                &["kind"],
            )?,
            rejected: c(
                "hearth_cluster_envelopes_rejected_total",
                "Envelopes rejected by reason",
                &["reason"],
            )?,
            resyncs: c(
                "hearth_cluster_resyncs_total",
                "Client resets forced by link problems",
                &["reason"],
            )?,
            routes: c(
                "hearth_cluster_route_lookups_total",
                "Route look-ups by outcome",
                &["outcome"],
            )?,
            lock_ops: c(
                "hearth_cluster_lock_ops_total",
                "Lock operations by op and result",
                &["op", "result"],
            )?,
            lock_losses: c(
                "hearth_cluster_lock_losses_total",
                "Ownership locks lost, by reason",
                &["reason"],
            )?,
            shed: c(
                "hearth_cluster_sessions_shed_total",
                "Proxied clients closed (1013) because one of their queues between edge and \
                 owner was full, by queue",
                &["queue"],
            )?,
        })
    }
}

struct Observer(ClusterMetrics);

impl hearth_lock::LockObserver for Observer {
    fn on_acquire(&self, _latency: Duration, outcome: hearth_lock::AcquireOutcome) {
        self.0
            .lock_ops
            .with_label_values(&["acquire", &format!("{outcome:?}").to_lowercase()])
            .inc();
    }
    fn on_refresh(&self, _latency: Duration, outcome: hearth_lock::RefreshOutcome) {
        self.0
            .lock_ops
            .with_label_values(&["refresh", &format!("{outcome:?}").to_lowercase()])
            .inc();
    }
    fn on_lost(&self, resource: &str, reason: &hearth_lock::LossReason) {
        warn!(
            doc = resource,
            reason = reason.as_str(),
            "ownership lock lost"
        );
        self.0
            .lock_losses
            .with_label_values(&[reason.as_str()])
            .inc();
    }
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
    lock_ttl: Duration,
    proxy_ttl: Duration,
    event_ttl: Duration,
    claims: Mutex<HashMap<String, LockGuard>>,
    owner_sessions: Mutex<HashMap<(NodeAddr, ConnId), OwnerSession>>,
    /// Bounds of each proxied client's queues.
    limits: SessionLimits,
    edge_sessions: Mutex<HashMap<ConnId, EdgeSession>>,
    peers_seen: Mutex<HashMap<NodeAddr, Instant>>,
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

/// A fred client with reconnects (fred does not reconnect without a policy).
pub(crate) async fn redis_client(url: &str) -> Result<fred::clients::Client, ClusterError> {
    let config = RedisConfig::from_url(url).map_err(|e| ClusterError::Redis(e.to_string()))?;
    let client = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2000, 2))
        .build()
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    client
        .init()
        .await
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    Ok(client)
}

fn holder_addr(h: &HolderId) -> Result<NodeAddr, ClusterError> {
    let id = NodeId::new(h.node_id()).map_err(|_| ClusterError::Holder(h.to_string()))?;
    let inc =
        u64::from_str_radix(h.nonce(), 16).map_err(|_| ClusterError::Holder(h.to_string()))?;
    Ok(NodeAddr::new(id, Incarnation(inc)))
}

fn kind_of(body: &Body) -> &'static str {
    match body {
        Body::Open { .. } => "open",
        Body::Frame { .. } => "frame",
        Body::Out { .. } => "out",
        Body::Detach { .. } => "detach",
        Body::CloseDoc { .. } => "close_doc",
        Body::NotOwner { .. } => "not_owner",
        Body::Released { .. } => "released",
        Body::Draining { .. } => "draining",
        Body::NodeDown { .. } => "node_down",
        Body::Rpc(_) => "rpc",
        Body::RpcReply(_) => "rpc_reply",
        Body::Keepalive { .. } => "keepalive",
        Body::Part { .. } => "part",
    }
}

/// True when `frame` (server → client) is an `Authenticated` message.
fn is_authenticated_frame(frame: &[u8]) -> bool {
    let mut r = crate::protocol::lib0::Reader::new(Bytes::copy_from_slice(frame));
    r.read_var_string().is_ok() && r.read_var_uint() == Ok(2) && r.read_var_uint() == Ok(2)
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
        let (transport, inbound) = Transport::connect(tc).await?;
        let redis = redis_client(&config.redis_url).await?;
        let metrics = ClusterMetrics::register(registry)
            .map_err(|e| ClusterError::Redis(format!("metrics: {e}")))?;
        let lock_ttl = Duration::from_millis(config.lock_ttl_ms);
        let lock = LockClient::new(
            redis.clone(),
            config.redis_prefix.clone(),
            holder.clone(),
            LockTiming::from_ttl(lock_ttl)?,
        )?
        .with_observer(Arc::new(Observer(metrics.clone())));
        let presence =
            presence::Presence::register(redis.clone(), transport.keys(), &me, lock_ttl).await?;
        let cluster = Arc::new(Cluster {
            rpc: Rpc::new(transport.clone()),
            me,
            holder,
            lock,
            transport,
            routes: RouteCache::new(100_000),
            presence,
            lock_ttl,
            proxy_ttl: Duration::from_millis(config.proxy_socket_ttl_ms),
            event_ttl: Duration::from_millis(config.custom_event_ttl_ms),
            claims: Mutex::new(HashMap::new()),
            owner_sessions: Mutex::new(HashMap::new()),
            limits: SessionLimits::from_config(config),
            edge_sessions: Mutex::new(HashMap::new()),
            peers_seen: Mutex::new(HashMap::new()),
            metrics,
        });
        info!(node = %cluster.me, "joined the cluster");
        Ok((cluster, inbound))
    }

    /// This process's cluster address.
    pub fn me(&self) -> &NodeAddr {
        &self.me
    }

    async fn refresh_node_key(&self) {
        self.presence.refresh().await;
    }

    fn heard_from_within(&self, node: &NodeAddr, within: Duration) -> bool {
        lock_map(&self.peers_seen)
            .get(node)
            .is_some_and(|t| t.elapsed() < within)
    }

    /// Decides where `doc` is served, claiming its lock when nobody holds it.
    pub(crate) async fn route(
        &self,
        shared: &Shared,
        doc: &str,
    ) -> Result<Placement, ClusterError> {
        if shared.registry.get(doc).is_some() || lock_map(&self.claims).contains_key(doc) {
            self.metrics.routes.with_label_values(&["local"]).inc();
            return Ok(Placement::Local);
        }
        if let Some(r) = self.routes.get(doc)
            && r.owner != self.me
        {
            // Trust a cached route only while the owner is heard from (owners keepalive their
            // edges); a frozen or partitioned owner's routes are re-resolved through the lock.
            if self.heard_from_within(&r.owner, self.lock_ttl) {
                self.metrics.routes.with_label_values(&["cached"]).inc();
                return Ok(Placement::Remote(r.owner));
            }
            self.routes.invalidate(doc);
        }
        match self.lock.try_acquire(doc).await? {
            Acquire::Acquired(guard) => {
                self.metrics.routes.with_label_values(&["claimed"]).inc();
                debug!(doc, "claimed ownership");
                lock_map(&self.claims).insert(doc.to_owned(), guard);
                Ok(Placement::Local)
            }
            Acquire::HeldBy(h) if h == self.holder => Ok(Placement::Local),
            Acquire::HeldBy(h) => {
                self.metrics.routes.with_label_values(&["remote"]).inc();
                let owner = holder_addr(&h)?;
                self.routes.insert(
                    doc,
                    Route {
                        owner: owner.clone(),
                        epoch: 0,
                    },
                );
                Ok(Placement::Remote(owner))
            }
        }
    }

    /// The lease for a document about to load here: the claim made by [`Cluster::route`], or a
    /// fresh acquisition. `None` when another node owns it.
    pub(crate) async fn lease_for_load(
        &self,
        doc: &str,
    ) -> Result<Option<LockGuard>, ClusterError> {
        if let Some(g) = lock_map(&self.claims).remove(doc) {
            return Ok(Some(g));
        }
        match self.lock.try_acquire(doc).await? {
            Acquire::Acquired(g) => Ok(Some(g)),
            Acquire::HeldBy(_) => Ok(None),
        }
    }

    /// Releases a claim that no document task took (e.g. the client failed to authenticate).
    pub(crate) fn drop_unused_claim(&self, shared: &Shared, doc: &str) {
        if shared.registry.get(doc).is_some() {
            return;
        }
        if let Some(g) = lock_map(&self.claims).remove(doc) {
            tokio::spawn(async move {
                let _ = g.release().await;
            });
        }
    }

    /// Called by a document task that took a lease.
    pub(crate) fn owned_inc(&self) {
        self.metrics.owned.inc();
    }

    /// Called by a stopping document task: release the lease (compare-and-delete) and tell
    /// every node to forget the route.
    pub(crate) async fn release(&self, doc: &str, epoch: i64, lease: LockGuard) {
        self.metrics.owned.dec();
        match lease.release().await {
            Ok(_) => self
                .metrics
                .lock_ops
                .with_label_values(&["release", "ok"])
                .inc(),
            Err(e) => {
                self.metrics
                    .lock_ops
                    .with_label_values(&["release", "error"])
                    .inc();
                debug!(doc, error = %e, "lock release failed (it will expire)");
            }
        }
        self.send_broadcast(Body::Released {
            doc: doc.to_owned(),
            epoch,
        })
        .await;
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

    /// Sends and waits for the publish; returns the receiver count (0 = destination gone).
    async fn send(&self, to: &NodeAddr, body: Body) -> u64 {
        let kind = kind_of(&body);
        self.metrics.envelopes_out.with_label_values(&[kind]).inc();
        self.transport.send(to, body).await.unwrap_or(0)
    }

    // === edge side ===

    /// Attaches a client address to a remote owner: registers the session and sends `open`.
    /// Returns the session, or `None` when the owner is unreachable (route invalidated).
    pub(crate) async fn open_remote(
        &self,
        owner: &NodeAddr,
        doc: &str,
        meta: OpenMeta,
        outbox: Outbox,
        authenticated: Arc<AtomicBool>,
    ) -> Option<Session> {
        let session = Session {
            conn: ConnId::generate(),
            doc: doc.to_owned(),
            epoch: 0,
        };
        lock_map(&self.edge_sessions).insert(
            session.conn,
            EdgeSession {
                owner: owner.clone(),
                doc: doc.to_owned(),
                outbox,
                authenticated,
                backlog: hearth_proxy::Backlog::new(),
            },
        );
        self.metrics.edge_sessions.inc();
        if self
            .send(
                owner,
                Body::Open {
                    session: session.clone(),
                    meta,
                },
            )
            .await
            == 0
        {
            warn!(doc, owner = %owner, "owner unreachable; forgetting the route");
            self.routes.invalidate(doc);
            self.forget_edge(&session.conn);
            return None;
        }
        Some(session)
    }

    /// Forwards a raw client frame to the owner, charging it to the client's `edge_out` queue
    /// (see [`flow`]). True when the frame was handed on, or dropped because the client is
    /// being closed already: a client that has its limit of frames waiting there is shed (its
    /// socket gets a close with [`Close::TryAgainLater`], the owner a `detach`), and a client whose session
    /// was reset has a close queued. False when the transport refused the frame: the caller
    /// closes the socket.
    pub(crate) fn forward(&self, owner: &NodeAddr, session: &Session, frame: Bytes) -> bool {
        let backlog = {
            let mut map = lock_map(&self.edge_sessions);
            let Some(s) = map.get(&session.conn) else {
                return true;
            };
            if !self.limits.full(s.backlog.bytes(), s.backlog.envelopes()) {
                s.backlog.clone()
            } else {
                let queued = (s.backlog.bytes(), s.backlog.envelopes());
                let shed = map.remove(&session.conn);
                drop(map);
                if let Some(shed) = shed {
                    self.shed_edge_session(owner, session, shed, queued);
                }
                return true;
            }
        };
        let body = Body::Frame {
            session: session.clone(),
            data: frame.to_vec(),
        };
        match self.transport.start_send_counted(owner, body, &backlog) {
            Ok(_) => {
                self.metrics
                    .envelopes_out
                    .with_label_values(&["frame"])
                    .inc();
                true
            }
            Err(e) => {
                warn!(to = %owner, doc = %session.doc, error = %e, kind = "frame", "cannot queue envelope");
                false
            }
        }
    }

    /// A client here filled its `edge_out` queue: close it with [`Close::TryAgainLater`] and detach it
    /// from the owner.
    fn shed_edge_session(
        &self,
        owner: &NodeAddr,
        session: &Session,
        shed: EdgeSession,
        (bytes, frames): (usize, usize),
    ) {
        self.metrics.edge_sessions.dec();
        self.metrics.shed.with_label_values(&["edge_out"]).inc();
        warn!(
            node = %self.me,
            doc = %session.doc,
            owner = %owner,
            queued_bytes = bytes,
            queued_frames = frames,
            "client sends faster than its frames reach the owner; shedding it"
        );
        shed.outbox
            .control(Outgoing::CloseSocket(Close::TryAgainLater));
        self.post(
            owner,
            Body::Detach {
                session: session.clone(),
                reason: "shed".into(),
            },
        );
    }

    /// The client left: tell the owner and forget the session.
    pub(crate) fn detach_remote(&self, owner: &NodeAddr, session: &Session) {
        if self.forget_edge(&session.conn) {
            self.post(
                owner,
                Body::Detach {
                    session: session.clone(),
                    reason: "client gone".into(),
                },
            );
        }
    }

    fn forget_edge(&self, conn: &ConnId) -> bool {
        let removed = lock_map(&self.edge_sessions).remove(conn).is_some();
        if removed {
            self.metrics.edge_sessions.dec();
        }
        removed
    }

    /// Resets (closes with 4205) every client here attached to a document owned by `owner`.
    fn reset_edges_of(&self, owner: Option<&NodeAddr>, reason: &str) {
        let victims: Vec<EdgeSession> = {
            let mut map = lock_map(&self.edge_sessions);
            let keys: Vec<ConnId> = map
                .iter()
                .filter(|(_, s)| owner.is_none_or(|o| &s.owner == o))
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        for s in victims {
            self.metrics.edge_sessions.dec();
            self.metrics.resyncs.with_label_values(&[reason]).inc();
            self.routes.invalidate(&s.doc);
            s.outbox
                .control(Outgoing::CloseSocket(Close::ResetConnection));
        }
    }

    // === owner side ===

    /// A client of `from` opens a document here. The session is registered at once, so the
    /// frames that follow the open queue behind it; whether this node owns the document (a
    /// Redis round trip away, or a claim) is decided in a task of its own, so one client's open
    /// never holds up the envelopes of every other session on the inbox.
    fn on_open(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        from: NodeAddr,
        session: Session,
        meta: OpenMeta,
    ) {
        let (tx, rx) = flow::remote_inbox(self.limits);
        if !matches!(
            lock_map(&self.owner_sessions)
                .insert((from.clone(), session.conn), OwnerSession::Live(tx)),
            Some(OwnerSession::Live(_))
        ) {
            self.metrics.owner_sessions.inc();
        }
        let (me, shared) = (self.clone(), shared.clone());
        tokio::spawn(
            async move {
                let owns = match me.route(&shared, &session.doc).await {
                    Ok(Placement::Local) => true,
                    Ok(Placement::Remote(_)) | Err(_) => false,
                };
                if !owns || shared.draining.load(Ordering::Acquire) {
                    debug!(doc = %session.doc, edge = %from, "refusing open: not the owner");
                    // the edge is told below: the client's frames on their way are dropped
                    me.remote_ended(&from, session.conn, true);
                    me.post(
                        &from,
                        Body::NotOwner {
                            session,
                            holder: None,
                        },
                    );
                    return;
                }
                crate::connection::hocuspocus::spawn_remote(shared, me, from, session, meta, rx);
            }
            .in_current_span(),
        );
    }

    /// True while a remote client's `owner_out` queue (`backlog`, see [`flow`]) is full: its
    /// stand-in socket sends nothing more until Redis has taken some of it.
    pub(crate) fn out_full(&self, backlog: &hearth_proxy::Backlog) -> bool {
        self.limits.full(backlog.bytes(), backlog.envelopes())
    }

    /// Resolves once a remote client's `owner_out` queue has room again.
    pub(crate) async fn out_room(&self, backlog: &hearth_proxy::Backlog) {
        backlog.below(self.limits.bytes, self.limits.frames).await;
    }

    /// Sends a frame to a remote client (owner side), charged to its `owner_out` queue. A frame
    /// never goes missing while the client stays: when it cannot be queued, the error is the
    /// close the client's stand-in socket must end with. A frame beyond
    /// `max_proxied_frame_bytes` cannot cross: the client is reset (it may reconnect to this
    /// node directly).
    pub(crate) fn send_out(
        &self,
        edge: &NodeAddr,
        session: &Session,
        backlog: &hearth_proxy::Backlog,
        frame: &Bytes,
    ) -> Result<(), Close> {
        let body = Body::Out {
            session: session.clone(),
            data: frame.to_vec(),
        };
        match self.transport.start_send_counted(edge, body, backlog) {
            Ok(_) => {
                self.metrics.envelopes_out.with_label_values(&["out"]).inc();
                Ok(())
            }
            Err(hearth_proxy::ProxyError::FrameTooLarge { size, max }) => {
                warn!(
                    edge = %edge,
                    doc = %session.doc,
                    size,
                    max,
                    "frame for a client on another node exceeds max_proxied_frame_bytes; \
                     resetting the client"
                );
                self.metrics
                    .resyncs
                    .with_label_values(&["frame_too_large"])
                    .inc();
                Err(Close::ResetConnection)
            }
            Err(hearth_proxy::ProxyError::Clogged) => {
                warn!(node = %self.me, to = %edge, doc = %session.doc, kind = "out", "outbound envelope queue is full; shedding the client");
                self.metrics.shed.with_label_values(&["owner_out"]).inc();
                Err(Close::TryAgainLater)
            }
            Err(e) => {
                warn!(to = %edge, doc = %session.doc, error = %e, kind = "out", "cannot queue envelope; resetting the client");
                Err(Close::ResetConnection)
            }
        }
    }

    /// Ends a remote client's session with a close (owner side).
    pub(crate) fn close_remote(&self, edge: &NodeAddr, session: &Session, how: Close) {
        self.post(
            edge,
            Body::CloseDoc {
                session: session.clone(),
                close: CloseDoc {
                    code: how.code(),
                    reason: how.reason().to_owned(),
                    resync: true,
                },
            },
        );
    }

    /// A remote socket task ended. `told_edge`: it sent the edge a `close_doc`, so frames of
    /// the client still on their way are dropped quietly for a while.
    pub(crate) fn remote_ended(&self, edge: &NodeAddr, conn: ConnId, told_edge: bool) {
        let key = (edge.clone(), conn);
        let mut map = lock_map(&self.owner_sessions);
        let was_live = matches!(map.get(&key), Some(OwnerSession::Live(_)));
        if told_edge {
            map.insert(key, OwnerSession::Ended(Instant::now()));
        } else if was_live {
            map.remove(&key);
        }
        drop(map);
        if was_live {
            self.metrics.owner_sessions.dec();
        }
    }

    /// The queue of a live remote client's stand-in socket.
    fn owner_inbox(&self, edge: &NodeAddr, conn: ConnId) -> Option<RemoteInbox> {
        match lock_map(&self.owner_sessions).get(&(edge.clone(), conn)) {
            Some(OwnerSession::Live(tx)) => Some(tx.clone()),
            _ => None,
        }
    }

    /// A remote client filled its `owner_in` queue: shed it. Its stand-in socket ends with
    /// [`Close::TryAgainLater`] and tells the edge; frames of it still arriving are dropped quietly.
    fn shed_owner_session(&self, edge: &NodeAddr, session: &Session, inbox: &RemoteInbox) {
        self.metrics.shed.with_label_values(&["owner_in"]).inc();
        warn!(
            node = %self.me,
            doc = %session.doc,
            edge = %edge,
            "client of another node sends faster than its document takes it; shedding it"
        );
        inbox.control(RemoteIn::Shed);
        self.remote_ended(edge, session.conn, true);
    }

    fn reset_owner_sessions_of(&self, edge: Option<&NodeAddr>, reason: &str) {
        let victims: Vec<RemoteInbox> = lock_map(&self.owner_sessions)
            .iter()
            .filter(|((e, _), _)| edge.is_none_or(|x| e == x))
            .filter_map(|(_, s)| match s {
                OwnerSession::Live(tx) => Some(tx.clone()),
                OwnerSession::Ended(_) => None,
            })
            .collect();
        for tx in victims {
            self.metrics.resyncs.with_label_values(&[reason]).inc();
            tx.control(RemoteIn::Reset);
        }
    }

    /// Resets the one proxied client of `session` on the link with `peer`: here at the edge
    /// (close 4205), or its attachment here at the owner (ends with 4205). False when it is
    /// already gone.
    fn reset_session(&self, peer: &NodeAddr, session: &Session, reason: &str) -> bool {
        let edge = {
            let mut map = lock_map(&self.edge_sessions);
            if map.get(&session.conn).is_some_and(|s| &s.owner == peer) {
                map.remove(&session.conn)
            } else {
                None
            }
        };
        if let Some(s) = edge {
            self.metrics.edge_sessions.dec();
            self.metrics.resyncs.with_label_values(&[reason]).inc();
            s.outbox
                .control(Outgoing::CloseSocket(Close::ResetConnection));
            return true;
        }
        match self.owner_inbox(peer, session.conn) {
            Some(tx) if tx.control(RemoteIn::Reset) => {
                self.metrics.resyncs.with_label_values(&[reason]).inc();
                true
            }
            _ => false,
        }
    }

    // === custom events ===

    async fn on_rpc(self: Arc<Self>, shared: Arc<Shared>, from: NodeAddr, req: RpcRequest) {
        let owned = shared.registry.get(&req.doc).is_some()
            || lock_map(&self.claims).contains_key(&req.doc);
        let result = if !owned && req.only_if_open {
            Err(RpcFailure {
                code: RpcErrorCode::NotOwner,
                msg: "document not open here".into(),
                holder: None,
            })
        } else {
            match self.route(&shared, &req.doc).await {
                Ok(Placement::Local) => run_event(&shared, &req.doc, &req.name, &req.payload).await,
                _ => Err(RpcFailure {
                    code: RpcErrorCode::NotOwner,
                    msg: "not the owner".into(),
                    holder: None,
                }),
            }
        };
        self.drop_unused_claim(&shared, &req.doc);
        if let Err(e) = self.rpc.reply(&from, &req, result).await {
            debug!(error = %e, "custom event reply failed");
        }
    }

    /// Runs a custom event on the owner of `doc` (here or remotely).
    pub(crate) async fn emit(
        &self,
        shared: &Arc<Shared>,
        doc: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, EmitError> {
        let mut last = EmitError::Unavailable("ownership kept moving".into());
        for _ in 0..2 {
            match self
                .route(shared, doc)
                .await
                .map_err(|e| EmitError::Unavailable(e.to_string()))?
            {
                Placement::Local => {
                    let r = run_event(shared, doc, name, &payload)
                        .await
                        .map_err(EmitError::from_failure);
                    self.drop_unused_claim(shared, doc);
                    return r;
                }
                Placement::Remote(owner) => {
                    let r = self
                        .rpc
                        .call(&owner, doc, name, payload.clone(), self.event_ttl)
                        .await;
                    match emit::settle(r, &owner) {
                        std::ops::ControlFlow::Break(r) => return r,
                        std::ops::ControlFlow::Continue(why) => {
                            self.routes.invalidate(doc);
                            last = why;
                        }
                    }
                }
            }
        }
        Err(last)
    }

    // === background ===

    /// Starts the inbound dispatcher and the keepalive/reaper loop.
    pub(crate) fn spawn_tasks(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        mut inbound: hearth_proxy::InboundReceiver,
    ) {
        let (me, sh) = (self.clone(), shared.clone());
        tokio::spawn(async move {
            // The dispatcher never waits on a queue (module docs); it only lets the other tasks
            // of its worker run now and then, however fast envelopes arrive.
            let mut since_yield = 0;
            while let Some(ev) = inbound.recv().await {
                since_yield += me.dispatch(&sh, ev);
                if since_yield >= DISPATCH_YIELD_BYTES {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
            }
        });
        let (me, sh) = (self.clone(), Arc::downgrade(shared));
        tokio::spawn(async move {
            let period = (me.lock_ttl.min(me.proxy_ttl) / 3).max(Duration::from_millis(100));
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(shared) = sh.upgrade() else { break };
                if shared.shutdown.is_cancelled() {
                    break;
                }
                me.housekeeping().await;
            }
        });
    }

    /// Distinct owners of the documents this node's clients are proxied to.
    fn owners_of_edge_sessions(&self) -> Vec<NodeAddr> {
        let mut v: Vec<NodeAddr> = lock_map(&self.edge_sessions)
            .values()
            .map(|s| s.owner.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Distinct edges whose clients are attached to documents owned here.
    fn edges_of_owner_sessions(&self) -> Vec<NodeAddr> {
        let mut v: Vec<NodeAddr> = lock_map(&self.owner_sessions)
            .iter()
            .filter(|(_, s)| matches!(s, OwnerSession::Live(_)))
            .map(|((e, _), _)| e.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Forgets ended remote clients after a lock TTL: by then no frame of theirs is on its way
    /// (a later one is answered with a `close_doc` of its own).
    fn forget_ended_owner_sessions(&self) {
        let ttl = self.lock_ttl;
        lock_map(&self.owner_sessions).retain(|_, s| match s {
            OwnerSession::Live(_) => true,
            OwnerSession::Ended(at) => at.elapsed() < ttl,
        });
    }

    async fn housekeeping(&self) {
        self.refresh_node_key().await;
        self.forget_ended_owner_sessions();
        for owner in self.owners_of_edge_sessions() {
            // edge → owner keepalive: no receiver means the owner is gone
            if self.send(&owner, Body::Keepalive { session: None }).await == 0 {
                warn!(owner = %owner, "owner unreachable; resetting its clients here");
                self.routes.invalidate_node(&owner);
                self.reset_edges_of(Some(&owner), "owner_gone");
            } else if !self.heard_from_within(&owner, self.lock_ttl) {
                // an owner silent for longer than its lock could live (frozen, partitioned) no
                // longer owns anything it had; reset its clients here so they re-route
                warn!(owner = %owner, "owner silent for longer than the lock TTL; resetting its clients here");
                self.routes.invalidate_node(&owner);
                self.reset_edges_of(Some(&owner), "owner_silent");
            }
        }
        self.forget_dead_peers();
        let now = Instant::now();
        for edge in self.edges_of_owner_sessions() {
            // owner → edge keepalive, so edges can tell a live owner from a frozen one
            self.post(&edge, Body::Keepalive { session: None });
            let seen = lock_map(&self.peers_seen).get(&edge).copied();
            if seen.is_none_or(|t| now.duration_since(t) > self.proxy_ttl) {
                info!(edge = %edge, "edge silent past proxy_socket_ttl; dropping its attachments");
                self.reset_owner_sessions_of(Some(&edge), "edge_silent");
            }
        }
    }

    /// Drops the per-peer state (`peers_seen`, the transport's sequence and reassembly maps) of
    /// peers that can never send again, so it does not accumulate:
    ///
    /// * a `hearth cluster emit` caller (a fresh identity per run) silent for twice the custom
    ///   event TTL: it gave up waiting for its reply long ago;
    /// * an earlier incarnation of a node we have heard from since under a newer one, silent
    ///   for longer than a lock TTL (a node id runs in one process at a time: the collision
    ///   check).
    ///
    /// A live peer is never forgotten: its next envelope would restart the link's numbering.
    fn forget_dead_peers(&self) {
        let dead: Vec<NodeAddr> = {
            let mut seen = lock_map(&self.peers_seen);
            let latest: HashMap<NodeId, (Incarnation, Instant)> =
                seen.iter().fold(HashMap::new(), |mut m, (addr, t)| {
                    let e = m.entry(addr.id.clone()).or_insert((addr.inc, *t));
                    if *t > e.1 {
                        *e = (addr.inc, *t);
                    }
                    m
                });
            let dead: Vec<NodeAddr> = seen
                .iter()
                .filter(|(addr, t)| {
                    let silent = t.elapsed();
                    if addr.id.as_str() == EMITTER_NODE_ID {
                        silent > 2 * self.event_ttl
                    } else {
                        silent > self.lock_ttl
                            && latest.get(&addr.id).is_some_and(|l| l.0 != addr.inc)
                    }
                })
                .map(|(addr, _)| addr.clone())
                .collect();
            for addr in &dead {
                seen.remove(addr);
            }
            self.metrics.peers.set(seen.len() as i64);
            dead
        };
        for addr in dead {
            debug!(peer = %addr, "forgetting a peer that cannot send again");
            self.transport.forget_peer(&addr);
        }
    }

    /// Handles one inbound event. Never waits (the module's invariant): it is the only consumer
    /// of the node's subscription. Returns roughly how many bytes it handled.
    fn dispatch(self: &Arc<Self>, shared: &Arc<Shared>, ev: Inbound) -> usize {
        let mut weight = DISPATCH_EVENT_BYTES;
        match ev {
            Inbound::Envelope(env) => {
                if let Body::Frame { data, .. } | Body::Out { data, .. } = &env.body {
                    weight += data.len();
                }
                let from = env.header.from.clone();
                self.metrics
                    .envelopes_in
                    .with_label_values(&[kind_of(&env.body)])
                    .inc();
                if lock_map(&self.peers_seen)
                    .insert(from.clone(), Instant::now())
                    .is_none()
                {
                    self.metrics.peers.inc();
                }
                match env.body {
                    Body::Open { session, meta } => self.on_open(shared, from, session, meta),
                    Body::Frame { session, data } => {
                        let key = (from.clone(), session.conn);
                        let inbox = match lock_map(&self.owner_sessions).get(&key) {
                            Some(OwnerSession::Live(tx)) => Some(Some(tx.clone())),
                            Some(OwnerSession::Ended(_)) => Some(None),
                            None => None,
                        };
                        match inbox {
                            // never waits: a client whose queue is full is shed
                            Some(Some(tx)) => match tx.frame(data) {
                                Ok(()) | Err(Refused::Gone) => {}
                                Err(Refused::Full) => self.shed_owner_session(&from, &session, &tx),
                            },
                            // ended, and the edge was told
                            Some(None) => {}
                            None => self.close_remote(&from, &session, Close::ResetConnection),
                        }
                    }
                    Body::Detach { session, .. } => {
                        let key = (from, session.conn);
                        let mut map = lock_map(&self.owner_sessions);
                        match map.get(&key) {
                            Some(OwnerSession::Live(tx)) => {
                                tx.control(RemoteIn::Detach);
                            }
                            Some(OwnerSession::Ended(_)) => {
                                map.remove(&key);
                            }
                            None => {}
                        }
                    }
                    Body::Out { session, data } => {
                        let map = lock_map(&self.edge_sessions);
                        if let Some(s) = map.get(&session.conn) {
                            if is_authenticated_frame(&data) {
                                s.authenticated.store(true, Ordering::Release);
                            }
                            s.outbox.send(Bytes::from(data));
                        }
                    }
                    Body::CloseDoc { session, close } => {
                        let s = lock_map(&self.edge_sessions).remove(&session.conn);
                        if let Some(s) = s {
                            self.metrics.edge_sessions.dec();
                            s.outbox.control(Outgoing::CloseSocket(Close::from_wire(
                                close.code,
                                &close.reason,
                            )));
                        }
                    }
                    Body::NotOwner { session, .. } => {
                        self.routes.invalidate(&session.doc);
                        let s = lock_map(&self.edge_sessions).remove(&session.conn);
                        if let Some(s) = s {
                            self.metrics.edge_sessions.dec();
                            self.metrics.resyncs.with_label_values(&["not_owner"]).inc();
                            s.outbox
                                .control(Outgoing::CloseSocket(Close::ResetConnection));
                        }
                    }
                    Body::Released { doc, .. } => {
                        self.routes.invalidate(&doc);
                    }
                    Body::Draining { node } | Body::NodeDown { node } => {
                        self.routes.invalidate_node(&node);
                    }
                    Body::Rpc(req) => {
                        tokio::spawn(self.clone().on_rpc(shared.clone(), from, req));
                    }
                    Body::RpcReply(reply) => {
                        self.rpc.on_reply(reply);
                    }
                    // the transport reassembles parts; it never delivers one
                    Body::Keepalive { .. } | Body::Part { .. } => {}
                }
            }
            Inbound::FrameDropped {
                from,
                session,
                reason,
            } => {
                if self.reset_session(&from, &session, reason.as_str()) {
                    warn!(
                        from = %from,
                        doc = %session.doc,
                        reason = reason.as_str(),
                        "a frame sent in parts was dropped before it was complete; resetting its client"
                    );
                } else {
                    debug!(from = %from, reason = reason.as_str(), "dropped part of a frame for a session already gone");
                }
            }
            Inbound::Gap { from, .. } => {
                warn!(from = %from, "envelopes lost on the link; resetting affected clients");
                self.reset_edges_of(Some(&from), "gap");
                self.reset_owner_sessions_of(Some(&from), "gap");
            }
            Inbound::Lagged { missed } => {
                warn!(
                    missed,
                    "inbound envelopes dropped; resetting every proxied client"
                );
                self.reset_edges_of(None, "lagged");
                self.reset_owner_sessions_of(None, "lagged");
            }
            Inbound::Resubscribed => {
                warn!("resubscribed after a Redis reconnect; resetting every proxied client");
                self.reset_edges_of(None, "resubscribed");
                self.reset_owner_sessions_of(None, "resubscribed");
            }
            Inbound::OutOfOrder { .. } => {
                self.metrics
                    .rejected
                    .with_label_values(&["out_of_order"])
                    .inc();
            }
            Inbound::Rejected { reason, detail } => {
                debug!(reason = reason.as_str(), %detail, "envelope rejected");
                self.metrics
                    .rejected
                    .with_label_values(&[reason.as_str()])
                    .inc();
            }
        }
        weight
    }

    /// Graceful leave: tell peers, reset proxied clients, stop the node key.
    pub(crate) async fn drain(&self) {
        self.send_broadcast(Body::Draining {
            node: self.me.clone(),
        })
        .await;
    }

    /// Final step of a shutdown: release unused claims, remove the node key, close Redis links.
    pub(crate) async fn leave(&self) {
        let claims: Vec<LockGuard> = lock_map(&self.claims).drain().map(|(_, g)| g).collect();
        for g in claims {
            let _ = g.release().await;
        }
        self.presence.release().await;
        self.transport.shutdown().await;
    }
}

/// Runs `on_custom_event` hooks locally.
async fn run_event(
    shared: &Shared,
    doc: &str,
    name: &str,
    payload: &[u8],
) -> Result<Vec<u8>, RpcFailure> {
    let p = CustomEventPayload {
        document_name: doc,
        name,
        payload,
    };
    match shared.extensions.on_custom_event(&p).await {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(RpcFailure {
            code: RpcErrorCode::NoHandler,
            msg: format!("no handler for {name}"),
            holder: None,
        }),
        Err(e) => Err(RpcFailure {
            code: RpcErrorCode::HandlerError,
            msg: e.reason,
            holder: None,
        }),
    }
}

/// Why a custom event failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EmitError {
    /// No extension handles this event name.
    #[error("no handler for this event")]
    NoHandler,
    /// The handler rejected.
    #[error("handler failed: {0}")]
    Handler(String),
    /// The owner did not answer within `custom_event_ttl_ms`.
    #[error("timed out waiting for the owner")]
    Timeout,
    /// Redis or the owner could not be reached.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}

impl EmitError {
    fn from_failure(f: RpcFailure) -> Self {
        match f.code {
            RpcErrorCode::NoHandler => EmitError::NoHandler,
            RpcErrorCode::HandlerError => EmitError::Handler(f.msg),
            other => EmitError::Unavailable(format!("{other:?}: {}", f.msg)),
        }
    }
}

/// Runs a custom event where no cluster is configured.
pub(crate) async fn emit_local(
    shared: &Shared,
    doc: &str,
    name: &str,
    payload: &[u8],
) -> Result<Vec<u8>, EmitError> {
    run_event(shared, doc, name, payload)
        .await
        .map_err(EmitError::from_failure)
}

/// `hearth cluster owner DOC`: the owning node's id, if any.
pub async fn owner_of(config: &Config, doc: &str) -> Result<Option<String>, ClusterError> {
    let lock = emit::reader_lock(config, redis_client(&config.redis_url).await?)?;
    Ok(lock.holder(doc).await?.map(|h| h.node_id().to_owned()))
}

/// `hearth cluster status`: live nodes as (node id, incarnation).
pub async fn live_nodes(config: &Config) -> Result<Vec<(String, String)>, ClusterError> {
    use fred::interfaces::KeysInterface as _;
    let redis = redis_client(&config.redis_url).await?;
    let keys = hearth_proxy::Keys::new(config.redis_prefix.clone())?;
    let probe = keys.node_key(&NodeId::new("x")?);
    let prefix = probe.strip_suffix('x').unwrap_or(&probe).to_owned();
    let mut cursor = "0".to_owned();
    let mut out = Vec::new();
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
            .map_err(|e| ClusterError::Redis(e.to_string()))?;
        for key in batch {
            let inc: Option<String> = redis
                .get(&key)
                .await
                .map_err(|e| ClusterError::Redis(e.to_string()))?;
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
