//! Wire encoding of envelopes: format tag, optional HMAC, msgpack map.
//!
//! ```text
//! unsigned:  0x01 | body
//! signed:    0x02 | key_id:u8 | mac:[u8; 32] | body
//!            mac = HMAC-SHA256(secret, 0x02 | key_id | body), key_id = 0 (crate::auth)
//! body:      one msgpack map with string keys (see the crate docs for the fields):
//!            one envelope, or (schema 3) a batch of consecutive envelopes of one link
//! ```
//!
//! Decoding is defensive: oversize input is refused before parsing, nesting depth is capped,
//! declared lengths are checked against the input before anything is allocated, and every
//! failure is a [`DecodeError`] with a [`RejectReason`] the caller can count. Envelopes of an
//! unknown kind or a newer schema version still yield their [`Header`], so the receiver can keep
//! its sequence tracking right while ignoring the body.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::auth::{Auth, MAC_LEN};
use crate::envelope::{
    Body, CloseDoc, Envelope, Header, Holder, Kind, MIN_SCHEMA_VERSION, OpenMeta, Part, RpcFailure,
    RpcReply, RpcRequest, SCHEMA_VERSION, Session,
};
use crate::error::ProxyError;
use crate::ids::{ConnId, NodeAddr, RequestId};

/// Format tag of an unsigned envelope.
pub const FORMAT_PLAIN: u8 = 0x01;
/// Format tag of an HMAC-SHA256-signed envelope.
pub const FORMAT_HMAC_SHA256: u8 = 0x02;
/// Bytes before the msgpack body of a signed envelope (tag, key id, MAC).
pub const SIGNED_PREFIX_LEN: usize = 2 + MAC_LEN;
/// Default cap on one encoded envelope (8 MiB).
pub const DEFAULT_MAX_ENVELOPE_BYTES: usize = 8 * 1024 * 1024;
/// Maximum msgpack nesting depth accepted when decoding.
pub const MAX_DEPTH: usize = 16;

/// Why an inbound envelope was rejected; use [`RejectReason::as_str`] as the
/// `envelopes_rejected{reason}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Larger than the configured cap.
    Oversize,
    /// Truncated, not msgpack, or not an envelope.
    Malformed,
    /// First byte is not a known format tag.
    UnknownFormat,
    /// No MAC, but a cluster secret is configured.
    Unsigned,
    /// MAC under a key id other than [`crate::auth::KEY_ID`] (reserved).
    UnknownKey,
    /// MAC doesn't match (wrong key or tampered bytes).
    BadMac,
    /// Schema version newer than this build reads (or older than it supports).
    UnsupportedVersion,
    /// Kind tag this build doesn't know.
    UnknownKind,
    /// Addressed to another process incarnation, or a broadcast on an inbox (or vice versa).
    WrongDestination,
}

impl RejectReason {
    /// Every reason (for pre-registering metric label values).
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Oversize,
        RejectReason::Malformed,
        RejectReason::UnknownFormat,
        RejectReason::Unsigned,
        RejectReason::UnknownKey,
        RejectReason::BadMac,
        RejectReason::UnsupportedVersion,
        RejectReason::UnknownKind,
        RejectReason::WrongDestination,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Oversize => "oversize",
            RejectReason::Malformed => "malformed",
            RejectReason::UnknownFormat => "unknown_format",
            RejectReason::Unsigned => "unsigned",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::BadMac => "bad_mac",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::UnknownKind => "unknown_kind",
            RejectReason::WrongDestination => "wrong_destination",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoding failure. None of these should stop a receive loop: count
/// [`DecodeError::reason`] and go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than the configured cap.
    #[error("envelope of {len} bytes exceeds the {max}-byte cap")]
    Oversize {
        /// Received length.
        len: usize,
        /// Configured cap.
        max: usize,
    },
    /// Empty input, or shorter than its format's prefix.
    #[error("truncated envelope")]
    Truncated,
    /// Unknown first byte.
    #[error("unknown wire format tag {0:#04x}")]
    UnknownFormat(u8),
    /// Unsigned, but a cluster secret is configured.
    #[error("unsigned envelope rejected: a cluster secret is configured")]
    Unsigned,
    /// Signed with a key id this node doesn't have.
    #[error("envelope signed with unknown key id {0}")]
    UnknownKey(u8),
    /// Wrong MAC.
    #[error("envelope MAC mismatch")]
    BadMac,
    /// The msgpack body is not a valid envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// Authentic header, but a schema version this build doesn't read; body ignored.
    #[error("unsupported envelope schema version {version}")]
    UnsupportedVersion {
        /// The envelope's version.
        version: u8,
        /// Its header (for sequence tracking).
        header: Box<Header>,
    },
    /// Authentic header, but a kind this build doesn't know; body ignored.
    #[error("unknown envelope kind {kind:?}")]
    UnknownKind {
        /// The kind tag.
        kind: String,
        /// Its header (for sequence tracking).
        header: Box<Header>,
    },
}

impl DecodeError {
    /// The metric reason.
    pub fn reason(&self) -> RejectReason {
        match self {
            DecodeError::Oversize { .. } => RejectReason::Oversize,
            DecodeError::Truncated | DecodeError::Malformed(_) => RejectReason::Malformed,
            DecodeError::UnknownFormat(_) => RejectReason::UnknownFormat,
            DecodeError::Unsigned => RejectReason::Unsigned,
            DecodeError::UnknownKey(_) => RejectReason::UnknownKey,
            DecodeError::BadMac => RejectReason::BadMac,
            DecodeError::UnsupportedVersion { .. } => RejectReason::UnsupportedVersion,
            DecodeError::UnknownKind { .. } => RejectReason::UnknownKind,
        }
    }

    /// The header, when the envelope was authentic and well-formed up to its body (unknown kind
    /// or version). The receiver should still feed `seq` to its sequence tracker.
    pub fn header(&self) -> Option<&Header> {
        match self {
            DecodeError::UnsupportedVersion { header, .. }
            | DecodeError::UnknownKind { header, .. } => Some(header),
            _ => None,
        }
    }
}

/// Encodes and decodes envelopes under one authentication policy and size cap.
#[derive(Debug, Clone)]
pub struct Codec {
    auth: Auth,
    max_envelope_bytes: usize,
}

impl Codec {
    /// A codec with the given policy and cap on the encoded size.
    pub fn new(auth: Auth, max_envelope_bytes: usize) -> Self {
        Codec {
            auth,
            max_envelope_bytes,
        }
    }

    /// The authentication policy.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The cap on one encoded envelope.
    pub fn max_envelope_bytes(&self) -> usize {
        self.max_envelope_bytes
    }

    /// Encodes (and signs, if a secret is configured) one envelope.
    ///
    /// Fails with [`ProxyError::Oversize`] if the result would exceed the cap. (The transport
    /// then sends a `frame` or `out` as `part`s, see [`crate::chunk`]; other kinds fail.)
    pub fn encode(&self, env: &Envelope) -> Result<Vec<u8>, ProxyError> {
        let payload_hint = env.body.payload_len();
        self.seal(SIGNED_PREFIX_LEN + 192 + payload_hint, &WireOut(env))
    }

    /// Encodes (and signs once) a batch: `items` as the consecutive envelopes `first_seq`,
    /// `first_seq + 1`, … of the link `from` → `to`, in one message (schema version 3).
    ///
    /// Only for a receiver that reads version 3 ([`Message::sender_reads`] of its messages).
    /// `part`s cannot be batched; any other kind can. Fails with [`ProxyError::Oversize`] if the
    /// batch would exceed the cap, or with [`ProxyError::Encode`] for an empty batch, one of
    /// more than [`MAX_BATCH_ITEMS`] items or one holding a `part`.
    pub fn encode_batch(
        &self,
        from: &NodeAddr,
        to: Option<&NodeAddr>,
        first_seq: u64,
        items: &[Body],
    ) -> Result<Vec<u8>, ProxyError> {
        if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
            return Err(ProxyError::Encode(format!(
                "a batch holds 1 to {MAX_BATCH_ITEMS} envelopes, not {}",
                items.len()
            )));
        }
        if items.iter().any(|b| matches!(b, Body::Part { .. })) {
            return Err(ProxyError::Encode("a part cannot be batched".into()));
        }
        let hint: usize = items.iter().map(|b| 48 + b.payload_len()).sum();
        self.seal(
            SIGNED_PREFIX_LEN + 128 + hint,
            &BatchOut {
                from,
                to,
                first_seq,
                items,
            },
        )
    }

    /// Writes the format prefix and `body` as msgpack, checks the cap and signs.
    fn seal(&self, capacity: usize, body: &impl Serialize) -> Result<Vec<u8>, ProxyError> {
        let mut buf = Vec::with_capacity(capacity);
        let key_id = self.auth.key_id();
        match key_id {
            Some(id) => {
                buf.push(FORMAT_HMAC_SHA256);
                buf.push(id);
                buf.extend_from_slice(&[0u8; MAC_LEN]);
            }
            None => buf.push(FORMAT_PLAIN),
        }
        let body_start = buf.len();
        {
            let mut ser = rmp_serde::Serializer::new(&mut buf).with_struct_map();
            body.serialize(&mut ser)
                .map_err(|e| ProxyError::Encode(e.to_string()))?;
        }
        if buf.len() > self.max_envelope_bytes {
            return Err(ProxyError::Oversize {
                size: buf.len(),
                max: self.max_envelope_bytes,
            });
        }
        if key_id.is_some() {
            let (prefix, body) = buf.split_at(body_start);
            if let Some(mac) = self.auth.sign(&prefix[..2], body) {
                buf[2..body_start].copy_from_slice(&mac);
            }
        }
        Ok(buf)
    }

    /// Verifies and decodes one envelope.
    ///
    /// Destination checks (is this for my incarnation? did it arrive on the right channel?) are
    /// the transport's job, not the codec's.
    ///
    /// A batch (schema 3) is refused here as malformed; use [`Codec::decode_message`] for
    /// whatever arrives on a channel.
    pub fn decode(&self, bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let message = self.decode_message(bytes)?;
        if message.batch {
            return Err(DecodeError::Malformed(
                "a batch where one envelope was expected".into(),
            ));
        }
        match message.envelopes.into_iter().next() {
            Some(one) => one,
            None => Err(DecodeError::Truncated),
        }
    }

    /// Verifies and decodes one pub/sub message: a single envelope or a batch.
    ///
    /// A message that fails as a whole (size, format, MAC, msgpack) is an `Err`. Otherwise each
    /// envelope it carries, in link order, is an `Ok`, or an `Err` with its header
    /// ([`DecodeError::header`]) when its kind or version is unknown here.
    pub fn decode_message(&self, bytes: &[u8]) -> Result<Message, DecodeError> {
        if bytes.len() > self.max_envelope_bytes {
            return Err(DecodeError::Oversize {
                len: bytes.len(),
                max: self.max_envelope_bytes,
            });
        }
        let Some(&tag) = bytes.first() else {
            return Err(DecodeError::Truncated);
        };
        let body = match tag {
            FORMAT_PLAIN => {
                if self.auth.is_enabled() {
                    return Err(DecodeError::Unsigned);
                }
                &bytes[1..]
            }
            FORMAT_HMAC_SHA256 => {
                if bytes.len() < SIGNED_PREFIX_LEN {
                    return Err(DecodeError::Truncated);
                }
                let (prefix, body) = bytes.split_at(SIGNED_PREFIX_LEN);
                if self.auth.is_enabled() {
                    self.auth
                        .verify(prefix[1], &prefix[..2], body, &prefix[2..])?;
                }
                body
            }
            other => return Err(DecodeError::UnknownFormat(other)),
        };
        decode_body(body)
    }
}

impl Codec {
    /// Frames an arbitrary msgpack body the way [`Codec::encode`] would (tests only: lets
    /// tests sign hand-built bodies such as unknown kinds or newer versions).
    #[cfg(test)]
    pub(crate) fn wrap_raw(&self, body: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        match self.auth.key_id() {
            Some(id) => {
                buf.push(FORMAT_HMAC_SHA256);
                buf.push(id);
                let mac = self.auth.sign(&buf[..2], body).unwrap_or([0; MAC_LEN]);
                buf.extend_from_slice(&mac);
            }
            None => buf.push(FORMAT_PLAIN),
        }
        buf.extend_from_slice(body);
        buf
    }
}

/// One decoded pub/sub message.
#[derive(Debug)]
pub struct Message {
    /// The highest schema version the sender reads (`mv`; 2 for a sender that doesn't say).
    pub sender_reads: u8,
    /// Whether the message was a batch.
    pub batch: bool,
    /// The envelopes, in link order: each decoded, or skipped with its header (unknown kind or
    /// version, see [`DecodeError::header`]).
    pub envelopes: Vec<Result<Envelope, DecodeError>>,
}

/// The most envelopes one batch may carry.
pub const MAX_BATCH_ITEMS: usize = 1024;

/// What a sender that doesn't send `mv` reads (schema version 2, the last one without it).
const READS_WITHOUT_MV: u8 = 2;

fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Truncated);
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    let wire = WireIn::deserialize(&mut de).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let sender_reads = wire.reads.unwrap_or(READS_WITHOUT_MV);
    let skipped = |header: Header, kind: String| {
        if (MIN_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&header.version) {
            DecodeError::UnknownKind {
                kind,
                header: Box::new(header),
            }
        } else {
            DecodeError::UnsupportedVersion {
                version: header.version,
                header: Box::new(header),
            }
        }
    };
    let (batch, envelopes) = match wire.content {
        WireContent::Envelope(env) => (false, vec![Ok(env)]),
        WireContent::Skipped { header, kind } => (false, vec![Err(skipped(header, kind))]),
        WireContent::Batch(items) => (
            true,
            items
                .into_iter()
                .map(|item| match item {
                    ItemIn::Envelope(env) => Ok(env),
                    ItemIn::Skipped { header, kind } => Err(skipped(header, kind)),
                })
                .collect(),
        ),
        WireContent::SkippedBatch { header, count } => (
            true,
            (0..count)
                .map(|i| {
                    let header = Header {
                        seq: header.seq.saturating_add(i),
                        ..header.clone()
                    };
                    Err(skipped(header, BATCH_TAG.to_owned()))
                })
                .collect(),
        ),
    };
    Ok(Message {
        sender_reads,
        batch,
        envelopes,
    })
}

// === encoding ===

/// The kind tag of a batch message (`t`).
const BATCH_TAG: &str = "batch";

/// The schema version that introduced batches.
const BATCH_VERSION: u8 = 3;

/// A batch: `{v: 3, t: "batch", from, to, seq: <first>, mv, n: <count>, items: [...]}`.
struct BatchOut<'a> {
    from: &'a NodeAddr,
    to: Option<&'a NodeAddr>,
    first_seq: u64,
    items: &'a [Body],
}

impl Serialize for BatchOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(8))?;
        map.serialize_entry("v", &BATCH_VERSION)?;
        map.serialize_entry("t", BATCH_TAG)?;
        map.serialize_entry("from", self.from)?;
        map.serialize_entry("to", &self.to)?;
        map.serialize_entry("seq", &self.first_seq)?;
        map.serialize_entry("mv", &SCHEMA_VERSION)?;
        map.serialize_entry("n", &self.items.len())?;
        map.serialize_entry("items", &ItemsOut(self.items))?;
        map.end()
    }
}

struct ItemsOut<'a>(&'a [Body]);

impl Serialize for ItemsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for body in self.0 {
            seq.serialize_element(&ItemOut(body))?;
        }
        seq.end()
    }
}

/// A session as an array: `[conn, doc, epoch]`.
struct SessionTuple<'a>(&'a Session);

impl Serialize for SessionTuple<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.0.conn, &self.0.doc, self.0.epoch).serialize(s)
    }
}

/// One batch item, an array: `[t, s, data]` for `frame` and `out`, `["fan", [doc, epoch],
/// [conn…], data]` for `fan`, `[t, s or nil, b]` for every other kind (`b` as in a single
/// envelope).
struct ItemOut<'a>(&'a Body);

impl Serialize for ItemOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let body = self.0;
        let tag = body.kind().tag();
        match body {
            Body::Frame { session, data } | Body::Out { session, data } => {
                (tag, SessionTuple(session), serde_bytes::Bytes::new(data)).serialize(s)
            }
            Body::Fan {
                doc,
                epoch,
                conns,
                data,
            } => (tag, (doc, epoch), conns, serde_bytes::Bytes::new(data)).serialize(s),
            other => (tag, other.session().map(SessionTuple), BodyOut(other)).serialize(s),
        }
    }
}

struct WireOut<'a>(&'a Envelope);

impl Serialize for WireOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let header = &self.0.header;
        let body = &self.0.body;
        let session = body.session();
        let mut map = s.serialize_map(Some(7 + usize::from(session.is_some())))?;
        map.serialize_entry("v", &header.version)?;
        map.serialize_entry("t", body.kind().tag())?;
        map.serialize_entry("from", &header.from)?;
        map.serialize_entry("to", &header.to)?;
        map.serialize_entry("seq", &header.seq)?;
        map.serialize_entry("mv", &SCHEMA_VERSION)?;
        if let Some(session) = session {
            map.serialize_entry("s", session)?;
        }
        map.serialize_entry("b", &BodyOut(body))?;
        map.end()
    }
}

struct BodyOut<'a>(&'a Body);

#[derive(Serialize)]
struct DataRef<'a> {
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

#[derive(Serialize)]
struct ReasonRef<'a> {
    reason: &'a str,
}

#[derive(Serialize)]
struct HolderRef<'a> {
    holder: &'a Option<Holder>,
}

#[derive(Serialize)]
struct ReleasedRef<'a> {
    doc: &'a str,
    epoch: i64,
}

#[derive(Serialize)]
struct NodeRef<'a> {
    node: &'a NodeAddr,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct PartRef<'a> {
    k: &'a str,
    n: u32,
    last: bool,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

#[derive(Serialize)]
struct FanRef<'a> {
    doc: &'a str,
    epoch: i64,
    conns: &'a [ConnId],
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

#[derive(Serialize)]
struct RpcReplyRef<'a> {
    id: &'a RequestId,
    ok: bool,
    #[serde(with = "serde_bytes")]
    payload: Option<&'a [u8]>,
    err: Option<&'a RpcFailure>,
}

impl Serialize for BodyOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Body::Open { meta, .. } => meta.serialize(s),
            Body::Frame { data, .. } | Body::Out { data, .. } => DataRef { data }.serialize(s),
            Body::Detach { reason, .. } => ReasonRef { reason }.serialize(s),
            Body::CloseDoc { close, .. } => close.serialize(s),
            Body::NotOwner { holder, .. } => HolderRef { holder }.serialize(s),
            Body::Released { doc, epoch } => ReleasedRef { doc, epoch: *epoch }.serialize(s),
            Body::Draining { node } | Body::NodeDown { node } => NodeRef { node }.serialize(s),
            Body::Rpc(req) => req.serialize(s),
            Body::RpcReply(reply) => match &reply.result {
                Ok(payload) => RpcReplyRef {
                    id: &reply.id,
                    ok: true,
                    payload: Some(payload),
                    err: None,
                },
                Err(failure) => RpcReplyRef {
                    id: &reply.id,
                    ok: false,
                    payload: None,
                    err: Some(failure),
                },
            }
            .serialize(s),
            Body::Keepalive { .. } => Empty {}.serialize(s),
            Body::Fan {
                doc,
                epoch,
                conns,
                data,
            } => FanRef {
                doc,
                epoch: *epoch,
                conns,
                data,
            }
            .serialize(s),
            Body::Part { part, .. } => PartRef {
                k: part.of.tag(),
                n: part.index,
                last: part.last,
                data: &part.data,
            }
            .serialize(s),
        }
    }
}

// === decoding ===

/// A decoded message body: what it carries and what its sender reads.
struct WireIn {
    reads: Option<u8>,
    content: WireContent,
}

enum WireContent {
    Envelope(Envelope),
    /// An envelope of an unknown kind or version: its header only.
    Skipped {
        header: Header,
        kind: String,
    },
    Batch(Vec<ItemIn>),
    /// A batch of a version this build doesn't read: `count` envelopes from `header.seq` on.
    SkippedBatch {
        header: Header,
        count: u64,
    },
}

enum ItemIn {
    Envelope(Envelope),
    Skipped { header: Header, kind: String },
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    V,
    T,
    From,
    To,
    Seq,
    S,
    B,
    Mv,
    N,
    Items,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct DataIn {
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

#[derive(Deserialize)]
struct ReasonIn {
    reason: String,
}

#[derive(Deserialize)]
struct HolderIn {
    holder: Option<Holder>,
}

#[derive(Deserialize)]
struct ReleasedIn {
    doc: String,
    epoch: i64,
}

#[derive(Deserialize)]
struct NodeIn {
    node: NodeAddr,
}

#[derive(Deserialize)]
struct EmptyIn {}

#[derive(Deserialize)]
struct FanIn {
    doc: String,
    epoch: i64,
    conns: Vec<ConnId>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

#[derive(Deserialize)]
struct PartIn {
    k: String,
    n: u32,
    last: bool,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

#[derive(Deserialize)]
struct RpcReplyIn {
    id: RequestId,
    ok: bool,
    #[serde(default, with = "serde_bytes")]
    payload: Option<Vec<u8>>,
    #[serde(default)]
    err: Option<RpcFailure>,
}

/// A kind-specific body, before the session from the header is attached.
enum RawBody {
    Open(OpenMeta),
    Data(Vec<u8>),
    Reason(String),
    Close(CloseDoc),
    NotOwner(Option<Holder>),
    Released {
        doc: String,
        epoch: i64,
    },
    Node(NodeAddr),
    Rpc(RpcRequest),
    RpcReply(RpcReply),
    Empty,
    Part(Part),
    Fan {
        doc: String,
        epoch: i64,
        conns: Vec<ConnId>,
        data: Vec<u8>,
    },
}

struct BodySeed(Kind);

impl<'de> DeserializeSeed<'de> for BodySeed {
    type Value = RawBody;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawBody, D::Error> {
        Ok(match self.0 {
            Kind::Open => RawBody::Open(OpenMeta::deserialize(d)?),
            Kind::Frame | Kind::Out => RawBody::Data(DataIn::deserialize(d)?.data),
            Kind::Detach => RawBody::Reason(ReasonIn::deserialize(d)?.reason),
            Kind::CloseDoc => RawBody::Close(CloseDoc::deserialize(d)?),
            Kind::NotOwner => RawBody::NotOwner(HolderIn::deserialize(d)?.holder),
            Kind::Released => {
                let r = ReleasedIn::deserialize(d)?;
                RawBody::Released {
                    doc: r.doc,
                    epoch: r.epoch,
                }
            }
            Kind::Draining | Kind::NodeDown => RawBody::Node(NodeIn::deserialize(d)?.node),
            Kind::Rpc => RawBody::Rpc(RpcRequest::deserialize(d)?),
            Kind::RpcReply => {
                let r = RpcReplyIn::deserialize(d)?;
                let result = match (r.ok, r.payload, r.err) {
                    (true, Some(payload), None) => Ok(payload),
                    (false, None, Some(err)) => Err(err),
                    _ => {
                        return Err(de::Error::custom(
                            "rpc_reply needs `ok`+`payload` or `!ok`+`err`",
                        ));
                    }
                };
                RawBody::RpcReply(RpcReply { id: r.id, result })
            }
            Kind::Keepalive => {
                EmptyIn::deserialize(d)?;
                RawBody::Empty
            }
            Kind::Fan => {
                let f = FanIn::deserialize(d)?;
                RawBody::Fan {
                    doc: f.doc,
                    epoch: f.epoch,
                    conns: f.conns,
                    data: f.data,
                }
            }
            Kind::Part => {
                let p = PartIn::deserialize(d)?;
                let of = match Kind::from_tag(&p.k) {
                    Some(k @ (Kind::Frame | Kind::Out)) => k,
                    _ => return Err(de::Error::custom("`part` of a kind other than frame/out")),
                };
                RawBody::Part(Part {
                    of,
                    index: p.n,
                    last: p.last,
                    data: p.data,
                })
            }
        })
    }
}

impl<'de> Deserialize<'de> for WireIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(WireVisitor)
    }
}

struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = WireIn;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an envelope map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireIn, A::Error> {
        let mut version: Option<u8> = None;
        let mut tag: Option<String> = None;
        let mut from: Option<NodeAddr> = None;
        let mut to: Option<Option<NodeAddr>> = None;
        let mut seq: Option<u64> = None;
        let mut reads: Option<u8> = None;
        let mut count: Option<u64> = None;
        let mut session: Option<Option<Session>> = None;
        // Outer None: `b` not seen. Inner None: body skipped (unknown kind or version).
        let mut body: Option<Option<RawBody>> = None;
        let mut kind: Option<Kind> = None;
        // Outer None: `items` not seen. Inner None: skipped (batch of a newer version).
        let mut items: Option<Option<Vec<ItemIn>>> = None;

        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::V => set_once(&mut version, map.next_value()?, "v")?,
                Field::T => set_once(&mut tag, map.next_value()?, "t")?,
                Field::From => set_once(&mut from, map.next_value()?, "from")?,
                Field::To => set_once(&mut to, map.next_value()?, "to")?,
                Field::Seq => set_once(&mut seq, map.next_value()?, "seq")?,
                Field::S => set_once(&mut session, map.next_value()?, "s")?,
                Field::Mv => set_once(&mut reads, map.next_value()?, "mv")?,
                Field::N => set_once(&mut count, map.next_value()?, "n")?,
                Field::B => {
                    let (Some(v), Some(t)) = (version, tag.as_deref()) else {
                        return Err(de::Error::custom("`b` before `v` and `t`"));
                    };
                    if body.is_some() {
                        return Err(de::Error::custom("duplicate field `b`"));
                    }
                    let known = Kind::from_tag(t);
                    let readable = (MIN_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&v);
                    match known {
                        Some(k) if readable => {
                            kind = Some(k);
                            body = Some(Some(map.next_value_seed(BodySeed(k))?));
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            body = Some(None);
                        }
                    }
                }
                Field::Items => {
                    let (Some(v), Some(BATCH_TAG), Some(from), Some(to), Some(seq), Some(_)) =
                        (version, tag.as_deref(), &from, &to, seq, count)
                    else {
                        return Err(de::Error::custom(
                            "`items` before `v`, `t`, `from`, `to`, `seq` and `n`, or not in a batch",
                        ));
                    };
                    if items.is_some() {
                        return Err(de::Error::custom("duplicate field `items`"));
                    }
                    if (BATCH_VERSION..=SCHEMA_VERSION).contains(&v) {
                        let template = Header {
                            version: v,
                            from: from.clone(),
                            to: to.clone(),
                            seq,
                        };
                        items = Some(Some(map.next_value_seed(ItemsSeed(template))?));
                    } else {
                        map.next_value::<IgnoredAny>()?;
                        items = Some(None);
                    }
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }

        let version = version.ok_or_else(|| de::Error::missing_field("v"))?;
        let tag = tag.ok_or_else(|| de::Error::missing_field("t"))?;
        let header = Header {
            version,
            from: from.ok_or_else(|| de::Error::missing_field("from"))?,
            to: to.ok_or_else(|| de::Error::missing_field("to"))?,
            seq: seq.ok_or_else(|| de::Error::missing_field("seq"))?,
        };
        if version == 0 {
            return Err(de::Error::custom("schema version 0 is invalid"));
        }
        if tag == BATCH_TAG {
            if version < BATCH_VERSION {
                return Err(de::Error::custom("a batch before schema version 3"));
            }
            let count = count.ok_or_else(|| de::Error::missing_field("n"))?;
            if count == 0 || count > MAX_BATCH_ITEMS as u64 {
                return Err(de::Error::custom(format!(
                    "a batch of {count} envelopes (1 to {MAX_BATCH_ITEMS})"
                )));
            }
            let content = match items {
                None => return Err(de::Error::missing_field("items")),
                Some(None) => WireContent::SkippedBatch { header, count },
                Some(Some(items)) => {
                    if items.len() as u64 != count {
                        return Err(de::Error::custom("`n` does not match `items`"));
                    }
                    WireContent::Batch(items)
                }
            };
            return Ok(WireIn { reads, content });
        }
        if items.is_some() {
            return Err(de::Error::custom("`items` outside a batch"));
        }
        let raw = match body {
            None => return Err(de::Error::missing_field("b")),
            Some(None) => {
                return Ok(WireIn {
                    reads,
                    content: WireContent::Skipped { header, kind: tag },
                });
            }
            Some(Some(raw)) => raw,
        };
        let kind = kind.ok_or_else(|| de::Error::custom("kind not resolved"))?;
        let body = assemble(kind, session.flatten(), raw).map_err(de::Error::custom)?;
        Ok(WireIn {
            reads,
            content: WireContent::Envelope(Envelope { header, body }),
        })
    }
}

/// Puts a kind's body and the session together, checking that they fit.
fn assemble(kind: Kind, session: Option<Session>, raw: RawBody) -> Result<Body, String> {
    if kind.requires_session() && session.is_none() {
        return Err(format!("`{}` needs a session (`s`)", kind.tag()));
    }
    let need = || "session missing".to_owned();
    Ok(match (kind, raw) {
        (Kind::Open, RawBody::Open(meta)) => Body::Open {
            session: session.ok_or_else(need)?,
            meta,
        },
        (Kind::Frame, RawBody::Data(data)) => Body::Frame {
            session: session.ok_or_else(need)?,
            data,
        },
        (Kind::Out, RawBody::Data(data)) => Body::Out {
            session: session.ok_or_else(need)?,
            data,
        },
        (Kind::Detach, RawBody::Reason(reason)) => Body::Detach {
            session: session.ok_or_else(need)?,
            reason,
        },
        (Kind::CloseDoc, RawBody::Close(close)) => Body::CloseDoc {
            session: session.ok_or_else(need)?,
            close,
        },
        (Kind::NotOwner, RawBody::NotOwner(holder)) => Body::NotOwner {
            session: session.ok_or_else(need)?,
            holder,
        },
        (Kind::Released, RawBody::Released { doc, epoch }) => Body::Released { doc, epoch },
        (Kind::Draining, RawBody::Node(node)) => Body::Draining { node },
        (Kind::NodeDown, RawBody::Node(node)) => Body::NodeDown { node },
        (Kind::Rpc, RawBody::Rpc(req)) => Body::Rpc(req),
        (Kind::RpcReply, RawBody::RpcReply(reply)) => Body::RpcReply(reply),
        (Kind::Keepalive, RawBody::Empty) => Body::Keepalive { session },
        (Kind::Part, RawBody::Part(part)) => Body::Part {
            session: session.ok_or_else(need)?,
            part,
        },
        (
            Kind::Fan,
            RawBody::Fan {
                doc,
                epoch,
                conns,
                data,
            },
        ) => {
            if conns.is_empty() {
                return Err("`fan` without connections".to_owned());
            }
            Body::Fan {
                doc,
                epoch,
                conns,
                data,
            }
        }
        _ => return Err("body does not match kind".to_owned()),
    })
}

/// The `items` of a batch whose header (first sequence number) is `.0`.
struct ItemsSeed(Header);

impl<'de> DeserializeSeed<'de> for ItemsSeed {
    type Value = Vec<ItemIn>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<ItemIn>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed {
    type Value = Vec<ItemIn>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of batch items")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<ItemIn>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        loop {
            if items.len() >= MAX_BATCH_ITEMS {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("too many batch items"));
                }
                break;
            }
            let offset = items.len() as u64;
            let header = Header {
                seq: self.0.seq.saturating_add(offset),
                ..self.0.clone()
            };
            match seq.next_element_seed(ItemSeed(header))? {
                Some(item) => items.push(item),
                None => break,
            }
        }
        Ok(items)
    }
}

/// One batch item (see [`ItemOut`]), numbered by its header.
struct ItemSeed(Header);

impl<'de> DeserializeSeed<'de> for ItemSeed {
    type Value = ItemIn;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ItemIn, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed {
    type Value = ItemIn;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a batch item array")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<ItemIn, A::Error> {
        let missing = || de::Error::custom("batch item too short");
        let tag: String = seq.next_element()?.ok_or_else(missing)?;
        let mut header = self.0;
        let Some(kind) = Kind::from_tag(&tag).filter(|k| k.since() <= header.version) else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(ItemIn::Skipped { header, kind: tag });
        };
        let body = match kind {
            Kind::Part => return Err(de::Error::custom("a part inside a batch")),
            Kind::Frame | Kind::Out => {
                let (conn, doc, epoch): (ConnId, String, i64) =
                    seq.next_element()?.ok_or_else(missing)?;
                let data: serde_bytes::ByteBuf = seq.next_element()?.ok_or_else(missing)?;
                let session = Session { conn, doc, epoch };
                assemble(kind, Some(session), RawBody::Data(data.into_vec()))
            }
            Kind::Fan => {
                let (doc, epoch): (String, i64) = seq.next_element()?.ok_or_else(missing)?;
                let conns: Vec<ConnId> = seq.next_element()?.ok_or_else(missing)?;
                let data: serde_bytes::ByteBuf = seq.next_element()?.ok_or_else(missing)?;
                assemble(
                    kind,
                    None,
                    RawBody::Fan {
                        doc,
                        epoch,
                        conns,
                        data: data.into_vec(),
                    },
                )
            }
            other => {
                let session: Option<(ConnId, String, i64)> =
                    seq.next_element()?.ok_or_else(missing)?;
                let raw = seq
                    .next_element_seed(BodySeed(other))?
                    .ok_or_else(missing)?;
                let session = session.map(|(conn, doc, epoch)| Session { conn, doc, epoch });
                assemble(other, session, raw)
            }
        }
        .map_err(de::Error::custom)?;
        // later versions may append fields to an item
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        header.version = kind.since();
        Ok(ItemIn::Envelope(Envelope { header, body }))
    }
}

fn set_once<T, E: de::Error>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests;
