//! Custom events: run here, or on the owner of the document through the RPC envelopes.

use super::*;

impl Cluster {
    pub(super) async fn on_rpc(
        self: Arc<Self>,
        shared: Arc<Shared>,
        from: NodeAddr,
        req: RpcRequest,
    ) {
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
                Ok(Home::Here) => run_event(&shared, &req.doc, &req.name, &req.payload).await,
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
                .route(&shared.docs.registry, doc)
                .await
                .map_err(|e| EmitError::Unavailable(e.to_string()))?
            {
                Home::Here => {
                    let r = run_event(shared, doc, name, &payload)
                        .await
                        .map_err(EmitError::from_failure);
                    self.drop_unused_claim(&shared.docs.registry, doc);
                    return r;
                }
                Home::Node(owner) => {
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
    pub(super) fn from_failure(f: RpcFailure) -> Self {
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
