//! [`Shared`]: the state every task of one server reaches through an `Arc`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::doc::committer::Committer;
use crate::doc::registry::Registry;
use crate::hooks::Extensions;
use crate::metrics::Metrics;
use crate::storage::DocumentStore;

/// Server-wide state.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub extensions: Extensions,
    pub store: Arc<dyn DocumentStore>,
    pub metrics: Metrics,
    pub registry: Registry,
    pub committer: Committer,
    /// Cancelled when the server starts shutting down: sockets close, listeners stop.
    pub shutdown: CancellationToken,
    /// Every socket task (local sockets, and stand-ins for clients of other nodes): a shutdown
    /// waits for them to end before it stores the documents.
    pub sockets: TaskTracker,
    /// True while shutting down (`/readyz` reports not ready).
    pub draining: AtomicBool,
    /// Cluster membership, when `redis_url` is set.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Failed-authentication counts and bans per client address.
    pub throttle: crate::throttle::AuthThrottle,
}
