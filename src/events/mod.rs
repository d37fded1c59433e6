//! Built-in custom events: the document operations of the admin API, as custom events named
//! `hearth.*` that run on the document's owner like any other custom event. So they work the
//! same in-process ([`ServerHandle::emit`](crate::ServerHandle::emit)), from another node (the
//! cluster's `rpc` envelopes) and over HTTP (the admin API, which routes them to the owner).
//!
//! Payloads and replies are JSON. A failure is a handler error whose message starts with a code
//! (`not_found: …`, `bad_request: …`, `unavailable: …`), which [`BuiltinError::parse`] reads
//! back on the caller's side.
//!
//! | event | payload | reply |
//! |---|---|---|
//! | `hearth.get` | `{include?: ["json","state","state_vector"], types?: "name:kind,…"}` | [`DocumentView`] |
//! | `hearth.apply` | `{update: base64}` or `{ops: [...]}` | `{applied: n}` once durable |
//! | `hearth.broadcast` | `{message: string}` | `{connections: n}` |
//! | `hearth.close` | `{}` | `{connections: n}` |
//! | `hearth.delete` | `{}` | `{deleted: true}` (`not_found` when nothing was stored) |
//!
//! Node-addressed (no document): `hearth.node.status`, `hearth.node.drain` and
//! `hearth.node.revoke` (see [`crate::revoke`]).
//!
//! Names starting with `hearth.` are reserved: application hooks never see them.

pub mod handlers;
pub(crate) mod json;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use yrs::{ReadTxn, StateVector, Transact, updates::encoder::Encode};

use crate::doc::services::DocServices;
use crate::doc::{DocCommand, TransactError};
use crate::hooks::Context;

/// Reads a document: `hearth.get`.
pub const GET: &str = "hearth.get";
/// Applies an update or JSON operations: `hearth.apply`.
pub const APPLY: &str = "hearth.apply";
/// Sends a stateless message to every client: `hearth.broadcast`.
pub const BROADCAST: &str = "hearth.broadcast";
/// Closes every connection of the document: `hearth.close`.
pub const CLOSE: &str = "hearth.close";
/// Deletes the stored document: `hearth.delete`.
pub const DELETE: &str = "hearth.delete";
/// A node's status (sent to a node, not routed by document): `hearth.node.status`.
pub const NODE_STATUS: &str = "hearth.node.status";
/// Drains a node (sent to a node, not routed by document): `hearth.node.drain`.
pub const NODE_DRAIN: &str = "hearth.node.drain";

/// Applies or lifts a revocation on a node (sent to a node, not routed by document):
/// `hearth.node.revoke` with `{"revoke": {kind: value, until_ms}}` or `{"lift": {kind: value}}`.
pub const NODE_REVOKE: &str = "hearth.node.revoke";

/// The prefix of every built-in event name.
pub const PREFIX: &str = "hearth.";

/// True for names reserved for built-in events.
pub fn is_builtin(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// True for built-in events addressed to a node rather than to a document's owner.
pub fn is_node_scoped(name: &str) -> bool {
    name == NODE_STATUS || name == NODE_DRAIN || name == NODE_REVOKE
}

/// Why a built-in event failed. On the wire it is a handler error whose message is
/// `"<code>: <message>"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuiltinError {
    /// The document has no content (read, delete), or the event name is unknown.
    #[error("not_found: {0}")]
    NotFound(String),
    /// The payload is malformed or an operation is invalid; nothing was changed.
    #[error("bad_request: {0}")]
    BadRequest(String),
    /// The document could not be loaded, stored or reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl BuiltinError {
    /// Reads a handler error message written by a built-in event back; `None` for any other
    /// message.
    pub fn parse(msg: &str) -> Option<BuiltinError> {
        let (code, rest) = msg.split_once(": ")?;
        let rest = rest.to_owned();
        match code {
            "not_found" => Some(BuiltinError::NotFound(rest)),
            "bad_request" => Some(BuiltinError::BadRequest(rest)),
            "unavailable" => Some(BuiltinError::Unavailable(rest)),
            _ => None,
        }
    }
}

/// The reply of `hearth.get`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DocumentView {
    /// The document name.
    pub name: String,
    /// Every root shared type as JSON (`{rootName: value}`), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Map<String, serde_json::Value>>,
    /// The whole state as a base64 Yjs v1 update, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The state vector, base64, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_vector: Option<String>,
}

/// The payload of `hearth.get`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetRequest {
    /// Which parts to return: `json`, `state`, `state_vector` (all when absent).
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// Type hints, `name:kind,…` with kind `text`, `map`, `array` or `xml`.
    #[serde(default)]
    pub types: Option<String>,
}

/// The payload of `hearth.apply`: exactly one of `update` and `ops`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyRequest {
    #[serde(default)]
    update: Option<String>,
    #[serde(default)]
    ops: Option<Vec<json::Op>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest {
    message: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, BuiltinError> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| BuiltinError::BadRequest(format!("payload: {e}")))
}

fn reply(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn transact_err(e: TransactError) -> BuiltinError {
    match e {
        TransactError::Refused(why) => BuiltinError::BadRequest(why),
        other => BuiltinError::Unavailable(other.to_string()),
    }
}

/// The context hooks see for an edit made through a built-in event.
fn context() -> Context {
    let mut c = Context::new();
    c.insert("origin".to_owned(), serde_json::json!("hearth-admin"));
    c
}

/// Runs the document-scoped built-in event `name` on this node, which owns `doc`.
pub(crate) async fn run(
    docs: &Arc<DocServices>,
    doc: &str,
    name: &str,
    payload: &[u8],
) -> Result<Vec<u8>, BuiltinError> {
    match name {
        GET => get(docs, doc, parse(payload)?).await,
        APPLY => apply(docs, doc, parse(payload)?).await,
        BROADCAST => {
            let req: BroadcastRequest = parse(payload)?;
            if req.message.len() > docs.config.max_message_bytes {
                return Err(BuiltinError::BadRequest(format!(
                    "message of {} bytes is over max_message_bytes ({})",
                    req.message.len(),
                    docs.config.max_message_bytes
                )));
            }
            let Some(h) = docs.registry.get(doc) else {
                return Ok(reply(serde_json::json!({ "connections": 0 })));
            };
            let connections = h.info().await.map_or(0, |i| i.connections);
            h.send(DocCommand::BroadcastStateless(req.message)).await;
            Ok(reply(serde_json::json!({ "connections": connections })))
        }
        CLOSE => {
            let _: Empty = parse(payload)?;
            let Some(h) = docs.registry.get(doc) else {
                return Ok(reply(serde_json::json!({ "connections": 0 })));
            };
            let connections = h.info().await.map_or(0, |i| i.connections);
            h.send(DocCommand::CloseConnections(
                crate::protocol::Close::ResetConnection.reason().into(),
            ))
            .await;
            Ok(reply(serde_json::json!({ "connections": connections })))
        }
        DELETE => {
            let _: Empty = parse(payload)?;
            delete(docs, doc).await
        }
        _ => Err(BuiltinError::NotFound(format!("no built-in event {name}"))),
    }
}

async fn get(docs: &Arc<DocServices>, doc: &str, req: GetRequest) -> Result<Vec<u8>, BuiltinError> {
    let mut want = (false, false, false);
    match &req.include {
        None => want = (true, true, true),
        Some(parts) => {
            for p in parts {
                match p.as_str() {
                    "json" => want.0 = true,
                    "state" => want.1 = true,
                    "state_vector" => want.2 = true,
                    other => {
                        return Err(BuiltinError::BadRequest(format!(
                            "include: unknown part {other:?} (json, state, state_vector)"
                        )));
                    }
                }
            }
        }
    }
    let hints = json::parse_hints(req.types.as_deref().unwrap_or(""))
        .map_err(|e| BuiltinError::BadRequest(format!("types: {e}")))?;
    if !exists(docs, doc).await? {
        return Err(BuiltinError::NotFound(format!("document {doc:?} is empty")));
    }
    let conn = docs
        .open_direct(doc, context())
        .await
        .map_err(|e| BuiltinError::Unavailable(e.to_string()))?;
    let name = doc.to_owned();
    let view = conn
        .read(move |d| {
            let (sv, state) = {
                let txn = d.transact();
                let sv = txn.state_vector();
                if sv == StateVector::default() {
                    return None;
                }
                let state = want
                    .1
                    .then(|| B64.encode(txn.encode_state_as_update_v1(&StateVector::default())));
                (sv, state)
            };
            Some(DocumentView {
                name,
                // opens its own read transaction
                json: want.0.then(|| json::doc_to_json(d, &hints)),
                state,
                state_vector: want.2.then(|| B64.encode(sv.encode_v1())),
            })
        })
        .await;
    conn.disconnect().await;
    match view.map_err(transact_err)? {
        Some(view) => serde_json::to_vec(&view)
            .map_err(|e| BuiltinError::Unavailable(format!("encoding the reply: {e}"))),
        None => Err(BuiltinError::NotFound(format!("document {doc:?} is empty"))),
    }
}

async fn apply(
    docs: &Arc<DocServices>,
    doc: &str,
    req: ApplyRequest,
) -> Result<Vec<u8>, BuiltinError> {
    enum Edit {
        Update(Vec<u8>),
        Ops(Vec<json::Op>),
    }
    let edit = match (req.update, req.ops) {
        (Some(u), None) => Edit::Update(
            B64.decode(u.as_bytes())
                .map_err(|e| BuiltinError::BadRequest(format!("update: not base64: {e}")))?,
        ),
        (None, Some(ops)) => Edit::Ops(ops),
        _ => {
            return Err(BuiltinError::BadRequest(
                "exactly one of `update` and `ops` is required".into(),
            ));
        }
    };
    let conn = docs
        .open_direct(doc, context())
        .await
        .map_err(|e| BuiltinError::Unavailable(e.to_string()))?;
    let result = match edit {
        Edit::Update(update) => conn
            .apply_update(update)
            .await
            .map(|()| 1)
            .map_err(transact_err),
        Edit::Ops(ops) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let done = conn
                .transact_durable(move |d| {
                    let _ = tx.send(json::apply_ops(d, &ops));
                })
                .await;
            match (done, rx.await) {
                (Ok(()), Ok(Ok(n))) => Ok(n),
                (_, Ok(Err(e))) => Err(BuiltinError::BadRequest(e.to_string())),
                (Err(e), _) => Err(transact_err(e)),
                (Ok(()), Err(_)) => Err(BuiltinError::Unavailable("the edit did not run".into())),
            }
        }
    };
    conn.disconnect().await;
    Ok(reply(serde_json::json!({ "applied": result? })))
}

/// Whether `doc` is loaded here or has a row in the database: what is neither is not loaded
/// just to be found empty.
async fn exists(docs: &DocServices, doc: &str) -> Result<bool, BuiltinError> {
    if docs.registry.get(doc).is_some() {
        return Ok(true);
    }
    docs.store
        .current_epoch(doc)
        .await
        .map(|e| e.is_some())
        .map_err(|e| BuiltinError::Unavailable(e.to_string()))
}

async fn delete(docs: &Arc<DocServices>, doc: &str) -> Result<Vec<u8>, BuiltinError> {
    if !exists(docs, doc).await? {
        return Err(BuiltinError::NotFound(format!(
            "document {doc:?} has no stored content"
        )));
    }
    let handle = docs
        .open(doc, &context())
        .await
        .map_err(|e| BuiltinError::Unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    if !handle.send(DocCommand::Delete(tx)).await {
        return Err(BuiltinError::Unavailable(
            "the document closed while being deleted".into(),
        ));
    }
    match rx.await {
        Ok(Ok(true)) => Ok(reply(serde_json::json!({ "deleted": true }))),
        Ok(Ok(false)) => Err(BuiltinError::NotFound(format!(
            "document {doc:?} has no stored content"
        ))),
        Ok(Err(e)) => Err(BuiltinError::Unavailable(e.to_string())),
        Err(_) => Err(BuiltinError::Unavailable(
            "the document closed while being deleted".into(),
        )),
    }
}

/// Applies a JSON array of operations (the `ops` of `hearth.apply`) to `doc` in one
/// transaction, or changes nothing when one of them is invalid; returns how many were applied.
/// This is the admin API's edit path for outside JSON, also driven by the fuzzer.
pub fn apply_ops_json(doc: &yrs::Doc, ops: &[u8]) -> Result<usize, BuiltinError> {
    let ops: Vec<json::Op> =
        serde_json::from_slice(ops).map_err(|e| BuiltinError::BadRequest(format!("ops: {e}")))?;
    json::apply_ops(doc, &ops).map_err(|e| BuiltinError::BadRequest(e.to_string()))
}

/// Every root of `doc` as JSON with the type hints `types` (`name:kind,…`), as `hearth.get`
/// reads it.
pub fn document_json(
    doc: &yrs::Doc,
    types: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, BuiltinError> {
    let hints =
        json::parse_hints(types).map_err(|e| BuiltinError::BadRequest(format!("types: {e}")))?;
    Ok(json::doc_to_json(doc, &hints))
}

/// One loaded document in a [`NodeStatus`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoadedDocument {
    /// The document name.
    pub name: String,
    /// The ownership epoch it is written under (0: not stored yet).
    pub epoch: i64,
    /// Attached clients (including clients of other nodes served here).
    pub connections: usize,
}

/// What `hearth.node.status` reports of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node id.
    pub node: String,
    /// Whether the node runs in a cluster.
    pub cluster: bool,
    /// Whether the node is draining (takes no new clients or documents).
    pub draining: bool,
    /// Number of loaded documents.
    pub documents: usize,
    /// Client connections attached to its documents.
    pub connections: usize,
    /// Hearth's version.
    pub version: String,
    /// The loaded documents, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded: Option<Vec<LoadedDocument>>,
    /// Why the node's status could not be read (it did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How long a document may take to report its state to a status request; one that is busy
/// (waiting for the database, say) is listed without its numbers.
const INFO_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// Collects the loaded documents of this node with their state, asking them all at once; a
/// document that does not answer within [`INFO_TIMEOUT`] is listed with epoch 0 and no
/// connections.
pub(crate) async fn loaded_documents(docs: &DocServices) -> Vec<LoadedDocument> {
    let asks = docs.registry.handles().into_iter().map(|h| async move {
        let info = tokio::time::timeout(INFO_TIMEOUT, h.info())
            .await
            .ok()
            .flatten();
        LoadedDocument {
            name: h.name().to_owned(),
            epoch: info.map_or(0, |i| i.epoch),
            connections: info.map_or(0, |i| i.connections),
        }
    });
    let mut out = futures_util::future::join_all(asks).await;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
