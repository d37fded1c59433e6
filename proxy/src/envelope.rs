//! The envelope data model: what one cross-node message says.
//!
//! An [`Envelope`] is a [`Header`] (written by the transport: version, sender, destination,
//! link sequence number) plus a [`Body`] (written by the caller). The wire encoding lives in
//! [`crate::codec`]; the crate-level docs describe the schema.
//!
//! Payload bytes (`data`, `payload`) are opaque: this crate never looks inside them.

use serde::{Deserialize, Serialize};

use crate::ids::{ConnId, NodeAddr, RequestId};

/// The highest schema version this build reads and writes.
///
/// Each envelope is stamped with the lowest version that defines its kind ([`Kind::since`]):
/// version 1 for every kind of the first schema, version 2 for `part` (frames split across
/// envelopes), version 3 for batches and `fan`. A version-1 node therefore still reads every
/// envelope of a version-2 node except parts, which it counts as `unsupported_version` and skips
/// with its sequence tracking intact. Batches (version 3) go only to a peer that said it reads
/// them (`mv` in its envelopes), so a version-2 node never receives one.
pub const SCHEMA_VERSION: u8 = 3;

/// The lowest schema version this build reads.
pub const MIN_SCHEMA_VERSION: u8 = 1;

/// The per-envelope header. The transport fills it in; callers only read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Schema version of the body (`v`).
    pub version: u8,
    /// The sending process (`from`).
    pub from: NodeAddr,
    /// The destination process, or `None` for a broadcast (`to`). A receiver drops envelopes
    /// addressed to another incarnation.
    pub to: Option<NodeAddr>,
    /// Sequence number on the link (sender incarnation → receiver incarnation, or sender →
    /// broadcast). Starts at 1 and rises by one per envelope (`seq`).
    pub seq: u64,
}

/// The session an envelope belongs to: one client connection attached to one document, under
/// the owner epoch the sender believes in (`s` on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Session {
    /// Server-generated connection id (never client-chosen).
    pub conn: ConnId,
    /// The document name.
    pub doc: String,
    /// The owner epoch (fencing token) the sender believes in.
    pub epoch: i64,
}

/// What the edge knows about the client's upgrade request, sent once per (connection, document,
/// owner) in [`Body::Open`].
///
/// `headers` must already be allow-listed by the caller: this crate forwards whatever it is
/// given, and anyone who can read Redis can read it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OpenMeta {
    /// Request path.
    pub path: String,
    /// Raw query string (without `?`).
    pub query: String,
    /// Allow-listed request headers, in order.
    pub headers: Vec<(String, String)>,
    /// The client's remote address as the edge saw it.
    pub remote: Option<String>,
    /// The provider version, if the client told us.
    pub provider_version: Option<String>,
}

/// A document-scoped end of a session, sent owner → edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseDoc {
    /// Close code the edge should use.
    pub code: u16,
    /// Human-readable reason.
    pub reason: String,
    /// `true`: the edge must reset the client (reconnect + resync), not just drop the document.
    pub resync: bool,
}

/// The current lease holder, as a hint in `not_owner` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The process holding the lease.
    pub node: NodeAddr,
    /// Its epoch.
    pub epoch: i64,
}

/// A custom-event call into the owner of `doc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcRequest {
    /// Request id; the reply carries it back.
    pub id: RequestId,
    /// The document the event is about.
    pub doc: String,
    /// The owner epoch the caller routed by, if known.
    pub epoch: Option<i64>,
    /// Event name.
    pub name: String,
    /// Opaque payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Time the caller is still willing to wait, in ms, when the request was sent. The receiver
    /// counts it from the moment it receives the request and should drop expired requests.
    pub deadline_ms: u64,
    /// Run only if the document is already open on the receiver.
    pub only_if_open: bool,
}

/// Error codes of a failed custom event (`err.code` on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RpcErrorCode {
    /// The receiver doesn't own the document (`not_owner`).
    NotOwner,
    /// No handler for this event name (`no_handler`).
    NoHandler,
    /// The handler failed (`handler_error`).
    HandlerError,
    /// The request's deadline had passed (`expired`).
    Expired,
    /// The receiver is shedding load (`overloaded`).
    Overloaded,
    /// A code this build doesn't know (forward compatibility).
    Other(String),
}

impl RpcErrorCode {
    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            RpcErrorCode::NotOwner => "not_owner",
            RpcErrorCode::NoHandler => "no_handler",
            RpcErrorCode::HandlerError => "handler_error",
            RpcErrorCode::Expired => "expired",
            RpcErrorCode::Overloaded => "overloaded",
            RpcErrorCode::Other(s) => s,
        }
    }
}

impl From<String> for RpcErrorCode {
    fn from(value: String) -> Self {
        match value.as_str() {
            "not_owner" => RpcErrorCode::NotOwner,
            "no_handler" => RpcErrorCode::NoHandler,
            "handler_error" => RpcErrorCode::HandlerError,
            "expired" => RpcErrorCode::Expired,
            "overloaded" => RpcErrorCode::Overloaded,
            _ => RpcErrorCode::Other(value),
        }
    }
}

impl From<RpcErrorCode> for String {
    fn from(value: RpcErrorCode) -> Self {
        match value {
            RpcErrorCode::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

/// Why a custom event failed on the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcFailure {
    /// Machine-readable code.
    pub code: RpcErrorCode,
    /// Human-readable message.
    pub msg: String,
    /// With `not_owner`: the holder, if the receiver knows it.
    pub holder: Option<Holder>,
}

/// The answer to an [`RpcRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcReply {
    /// The request's id.
    pub id: RequestId,
    /// The handler's payload, or why it failed.
    pub result: Result<Vec<u8>, RpcFailure>,
}

/// One piece of a `frame` or `out` whose envelope would exceed the size cap (`part` on the
/// wire; see [`crate::chunk`]). The pieces of one frame travel in order on one link, numbered
/// from 0, the last one flagged; the receiving transport reassembles them and delivers the
/// whole frame as the original kind, so callers never see a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The kind of the whole frame: [`Kind::Frame`] or [`Kind::Out`] (`k`).
    pub of: Kind,
    /// Position of this piece, from 0 (`n`).
    pub index: u32,
    /// Whether this is the final piece (`last`).
    pub last: bool,
    /// This piece of the frame's bytes (`data`).
    pub data: Vec<u8>,
}

/// What an envelope says. Variants with a `session` are session envelopes: the session travels
/// in the header map (`s`), the rest in the body map (`b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Edge → owner: create the owner-side session for (conn, doc). `open`.
    Open {
        /// The session.
        session: Session,
        /// Request summary.
        meta: OpenMeta,
    },
    /// Edge → owner: one raw client frame. `frame`.
    Frame {
        /// The session.
        session: Session,
        /// Raw frame bytes (opaque).
        data: Vec<u8>,
    },
    /// Owner → edge: one frame for the client. `out`.
    Out {
        /// The session.
        session: Session,
        /// Raw frame bytes (opaque).
        data: Vec<u8>,
    },
    /// Edge → owner: the client left or the edge dropped the session. `detach`.
    Detach {
        /// The session.
        session: Session,
        /// Why.
        reason: String,
    },
    /// Owner → edge: document-scoped end of the session. `close_doc`.
    CloseDoc {
        /// The session.
        session: Session,
        /// Code, reason, resync flag.
        close: CloseDoc,
    },
    /// Owner → edge: the receiver doesn't hold the lease at `session.epoch`. `not_owner`.
    NotOwner {
        /// The session that was refused.
        session: Session,
        /// The current holder, if known.
        holder: Option<Holder>,
    },
    /// Broadcast: the lease for `doc` at `epoch` was released (document unloaded). `released`.
    Released {
        /// Document name.
        doc: String,
        /// The released epoch.
        epoch: i64,
    },
    /// Broadcast: `node` is draining (stops claiming; hands documents off). `draining`.
    Draining {
        /// The draining process.
        node: NodeAddr,
    },
    /// Broadcast: `node` is gone; reap its sessions and routes. `node_down`.
    NodeDown {
        /// The dead process.
        node: NodeAddr,
    },
    /// Caller → owner: custom event. `rpc`.
    Rpc(RpcRequest),
    /// Owner → caller: custom event result. `rpc_reply`.
    RpcReply(RpcReply),
    /// Liveness: per attachment (with a session) or per node pair (without). `keepalive`.
    Keepalive {
        /// The attachment, or `None` for a node-pair keepalive.
        session: Option<Session>,
    },
    /// One piece of a large `frame` or `out` (schema version 2). `part`. The transport splits
    /// and reassembles these itself: callers neither send nor receive them.
    Part {
        /// The session of the whole frame.
        session: Session,
        /// The piece.
        part: Part,
    },
    /// Owner → edge: one frame for several clients of one document on the receiving node
    /// (schema version 3, only inside a batch). `fan`. The transport builds these itself out of
    /// `out`s with the same document, epoch and bytes; callers receive them and deliver `data`
    /// to each connection in `conns`, in that order, exactly as if each had its own `out`.
    Fan {
        /// Document name.
        doc: String,
        /// The owner epoch.
        epoch: i64,
        /// The receiving node's connections the frame is for (at least one).
        conns: Vec<ConnId>,
        /// Raw frame bytes (opaque).
        data: Vec<u8>,
    },
}

/// The envelope kind (`t` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `open`
    Open,
    /// `frame`
    Frame,
    /// `out`
    Out,
    /// `detach`
    Detach,
    /// `close_doc`
    CloseDoc,
    /// `not_owner`
    NotOwner,
    /// `released`
    Released,
    /// `draining`
    Draining,
    /// `node_down`
    NodeDown,
    /// `rpc`
    Rpc,
    /// `rpc_reply`
    RpcReply,
    /// `keepalive`
    Keepalive,
    /// `part` (since schema version 2)
    Part,
    /// `fan` (since schema version 3, only inside a batch)
    Fan,
}

impl Kind {
    /// Every kind this build knows.
    pub const ALL: [Kind; 14] = [
        Kind::Open,
        Kind::Frame,
        Kind::Out,
        Kind::Detach,
        Kind::CloseDoc,
        Kind::NotOwner,
        Kind::Released,
        Kind::Draining,
        Kind::NodeDown,
        Kind::Rpc,
        Kind::RpcReply,
        Kind::Keepalive,
        Kind::Part,
        Kind::Fan,
    ];

    /// The wire tag.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Open => "open",
            Kind::Frame => "frame",
            Kind::Out => "out",
            Kind::Detach => "detach",
            Kind::CloseDoc => "close_doc",
            Kind::NotOwner => "not_owner",
            Kind::Released => "released",
            Kind::Draining => "draining",
            Kind::NodeDown => "node_down",
            Kind::Rpc => "rpc",
            Kind::RpcReply => "rpc_reply",
            Kind::Keepalive => "keepalive",
            Kind::Part => "part",
            Kind::Fan => "fan",
        }
    }

    /// The schema version that introduced this kind; envelopes of this kind are stamped with
    /// it (`v`), so nodes of an older version still read every kind they know.
    pub fn since(self) -> u8 {
        match self {
            Kind::Part => 2,
            Kind::Fan => 3,
            _ => 1,
        }
    }

    /// Parses a wire tag; `None` for a kind this build doesn't know.
    pub fn from_tag(tag: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.tag() == tag)
    }

    /// Whether envelopes of this kind must carry a session.
    pub fn requires_session(self) -> bool {
        matches!(
            self,
            Kind::Open
                | Kind::Frame
                | Kind::Out
                | Kind::Detach
                | Kind::CloseDoc
                | Kind::NotOwner
                | Kind::Part
        )
    }
}

impl Body {
    /// The kind tag of this body.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Open { .. } => Kind::Open,
            Body::Frame { .. } => Kind::Frame,
            Body::Out { .. } => Kind::Out,
            Body::Detach { .. } => Kind::Detach,
            Body::CloseDoc { .. } => Kind::CloseDoc,
            Body::NotOwner { .. } => Kind::NotOwner,
            Body::Released { .. } => Kind::Released,
            Body::Draining { .. } => Kind::Draining,
            Body::NodeDown { .. } => Kind::NodeDown,
            Body::Rpc(_) => Kind::Rpc,
            Body::RpcReply(_) => Kind::RpcReply,
            Body::Keepalive { .. } => Kind::Keepalive,
            Body::Part { .. } => Kind::Part,
            Body::Fan { .. } => Kind::Fan,
        }
    }

    /// The session, for session envelopes.
    pub fn session(&self) -> Option<&Session> {
        match self {
            Body::Open { session, .. }
            | Body::Frame { session, .. }
            | Body::Out { session, .. }
            | Body::Detach { session, .. }
            | Body::CloseDoc { session, .. }
            | Body::NotOwner { session, .. }
            | Body::Part { session, .. } => Some(session),
            Body::Keepalive { session } => session.as_ref(),
            Body::Released { .. }
            | Body::Draining { .. }
            | Body::NodeDown { .. }
            | Body::Rpc(_)
            | Body::RpcReply(_)
            | Body::Fan { .. } => None,
        }
    }

    /// Roughly the bytes this body carries besides its fixed fields: frame and event payloads,
    /// and the variable parts of an `open` (for sizing buffers and batches).
    pub fn payload_len(&self) -> usize {
        match self {
            Body::Frame { data, .. } | Body::Out { data, .. } => data.len(),
            Body::Fan { data, conns, .. } => data.len() + 18 * conns.len(),
            Body::Part { part, .. } => part.data.len(),
            Body::Rpc(req) => req.payload.len() + req.name.len() + req.doc.len(),
            Body::RpcReply(RpcReply {
                result: Ok(payload),
                ..
            }) => payload.len(),
            Body::Open { meta, .. } => {
                meta.path.len()
                    + meta.query.len()
                    + meta
                        .headers
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 4)
                        .sum::<usize>()
            }
            _ => 0,
        }
    }

    /// The document this body is about, if any.
    pub fn doc(&self) -> Option<&str> {
        match self {
            Body::Released { doc, .. } | Body::Fan { doc, .. } => Some(doc),
            Body::Rpc(req) => Some(&req.doc),
            other => other.session().map(|s| s.doc.as_str()),
        }
    }
}

/// One decoded (or to-be-encoded) cross-node message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Version, sender, destination, link sequence number.
    pub header: Header,
    /// What it says.
    pub body: Body,
}
