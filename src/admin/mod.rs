//! The admin API: an HTTP/1 JSON listener of its own through which backends and operators
//! drive documents and events without writing Rust (docs/admin-api.md).
//!
//! Every request carries one of the configured bearer tokens (`admin_tokens`); the listener
//! does not exist without one. Requests are bounded before anything is decoded: a token is
//! checked first, the body is read up to `admin_max_body_bytes`, and a token bucket bounds the
//! request rate of the node (`admin_requests_per_second`). The operations themselves are the
//! built-in events of [`crate::events`], routed to the document's owner by the `Backend`
//! (the server), so any node answers for any document.
//!
//! **Invariant:** nothing outside a document's owner touches its content; this module only
//! parses requests, asks the backend and formats answers.

pub mod client;
pub mod commands;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tracing::debug;

use crate::cluster::EmitError;
use crate::events::NodeStatus;

pub use routes::{ROUTES, parse_revocation, parse_target};

/// Connections the admin listener serves at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 256;

/// One entry of a document listing ([`crate::ServerHandle::list_documents`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DocumentEntry {
    /// The document name.
    pub name: String,
    /// Whether the database holds content for it.
    pub stored: bool,
    /// Whether some node has it loaded.
    pub loaded: bool,
    /// The node that has it loaded (its owner), if any.
    pub owner: Option<String>,
    /// The ownership epoch (the loaded one, else the stored one).
    pub epoch: Option<i64>,
    /// Clients attached on the owner (including clients of other nodes).
    pub connections: usize,
}

/// A page of [`crate::ServerHandle::list_documents`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DocumentPage {
    /// The documents, sorted by name.
    pub documents: Vec<DocumentEntry>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Why a drain could not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DrainError {
    /// No live node has this id.
    #[error("no live node {0:?}")]
    NotFound(String),
    /// The node could not be reached.
    #[error(transparent)]
    Unavailable(#[from] EmitError),
}

/// What the admin API asks of the server.
#[async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    /// Runs event `name` on the owner of `doc` (claiming it when nobody owns it, unless
    /// `claim` is false), waiting at most `timeout`.
    async fn emit(
        &self,
        doc: &str,
        name: &str,
        payload: Vec<u8>,
        timeout: Duration,
        claim: bool,
    ) -> Result<Vec<u8>, EmitError>;
    /// The node that owns `doc`, if any (never claims).
    async fn owner(&self, doc: &str) -> Result<Option<String>, EmitError>;
    /// Stored and loaded documents whose name starts with `prefix`, after `after`.
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DocumentPage, EmitError>;
    /// This node's status.
    async fn node(&self) -> NodeStatus;
    /// Every live node's status.
    async fn nodes(&self) -> Result<Vec<NodeStatus>, EmitError>;
    /// Starts draining node `node`.
    async fn drain(&self, node: &str) -> Result<(), DrainError>;
    /// Revokes `what` until `until` on every node.
    async fn revoke(
        &self,
        what: crate::revoke::Revocation,
        until: std::time::SystemTime,
    ) -> Result<crate::revoke::RevokeReport, crate::revoke::RevokeError>;
    /// Lifts a revocation on every node.
    async fn lift(
        &self,
        what: crate::revoke::Revocation,
    ) -> Result<bool, crate::revoke::RevokeError>;
    /// The revocations in force.
    fn revocations(&self) -> Vec<crate::revoke::RevocationEntry>;
    /// The default reply timeout of custom events (`custom_event_ttl_ms`).
    fn default_timeout(&self) -> Duration;
}

/// The listener's limits and credentials.
#[derive(Debug)]
pub(crate) struct AdminSettings {
    /// SHA-256 of every accepted token (compared in constant time).
    token_digests: Vec<[u8; 32]>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Requests per second (bursts of twice as many).
    pub requests_per_second: u32,
    /// Largest payload of a custom event or update (`max_message_bytes`).
    pub max_payload_bytes: usize,
}

impl AdminSettings {
    /// Settings from the configuration; `None` when no admin token is configured.
    pub(crate) fn from_config(config: &crate::config::Config) -> Option<AdminSettings> {
        let tokens = config.admin_token_list().ok()?;
        if tokens.is_empty() {
            return None;
        }
        Some(AdminSettings {
            token_digests: tokens.iter().map(|t| digest(t.as_bytes())).collect(),
            max_body_bytes: config.admin_max_body_bytes,
            requests_per_second: config.admin_requests_per_second,
            max_payload_bytes: config.max_message_bytes,
        })
    }

    /// True when `token` is one of the configured tokens.
    fn accepts(&self, token: &[u8]) -> bool {
        let d = digest(token);
        let mut found = false;
        for t in &self.token_digests {
            let diff = t
                .iter()
                .zip(d.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= diff == 0;
        }
        found
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(b));
    out
}

/// A token bucket over the whole listener.
#[derive(Debug)]
struct RateLimit {
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
    rate: f64,
    burst: f64,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        let burst = f64::from(per_second) * 2.0;
        RateLimit {
            state: std::sync::Mutex::new((burst, tokio::time::Instant::now())),
            rate: f64::from(per_second),
            burst,
        }
    }

    fn allow(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What every request handler shares.
struct Admin {
    backend: Arc<dyn Backend>,
    settings: AdminSettings,
    rate: RateLimit,
    metrics: crate::metrics::Metrics,
}

/// Serves the admin API on `listener` until the task is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    settings: AdminSettings,
    metrics: crate::metrics::Metrics,
    header_timeout: Duration,
) {
    let admin = Arc::new(Admin {
        rate: RateLimit::new(settings.requests_per_second),
        backend,
        settings,
        metrics,
    });
    crate::http::accept_bounded(listener, MAX_CONNECTIONS, "admin", move |tcp, remote| {
        let admin = admin.clone();
        async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(routes::handle(&admin, req).await) }
            });
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            if let Err(e) = b.serve_connection(TokioIo::new(tcp), svc).await {
                debug!(peer = %remote, error = %e, "admin connection ended with an error");
            }
        }
    })
    .await;
}
