//! Redis key and channel names.
//!
//! No raw document name ever reaches Redis: documents are addressed by [`doc_tag`], a fixed-width
//! hex hash, wrapped in a Redis Cluster hash tag so all keys of one document share a slot. Node
//! names are [`NodeId`]s, which are validated to `[A-Za-z0-9_-]`. The prefix is validated once in
//! [`Keys::new`].

use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::ids::{NodeAddr, NodeId};

/// Longest accepted key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// The document's routing tag: lowercase hex of the first 16 bytes of `sha256(name)` (32 chars).
///
/// Names such as `a`, `a:lock`, `{a}`, `a*` and `a\0b` get unrelated tags, so they can't collide
/// with each other's keys, force a Redis Cluster slot, or act as glob patterns.
/// (`hearth-lock::doc_tag` hashes the same way but returns the tag already wrapped in `{…}`;
/// here the braces are added by [`Keys::doc_key`].)
pub fn doc_tag(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut out = String::with_capacity(32);
    for byte in &digest[..16] {
        out.push(hex_digit(byte >> 4));
        out.push(hex_digit(byte & 0x0f));
    }
    out
}

fn hex_digit(nibble: u8) -> char {
    match nibble {
        0..=9 => char::from(b'0' + nibble),
        _ => char::from(b'a' + nibble - 10),
    }
}

/// Builds every key and channel name under one validated prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Validates `prefix`: 1 to [`MAX_PREFIX_LEN`] bytes of ASCII letters, digits, `-`, `_`, `.`
    /// or `:` (so it contains no hash-tag braces, glob characters or whitespace).
    pub fn new(prefix: impl Into<String>) -> Result<Self, ProxyError> {
        let prefix = prefix.into();
        let valid = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if valid {
            Ok(Keys { prefix })
        } else {
            Err(ProxyError::Config(format!(
                "invalid key prefix {prefix:?}: use 1-{MAX_PREFIX_LEN} chars of [A-Za-z0-9_.:-]"
            )))
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The inbox channel of one process: `<prefix>:inbox:<node_id>:<incarnation hex>`.
    pub fn inbox(&self, addr: &NodeAddr) -> String {
        format!("{}:inbox:{}:{}", self.prefix, addr.id, addr.inc)
    }

    /// The broadcast channel every node subscribes to: `<prefix>:bcast`.
    pub fn bcast(&self) -> String {
        format!("{}:bcast", self.prefix)
    }

    /// The node liveness key: `<prefix>:node:<node_id>`.
    pub fn node_key(&self, id: &NodeId) -> String {
        format!("{}:node:{}", self.prefix, id)
    }

    /// A per-document key: `<prefix>:d:{<doc_tag>}:<suffix>`. The braces are a Redis Cluster
    /// hash tag, so every key of one document lands in one slot (multi-key Lua scripts work).
    /// `suffix` is chosen by our code, never by a client.
    pub fn doc_key(&self, doc: &str, suffix: &str) -> String {
        format!("{}:d:{{{}}}:{}", self.prefix, doc_tag(doc), suffix)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashSet;

    use super::*;
    use crate::ids::Incarnation;

    #[test]
    fn doc_tag_is_fixed_width_hex_and_distinct() {
        let names = ["a", "a:lock", "{a}", "a*", "a\0b", "", "A", "a\u{0}", "a "];
        let tags: HashSet<String> = names.iter().map(|n| doc_tag(n)).collect();
        assert_eq!(tags.len(), names.len());
        for tag in &tags {
            assert_eq!(tag.len(), 32);
            assert!(
                tag.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
        // Known vector: sha256("a") = ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb
        assert_eq!(doc_tag("a"), "ca978112ca1bbdcafac231b39a23dc4d");
        assert_eq!(doc_tag("a"), doc_tag("a"));
    }

    #[test]
    fn doc_keys_have_one_hash_tag_and_no_raw_name() {
        let keys = Keys::new("hearth").unwrap();
        for name in ["a", "a:lock", "{a}", "a*", "a\0b", "}{", "x}:lease"] {
            let key = keys.doc_key(name, "lease");
            assert_eq!(key.matches('{').count(), 1, "{key}");
            assert_eq!(key.matches('}').count(), 1, "{key}");
            assert_eq!(key, format!("hearth:d:{{{}}}:lease", doc_tag(name)));
        }
    }

    #[test]
    fn channel_names() {
        let keys = Keys::new("hearth.test:1").unwrap();
        let addr = NodeAddr::new(NodeId::new("node-0").unwrap(), Incarnation(0x1234));
        assert_eq!(
            keys.inbox(&addr),
            "hearth.test:1:inbox:node-0:0000000000001234"
        );
        assert_eq!(keys.bcast(), "hearth.test:1:bcast");
        assert_eq!(keys.node_key(&addr.id), "hearth.test:1:node:node-0");
    }

    #[test]
    fn prefix_validation() {
        for bad in ["", "a b", "{x}", "x*", "x?", "x[", "é", &"p".repeat(65)] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
        }
        assert!(Keys::new("p").is_ok());
    }
}
