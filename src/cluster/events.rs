//! Custom events: run here, or on the owner of the document through the RPC envelopes.

use super::*;
use hearth_proxy::RpcError;

impl Cluster {
    pub(super) async fn on_rpc(
        self: Arc<Self>,
        shared: Arc<Shared>,
        from: NodeAddr,
        req: RpcRequest,
    ) {
        if crate::events::is_node_scoped(&req.name) && req.doc.is_empty() {
            let result = self.on_node_event(&shared, &req.name, &req.payload).await;
            if let Err(e) = self.rpc.reply(&from, &req, result).await {
                debug!(error = %e, "node event reply failed");
            }
            return;
        }
        let owned = shared.docs.registry.get(&req.doc).is_some()
            || lock_map(&self.claims).contains_key(&req.doc);
        let result = if !owned && req.only_if_open {
            Err(RpcFailure {
                code: RpcErrorCode::NotOwner,
                msg: "document not open here".into(),
                holder: None,
            })
        } else {
            match self.route(&shared.docs.registry, &req.doc).await {
                // the caller waits at most its deadline; so does the work done for it here
                Ok(Home::Here) => {
                    let deadline = Duration::from_millis(req.deadline_ms.max(1));
                    tokio::time::timeout(
                        deadline,
                        run_event(&shared, &req.doc, &req.name, &req.payload),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(RpcFailure {
                            code: RpcErrorCode::Expired,
                            msg: "the event did not finish before its deadline".into(),
                            holder: None,
                        })
                    })
                }
                _ => Err(RpcFailure {
                    code: RpcErrorCode::NotOwner,
                    msg: "not the owner".into(),
                    holder: None,
                }),
            }
        };
        self.drop_unused_claim(&shared.docs.registry, &req.doc);
        if let Err(e) = self.rpc.reply(&from, &req, result).await {
            debug!(error = %e, "custom event reply failed");
        }
    }

    /// A built-in event addressed to this node rather than to a document's owner.
    async fn on_node_event(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        name: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, RpcFailure> {
        let failure = |msg: String| RpcFailure {
            code: RpcErrorCode::HandlerError,
            msg,
            holder: None,
        };
        match name {
            crate::events::NODE_STATUS => {
                let with_documents = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("documents").and_then(|d| d.as_bool()))
                    .unwrap_or(false);
                let status = crate::connection::node::status(shared, true, with_documents).await;
                serde_json::to_vec(&status).map_err(|e| failure(format!("unavailable: {e}")))
            }
            crate::events::NODE_DRAIN => {
                self.start_drain(shared.clone());
                Ok(br#"{"draining":true}"#.to_vec())
            }
            crate::events::NODE_REVOKE => {
                use crate::revoke::NodeChange;
                let change =
                    NodeChange::parse(payload).map_err(|e| failure(format!("bad_request: {e}")))?;
                match change {
                    NodeChange::Revoke(entry) => shared
                        .revocations
                        .apply(entry.what, entry.until_ms)
                        .map_err(|e| failure(format!("bad_request: {e}")))?,
                    NodeChange::Lift(what) => {
                        shared.revocations.lift_here(&what);
                    }
                }
                Ok(br#"{"applied":true}"#.to_vec())
            }
            other => Err(failure(format!("not_found: no node event {other}"))),
        }
    }

    /// Drains this node in the background (see [`crate::connection::node::drain`]): peers are
    /// told first, so they stop routing here; the node stays a member and keeps running.
    pub(crate) fn start_drain(self: &Arc<Self>, shared: Arc<Shared>) {
        if self
            .draining
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.drain().await;
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(shared.config.shutdown_timeout_ms);
            crate::connection::node::drain(&shared, deadline).await;
            let claims: Vec<LockGuard> = lock_map(&me.claims).drain().map(|(_, g)| g).collect();
            for g in claims {
                let _ = g.release().await;
            }
        });
    }

    /// Asks node `node` (its id) for its status, or to drain.
    pub(crate) async fn node_call(
        &self,
        node: &NodeAddr,
        name: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, EmitError> {
        let waiting = Waiting::new(&self.metrics.events_waiting);
        let r = self.rpc.call(node, "", name, payload, timeout).await;
        drop(waiting);
        match r {
            Ok(v) => Ok(v),
            Err(RpcError::Timeout) => Err(EmitError::Timeout),
            Err(RpcError::Remote { code, msg }) => Err(EmitError::from_failure(RpcFailure {
                code,
                msg,
                holder: None,
            })),
            Err(e) => Err(EmitError::Unavailable(e.to_string())),
        }
    }

    /// Runs a custom event on the owner of `doc` (here or remotely), waiting at most
    /// `timeout` for the owner, this node included. With `claim` false, a document nobody owns is not loaded
    /// here: [`EmitError::NotOwned`].
    pub(crate) async fn emit(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        doc: &str,
        name: &str,
        payload: Vec<u8>,
        timeout: Option<Duration>,
        claim: bool,
    ) -> Result<Vec<u8>, EmitError> {
        let timeout = timeout.unwrap_or(self.event_ttl);
        if !claim && shared.docs.registry.get(doc).is_none() {
            let holder = self
                .lock
                .holder(doc)
                .await
                .map_err(|e| EmitError::Unavailable(e.to_string()))?;
            if holder.is_none() {
                return Err(EmitError::NotOwned);
            }
        }
        let mut last = EmitError::Unavailable("ownership kept moving".into());
        for _ in 0..2 {
            match self
                .route(&shared.docs.registry, doc)
                .await
                .map_err(|e| EmitError::Unavailable(e.to_string()))?
            {
                Home::Here => {
                    // in a task of its own, so that a caller giving up still releases the claim
                    let (me, shared, doc, name) = (
                        self.clone(),
                        shared.clone(),
                        doc.to_owned(),
                        name.to_owned(),
                    );
                    let payload = payload.clone();
                    let run = tokio::spawn(async move {
                        let r = tokio::time::timeout(
                            timeout,
                            run_event(&shared, &doc, &name, &payload),
                        )
                        .await
                        .map_err(|_| EmitError::Timeout)
                        .and_then(|r| r.map_err(EmitError::from_failure));
                        me.drop_unused_claim(&shared.docs.registry, &doc);
                        r
                    });
                    return run
                        .await
                        .unwrap_or_else(|e| Err(EmitError::Unavailable(e.to_string())));
                }
                Home::Node(owner) => {
                    let waiting = Waiting::new(&self.metrics.events_waiting);
                    let r = self
                        .rpc
                        .call(&owner, doc, name, payload.clone(), timeout)
                        .await;
                    drop(waiting);
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

    /// The id of the node holding `doc`'s lock, if any.
    pub(crate) async fn owner_of(&self, doc: &str) -> Result<Option<String>, EmitError> {
        self.lock
            .holder(doc)
            .await
            .map(|h| h.map(|h| h.node_id().to_owned()))
            .map_err(|e| EmitError::Unavailable(e.to_string()))
    }

    /// The live nodes of the cluster (from their presence records).
    pub(crate) async fn live_nodes(&self) -> Result<Vec<NodeAddr>, EmitError> {
        self.presence
            .live_nodes(self.transport.keys())
            .await
            .map_err(|e| EmitError::Unavailable(e.to_string()))
    }
}

/// Counts one awaited reply in a gauge for as long as it lives (also when the caller gives up
/// and drops the call).
struct Waiting<'a>(&'a prometheus::IntGauge);

impl<'a> Waiting<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Waiting(g)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs a custom event here: a built-in event (`hearth.*`), else the `on_custom_event` hooks.
async fn run_event(
    shared: &Shared,
    doc: &str,
    name: &str,
    payload: &[u8],
) -> Result<Vec<u8>, RpcFailure> {
    if crate::events::is_builtin(name) {
        if crate::events::is_node_scoped(name) {
            return Err(RpcFailure {
                code: RpcErrorCode::HandlerError,
                msg: format!("bad_request: {name} is addressed to a node, not to a document"),
                holder: None,
            });
        }
        return crate::events::run(&shared.docs, doc, name, payload)
            .await
            .map_err(|e| RpcFailure {
                code: RpcErrorCode::HandlerError,
                msg: e.to_string(),
                holder: None,
            });
    }
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
    /// Nobody owns the document and the caller asked not to claim it.
    #[error("no node owns the document")]
    NotOwned,
}

impl EmitError {
    pub(super) fn from_failure(f: RpcFailure) -> Self {
        match f.code {
            RpcErrorCode::NoHandler => EmitError::NoHandler,
            RpcErrorCode::HandlerError => EmitError::Handler(f.msg),
            // the owner's own deadline ran out first: the same outcome as the caller's
            RpcErrorCode::Expired => EmitError::Timeout,
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
