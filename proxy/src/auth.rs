//! HMAC-SHA256 envelope authentication with a cluster secret.
//!
//! With a secret configured, every envelope is signed with the first (signing) key and every
//! received envelope must carry a valid MAC under one of the accepted keys; envelopes without a
//! MAC, with an unknown key id or a wrong MAC are rejected with distinct errors. Verification is
//! constant-time (`hmac`'s `verify_slice`).
//!
//! Key rotation: configure the new key as signing key and keep the old one in `also_accept`
//! until every node runs with the new key; then drop the old one.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::codec::DecodeError;
use crate::error::ProxyError;

type HmacSha256 = Hmac<Sha256>;

/// Length of the MAC on the wire, in bytes.
pub const MAC_LEN: usize = 32;

/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// One cluster secret with its key id (the id travels in clear next to the MAC).
#[derive(Clone)]
pub struct ClusterKey {
    id: u8,
    /// HMAC state already keyed with the secret; cloned per message so the key schedule is not
    /// recomputed.
    mac: HmacSha256,
}

impl ClusterKey {
    /// Builds a key; `secret` must be at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(id: u8, secret: &[u8]) -> Result<Self, ProxyError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(ProxyError::Config(format!(
                "cluster secret must be at least {MIN_SECRET_LEN} bytes"
            )));
        }
        let mac = HmacSha256::new_from_slice(secret)
            .map_err(|e| ProxyError::Config(format!("cluster secret: {e}")))?;
        Ok(ClusterKey { id, mac })
    }

    /// The key id.
    pub fn id(&self) -> u8 {
        self.id
    }

    fn compute(&self, prefix: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.mac.clone();
        mac.update(prefix);
        mac.update(body);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }

    fn verify(&self, prefix: &[u8], body: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(prefix);
        mac.update(body);
        mac.verify_slice(tag).is_ok()
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The authentication policy of a node: either disabled (accept unsigned envelopes) or a
/// signing key plus the keys accepted for verification.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// `keys[0]` signs; all of them verify. Empty = disabled.
    keys: Vec<ClusterKey>,
}

impl Auth {
    /// No cluster secret: envelopes go out unsigned and unsigned envelopes are accepted. A signed
    /// envelope is accepted too, without checking its MAC (there is no key to check it with).
    /// Call [`Auth::startup_warning`] and log the result.
    pub fn disabled() -> Self {
        Auth { keys: Vec::new() }
    }

    /// One secret, key id 0.
    pub fn with_secret(secret: &[u8]) -> Result<Self, ProxyError> {
        Ok(Auth {
            keys: vec![ClusterKey::new(0, secret)?],
        })
    }

    /// A signing key plus older keys still accepted during a rotation. Key ids must be distinct.
    pub fn with_keys(
        signing: ClusterKey,
        also_accept: Vec<ClusterKey>,
    ) -> Result<Self, ProxyError> {
        let mut keys = vec![signing];
        for key in also_accept {
            if keys.iter().any(|k| k.id == key.id) {
                return Err(ProxyError::Config(format!(
                    "duplicate cluster key id {}",
                    key.id
                )));
            }
            keys.push(key);
        }
        Ok(Auth { keys })
    }

    /// Whether a cluster secret is configured (envelopes are signed and MACs are required).
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The warning the server should log at startup, if any (no secret configured).
    pub fn startup_warning(&self) -> Option<&'static str> {
        if self.is_enabled() {
            None
        } else {
            Some(
                "no cluster secret configured: cross-node envelopes are not authenticated; \
                 anyone who can PUBLISH to this Redis can inject frames, sessions and events",
            )
        }
    }

    /// The signing key, if enabled.
    pub(crate) fn signing_key(&self) -> Option<&ClusterKey> {
        self.keys.first()
    }

    /// MAC of `prefix || body` with the signing key.
    pub(crate) fn sign(&self, prefix: &[u8], body: &[u8]) -> Option<[u8; MAC_LEN]> {
        self.signing_key().map(|k| k.compute(prefix, body))
    }

    /// Checks `tag` against `prefix || body` under key `key_id`.
    pub(crate) fn verify(
        &self,
        key_id: u8,
        prefix: &[u8],
        body: &[u8],
        tag: &[u8],
    ) -> Result<(), DecodeError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or(DecodeError::UnknownKey(key_id))?;
        if key.verify(prefix, body, tag) {
            Ok(())
        } else {
            Err(DecodeError::BadMac)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rfc4231_test_case_2() {
        // RFC 4231 test case 2 ("Jefe"), split across prefix and body to check concatenation.
        // The key is shorter than MIN_SECRET_LEN, so build the state directly.
        let key = ClusterKey {
            id: 0,
            mac: HmacSha256::new_from_slice(b"Jefe").unwrap(),
        };
        let tag = key.compute(b"what do ya want ", b"for nothing?");
        let expected = [
            0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95,
            0x75, 0xc7, 0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9,
            0x64, 0xec, 0x38, 0x43,
        ];
        assert_eq!(tag, expected);
        assert!(key.verify(b"what do ya want for nothing?", b"", &expected));
        assert!(!key.verify(b"what do ya want for nothing!", b"", &expected));
        assert!(!key.verify(b"what do ya want for nothing?", b"", &expected[..31]));
    }

    #[test]
    fn short_secret_and_duplicate_ids_rejected() {
        assert!(ClusterKey::new(0, b"short").is_err());
        let a = ClusterKey::new(1, &[7u8; 32]).unwrap();
        let b = ClusterKey::new(1, &[8u8; 32]).unwrap();
        assert!(Auth::with_keys(a, vec![b]).is_err());
    }

    #[test]
    fn warning_only_when_disabled() {
        assert!(Auth::disabled().startup_warning().is_some());
        assert!(!Auth::disabled().is_enabled());
        let auth = Auth::with_secret(&[1u8; 32]).unwrap();
        assert!(auth.is_enabled());
        assert!(auth.startup_warning().is_none());
        assert!(!format!("{auth:?}").contains("[1"));
    }
}
