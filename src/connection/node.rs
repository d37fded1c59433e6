//! The node as a whole, seen from its sockets and documents: its status, and draining it
//! (every socket closes, every document is stored and unloaded) — the first half of a graceful
//! shutdown, and what the admin API's drain runs without exiting.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};

use super::shared::Shared;
use crate::doc::DocCommand;
use crate::events::{NodeStatus, loaded_documents};

/// This node's status; with `with_documents`, the loaded documents too.
pub(crate) async fn status(shared: &Shared, cluster: bool, with_documents: bool) -> NodeStatus {
    let loaded = loaded_documents(&shared.docs).await;
    NodeStatus {
        node: shared.config.node_id.clone(),
        cluster,
        draining: shared.draining.load(Ordering::Acquire),
        documents: loaded.len(),
        connections: loaded.iter().map(|d| d.connections).sum(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        loaded: with_documents.then_some(loaded),
        error: None,
    }
}

/// Marks the node draining (`/readyz` answers 503, new sockets and sessions are refused),
/// closes every socket (each applies what its client already sent, then closes its documents
/// with a reset, so providers reconnect elsewhere) and stores and unloads every document, which
/// releases its ownership. Waits until `deadline` at most.
pub(crate) async fn drain(shared: &Shared, deadline: Instant) {
    shared.draining.store(true, Ordering::Release);
    info!(node = %shared.config.node_id, "draining: closing sockets");
    shared.stop_sockets.cancel();
    shared.sockets.close();
    if tokio::time::timeout_at(deadline, shared.sockets.wait())
        .await
        .is_err()
    {
        warn!(
            sockets = shared.sockets.len(),
            "sockets still open at the drain deadline"
        );
    }
    shared.sockets.reopen();
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
            warn!("a document did not finish storing before the drain deadline");
        }
    }
    info!(node = %shared.config.node_id, "drained");
}
