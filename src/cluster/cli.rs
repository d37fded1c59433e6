//! `hearth cluster owner` and `hearth cluster status`: read-only looks at a running cluster.

use super::*;

/// `hearth cluster owner DOC`: the owning node's id, if any.
pub async fn owner_of(config: &Config, doc: &str) -> Result<Option<String>, ClusterError> {
    let lock = emit::reader_lock(config, redis_client(config).await?)?;
    Ok(lock.holder(doc).await?.map(|h| h.node_id().to_owned()))
}

/// `hearth cluster status`: live nodes as (node id, incarnation).
pub async fn live_nodes(config: &Config) -> Result<Vec<(String, String)>, ClusterError> {
    let redis = redis_client(config).await?;
    let keys = hearth_proxy::Keys::new(config.redis_prefix.clone())?;
    super::presence::scan_nodes(&redis, &keys).await
}

/// How many payload bytes `hearth cluster decode` shows (as hex) per frame.
const SHOWN_PAYLOAD_BYTES: usize = 48;

/// One captured message, described by [`describe_message`].
#[derive(Debug)]
pub struct Described {
    /// One JSON line per envelope, or one saying why the message was rejected.
    pub lines: Vec<String>,
    /// The message was rejected as a whole.
    pub rejected: bool,
}

/// `hearth cluster decode`: one JSON line per envelope of one captured pub/sub message (a batch
/// gives several), or one line saying why it was rejected. With a cluster secret configured the
/// MAC is verified; without one it is not (and the line says `"verified": false`).
pub fn describe_message(config: &Config, bytes: &[u8]) -> Described {
    Decoder::new(config).describe(bytes, None)
}

/// The codec `hearth cluster decode` reads messages with: the cluster secrets when configured.
struct Decoder {
    codec: hearth_proxy::Codec,
    verified: bool,
}

impl Decoder {
    fn new(config: &Config) -> Decoder {
        let secrets = config.cluster_secrets().ok();
        let auth = secrets
            .as_ref()
            .map_or_else(hearth_proxy::Auth::disabled, hearth_proxy::Auth::new);
        Decoder {
            verified: auth.is_enabled(),
            codec: hearth_proxy::Codec::new(auth, usize::MAX),
        }
    }

    /// See [`describe_message`]; every line also names `channel` when given.
    fn describe(&self, bytes: &[u8], channel: Option<&str>) -> Described {
        let stamp = |mut line: serde_json::Value| {
            if let Some(obj) = line.as_object_mut() {
                obj.insert("verified".into(), self.verified.into());
                if let Some(channel) = channel {
                    obj.insert("channel".into(), channel.into());
                }
            }
            line
        };
        let message = match self.codec.decode_message(bytes) {
            Ok(message) => message,
            Err(e) => {
                let line = stamp(serde_json::json!({
                    "rejected": e.reason().as_str(),
                    "error": e.to_string(),
                    "bytes": bytes.len(),
                }));
                return Described {
                    lines: vec![line.to_string()],
                    rejected: true,
                };
            }
        };
        let count = message.envelopes.len();
        let lines = message
            .envelopes
            .into_iter()
            .map(|item| {
                let mut line = stamp(match item {
                    Ok(env) => describe_envelope(&env),
                    Err(e) => serde_json::json!({
                        "skipped": e.reason().as_str(),
                        "error": e.to_string(),
                        "seq": e.header().map(|h| h.seq),
                    }),
                });
                if let Some(obj) = line.as_object_mut() {
                    obj.insert("sender_reads".into(), message.sender_reads.into());
                    if message.batch {
                        obj.insert("batch_of".into(), count.into());
                    }
                }
                line.to_string()
            })
            .collect();
        Described {
            lines,
            rejected: false,
        }
    }
}

fn describe_envelope(env: &hearth_proxy::Envelope) -> serde_json::Value {
    use serde_json::json;
    let payload = |data: &[u8]| {
        let shown: String = data
            .iter()
            .take(SHOWN_PAYLOAD_BYTES)
            .map(|b| format!("{b:02x}"))
            .collect();
        json!({"len": data.len(), "hex": shown, "truncated": data.len() > SHOWN_PAYLOAD_BYTES})
    };
    let body = match &env.body {
        Body::Open { meta, .. } => json!({
            "path": meta.path,
            "query_len": meta.query.len(),
            "headers": meta.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            "remote": meta.remote,
        }),
        Body::Frame { data, .. } | Body::Out { data, .. } => json!({"data": payload(data)}),
        Body::Fan {
            doc,
            epoch,
            conns,
            data,
        } => json!({
            "doc": doc,
            "epoch": epoch,
            "conns": conns.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "data": payload(data),
        }),
        Body::Detach { reason, .. } => json!({"reason": reason}),
        Body::CloseDoc { close, .. } => {
            json!({"code": close.code, "reason": close.reason, "resync": close.resync})
        }
        Body::NotOwner { holder, .. } => {
            json!({"holder": holder.as_ref().map(|h| format!("{} @{}", h.node, h.epoch))})
        }
        Body::Released { doc, epoch } => json!({"doc": doc, "epoch": epoch}),
        Body::Draining { node } | Body::NodeDown { node } => json!({"node": node.to_string()}),
        Body::Rpc(req) => json!({
            "id": format!("{}:{}", req.id.inc, req.id.n),
            "doc": req.doc,
            "name": req.name,
            "payload": payload(&req.payload),
        }),
        Body::RpcReply(reply) => match &reply.result {
            Ok(data) => {
                json!({"id": format!("{}:{}", reply.id.inc, reply.id.n), "ok": payload(data)})
            }
            Err(f) => {
                json!({"id": format!("{}:{}", reply.id.inc, reply.id.n), "err": format!("{f:?}")})
            }
        },
        Body::Keepalive { .. } => json!({}),
        Body::Part { part, .. } => json!({
            "of": part.of.tag(),
            "index": part.index,
            "last": part.last,
            "data": payload(&part.data),
        }),
    };
    json!({
        "seq": env.header.seq,
        "v": env.header.version,
        "t": env.body.kind().tag(),
        "from": env.header.from.to_string(),
        "to": env.header.to.as_ref().map(ToString::to_string),
        "s": env.body.session().map(|s| json!({
            "conn": s.conn.to_string(),
            "doc": s.doc,
            "epoch": s.epoch,
        })),
        "b": body,
    })
}

/// `hearth cluster decode --listen N`: subscribes to every channel of the cluster's prefix and
/// prints the next `count` messages as [`describe_message`] does, each line with its channel.
pub async fn listen(
    config: &Config,
    count: usize,
    mut print: impl FnMut(&str),
) -> Result<(), ClusterError> {
    use fred::interfaces::{EventInterface as _, PubsubInterface as _};
    let mut builder = Builder::from_config(super::redis_config(config)?);
    builder.with_performance_config(|p| p.broadcast_channel_capacity = 65_536);
    let sub = builder
        .build_subscriber_client()
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    match tokio::time::timeout(super::redis::CONNECT_TIMEOUT, sub.init()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(super::redis::connect_error(
                config,
                super::redis::cause_of(&e),
            ));
        }
        Err(_) => {
            return Err(super::redis::connect_error(
                config,
                format!(
                    "no connection within {} s",
                    super::redis::CONNECT_TIMEOUT.as_secs()
                ),
            ));
        }
    }
    let mut messages = sub.message_rx();
    sub.psubscribe(format!("{}:*", config.redis_prefix))
        .await
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    let decoder = Decoder::new(config);
    let mut seen = 0;
    while seen < count {
        let message = match messages.recv().await {
            Ok(m) => m,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                print(&serde_json::json!({"lagged": n}).to_string());
                continue;
            }
            Err(_) => break,
        };
        seen += 1;
        let Some(bytes) = message.value.as_bytes() else {
            continue;
        };
        for line in decoder.describe(bytes, Some(&message.channel)).lines {
            print(&line);
        }
    }
    let _ = sub.quit().await;
    Ok(())
}
