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
    Auth, Body, Inbound, NodeAddr, NodeId, PubSubMode, Rpc, RpcError, RpcFailure, Transport,
    TransportConfig,
};
use tracing::debug;

use super::{ClusterError, EmitError, holder_addr, redis_client};
use crate::config::Config;

/// The node id of `hearth cluster emit` processes (each with a fresh incarnation).
pub const EMITTER_NODE_ID: &str = "hearth-cli";

/// How long the emitter may take to subscribe its inbox once Redis answered.
const CONNECT_TIMEOUT: Duration = super::redis::CONNECT_TIMEOUT;

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
    tc.pubsub = if config.redis_pubsub_sharded() {
        PubSubMode::Sharded
    } else {
        PubSubMode::Classic
    };
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
    /// The command line names no document or event a node could serve (nothing was sent).
    #[error("{0}")]
    Usage(String),
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
    /// The owner's published secret fingerprints show that it and this command do not share
    /// a cluster secret: it would drop the request (nothing was sent).
    #[error(
        "cluster_secret does not match the live nodes' secret: node {node} uses secret \
         {theirs}, this command {mine} (fingerprints); use the nodes' HEARTH_CLUSTER_SECRET or \
         HEARTH_CLUSTER_SECRET_FILE"
    )]
    SecretMismatch {
        /// The owner's node id.
        node: String,
        /// The fingerprint of the owner's current secret.
        theirs: String,
        /// The fingerprint of this command's current secret.
        mine: String,
    },
    /// Redis could not be reached, or the configuration cannot address the cluster.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Exit status of `hearth cluster emit`: definitive failure, retrying will not help.
pub(crate) const EXIT_DEFINITIVE: u8 = 1;
/// Exit status: transient failure, try again later.
pub(crate) const EXIT_TRANSIENT: u8 = 2;
/// Exit status: the settings or the command line are wrong (nothing was sent).
pub(crate) const EXIT_USAGE: u8 = 64;

impl RemoteEmitError {
    /// The exit status of `hearth cluster emit` for this error (docs/cluster.md): 64 for a
    /// wrong command line or setting, 2 for a failure worth retrying, 1 for the rest.
    pub fn exit_status(&self) -> u8 {
        match self {
            RemoteEmitError::Usage(_) => EXIT_USAGE,
            RemoteEmitError::NoOwner(_)
            | RemoteEmitError::PayloadTooLarge { .. }
            | RemoteEmitError::SecretMismatch { .. } => EXIT_DEFINITIVE,
            RemoteEmitError::Event(
                EmitError::NoHandler | EmitError::Handler(_) | EmitError::NotOwned,
            ) => EXIT_DEFINITIVE,
            RemoteEmitError::Event(EmitError::Timeout | EmitError::Unavailable(_)) => {
                EXIT_TRANSIENT
            }
            RemoteEmitError::Cluster(e) => e.exit_status(),
        }
    }
}

/// Refuses a document or event name that no node would serve, before anything is sent.
fn check_names(config: &Config, doc: &str, event: &str) -> Result<(), RemoteEmitError> {
    if !crate::connection::hocuspocus::valid_document_name(doc, config.max_document_name_bytes) {
        return Err(RemoteEmitError::Usage(format!(
            "document name {doc:?} is not one a client can open: 1 to {} bytes \
             (max_document_name_bytes), not blank, no control characters",
            config.max_document_name_bytes
        )));
    }
    if event.trim().is_empty() || event.chars().any(char::is_control) {
        return Err(RemoteEmitError::Usage(format!(
            "event name {event:?} must not be blank or contain control characters"
        )));
    }
    Ok(())
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
    check_names(config, doc, event)?;
    let max = max_payload_bytes(config);
    if payload.len() > max {
        return Err(RemoteEmitError::PayloadTooLarge {
            len: payload.len(),
            max,
        });
    }
    let me = NodeAddr::fresh(NodeId::new(EMITTER_NODE_ID).map_err(ClusterError::from)?);
    let tc = transport_config(config, me)?;
    // Redis first: its failure names redis_url and the cause
    let redis = redis_client(config).await?;
    let (transport, mut inbound) = tokio::time::timeout(CONNECT_TIMEOUT, Transport::connect(tc))
        .await
        .map_err(|_| {
            super::redis::connect_error(
                config,
                format!("cannot subscribe within {} s", CONNECT_TIMEOUT.as_secs()),
            )
        })?
        .map_err(ClusterError::from)?;
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
    let secrets = config.cluster_secrets().map_err(ClusterError::from)?;
    let result = call_owner(
        &rpc,
        &lock,
        SecretCheck {
            redis: &redis,
            keys: transport.keys(),
            secrets: &secrets,
        },
        (doc, event, payload),
        ttl,
    )
    .await;
    replies.abort();
    transport.shutdown().await;
    let _ = redis.quit().await;
    result
}

/// What the emitter compares its secrets with before it sends.
struct SecretCheck<'a> {
    redis: &'a fred::clients::Client,
    keys: &'a hearth_proxy::Keys,
    secrets: &'a hearth_proxy::Secrets,
}

impl SecretCheck<'_> {
    /// Fails when `owner` published fingerprints of secrets it cannot talk with.
    async fn check(&self, owner: &NodeAddr) -> Result<(), RemoteEmitError> {
        match super::fingerprint::of_node(self.redis, self.keys, owner).await? {
            Some(p) if !p.talks_with(self.secrets) => Err(RemoteEmitError::SecretMismatch {
                node: owner.id.to_string(),
                theirs: p.current,
                mine: self.secrets.current.fingerprint(),
            }),
            _ => Ok(()),
        }
    }
}

async fn call_owner(
    rpc: &Rpc,
    lock: &LockClient,
    secrets: SecretCheck<'_>,
    (doc, event, payload): (&str, &str, Vec<u8>),
    ttl: Duration,
) -> Result<Vec<u8>, RemoteEmitError> {
    let mut last = EmitError::Unavailable("ownership kept moving".into());
    for _ in 0..2 {
        let Some(holder) = lock.holder(doc).await.map_err(ClusterError::from)? else {
            return Err(RemoteEmitError::NoOwner(doc.to_owned()));
        };
        let owner = holder_addr(&holder)?;
        secrets.check(&owner).await?;
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
    fn exit_statuses_say_whether_to_retry() {
        let status = |e: RemoteEmitError| e.exit_status();
        assert_eq!(
            status(RemoteEmitError::NoOwner("d".into())),
            EXIT_DEFINITIVE
        );
        assert_eq!(
            status(RemoteEmitError::PayloadTooLarge { len: 2, max: 1 }),
            EXIT_DEFINITIVE
        );
        assert_eq!(status(EmitError::NoHandler.into()), EXIT_DEFINITIVE);
        assert_eq!(
            status(EmitError::Handler("x".into()).into()),
            EXIT_DEFINITIVE
        );
        assert_eq!(status(EmitError::Timeout.into()), EXIT_TRANSIENT);
        assert_eq!(
            status(EmitError::Unavailable("x".into()).into()),
            EXIT_TRANSIENT
        );
        assert_eq!(
            status(ClusterError::Redis("x".into()).into()),
            EXIT_TRANSIENT
        );
        assert_eq!(status(RemoteEmitError::Usage("x".into())), EXIT_USAGE);
        let config = ClusterError::Config(crate::config::ConfigError::Invalid {
            name: "redis_url",
            message: "x".into(),
        });
        assert_eq!(status(config.into()), EXIT_USAGE);
    }

    #[test]
    fn blank_or_oversized_names_are_usage_errors() {
        let c = Config::default();
        for (doc, event) in [
            ("", "e"),
            ("  ", "e"),
            ("a\nb", "e"),
            ("d", ""),
            ("d", "a\u{7}"),
        ] {
            let e = check_names(&c, doc, event).unwrap_err();
            assert_eq!(e.exit_status(), EXIT_USAGE, "{doc:?} {event:?}");
        }
        let long = "x".repeat(c.max_document_name_bytes + 1);
        assert!(check_names(&c, &long, "e").is_err());
        assert!(check_names(&c, "notes/2024", "summarize").is_ok());
    }
}
