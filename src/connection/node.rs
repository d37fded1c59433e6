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
    // documents that finish loading meanwhile are taken in the next round
    for round in 0..10 {
        let handles = shared.docs.registry.handles();
        if handles.is_empty() {
            break;
        }
        info!(documents = handles.len(), round, "storing documents");
        let mut waits = Vec::new();
        for h in handles {
            let (tx, rx) = oneshot::channel();
            match tokio::time::timeout_at(deadline, h.send(DocCommand::Shutdown(tx))).await {
                Ok(true) => waits.push(rx),
                Ok(false) => {}
                Err(_) => warn!(
                    doc = h.name(),
                    "a document took no command before the deadline"
                ),
            }
        }
        for rx in waits {
            if tokio::time::timeout_at(deadline, rx).await.is_err() {
                warn!("a document did not finish storing before the deadline");
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    info!(node = %shared.config.node_id, "drained");
}
