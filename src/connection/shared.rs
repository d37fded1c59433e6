//! [`Shared`]: the state every task of one server reaches through an `Arc`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::placement::Placement;
use crate::config::Config;
use crate::doc::services::DocServices;
use crate::hooks::Extensions;
use crate::metrics::Metrics;

/// Server-wide state.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub extensions: Extensions,
    pub metrics: Metrics,
    /// The document layer: storage, the loaded documents, the group commit.
    pub docs: Arc<DocServices>,
    /// Cancelled when the server starts shutting down: sockets close, listeners stop.
    pub shutdown: CancellationToken,
    /// Cancelled when sockets must close: at a shutdown (a child of `shutdown`) or when the
    /// node drains. Sockets wait on [`signals`](Self::signals), which follows it.
    pub stop_sockets: CancellationToken,
    /// The stop and revocation events every socket waits for, with one waiter each.
    pub signals: Arc<super::signals::Signals>,
    /// Every socket task (local sockets, and stand-ins for clients of other nodes): a shutdown
    /// waits for them to end before it stores the documents.
    pub sockets: TaskTracker,
    /// True while shutting down (`/readyz` reports not ready).
    pub draining: AtomicBool,
    /// What the background checks of storage (and Redis) found; `/readyz` answers from it.
    pub readiness: crate::health::Readiness,
    /// Where authenticated documents are served; `None` on a single node (all local).
    pub placement: Option<Arc<dyn Placement>>,
    /// Failed-authentication counts and bans per client address.
    pub throttle: crate::throttle::AuthThrottle,
    /// Revoked users, token ids and documents: sockets refuse their connections.
    pub revocations: Arc<crate::revoke::Revocations>,
}
