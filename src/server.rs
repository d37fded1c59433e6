//! [`Server`]: binds, accepts, and shuts down in order. [`ServerHandle`]: the server-side API
//! (direct connections, closing connections, shutdown).
//!
//! Shutdown order (SIGTERM/SIGINT or [`ServerHandle::shutdown`]): stop accepting and report
//! not-ready → every socket sends `CLOSE("Reset Connection")` for each document and closes with
//! 4205 so providers reconnect → every document commits and compacts → `on_destroy` → return.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::auth::{StaticTokens, TokenTable};
use crate::cluster::{Cluster, EmitError};
use crate::config::Config;
use crate::doc::committer::Committer;
use crate::doc::direct::DirectConnection;
use crate::doc::registry::Registry;
use crate::doc::{DocCommand, LoadError};
use crate::hooks::{Context, Extension, Extensions};
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::storage::{self, DocumentStore};

/// How long a shutting-down node tries to release its cluster locks and presence.
const LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
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
        let test_ext = self
            .config
            .test_extension
            .then(crate::test_extension::TestExtension::new);
        if let Some(t) = &test_ext {
            list.push(t.clone());
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
        let shared = Arc::new(Shared {
            config: self.config,
            extensions,
            store,
            metrics,
            registry: Registry::default(),
            committer,
            shutdown: CancellationToken::new(),
            draining: Default::default(),
            cluster: cluster.as_ref().map(|(c, _)| c.clone()),
        });
        if let Some((c, inbound)) = cluster {
            c.spawn_tasks(&shared, inbound);
        }
        if let Some(t) = test_ext {
            t.set_server(Arc::downgrade(&shared));
        }
        shared
            .extensions
            .on_listen(local)
            .await
            .map_err(|e| ServerError::Extension(e.reason))?;
        Ok(Server {
            shared,
            listener,
            local,
        })
    }
}

/// A bound server. Call [`Server::run`].
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    local: SocketAddr,
}

impl Server {
    /// Starts building a server.
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            extensions: Vec::new(),
            store: None,
        }
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle for the server-side API.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until [`ServerHandle::shutdown`] is called, then shuts down gracefully.
    pub async fn run(self) -> Result<(), ServerError> {
        let Server {
            shared,
            listener,
            local,
        } = self;
        info!(addr = %local, node = %shared.config.node_id, storage = shared.store.backend(), durability = ?shared.config.durability, "hearth listening");
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
                    let _ = tcp.set_nodelay(true);
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| crate::http::handle(shared.clone(), req, remote));
                        if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).with_upgrades().await {
                            debug!(error = %e, "http connection ended with an error");
                        }
                    });
                }
            }
        }
        drop(listener);
        shutdown(&shared).await;
        Ok(())
    }
}

async fn shutdown(shared: &Arc<Shared>) {
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(shared.config.shutdown_timeout_ms);
    if let Some(c) = &shared.cluster {
        // peers stop routing here at once instead of waiting for lock expiry
        c.drain().await;
    }
    info!("shutting down: closing sockets");
    // sockets react to the cancelled token: CLOSE per document, socket close 4205
    while shared.metrics.sockets.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handles = shared.registry.handles();
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
    if let Some(c) = &shared.cluster {
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
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Opens a direct connection (loads the document if needed; blocks its unloading).
    pub async fn open_direct_connection(
        &self,
        name: &str,
        context: Context,
    ) -> Result<DirectConnection, LoadError> {
        open_direct(&self.shared, name, context).await
    }

    /// Closes every connection of `name` (or of every document) with `CLOSE("Reset Connection")`.
    pub fn close_connections(&self, name: Option<&str>) {
        let handles = match name {
            Some(n) => self.shared.registry.get(n).into_iter().collect(),
            None => self.shared.registry.handles(),
        };
        for h in handles {
            h.send_detached(DocCommand::CloseConnections("Reset Connection".into()));
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
        match &self.shared.cluster {
            Some(c) => c.emit(&self.shared, document, name, payload).await,
            None => crate::cluster::emit_local(&self.shared, document, name, &payload).await,
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
        if let Some(c) = &self.shared.cluster {
            match c.route(&self.shared, document).await {
                Ok(crate::cluster::Route2::Local) => {}
                Ok(crate::cluster::Route2::Remote(owner)) => {
                    return Err(LockDocumentError::Owned {
                        node: owner.id.as_str().to_owned(),
                    });
                }
                Err(e) => return Err(LockDocumentError::Unavailable(e.to_string())),
            }
        }
        open_direct(&self.shared, document, context)
            .await
            .map_err(|e| LockDocumentError::Unavailable(e.reason))
    }

    /// Names of the loaded documents.
    pub fn documents(&self) -> Vec<String> {
        self.shared
            .registry
            .handles()
            .iter()
            .map(|h| h.name().to_owned())
            .collect()
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Starts a graceful shutdown; [`Server::run`] returns when it is complete.
    pub fn shutdown(&self) {
        self.shared.draining.store(true, Ordering::Release);
        self.shared.shutdown.cancel();
    }
}

pub(crate) async fn open_direct(
    shared: &Arc<Shared>,
    name: &str,
    context: Context,
) -> Result<DirectConnection, LoadError> {
    for _ in 0..10 {
        let handle = shared.registry.open(shared, name, &context).await?;
        let (tx, rx) = oneshot::channel();
        if handle.send(DocCommand::DirectOpen(tx)).await && matches!(rx.await, Ok(Ok(()))) {
            return Ok(DirectConnection::new(handle, context));
        }
    }
    Err(LoadError {
        reason: "document unavailable".into(),
    })
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

/// A weak server reference for extensions built before the server (breaks the Arc cycle).
#[derive(Debug, Clone, Default)]
pub(crate) struct WeakServer(pub Weak<Shared>);

impl WeakServer {
    pub(crate) async fn open_direct_connection(
        &self,
        name: &str,
        context: Context,
    ) -> Result<DirectConnection, LoadError> {
        let Some(shared) = self.0.upgrade() else {
            return Err(LoadError {
                reason: "server stopped".into(),
            });
        };
        open_direct(&shared, name, context).await
    }
}
