//! Identities that travel in envelopes: [`NodeId`], [`Incarnation`], [`NodeAddr`], [`ConnId`]
//! and [`RequestId`].
//!
//! Everything here is validated when it is built or decoded, so a value of one of these types is
//! always safe to splice into a Redis channel or key name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ProxyError;

/// Longest accepted [`NodeId`], in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// A configured, stable, human-readable node name (`node0`, `collab-a`, …).
///
/// Guarantees: 1 to [`MAX_NODE_ID_LEN`] bytes of ASCII letters, digits, `-`, `_` and `.` (host
/// names are the usual node ids). No `:`,
/// `{`, `}`, glob characters or whitespace can appear, so the id can be embedded in channel and key
/// names as is. Validation also runs when an id is decoded from an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, ProxyError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= MAX_NODE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            Ok(NodeId(id))
        } else {
            Err(ProxyError::InvalidNodeId(id))
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = ProxyError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        NodeId::new(value)
    }
}

impl From<NodeId> for String {
    fn from(value: NodeId) -> Self {
        value.0
    }
}

impl FromStr for NodeId {
    type Err = ProxyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A random 64-bit value chosen at every process start ("boot nonce").
///
/// Two processes that share a [`NodeId`] (a restart, or an operator mistake) have different
/// incarnations, so envelopes for a dead process are never delivered to its successor.
/// Displayed as 16 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Incarnation(pub u64);

impl Incarnation {
    /// A fresh random incarnation (never 0, so 0 can't be mistaken for "unset").
    pub fn random() -> Self {
        loop {
            let v: u64 = rand::random();
            if v != 0 {
                return Incarnation(v);
            }
        }
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The address of one running process: node name plus incarnation.
///
/// Wire form: a map `{"id": <NodeId>, "inc": <u64>}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeAddr {
    /// The configured node name.
    pub id: NodeId,
    /// The process incarnation.
    pub inc: Incarnation,
}

impl NodeAddr {
    /// Builds an address from its parts.
    pub fn new(id: NodeId, inc: Incarnation) -> Self {
        NodeAddr { id, inc }
    }

    /// An address for `id` with a fresh random incarnation (what a starting process uses).
    pub fn fresh(id: NodeId) -> Self {
        NodeAddr {
            id,
            inc: Incarnation::random(),
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.id, self.inc)
    }
}

/// A server-generated client connection id (UUID v7: time-ordered, 74 random bits).
///
/// It is globally unique on its own, so an owner can key remote sessions by `ConnId` without
/// trusting anything the client sent. There is deliberately no way to build one from a client
/// header such as `Sec-WebSocket-Key`. Wire form: 16-byte msgpack `bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnId(Uuid);

impl ConnId {
    /// Generates a new connection id.
    pub fn generate() -> Self {
        ConnId(Uuid::now_v7())
    }

    /// The underlying UUID (for logs and maps).
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The id of one custom-event call: the caller's incarnation plus a per-process counter.
///
/// Because the incarnation is part of the id, a restarted node can never resolve a request id
/// issued by its previous incarnation. Wire form: `{"inc": <u64>, "n": <u64>}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The caller's incarnation.
    pub inc: Incarnation,
    /// A counter, unique within the incarnation.
    pub n: u64,
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.inc, self.n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_id_validation() {
        for ok in [
            "a",
            "node0",
            "collab-a",
            "x_y-Z9",
            "node1.example.com",
            &"n".repeat(MAX_NODE_ID_LEN),
        ] {
            assert!(NodeId::new(ok).is_ok(), "{ok:?} should be valid");
        }
        for bad in [
            "",
            "a:b",
            "{a}",
            "a*",
            "a b",
            "a\0b",
            "é",
            "a/b",
            &"n".repeat(MAX_NODE_ID_LEN + 1),
        ] {
            assert!(
                matches!(NodeId::new(bad), Err(ProxyError::InvalidNodeId(_))),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn node_id_is_validated_on_decode() {
        let bytes = rmp_serde::to_vec("a:b").unwrap();
        assert!(rmp_serde::from_slice::<NodeId>(&bytes).is_err());
        let bytes = rmp_serde::to_vec("ok-1").unwrap();
        assert_eq!(
            rmp_serde::from_slice::<NodeId>(&bytes).unwrap().as_str(),
            "ok-1"
        );
    }

    #[test]
    fn incarnations_differ_and_display_as_hex() {
        let a = Incarnation::random();
        let b = Incarnation::random();
        assert_ne!(a, b);
        assert_eq!(Incarnation(0xab).to_string(), "00000000000000ab");
    }

    #[test]
    fn conn_id_is_16_byte_bin() {
        let id = ConnId::generate();
        let bytes = rmp_serde::to_vec(&id).unwrap();
        // bin8 marker, length 16, 16 bytes.
        assert_eq!(bytes.len(), 18);
        assert_eq!(bytes[0], 0xc4);
        assert_eq!(rmp_serde::from_slice::<ConnId>(&bytes).unwrap(), id);
        assert_ne!(ConnId::generate(), id);
    }
}
