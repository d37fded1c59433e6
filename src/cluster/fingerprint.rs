//! Which cluster secret each node uses, published so that a process with another secret finds
//! out before it sends anything (an owner silently drops envelopes whose MAC fails, so a wrong
//! secret would otherwise look like a timeout).
//!
//! Every node keeps `<prefix>:secret-id:<node id>` = `<incarnation> <current> [<previous>]`,
//! the fingerprints of its secrets ([`hearth_proxy::Secret::fingerprint`]: a truncated
//! HMAC-SHA256 under the secret of a fixed label, which names the secret without revealing
//! it), with the same time-to-live as its node record and refreshed with it. `hearth cluster
//! emit` reads the owner's record and refuses to send when they could not talk
//! ([`hearth_proxy::Secrets::accepted_by`], so a rotation in progress is fine); a joining node
//! reads every record and logs a warning naming the nodes it cannot talk to. A missing record
//! (a node of an older version, or one whose record expired) is not checked.

use fred::clients::Client;
use fred::interfaces::KeysInterface as _;
use fred::types::Expiration;
use hearth_proxy::{Keys, NodeAddr, NodeId, Secrets};

use super::ClusterError;

/// The published fingerprints of one node's secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    /// The incarnation of the process that published them.
    pub(super) incarnation: String,
    /// The secret it signs with.
    pub(super) current: String,
    /// The secret it also accepts, during a rotation.
    pub(super) previous: Option<String>,
}

impl Published {
    /// Reads a record value; `None` when it is not one.
    fn parse(value: &str) -> Option<Published> {
        let mut parts = value.split(' ');
        let incarnation = parts.next()?.to_owned();
        let current = parts.next().filter(|c| !c.is_empty())?.to_owned();
        let previous = parts.next().map(str::to_owned);
        Some(Published {
            incarnation,
            current,
            previous,
        })
    }

    /// Whether envelopes go through both ways between this node and a process with `secrets`.
    pub(super) fn talks_with(&self, secrets: &Secrets) -> bool {
        secrets.accepted_by((&self.current, self.previous.as_deref()))
    }
}

/// The key of node `id`'s record.
fn key(keys: &Keys, id: &NodeId) -> String {
    format!("{}:secret-id:{id}", keys.prefix())
}

/// The record this process publishes: its key and value.
pub(super) fn record(keys: &Keys, me: &NodeAddr, secrets: &Secrets) -> (String, String) {
    let mut value = format!("{} {}", me.inc, secrets.current.fingerprint());
    if let Some(previous) = &secrets.previous {
        value.push(' ');
        value.push_str(&previous.fingerprint());
    }
    (key(keys, &me.id), value)
}

/// Writes a record with a time-to-live of `ttl_ms`.
pub(super) async fn publish(
    redis: &Client,
    (key, value): &(String, String),
    ttl_ms: i64,
) -> Result<(), ClusterError> {
    redis
        .set::<(), _, _>(
            key.as_str(),
            value.as_str(),
            Some(Expiration::PX(ttl_ms)),
            None,
            false,
        )
        .await
        .map_err(|e| ClusterError::Redis(e.to_string()))
}

/// What process `addr` published, if its record is there and is that process's.
pub(super) async fn of_node(
    redis: &Client,
    keys: &Keys,
    addr: &NodeAddr,
) -> Result<Option<Published>, ClusterError> {
    let value: Option<String> = redis
        .get(key(keys, &addr.id))
        .await
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    Ok(value
        .as_deref()
        .and_then(Published::parse)
        .filter(|p| p.incarnation == addr.inc.to_string()))
}

/// The ids of the other nodes whose published secrets cannot talk with `secrets`, read from
/// the records of the live nodes `nodes`.
pub(super) async fn mismatched(
    redis: &Client,
    keys: &Keys,
    me: &NodeAddr,
    nodes: &[NodeAddr],
    secrets: &Secrets,
) -> Result<Vec<String>, ClusterError> {
    let mut out = Vec::new();
    for node in nodes.iter().filter(|n| n.id != me.id) {
        let published = of_node(redis, keys, node).await?;
        if published.is_some_and(|p| !p.talks_with(secrets)) {
            out.push(node.id.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip() {
        let keys = Keys::new("p").unwrap();
        let me = NodeAddr::new(NodeId::new("n1").unwrap(), hearth_proxy::Incarnation(10));
        let a = hearth_proxy::Secret::new("pW3x9QzL7mKc2Rv8Tn5Yb1Hd6Jf4Gs0E").unwrap();
        let b = hearth_proxy::Secret::new("Zr8Kq2Wm5Xv9Lp3Nt7Yc1Bd6Hf4Gj0Sa").unwrap();
        let secrets = Secrets::new(a.clone()).with_previous(b.clone());
        let (k, v) = record(&keys, &me, &secrets);
        assert_eq!(k, "p:secret-id:n1");
        let p = Published::parse(&v).unwrap();
        assert_eq!(p.incarnation, me.inc.to_string());
        assert_eq!(p.current, a.fingerprint());
        assert_eq!(p.previous, Some(b.fingerprint()));
        assert!(p.talks_with(&secrets));
        assert!(p.talks_with(&Secrets::new(a)));
        assert!(
            !p.talks_with(&Secrets::new(b)),
            "b-only signs what p accepts, cannot read p"
        );
        assert!(Published::parse("").is_none());
        assert!(Published::parse("0a").is_none());
    }
}
