//! Wire encoding of envelopes: format tag, optional HMAC, msgpack map.
//!
//! ```text
//! unsigned:  0x01 | body
//! signed:    0x02 | key_id:u8 | mac:[u8; 32] | body
//!            mac = HMAC-SHA256(secret, 0x02 | key_id | body), key_id = 0 (crate::auth)
//! body:      one msgpack map with string keys (see the crate docs for the fields)
//! ```
//!
//! Decoding is defensive: oversize input is refused before parsing, nesting depth is capped,
//! declared lengths are checked against the input before anything is allocated, and every
//! failure is a [`DecodeError`] with a [`RejectReason`] the caller can count. Envelopes of an
//! unknown kind or a newer schema version still yield their [`Header`], so the receiver can keep
//! its sequence tracking right while ignoring the body.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::auth::{Auth, MAC_LEN};
use crate::envelope::{
    Body, CloseDoc, Envelope, Header, Holder, Kind, MIN_SCHEMA_VERSION, OpenMeta, Part, RpcFailure,
    RpcReply, RpcRequest, SCHEMA_VERSION, Session,
};
use crate::error::ProxyError;
use crate::ids::{NodeAddr, RequestId};

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
        let payload_hint = match &env.body {
            Body::Frame { data, .. } | Body::Out { data, .. } => data.len(),
            Body::Part { part, .. } => part.data.len(),
            Body::Rpc(req) => req.payload.len(),
            Body::RpcReply(RpcReply {
                result: Ok(payload),
                ..
            }) => payload.len(),
            _ => 0,
        };
        let mut buf = Vec::with_capacity(SIGNED_PREFIX_LEN + 192 + payload_hint);
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
            WireOut(env)
                .serialize(&mut ser)
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
    pub fn decode(&self, bytes: &[u8]) -> Result<Envelope, DecodeError> {
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

fn decode_body(body: &[u8]) -> Result<Envelope, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Truncated);
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    match WireIn::deserialize(&mut de) {
        Ok(WireIn::Envelope(env)) => Ok(env),
        Ok(WireIn::Skipped {
            header,
            kind,
            version_ok,
        }) => Err(if version_ok {
            DecodeError::UnknownKind {
                kind,
                header: Box::new(header),
            }
        } else {
            DecodeError::UnsupportedVersion {
                version: header.version,
                header: Box::new(header),
            }
        }),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

// === encoding ===

struct WireOut<'a>(&'a Envelope);

impl Serialize for WireOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let header = &self.0.header;
        let body = &self.0.body;
        let session = body.session();
        let mut map = s.serialize_map(Some(6 + usize::from(session.is_some())))?;
        map.serialize_entry("v", &header.version)?;
        map.serialize_entry("t", body.kind().tag())?;
        map.serialize_entry("from", &header.from)?;
        map.serialize_entry("to", &header.to)?;
        map.serialize_entry("seq", &header.seq)?;
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

enum WireIn {
    Envelope(Envelope),
    Skipped {
        header: Header,
        kind: String,
        version_ok: bool,
    },
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
    Released { doc: String, epoch: i64 },
    Node(NodeAddr),
    Rpc(RpcRequest),
    RpcReply(RpcReply),
    Empty,
    Part(Part),
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
        let mut session: Option<Option<Session>> = None;
        // Outer None: `b` not seen. Inner None: body skipped (unknown kind or version).
        let mut body: Option<Option<RawBody>> = None;
        let mut kind: Option<Kind> = None;

        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::V => set_once(&mut version, map.next_value()?, "v")?,
                Field::T => set_once(&mut tag, map.next_value()?, "t")?,
                Field::From => set_once(&mut from, map.next_value()?, "from")?,
                Field::To => set_once(&mut to, map.next_value()?, "to")?,
                Field::Seq => set_once(&mut seq, map.next_value()?, "seq")?,
                Field::S => set_once(&mut session, map.next_value()?, "s")?,
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
        let raw = match body {
            None => return Err(de::Error::missing_field("b")),
            Some(None) => {
                return Ok(WireIn::Skipped {
                    version_ok: (MIN_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&header.version),
                    header,
                    kind: tag,
                });
            }
            Some(Some(raw)) => raw,
        };
        let kind = kind.ok_or_else(|| de::Error::custom("kind not resolved"))?;
        let session = session.flatten();
        if kind.requires_session() && session.is_none() {
            return Err(de::Error::custom(format!(
                "`{}` needs a session (`s`)",
                kind.tag()
            )));
        }
        let need = || de::Error::custom("session missing");
        let body = match (kind, raw) {
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
            _ => return Err(de::Error::custom("body does not match kind")),
        };
        Ok(WireIn::Envelope(Envelope { header, body }))
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
