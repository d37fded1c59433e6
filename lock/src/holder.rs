//! Holder identity: who holds a lease, and the lease value stored in Redis.

use std::fmt;
use std::str::FromStr;

use crate::LockError;

/// Longest accepted node id, in bytes.
const MAX_NODE_ID_LEN: usize = 256;
/// Longest accepted nonce, in bytes.
const MAX_NONCE_LEN: usize = 64;

/// The identity of a lock holder: a stable, configured node id plus a random boot nonce.
///
/// The nonce is chosen once per process start ([`HolderId::new`]), so a node that restarts
/// under the same name is a *different* holder and never mistakes a lease left behind by its
/// previous incarnation for its own.
///
/// Text form (`Display` / `FromStr`): `<node_id>|<nonce>`. The node id may not contain `|` or
/// control characters; the nonce is ASCII alphanumerics, `-` or `_`.
///
/// ```
/// use hearth_lock::HolderId;
///
/// let a = HolderId::new("node-a")?;
/// let again = HolderId::new("node-a")?; // a "restart": same name, new nonce
/// assert_eq!(a.node_id(), again.node_id());
/// assert_ne!(a, again);
///
/// let parsed: HolderId = a.to_string().parse()?;
/// assert_eq!(parsed, a);
/// # Ok::<(), hearth_lock::LockError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HolderId {
    node_id: String,
    nonce: String,
}

impl HolderId {
    /// A holder for `node_id` with a fresh random 64-bit nonce (16 hex digits).
    pub fn new(node_id: impl Into<String>) -> Result<Self, LockError> {
        Self::from_parts(node_id, format!("{:016x}", rand::random::<u64>()))
    }

    /// A holder from explicit parts, e.g. to reuse an incarnation id the process already has.
    /// Both parts are validated as described on [`HolderId`].
    pub fn from_parts(
        node_id: impl Into<String>,
        nonce: impl Into<String>,
    ) -> Result<Self, LockError> {
        let node_id = node_id.into();
        let nonce = nonce.into();
        validate_node_id(&node_id)?;
        validate_nonce(&nonce)?;
        Ok(Self { node_id, nonce })
    }

    /// The configured node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The per-process random nonce.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// The value stored under a lock key for one lease: `<node_id>|<nonce>|<lease>`, where
    /// `lease` is 16 hex digits, random per acquire.
    pub(crate) fn lease_value(&self, lease: u64) -> String {
        format!("{}|{}|{lease:016x}", self.node_id, self.nonce)
    }

    /// What every lease value of this holder starts with: `<node_id>|<nonce>|`.
    pub(crate) fn lease_prefix(&self) -> String {
        format!("{}|{}|", self.node_id, self.nonce)
    }

    /// Parses a stored lease value back into its holder. `None` if it was not written by this
    /// crate.
    pub(crate) fn from_lease_value(value: &str) -> Option<Self> {
        let mut parts = value.split('|');
        let (Some(node), Some(nonce), Some(lease), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if lease.is_empty() || !lease.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Self::from_parts(node, nonce).ok()
    }
}

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}|{}", self.node_id, self.nonce)
    }
}

impl FromStr for HolderId {
    type Err = LockError;

    /// Parses `<node_id>|<nonce>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node, nonce) = s
            .split_once('|')
            .ok_or_else(|| LockError::InvalidHolder(format!("missing '|' in {s:?}")))?;
        Self::from_parts(node, nonce)
    }
}

fn validate_node_id(node_id: &str) -> Result<(), LockError> {
    if node_id.is_empty() {
        return Err(LockError::InvalidHolder("node id is empty".into()));
    }
    if node_id.len() > MAX_NODE_ID_LEN {
        return Err(LockError::InvalidHolder(format!(
            "node id is longer than {MAX_NODE_ID_LEN} bytes"
        )));
    }
    if node_id.chars().any(|c| c == '|' || c.is_control()) {
        return Err(LockError::InvalidHolder(format!(
            "node id {node_id:?} contains '|' or a control character"
        )));
    }
    Ok(())
}

fn validate_nonce(nonce: &str) -> Result<(), LockError> {
    if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
        return Err(LockError::InvalidHolder(format!(
            "nonce must be 1..={MAX_NONCE_LEN} bytes"
        )));
    }
    if !nonce
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(LockError::InvalidHolder(format!(
            "nonce {nonce:?} may only contain ASCII alphanumerics, '-' and '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_generates_distinct_nonces() {
        let a = HolderId::new("n").expect("valid");
        let b = HolderId::new("n").expect("valid");
        assert_ne!(a.nonce(), b.nonce());
        assert_eq!(a.nonce().len(), 16);
    }

    #[test]
    fn display_and_parse_round_trip() {
        let h = HolderId::from_parts("collab a:1{x}", "abc-DEF_1").expect("valid");
        assert_eq!(h.to_string(), "collab a:1{x}|abc-DEF_1");
        assert_eq!(h.to_string().parse::<HolderId>().expect("parses"), h);
    }

    #[test]
    fn rejects_bad_parts() {
        assert!(HolderId::new("").is_err());
        assert!(HolderId::new("a|b").is_err());
        assert!(HolderId::new("a\0b").is_err());
        assert!(HolderId::new("a\nb").is_err());
        assert!(HolderId::new("x".repeat(MAX_NODE_ID_LEN + 1)).is_err());
        assert!(HolderId::from_parts("a", "").is_err());
        assert!(HolderId::from_parts("a", "b|c").is_err());
        assert!(HolderId::from_parts("a", "b c").is_err());
        assert!("no-separator".parse::<HolderId>().is_err());
        assert!("a|b|c".parse::<HolderId>().is_err());
    }

    #[test]
    fn lease_value_round_trip() {
        let h = HolderId::from_parts("node-1", "00ff").expect("valid");
        let v = h.lease_value(0xdead_beef);
        assert_eq!(v, "node-1|00ff|00000000deadbeef");
        assert_eq!(HolderId::from_lease_value(&v), Some(h));
    }

    #[test]
    fn foreign_values_do_not_parse() {
        for v in [
            "",
            "node-1",
            "node-1|00ff",
            "node-1|00ff|",
            "node-1|00ff|xyz",
            "node-1|00ff|12|34",
            "|00ff|12",
        ] {
            assert_eq!(HolderId::from_lease_value(v), None, "{v:?}");
        }
    }
}
