//! Custom events sent from outside the cluster (`hearth cluster emit`), and what they share with
//! [`Cluster::emit`](super::Cluster::emit): the transport settings of every cluster process and
//! the rule for what an `rpc` result means.
//!
//! The emitter is an *ephemeral caller*: node id [`EMITTER_NODE_ID`] with a fresh incarnation,
//! its own inbox channel `<prefix>:inbox:hearth-cli:<incarnation>` for the reply, and the
//! cluster secret of its configuration (envelopes are signed and replies verified exactly as
//! between nodes). It never claims a document, never publishes a node key and never answers
//! envelopes, so it is not a member: owners reply to the `from` address of any authentic `rpc`.
//!
//! Flow: read the document's lock holder (like `hearth cluster owner`); nobody →
//! [`RemoteEmitError::NoOwner`] (the emitter cannot run hooks, so it does not claim). Otherwise
//! send `rpc` to the holder's incarnation and wait at most `custom_event_ttl_ms`. A `not_owner`
//! answer or an unreachable holder re-reads the holder once, like
//! [`Cluster::emit`](super::Cluster::emit) re-routes.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::ClientLike as _;
use hearth_lock::{HolderId, LockClient, LockTiming};
use hearth_proxy::{
    Auth, Body, Inbound, NodeAddr, NodeId, Rpc, RpcError, RpcFailure, Transport, TransportConfig,
};
use tracing::debug;

use super::{ClusterError, EmitError, holder_addr, redis_client};
use crate::config::Config;

/// The node id of `hearth cluster emit` processes (each with a fresh incarnation).
pub const EMITTER_NODE_ID: &str = "hearth-cli";

/// How long the emitter may take to connect to Redis and subscribe its inbox.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The transport settings of a cluster process with address `me`: Redis URL, prefix, the
/// envelope authentication from the cluster secrets (current and previous, see
/// [`Config::cluster_secrets`]), and the envelope size cap.
pub(crate) fn transport_config(
    config: &Config,
    me: NodeAddr,
) -> Result<TransportConfig, ClusterError> {
    let mut tc = TransportConfig::new(config.redis_url.clone(), config.redis_prefix.clone(), me);
    tc.tls = super::redis_tls(config)?;
    tc.auth = Auth::new(&config.cluster_secrets()?);
    tc.max_envelope_bytes = max_payload_bytes(config) + 4096;
    tc.batching = config.cluster_batching;
    Ok(tc)
}

/// The largest frame or event payload an envelope carries (the envelope cap leaves 4 KiB for
/// the rest of the envelope).
fn max_payload_bytes(config: &Config) -> usize {
    config.max_message_bytes.max(1 << 20)
}

/// A lock client on `redis` that only reads holders (`hearth cluster owner`, `hearth cluster
/// emit`).
pub(crate) fn reader_lock(
    config: &Config,
    redis: fred::clients::Client,
) -> Result<LockClient, ClusterError> {
    Ok(LockClient::new(
        redis,
        config.redis_prefix.clone(),
        HolderId::new("cli")?,
        LockTiming::default(),
    )?)
}

/// What the result of one `rpc` to the resolved owner means: `Break` with the final outcome,
/// or `Continue` with the reason to re-resolve the owner and try again (`not_owner`, or the
/// owner's incarnation is gone).
pub(crate) fn settle(
    result: Result<Vec<u8>, RpcError>,
    owner: &NodeAddr,
) -> ControlFlow<Result<Vec<u8>, EmitError>, EmitError> {
    match result {
        Ok(v) => ControlFlow::Break(Ok(v)),
        Err(RpcError::NotOwner { .. }) => ControlFlow::Continue(EmitError::Unavailable(format!(
            "{owner} says it does not own the document"
        ))),
        Err(RpcError::Unreachable) => {
            ControlFlow::Continue(EmitError::Unavailable(format!("{owner} is unreachable")))
        }
        Err(RpcError::Timeout) => ControlFlow::Break(Err(EmitError::Timeout)),
        Err(RpcError::Remote { code, msg }) => {
            ControlFlow::Break(Err(EmitError::from_failure(RpcFailure {
                code,
                msg,
                holder: None,
            })))
        }
        Err(e) => ControlFlow::Break(Err(EmitError::Unavailable(e.to_string()))),
    }
}

/// Why `hearth cluster emit` failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteEmitError {
    /// No node holds the document's ownership lock (nothing was sent).
    #[error("no node owns document {0:?}")]
    NoOwner(String),
    /// The payload does not fit in an envelope (nothing was sent).
    #[error("payload of {len} bytes is over the {max}-byte limit (max_message_bytes)")]
    PayloadTooLarge {
        /// Payload size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The owner answered with an error, did not answer in time, or could not be reached.
    #[error(transparent)]
    Event(#[from] EmitError),
    /// Redis could not be reached, or the configuration cannot address the cluster.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl RemoteEmitError {
    /// True when trying again later may succeed (timeout, Redis or the owner unreachable);
    /// false when the answer is definitive (no owner, no handler, the handler failed).
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteEmitError::NoOwner(_) | RemoteEmitError::PayloadTooLarge { .. } => false,
            RemoteEmitError::Event(
                EmitError::NoHandler | EmitError::Handler(_) | EmitError::NotOwned,
            ) => false,
            RemoteEmitError::Event(EmitError::Timeout | EmitError::Unavailable(_)) => true,
            RemoteEmitError::Cluster(_) => true,
        }
    }
}

/// `hearth cluster emit DOC EVENT`: runs custom event `event` with `payload` on the node that
/// owns `doc`, from outside the cluster, and returns the reply payload. Waits at most
/// `custom_event_ttl_ms` for each of at most two attempts (the second only after a `not_owner`
/// or unreachable owner, which fail fast).
pub async fn emit_remote(
    config: &Config,
    doc: &str,
    event: &str,
    payload: Vec<u8>,
) -> Result<Vec<u8>, RemoteEmitError> {
    let max = max_payload_bytes(config);
    if payload.len() > max {
        return Err(RemoteEmitError::PayloadTooLarge {
            len: payload.len(),
            max,
        });
    }
    let me = NodeAddr::fresh(NodeId::new(EMITTER_NODE_ID).map_err(ClusterError::from)?);
    let tc = transport_config(config, me)?;
    let connect = async {
        let (transport, inbound) = Transport::connect(tc).await.map_err(ClusterError::from)?;
        let redis = redis_client(config).await?;
        Ok::<_, ClusterError>((transport, inbound, redis))
    };
    let (transport, mut inbound, redis) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
        ClusterError::Redis(format!("no connection within {CONNECT_TIMEOUT:?}"))
    })??;
    let lock = reader_lock(config, redis.clone())?;
    let rpc = Arc::new(Rpc::new(transport.clone()));
    let replies = {
        let rpc = rpc.clone();
        tokio::spawn(async move {
            while let Some(ev) = inbound.recv().await {
                match ev {
                    Inbound::Envelope(env) => {
                        if let Body::RpcReply(reply) = env.body {
                            rpc.on_reply(reply);
                        }
                    }
                    Inbound::Rejected { reason, detail } => {
                        debug!(reason = reason.as_str(), %detail, "envelope rejected");
                    }
                    _ => {}
                }
            }
        })
    };
    let ttl = Duration::from_millis(config.custom_event_ttl_ms);
    let result = call_owner(&rpc, &lock, doc, event, payload, ttl).await;
    replies.abort();
    transport.shutdown().await;
    let _ = redis.quit().await;
    result
}

async fn call_owner(
    rpc: &Rpc,
    lock: &LockClient,
    doc: &str,
    event: &str,
    payload: Vec<u8>,
    ttl: Duration,
) -> Result<Vec<u8>, RemoteEmitError> {
    let mut last = EmitError::Unavailable("ownership kept moving".into());
    for _ in 0..2 {
        let Some(holder) = lock.holder(doc).await.map_err(ClusterError::from)? else {
            return Err(RemoteEmitError::NoOwner(doc.to_owned()));
        };
        let owner = holder_addr(&holder)?;
        debug!(doc, owner = %owner, event, "sending custom event");
        match settle(
            rpc.call(&owner, doc, event, payload.clone(), ttl).await,
            &owner,
        ) {
            ControlFlow::Break(r) => return r.map_err(RemoteEmitError::from),
            ControlFlow::Continue(why) => last = why,
        }
    }
    Err(last.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use hearth_proxy::{Incarnation, RpcErrorCode};

    use super::*;

    fn owner() -> NodeAddr {
        NodeAddr::new(NodeId::new("n1").unwrap(), Incarnation(1))
    }

    #[test]
    fn settle_retries_only_on_not_owner_and_unreachable() {
        let o = owner();
        assert!(matches!(
            settle(Err(RpcError::NotOwner { holder: None }), &o),
            ControlFlow::Continue(EmitError::Unavailable(_))
        ));
        assert!(matches!(
            settle(Err(RpcError::Unreachable), &o),
            ControlFlow::Continue(EmitError::Unavailable(_))
        ));
        assert!(matches!(
            settle(Err(RpcError::Timeout), &o),
            ControlFlow::Break(Err(EmitError::Timeout))
        ));
        assert!(matches!(
            settle(
                Err(RpcError::Remote {
                    code: RpcErrorCode::NoHandler,
                    msg: String::new()
                }),
                &o
            ),
            ControlFlow::Break(Err(EmitError::NoHandler))
        ));
        assert!(matches!(
            settle(
                Err(RpcError::Remote {
                    code: RpcErrorCode::HandlerError,
                    msg: "boom".into()
                }),
                &o
            ),
            ControlFlow::Break(Err(EmitError::Handler(m))) if m == "boom"
        ));
        assert!(matches!(
            settle(Ok(b"x".to_vec()), &o),
            ControlFlow::Break(Ok(v)) if v == b"x"
        ));
    }

    #[test]
    fn transient_errors_are_the_retryable_ones() {
        assert!(!RemoteEmitError::NoOwner("d".into()).is_transient());
        assert!(!RemoteEmitError::PayloadTooLarge { len: 2, max: 1 }.is_transient());
        assert!(!RemoteEmitError::Event(EmitError::NoHandler).is_transient());
        assert!(!RemoteEmitError::Event(EmitError::Handler("x".into())).is_transient());
        assert!(RemoteEmitError::Event(EmitError::Timeout).is_transient());
        assert!(RemoteEmitError::Event(EmitError::Unavailable("x".into())).is_transient());
        assert!(RemoteEmitError::Cluster(ClusterError::Redis("x".into())).is_transient());
    }
}
