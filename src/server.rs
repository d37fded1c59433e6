//! [`Server`]: binds, accepts, and shuts down in order. [`ServerHandle`]: the server-side API
//! (direct connections, closing connections, shutdown).
//!
//! Shutdown order (SIGTERM/SIGINT or [`ServerHandle::shutdown`]): stop accepting and report
//! not-ready → every socket sends `CLOSE("Reset Connection")` for each document and closes with
//! 4205 so providers reconnect → every document commits and compacts → `on_destroy` → return.
//! The operator listener (`operator_listen`) keeps answering until then.
//!
//! Every accepted client-port connection is counted against the connection caps
//! (`limits`) until it closes, and must send a complete request header within
//! `http_header_timeout_ms` of opening (and of each response on a keep-alive connection).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admin::{DocumentEntry, DocumentPage, DrainError};
use crate::auth::StaticTokens;
use crate::client_ip::TrustedProxies;
use crate::cluster::{Cluster, ClusterPlacement, EmitError, LockOwnership, TransportBurst};
use crate::config::Config;
use crate::connection::placement::Placement;
use crate::connection::shared::Shared;
use crate::doc::committer::Committer;
use crate::doc::direct::DirectConnection;
use crate::doc::ownership::Ownership;
use crate::doc::registry::Registry;
use crate::doc::services::{Burst, DocServices};
use crate::doc::{DocCommand, LoadError};
use crate::events::NodeStatus;
use crate::health::{Probe, Readiness};
use crate::hooks::{Context, Extension, Extensions};
use crate::limits::{ConnectionLimits, ConnectionSlot, IpAdmission};
use crate::metrics::Metrics;
use crate::revoke::{Revocation, RevokeError, RevokeReport};
use crate::storage::{self, DocumentStore};
use crate::tokens::TokenTable;
use crate::webhook::auth::WebhookAuth;
use crate::webhook::events::EventWebhooks;

/// How long a shutting-down node tries to release its cluster locks and presence.
const LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Most connections the operator listener serves at once; more are closed when accepted.
const OPERATOR_MAX_CONNECTIONS: usize = 64;
/// Errors starting or running the server. Each variant either says what failed and returns the
/// cause from `source()`, or is transparent, never both (`{:#}` would print the cause twice).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The operator listener (`operator_listen`) could not be bound.
    #[error("cannot listen on {addr} (operator_listen; empty disables it)")]
    OperatorBind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The admin listener (`admin_listen`) could not be bound.
    #[error("cannot listen on {addr} (admin_listen)")]
    AdminBind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Storage could not be opened: `url` is `database_url` with its password hidden.
    #[error("database_url {url:?}")]
    Storage {
        /// The URL, password redacted.
        url: String,
        /// Cause.
        source: storage::StoreError,
    },
    /// An extension refused `on_configure` / `on_listen`.
    #[error("extension refused to start: {0}")]
    Extension(String),
    /// Metrics registration failed.
    #[error("metrics")]
    Metrics(#[from] prometheus::Error),
    /// The cluster (Redis) could not be joined.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Collects configuration, extensions and storage before binding.
pub struct ServerBuilder {
    config: Config,
    extensions: Vec<Arc<dyn Extension>>,
    store: Option<Arc<dyn DocumentStore>>,
    weak: WeakServer,
    /// Handler names that collide with built-in events (refused by `bind`).
    reserved: Vec<String>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Adds an extension (ordered by its priority).
    pub fn extension(mut self, e: impl Extension) -> Self {
        self.extensions.push(Arc::new(e));
        self
    }

    /// Registers a handler for custom event `name`: its payload is decoded from JSON into `Req`,
    /// its reply encoded as JSON, and an `Err` is the event's handler error. It runs on the
    /// document's owner like any custom event (from another node, `hearth event fire` or the
    /// admin API). Names starting with `hearth.` are reserved for built-in events:
    /// [`ServerBuilder::bind`] refuses them.
    pub fn on_event<Req, Resp, F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        Req: serde::de::DeserializeOwned + Send + 'static,
        Resp: serde::Serialize + Send + 'static,
        F: Fn(crate::events::handlers::EventCall<Req>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Resp, crate::hooks::HookError>> + Send + 'static,
    {
        if crate::events::is_builtin(name) {
            self.reserved.push(name.to_owned());
        }
        self.extensions
            .push(Arc::new(crate::events::handlers::NamedEvent::new(
                name.to_owned(),
                handler,
            )));
        self
    }

    /// Adds an extension that is already shared.
    pub fn extension_arc(mut self, e: Arc<dyn Extension>) -> Self {
        self.extensions.push(e);
        self
    }

    /// A weak handle to the server being built, for extensions that call the server from their
    /// hooks (direct connections, `lock_document`, custom events). It upgrades once
    /// [`ServerBuilder::bind`] has succeeded and stops upgrading when the server is gone, so an
    /// extension holding it keeps nothing alive.
    pub fn weak_handle(&self) -> WeakServer {
        self.weak.clone()
    }

    /// Uses this storage instead of the one `database_url` names.
    pub fn store(mut self, store: Arc<dyn DocumentStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Validates, opens storage, runs `on_configure` and binds the listener.
    pub async fn bind(mut self) -> Result<Server, ServerError> {
        self.config.validate()?;
        if let Some(name) = self.reserved.first() {
            return Err(crate::config::ConfigError::Invalid {
                name: "on_event",
                message: format!(
                    "event name {name:?} is reserved (names starting with `hearth.` are built in)"
                ),
            }
            .into());
        }
        let store = match self.store.take() {
            Some(s) => s,
            None => {
                let opts = storage::SqlOptions {
                    table_prefix: self.config.database_table_prefix.clone(),
                    ..storage::SqlOptions::default()
                };
                storage::open_store(&self.config.database_url, opts)
                    .await
                    .map_err(|source| ServerError::Storage {
                        url: crate::config::redact_url(&self.config.database_url),
                        source,
                    })?
            }
        };
        let table = TokenTable::parse(&self.config.auth_tokens).map_err(|m| {
            crate::config::ConfigError::Invalid {
                name: "auth_tokens",
                message: m,
            }
        })?;
        let mut list = self.extensions;
        if !table.is_open() {
            list.push(Arc::new(StaticTokens(table)));
        }
        let metrics = Metrics::new()?;
        if let Some(jwt) = crate::jwt::JwtAuth::from_config(&self.config)? {
            list.push(Arc::new(jwt));
        }
        if let Some(hook) = WebhookAuth::from_config(&self.config, &metrics.registry)? {
            list.push(Arc::new(hook));
        }
        if let Some(hooks) = EventWebhooks::from_config(&self.config, &metrics.registry)? {
            list.push(Arc::new(hooks));
        }
        let extensions = Extensions::new(list);
        let committer = Committer::spawn(
            store.clone(),
            Duration::from_millis(self.config.commit_interval_ms),
            metrics.clone(),
        );
        extensions
            .on_configure(&self.config)
            .await
            .map_err(|e| ServerError::Extension(e.reason))?;
        let cluster = if self.config.is_cluster() {
            Some(Cluster::connect(&self.config, &metrics.registry).await?)
        } else {
            None
        };
        let addr = self.config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let operator = match self.config.operator_addr() {
            Ok(Some(addr)) => {
                let bind_err = |source| ServerError::OperatorBind { addr, source };
                let l = TcpListener::bind(addr).await.map_err(bind_err)?;
                let bound = l.local_addr().map_err(bind_err)?;
                Some((l, bound))
            }
            // validated above
            Ok(None) | Err(_) => None,
        };
        let admin = match crate::admin::AdminSettings::from_config(&self.config) {
            Some(settings) => {
                let addr = self.config.admin_listen;
                let bind_err = |source| ServerError::AdminBind { addr, source };
                let l = TcpListener::bind(addr).await.map_err(bind_err)?;
                let bound = l.local_addr().map_err(bind_err)?;
                Some((l, bound, settings))
            }
            None => None,
        };
        let trusted = TrustedProxies::parse(&self.config.trusted_proxies).map_err(|e| {
            crate::config::ConfigError::Invalid {
                name: "trusted_proxies",
                message: e.to_string(),
            }
        })?;
        let limits = ConnectionLimits::new(
            crate::fd_limit::effective_max_connections(self.config.max_connections),
            self.config.max_connections_per_ip,
            &metrics,
        );
        let throttle = crate::throttle::AuthThrottle::start(
            &self.config,
            &metrics,
            crate::cluster::redis_client(&self.config),
        )
        .await;
        let revocations = crate::revoke::Revocations::start(
            &self.config,
            crate::cluster::redis_client(&self.config),
        )
        .await;
        let docs = Arc::new(DocServices {
            config: self.config.clone(),
            extensions: extensions.clone(),
            store,
            metrics: metrics.clone(),
            committer,
            registry: Registry::default(),
            ownership: cluster
                .as_ref()
                .map(|(c, _)| Arc::new(LockOwnership(c.clone())) as Arc<dyn Ownership>),
            burst: cluster
                .as_ref()
                .map(|(c, _)| Arc::new(TransportBurst(c.clone())) as Arc<dyn Burst>),
        });
        let shutdown = CancellationToken::new();
        let readiness = Readiness::start(
            readiness_checks(&docs, &metrics, cluster.as_ref().map(|(c, _)| c)),
            Duration::from_millis(self.config.readiness_outage_ms),
            &shutdown,
        )
        .await;
        let shared = Arc::new(Shared {
            config: self.config,
            extensions,
            metrics,
            docs: docs.clone(),
            stop_sockets: shutdown.child_token(),
            signals: Default::default(),
            shutdown,
            sockets: TaskTracker::new(),
            draining: Default::default(),
            readiness,
            placement: cluster.as_ref().map(|(c, _)| {
                Arc::new(ClusterPlacement::new(c.clone(), docs.clone())) as Arc<dyn Placement>
            }),
            throttle,
            revocations,
        });
        tokio::spawn(crate::connection::signals::forward(
            shared.signals.clone(),
            shared.stop_sockets.clone(),
            shared.revocations.subscribe(),
        ));
        let cluster = cluster.map(|(c, inbound)| {
            c.spawn_tasks(&shared, inbound);
            c
        });
        let node = Arc::new(Node { shared, cluster });
        // set once: a builder is consumed by `bind`
        let _ = self.weak.0.set(Arc::downgrade(&node));
        node.shared
            .extensions
            .on_listen(local)
            .await
            .map_err(|e| ServerError::Extension(e.reason))?;
        Ok(Server {
            node,
            listener,
            local,
            operator,
            admin,
            limits,
            trusted: Arc::new(trusted),
        })
    }
}

/// The dependencies `/readyz` watches (`crate::health`): storage (a ping, and the last write's
/// outcome) and, in a cluster, Redis.
fn readiness_checks(
    docs: &Arc<DocServices>,
    metrics: &Metrics,
    cluster: Option<&Arc<Cluster>>,
) -> Vec<(&'static str, prometheus::IntGauge, Probe)> {
    let up = |name: &str| metrics.dependency_up.with_label_values(&[name]);
    let (store, m) = (docs.store.clone(), metrics.clone());
    let storage = crate::health::probe(move || {
        let (store, m) = (store.clone(), m.clone());
        async move {
            store.ping().await.map_err(|e| e.to_string())?;
            if m.failed_writes_recent() {
                return Err("writes failing".into());
            }
            Ok(())
        }
    });
    let mut checks = vec![("storage", up("storage"), storage)];
    if let Some(c) = cluster {
        let c = c.clone();
        let redis = crate::health::probe(move || {
            let c = c.clone();
            async move { c.ping_redis().await }
        });
        checks.push(("redis", up("redis"), redis));
    }
    checks
}

/// The running node: the state its tasks share and, in a cluster, its membership.
#[derive(Debug)]
struct Node {
    shared: Arc<Shared>,
    cluster: Option<Arc<Cluster>>,
}

/// A bound server. Call [`Server::run`].
#[derive(Debug)]
pub struct Server {
    node: Arc<Node>,
    listener: TcpListener,
    local: SocketAddr,
    operator: Option<(TcpListener, SocketAddr)>,
    admin: Option<(TcpListener, SocketAddr, crate::admin::AdminSettings)>,
    limits: Arc<ConnectionLimits>,
    trusted: Arc<TrustedProxies>,
}

impl Server {
    /// Starts building a server.
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            extensions: Vec::new(),
            store: None,
            weak: WeakServer::default(),
            reserved: Vec::new(),
        }
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The operator listener's bound address (`/metrics`, `/cluster/owned`, `/healthz`,
    /// `/readyz`); `None` when `operator_listen` is empty.
    pub fn operator_addr(&self) -> Option<SocketAddr> {
        self.operator.as_ref().map(|(_, a)| *a)
    }

    /// The admin API's bound address; `None` when no admin token is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, a, _)| *a)
    }

    /// The node's connection cap in force: `max_connections`, or less when the open-file limit
    /// does not leave room for it.
    pub fn max_connections(&self) -> usize {
        self.limits.max_total()
    }

    /// A handle for the server-side API.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            node: self.node.clone(),
        }
    }

    /// Serves until [`ServerHandle::shutdown`] is called, then shuts down gracefully.
    pub async fn run(self) -> Result<(), ServerError> {
        let Server {
            node,
            listener,
            local,
            operator,
            admin,
            limits,
            trusted,
        } = self;
        let shared = node.shared.clone();
        let operator_addr = operator.as_ref().map(|(_, a)| *a);
        info!(addr = %local, operator = ?operator_addr, max_connections = limits.max_total(), node = %shared.config.node_id, storage = shared.docs.store.backend(), durability = ?shared.config.durability, "hearth listening");
        let operator_task = operator.map(|(l, _)| tokio::spawn(serve_operator(shared.clone(), l)));
        let admin_task = admin.map(|(l, addr, settings)| {
            info!(addr = %addr, "admin API listening");
            let backend = Arc::new(ServerHandle { node: node.clone() });
            tokio::spawn(crate::admin::serve(
                l,
                backend,
                settings,
                shared.metrics.clone(),
                Duration::from_millis(shared.config.http_header_timeout_ms),
            ))
        });
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                accepted = listener.accept() => {
                    let (tcp, remote) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Some(slot) = limits.admit(remote) else {
                        debug!(peer = %remote, "node connection cap reached: closing");
                        continue;
                    };
                    // behind a trusted proxy the client is known only from each request
                    if !trusted.contains(remote.ip()) && slot.assign(remote.ip()) == IpAdmission::Refused {
                        slot.count_ip_refusal();
                        debug!(peer = %remote, "connection cap of the address exceeded: closing");
                        continue;
                    }
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve_client(shared.clone(), tcp, Arc::new(slot), trusted.clone()));
                }
            }
        }
        drop(listener);
        shutdown(&node).await;
        if let Some(t) = operator_task {
            t.abort();
        }
        if let Some(t) = admin_task {
            t.abort();
        }
        Ok(())
    }
}

/// An HTTP/1 connection builder whose connections close when a request header is not complete
/// within `http_header_timeout_ms` of opening or of the previous response.
fn http_builder(shared: &Shared) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(shared.config.http_header_timeout_ms));
    b
}

/// Serves one client-port connection (requests, then possibly an upgraded WebSocket, which
/// takes `slot` along).
async fn serve_client(
    shared: Arc<Shared>,
    tcp: TcpStream,
    slot: Arc<ConnectionSlot>,
    trusted: Arc<TrustedProxies>,
) {
    let peer = slot.peer;
    let builder = http_builder(&shared);
    let svc_shared = shared.clone();
    let svc = service_fn(move |req| {
        crate::http::handle(svc_shared.clone(), req, slot.clone(), trusted.clone())
    });
    if let Err(e) = builder
        .serve_connection(TokioIo::new(tcp), svc)
        .with_upgrades()
        .await
    {
        if e.is_timeout() {
            shared.metrics.http_header_timeouts.inc();
            debug!(%peer, "no complete request header in time: closing");
        } else {
            debug!(%peer, error = %e, "http connection ended with an error");
        }
    }
}

/// Accepts operator connections (at most [`OPERATOR_MAX_CONNECTIONS`] at once) until aborted.
async fn serve_operator(shared: Arc<Shared>, listener: TcpListener) {
    crate::http::accept_bounded(
        listener,
        OPERATOR_MAX_CONNECTIONS,
        "operator",
        move |tcp, remote| {
            let shared = shared.clone();
            async move {
                let svc_shared = shared.clone();
                let svc =
                    service_fn(move |req| crate::http::handle_operator(svc_shared.clone(), req));
                if let Err(e) = http_builder(&shared)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await
                {
                    debug!(peer = %remote, error = %e, "operator connection ended with an error");
                }
            }
        },
    )
    .await;
}

async fn shutdown(node: &Node) {
    let shared = &node.shared;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(shared.config.shutdown_timeout_ms);
    if let Some(c) = &node.cluster {
        // peers stop routing here at once instead of waiting for lock expiry
        c.drain().await;
    }
    crate::connection::node::drain(shared, deadline).await;
    if let Some(c) = &node.cluster {
        // Releasing locks needs Redis; when it is unreachable the locks expire on their own
        // (lock_ttl), so the exit is not held up for longer than this.
        if tokio::time::timeout(LEAVE_TIMEOUT, c.leave())
            .await
            .is_err()
        {
            warn!(
                timeout_ms = LEAVE_TIMEOUT.as_millis() as u64,
                "could not release cluster locks in time (Redis unreachable?); they expire after lock_ttl"
            );
        }
    }
    if let Err(e) = shared.extensions.on_destroy().await {
        warn!(reason = %e, "on_destroy failed");
    }
    info!("shutdown complete");
}

/// Server-side API; cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    node: Arc<Node>,
}

impl ServerHandle {
    /// Opens a direct connection (loads the document if needed; blocks its unloading).
    pub async fn open_direct_connection(
        &self,
        name: &str,
        context: Context,
    ) -> Result<DirectConnection, LoadError> {
        open_direct(&self.node.shared, name, context).await
    }

    /// Closes every connection of `name` (or of every document) with `CLOSE("Reset Connection")`.
    pub fn close_connections(&self, name: Option<&str>) {
        let handles = match name {
            Some(n) => self.node.shared.docs.registry.get(n).into_iter().collect(),
            None => self.node.shared.docs.registry.handles(),
        };
        for h in handles {
            h.send_detached(DocCommand::CloseConnections(
                crate::protocol::Close::ResetConnection.reason().into(),
            ));
        }
    }

    /// Runs custom event `name` on the node that owns `document` (this one, or another through
    /// the cluster, waiting at most `custom_event_ttl_ms`); `on_custom_event` hooks answer it,
    /// or the built-in events of [`crate::events`] for names starting with `hearth.`.
    pub async fn emit(
        &self,
        document: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, EmitError> {
        self.emit_with(document, name, payload, EmitOptions::default())
            .await
    }

    /// [`ServerHandle::emit`] with a reply timeout and the choice not to claim a document
    /// nobody owns ([`EmitError::NotOwned`] then).
    pub async fn emit_with(
        &self,
        document: &str,
        name: &str,
        payload: Vec<u8>,
        options: EmitOptions,
    ) -> Result<Vec<u8>, EmitError> {
        let shared = &self.node.shared;
        match &self.node.cluster {
            Some(c) => {
                c.emit(
                    shared,
                    document,
                    name,
                    payload,
                    options.timeout,
                    options.claim,
                )
                .await
            }
            None => {
                if !options.claim && shared.docs.registry.get(document).is_none() {
                    return Err(EmitError::NotOwned);
                }
                let run = crate::cluster::emit_local(shared, document, name, &payload);
                match options.timeout {
                    Some(t) => tokio::time::timeout(t, run)
                        .await
                        .unwrap_or(Err(EmitError::Timeout)),
                    None => run.await,
                }
            }
        }
    }

    /// Revokes a user, a token id or a document until `until` (see [`crate::revoke`]): stored
    /// (in Redis in a cluster) and sent to every live node, whose matching document
    /// connections are refused with `PermissionDenied` at once; matching authentications are
    /// refused from then on. Returns the nodes told and those that did not answer (they learn
    /// it from Redis within [`crate::revoke::SYNC_EVERY`]).
    pub async fn revoke(
        &self,
        what: Revocation,
        until: std::time::SystemTime,
    ) -> Result<RevokeReport, RevokeError> {
        let until_ms = crate::clock::unix_ms(until);
        let shared = &self.node.shared;
        shared.revocations.add(what.clone(), until_ms).await?;
        let entry = crate::revoke::RevocationEntry { what, until_ms };
        let payload = serde_json::json!({ "revoke": entry })
            .to_string()
            .into_bytes();
        Ok(self.tell_nodes(payload).await)
    }

    /// Lifts a revocation on every node; `false` when this node did not hold it.
    pub async fn lift_revocation(&self, what: Revocation) -> Result<bool, RevokeError> {
        let was = self.node.shared.revocations.lift(&what).await?;
        let payload =
            serde_json::to_vec(&crate::revoke::NodeChange::Lift(what)).unwrap_or_default();
        self.tell_nodes(payload).await;
        Ok(was)
    }

    /// The revocations in force on this node.
    pub fn revocations(&self) -> Vec<crate::revoke::RevocationEntry> {
        self.node.shared.revocations.list()
    }

    /// Sends a `hearth.node.revoke` payload to every other live node at once.
    async fn tell_nodes(&self, payload: Vec<u8>) -> RevokeReport {
        let me = self.node.shared.config.node_id.clone();
        let mut report = RevokeReport {
            nodes: vec![me.clone()],
            unreachable: Vec::new(),
        };
        let Some(c) = &self.node.cluster else {
            return report;
        };
        let nodes = match c.live_nodes().await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "revocation: cannot list the nodes; they learn it from Redis");
                return report;
            }
        };
        let calls = nodes
            .into_iter()
            .filter(|a| a.id.as_str() != me)
            .map(|addr| {
                let payload = payload.clone();
                async move {
                    let r = c
                        .node_call(
                            &addr,
                            crate::events::NODE_REVOKE,
                            payload,
                            NODE_CALL_TIMEOUT,
                        )
                        .await;
                    (addr.id.as_str().to_owned(), r)
                }
            });
        for (node, r) in futures_util::future::join_all(calls).await {
            match r {
                Ok(_) => report.nodes.push(node),
                Err(e) => {
                    warn!(%node, error = %e, "revocation: node did not answer; it learns it from Redis");
                    report.unreachable.push(node);
                }
            }
        }
        report
    }

    /// The id of the node that owns `document` now, if any (never claims it).
    pub async fn document_owner(&self, document: &str) -> Result<Option<String>, EmitError> {
        match &self.node.cluster {
            Some(c) => c.owner_of(document).await,
            None => Ok(self
                .node
                .shared
                .docs
                .registry
                .get(document)
                .map(|_| self.node.shared.config.node_id.clone())),
        }
    }

    /// This node's status; with `with_documents`, its loaded documents too.
    pub async fn node_status(&self, with_documents: bool) -> NodeStatus {
        crate::connection::node::status(
            &self.node.shared,
            self.node.cluster.is_some(),
            with_documents,
        )
        .await
    }

    /// The status of every live node (this one alone without a cluster). A node that does not
    /// answer within two seconds is listed with an `error`.
    pub async fn nodes(&self, with_documents: bool) -> Result<Vec<NodeStatus>, EmitError> {
        let Some(c) = &self.node.cluster else {
            return Ok(vec![self.node_status(with_documents).await]);
        };
        let me = self.node.shared.config.node_id.clone();
        let payload = serde_json::json!({ "documents": with_documents })
            .to_string()
            .into_bytes();
        let mut out = Vec::new();
        for addr in c.live_nodes().await? {
            if addr.id.as_str() == me {
                out.push(self.node_status(with_documents).await);
                continue;
            }
            let answer = c
                .node_call(
                    &addr,
                    crate::events::NODE_STATUS,
                    payload.clone(),
                    NODE_CALL_TIMEOUT,
                )
                .await
                .and_then(|v| {
                    serde_json::from_slice::<NodeStatus>(&v)
                        .map_err(|e| EmitError::Unavailable(e.to_string()))
                });
            out.push(answer.unwrap_or_else(|e| NodeStatus {
                node: addr.id.as_str().to_owned(),
                cluster: true,
                error: Some(e.to_string()),
                ..NodeStatus::default()
            }));
        }
        Ok(out)
    }

    /// Starts draining node `node` (its id; `None` for this node): it stops taking clients and
    /// documents, `/readyz` answers 503, its sockets close with a reset (providers reconnect
    /// elsewhere) and its documents are stored and handed over. The process keeps running.
    pub async fn drain(&self, node: Option<&str>) -> Result<(), DrainError> {
        let shared = &self.node.shared;
        let here = node.is_none_or(|n| n == shared.config.node_id);
        match &self.node.cluster {
            Some(c) if here => {
                c.start_drain(shared.clone());
                Ok(())
            }
            Some(c) => {
                let Some(node) = node else {
                    return Ok(());
                };
                let addr = c
                    .live_nodes()
                    .await?
                    .into_iter()
                    .find(|a| a.id.as_str() == node)
                    .ok_or_else(|| DrainError::NotFound(node.to_owned()))?;
                c.node_call(
                    &addr,
                    crate::events::NODE_DRAIN,
                    Vec::new(),
                    NODE_CALL_TIMEOUT,
                )
                .await?;
                Ok(())
            }
            None if here => {
                if !shared.draining.swap(true, Ordering::AcqRel) {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let deadline = tokio::time::Instant::now()
                            + Duration::from_millis(shared.config.shutdown_timeout_ms);
                        crate::connection::node::drain(&shared, deadline).await;
                    });
                }
                Ok(())
            }
            None => Err(DrainError::NotFound(node.unwrap_or_default().to_owned())),
        }
    }

    /// A page of documents: those the database stores and those loaded on some node, sorted
    /// by name, whose name starts with `prefix` and sorts after `after`; at most `limit`.
    pub async fn list_documents(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DocumentPage, EmitError> {
        let stored = self
            .node
            .shared
            .docs
            .store
            .list(&crate::storage::ListQuery {
                prefix: prefix.to_owned(),
                after: after.map(str::to_owned),
                limit,
            })
            .await
            .map_err(|e| EmitError::Unavailable(e.to_string()))?;
        let stored_full = stored.len() >= limit;
        let mut entries: std::collections::BTreeMap<String, DocumentEntry> = stored
            .into_iter()
            .map(|d| {
                let entry = DocumentEntry {
                    name: d.name.clone(),
                    stored: true,
                    loaded: false,
                    owner: None,
                    epoch: Some(d.epoch),
                    connections: 0,
                };
                (d.name, entry)
            })
            .collect();
        let last_stored = entries.keys().next_back().cloned();
        for status in self.nodes(true).await? {
            for d in status.loaded.unwrap_or_default() {
                if !d.name.starts_with(prefix) || after.is_some_and(|a| d.name.as_str() <= a) {
                    continue;
                }
                // past the last stored name of a full page: it belongs to a later page
                if stored_full && last_stored.as_ref().is_some_and(|l| &d.name > l) {
                    continue;
                }
                let e = entries
                    .entry(d.name.clone())
                    .or_insert_with(|| DocumentEntry {
                        name: d.name.clone(),
                        stored: false,
                        loaded: false,
                        owner: None,
                        epoch: None,
                        connections: 0,
                    });
                e.loaded = true;
                e.owner = Some(status.node.clone());
                e.epoch = Some(d.epoch);
                e.connections += d.connections;
            }
        }
        let documents: Vec<DocumentEntry> = entries.into_values().take(limit).collect();
        let next = (stored_full || documents.len() >= limit)
            .then(|| documents.last().map(|d| d.name.clone()))
            .flatten();
        Ok(DocumentPage { documents, next })
    }

    /// Takes ownership of `document` for direct edits: loads it here (claiming its cluster lock
    /// if nobody holds it) and pins it while the returned connection is open. Fails with
    /// [`LockDocumentError::Owned`] when another node owns it — send that node a custom event
    /// instead.
    pub async fn lock_document(
        &self,
        document: &str,
        context: Context,
    ) -> Result<DirectConnection, LockDocumentError> {
        if let Some(c) = &self.node.cluster {
            match c.route(&self.node.shared.docs.registry, document).await {
                Ok(crate::cluster::Home::Here) => {}
                Ok(crate::cluster::Home::Node(owner)) => {
                    return Err(LockDocumentError::Owned {
                        node: owner.id.as_str().to_owned(),
                    });
                }
                Err(e) => return Err(LockDocumentError::Unavailable(e.to_string())),
            }
        }
        open_direct(&self.node.shared, document, context)
            .await
            .map_err(|e| LockDocumentError::Unavailable(e.to_string()))
    }

    /// Names of the loaded documents.
    pub fn documents(&self) -> Vec<String> {
        self.node
            .shared
            .docs
            .registry
            .handles()
            .iter()
            .map(|h| h.name().to_owned())
            .collect()
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.node.shared.metrics
    }

    /// A handle that does not keep the server alive.
    pub fn downgrade(&self) -> WeakServer {
        let weak = WeakServer::default();
        let _ = weak.0.set(Arc::downgrade(&self.node));
        weak
    }

    /// Starts a graceful shutdown; [`Server::run`] returns when it is complete.
    pub fn shutdown(&self) {
        self.node.shared.draining.store(true, Ordering::Release);
        self.node.shared.shutdown.cancel();
    }
}

pub(crate) async fn open_direct(
    shared: &Arc<Shared>,
    name: &str,
    context: Context,
) -> Result<DirectConnection, LoadError> {
    shared.docs.open_direct(name, context).await
}

/// How long a node answers a status or drain request from another node.
const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of [`ServerHandle::emit_with`].
#[derive(Debug, Clone, Copy)]
pub struct EmitOptions {
    /// How long to wait for a remote owner's reply (default: `custom_event_ttl_ms`), or for a
    /// local handler.
    pub timeout: Option<Duration>,
    /// Whether this node claims (loads) the document when nobody owns it (default true).
    pub claim: bool,
}

impl Default for EmitOptions {
    fn default() -> Self {
        EmitOptions {
            timeout: None,
            claim: true,
        }
    }
}

#[async_trait::async_trait]
impl crate::admin::Backend for ServerHandle {
    async fn emit(
        &self,
        doc: &str,
        name: &str,
        payload: Vec<u8>,
        timeout: Duration,
        claim: bool,
    ) -> Result<Vec<u8>, EmitError> {
        let options = EmitOptions {
            timeout: Some(timeout),
            claim,
        };
        self.emit_with(doc, name, payload, options).await
    }

    async fn owner(&self, doc: &str) -> Result<Option<String>, EmitError> {
        self.document_owner(doc).await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DocumentPage, EmitError> {
        self.list_documents(prefix, after, limit).await
    }

    async fn node(&self) -> NodeStatus {
        self.node_status(false).await
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>, EmitError> {
        ServerHandle::nodes(self, false).await
    }

    async fn drain(&self, node: &str) -> Result<(), DrainError> {
        ServerHandle::drain(self, Some(node)).await
    }

    async fn revoke(
        &self,
        what: Revocation,
        until: std::time::SystemTime,
    ) -> Result<RevokeReport, RevokeError> {
        ServerHandle::revoke(self, what, until).await
    }

    async fn lift(&self, what: Revocation) -> Result<bool, RevokeError> {
        self.lift_revocation(what).await
    }

    fn revocations(&self) -> Vec<crate::revoke::RevocationEntry> {
        ServerHandle::revocations(self)
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.node.shared.config.custom_event_ttl_ms)
    }
}

/// Why [`ServerHandle::lock_document`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LockDocumentError {
    /// Another node owns the document.
    #[error("document is owned by node {node}")]
    Owned {
        /// The owner's node id.
        node: String,
    },
    /// The document could not be loaded or the cluster could not be reached.
    #[error("document unavailable: {0}")]
    Unavailable(String),
}

/// A weak handle to a server: what an extension keeps to call the server from its hooks
/// without keeping the server alive. Get one from [`ServerBuilder::weak_handle`] (before the
/// server exists) or [`ServerHandle::downgrade`]; [`WeakServer::upgrade`] gives a
/// [`ServerHandle`] while the server runs.
///
/// Hooks that run inside a document's task (`on_change`, `on_stateless`, …) must not wait for
/// work on the same document through it: spawn that work instead.
#[derive(Debug, Clone, Default)]
pub struct WeakServer(Arc<std::sync::OnceLock<Weak<Node>>>);

impl WeakServer {
    /// The server, unless it has not been bound yet or is gone.
    pub fn upgrade(&self) -> Option<ServerHandle> {
        let node = self.0.get()?.upgrade()?;
        Some(ServerHandle { node })
    }
}
