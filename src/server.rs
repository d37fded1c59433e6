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
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

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
use crate::hooks::{Context, Extension, Extensions};
use crate::limits::{ConnectionLimits, ConnectionSlot, IpAdmission};
use crate::metrics::Metrics;
use crate::storage::{self, DocumentStore};
use crate::tokens::TokenTable;

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
    /// Storage could not be opened.
    #[error("storage")]
    Storage(#[from] storage::StoreError),
    /// An extension refused `on_configure` / `on_listen`.
    #[error("extension refused to start: {0}")]
    Extension(String),
    /// Metrics registration failed.
    #[error("metrics")]
    Metrics(#[from] prometheus::Error),
    /// The cluster (Redis) could not be joined.
    #[error("cluster")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Collects configuration, extensions and storage before binding.
pub struct ServerBuilder {
    config: Config,
    extensions: Vec<Arc<dyn Extension>>,
    store: Option<Arc<dyn DocumentStore>>,
    weak: WeakServer,
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
        let store = match self.store.take() {
            Some(s) => s,
            None => {
                storage::open_store(&self.config.database_url, storage::SqlOptions::default())
                    .await?
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
        let extensions = Extensions::new(list);
        let metrics = Metrics::new()?;
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
            crate::cluster::redis_client(&self.config.redis_url),
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
        let shared = Arc::new(Shared {
            config: self.config,
            extensions,
            metrics,
            docs: docs.clone(),
            shutdown: CancellationToken::new(),
            sockets: TaskTracker::new(),
            draining: Default::default(),
            placement: cluster.as_ref().map(|(c, _)| {
                Arc::new(ClusterPlacement::new(c.clone(), docs.clone())) as Arc<dyn Placement>
            }),
            throttle,
        });
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
            limits,
            trusted: Arc::new(trusted),
        })
    }
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
            limits,
            trusted,
        } = self;
        let shared = node.shared.clone();
        let operator_addr = operator.as_ref().map(|(_, a)| *a);
        info!(addr = %local, operator = ?operator_addr, max_connections = limits.max_total(), node = %shared.config.node_id, storage = shared.docs.store.backend(), durability = ?shared.config.durability, "hearth listening");
        let operator_task = operator.map(|(l, _)| tokio::spawn(serve_operator(shared.clone(), l)));
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
    let permits = Arc::new(Semaphore::new(OPERATOR_MAX_CONNECTIONS));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "operator accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(peer = %remote, "operator listener busy: closing");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc_shared = shared.clone();
            let svc = service_fn(move |req| crate::http::handle_operator(svc_shared.clone(), req));
            if let Err(e) = http_builder(&shared)
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                debug!(peer = %remote, error = %e, "operator connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn shutdown(node: &Node) {
    let shared = &node.shared;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(shared.config.shutdown_timeout_ms);
    if let Some(c) = &node.cluster {
        // peers stop routing here at once instead of waiting for lock expiry
        c.drain().await;
    }
    info!("shutting down: closing sockets");
    // sockets react to the cancelled token: CLOSE per document, socket close 4205
    shared.sockets.close();
    if tokio::time::timeout_at(deadline, shared.sockets.wait())
        .await
        .is_err()
    {
        warn!(
            sockets = shared.sockets.len(),
            "sockets still open at the shutdown deadline"
        );
    }
    let handles = shared.docs.registry.handles();
    info!(documents = handles.len(), "storing documents");
    let mut waits = Vec::new();
    for h in handles {
        let (tx, rx) = oneshot::channel();
        if h.send(DocCommand::Shutdown(tx)).await {
            waits.push(rx);
        }
    }
    for rx in waits {
        if tokio::time::timeout_at(deadline, rx).await.is_err() {
            warn!("a document did not finish storing before the shutdown deadline");
        }
    }
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
    /// the cluster, waiting at most `custom_event_ttl_ms`); `on_custom_event` hooks answer it.
    pub async fn emit(
        &self,
        document: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, EmitError> {
        match &self.node.cluster {
            Some(c) => c.emit(&self.node.shared, document, name, payload).await,
            None => crate::cluster::emit_local(&self.node.shared, document, name, &payload).await,
        }
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
    for _ in 0..10 {
        let handle = shared.docs.open(name, &context).await?;
        let (tx, rx) = oneshot::channel();
        if handle.send(DocCommand::DirectOpen(tx)).await && matches!(rx.await, Ok(Ok(()))) {
            return Ok(DirectConnection::new(handle, context));
        }
    }
    Err(LoadError::Unavailable("kept closing while being opened"))
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
