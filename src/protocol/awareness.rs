//! Server-side awareness state with the y-protocols rules applied literally (protocol.md §8).
//!
//! The server's own local state is always null. For every entry of an incoming update: the
//! known clock is the stored one (0 for an unknown client); the entry is accepted iff
//! `clock > known`, or `clock == known` with a `null` state for a client that is present.
//! Meta (clock, last update) is kept after removal, so a removed client cannot be revived with
//! an old clock. Time is passed in, never read here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::lib0::{DecodeError, Reader, Writer};

/// One decoded awareness entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The Yjs client id.
    pub client: u64,
    /// The entry's clock.
    pub clock: u64,
    /// The JSON state, `None` for `null`.
    pub state: Option<Arc<str>>,
}

/// Why an awareness update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwarenessError {
    /// Bytes could not be decoded.
    #[error("awareness decode: {0}")]
    Decode(#[from] DecodeError),
    /// A state is not JSON (relaying it would break every other client's JSON.parse).
    #[error("awareness state is not valid JSON")]
    InvalidJson,
    /// A state is larger than the configured limit.
    #[error("awareness state of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// Decodes an awareness update. Every state must be valid JSON no longer than `max_state`.
pub fn decode_update(bytes: Bytes, max_state: usize) -> Result<Vec<Entry>, AwarenessError> {
    let mut r = Reader::new(bytes);
    let n = r.read_var_uint()?;
    // every entry takes at least 3 bytes: never pre-allocate from the declared count
    let mut out = Vec::with_capacity((n as usize).min(r.remaining() / 3));
    for _ in 0..n {
        let client = r.read_var_uint()?;
        let clock = r.read_var_uint()?;
        let json = r.read_var_bytes()?;
        if json.len() > max_state {
            return Err(AwarenessError::TooLarge(json.len()));
        }
        let text = std::str::from_utf8(&json).map_err(|_| DecodeError::InvalidUtf8)?;
        let state = if text.trim() == "null" {
            None
        } else {
            serde_json::from_str::<serde::de::IgnoredAny>(text)
                .map_err(|_| AwarenessError::InvalidJson)?;
            Some(Arc::from(text))
        };
        out.push(Entry {
            client,
            clock,
            state,
        });
    }
    Ok(out)
}

/// Encodes entries as an awareness update.
pub fn encode_update<'a>(
    entries: impl IntoIterator<Item = (u64, u64, Option<&'a str>)>,
) -> Vec<u8> {
    let entries: Vec<_> = entries.into_iter().collect();
    let mut b = Vec::with_capacity(1 + entries.len() * 24);
    b.write_var_uint(entries.len() as u64);
    for (client, clock, state) in entries {
        b.write_var_uint(client);
        b.write_var_uint(clock);
        b.write_var_string(state.unwrap_or("null"));
    }
    b
}

/// What an application of an update (or a removal) changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Clients seen for the first time with a state.
    pub added: Vec<u64>,
    /// Known clients with a (possibly identical) new state.
    pub updated: Vec<u64>,
    /// Clients whose state became null.
    pub removed: Vec<u64>,
}

impl Change {
    /// True when nothing was accepted.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }

    /// Every changed client id.
    pub fn all(&self) -> impl Iterator<Item = u64> + '_ {
        self.added
            .iter()
            .chain(&self.updated)
            .chain(&self.removed)
            .copied()
    }
}

#[derive(Debug, Clone)]
struct Meta {
    clock: u64,
    last_updated: Instant,
    state: Option<Arc<str>>,
}

/// Awareness of one document.
#[derive(Debug, Default)]
pub struct Awareness {
    meta: HashMap<u64, Meta>,
    present: usize,
}

impl Awareness {
    /// An empty awareness.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of clients with a non-null state.
    pub fn len(&self) -> usize {
        self.present
    }

    /// True when no client has a state.
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    /// Applies decoded entries with the y-protocols acceptance rule.
    pub fn apply(&mut self, entries: Vec<Entry>, now: Instant) -> Change {
        let mut change = Change::default();
        for e in entries {
            let known = self.meta.get(&e.client);
            let known_clock = known.map_or(0, |m| m.clock);
            let present = known.is_some_and(|m| m.state.is_some());
            let accept =
                known_clock < e.clock || (known_clock == e.clock && e.state.is_none() && present);
            if !accept {
                continue;
            }
            let was_known = known.is_some();
            match (&e.state, present) {
                (Some(_), false) => self.present += 1,
                (None, true) => self.present -= 1,
                _ => {}
            }
            if !was_known && e.state.is_some() {
                change.added.push(e.client);
            } else if was_known && e.state.is_none() {
                change.removed.push(e.client);
            } else if e.state.is_some() {
                change.updated.push(e.client);
            }
            self.meta.insert(
                e.client,
                Meta {
                    clock: e.clock,
                    last_updated: now,
                    state: e.state,
                },
            );
        }
        change
    }

    /// Removes the states of `clients` (disconnect), keeping their clocks; the removal is
    /// broadcast as `[id, same clock, null]`.
    pub fn remove(&mut self, clients: impl IntoIterator<Item = u64>, now: Instant) -> Change {
        let mut change = Change::default();
        for c in clients {
            if let Some(m) = self.meta.get_mut(&c)
                && m.state.take().is_some()
            {
                m.last_updated = now;
                self.present -= 1;
                change.removed.push(c);
            }
        }
        change
    }

    /// Removes states not renewed within `timeout`.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Change {
        let stale: Vec<u64> = self
            .meta
            .iter()
            .filter(|(_, m)| {
                m.state.is_some() && now.saturating_duration_since(m.last_updated) >= timeout
            })
            .map(|(c, _)| *c)
            .collect();
        self.remove(stale, now)
    }

    /// Encodes the current entries of `clients` (removed ones as `null`).
    pub fn encode(&self, clients: impl IntoIterator<Item = u64>) -> Vec<u8> {
        encode_update(
            clients
                .into_iter()
                .filter_map(|c| self.meta.get(&c).map(|m| (c, m.clock, m.state.as_deref()))),
        )
    }

    /// Encodes every present state, or `None` when there is none.
    pub fn encode_all(&self) -> Option<Vec<u8>> {
        if self.present == 0 {
            return None;
        }
        Some(encode_update(self.meta.iter().filter_map(|(c, m)| {
            m.state.as_deref().map(|s| (*c, m.clock, Some(s)))
        })))
    }

    /// Drops the meta of clients that are absent and were last touched before `horizon` ago,
    /// so the map does not grow forever.
    pub fn gc(&mut self, now: Instant, horizon: Duration) {
        self.meta.retain(|_, m| {
            m.state.is_some() || now.saturating_duration_since(m.last_updated) < horizon
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn e(client: u64, clock: u64, state: Option<&str>) -> Entry {
        Entry {
            client,
            clock,
            state: state.map(Arc::from),
        }
    }

    #[test]
    fn first_state_with_clock_zero_is_ignored() {
        let mut a = Awareness::new();
        let now = Instant::now();
        assert!(a.apply(vec![e(1, 0, Some("{}"))], now).is_empty());
        let c = a.apply(vec![e(1, 1, Some(r#"{"n":1}"#))], now);
        assert_eq!(c.added, vec![1]);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn renewal_is_an_update_and_old_clocks_are_ignored() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(vec![e(7, 3, Some("{}"))], now);
        assert_eq!(a.apply(vec![e(7, 4, Some("{}"))], now).updated, vec![7]);
        assert!(a.apply(vec![e(7, 2, Some("{}"))], now).is_empty());
        assert!(
            a.apply(vec![e(7, 4, Some(r#"{"x":1}"#))], now).is_empty(),
            "same clock, non-null"
        );
    }

    #[test]
    fn equal_clock_null_removes_a_present_client_only() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(vec![e(5, 3, Some("{}"))], now);
        assert_eq!(a.apply(vec![e(5, 3, None)], now).removed, vec![5]);
        assert_eq!(a.len(), 0);
        assert!(
            a.apply(vec![e(5, 3, None)], now).is_empty(),
            "already absent"
        );
        // reappearing with a higher clock is "updated", not "added" (reference quirk)
        assert_eq!(a.apply(vec![e(5, 4, Some("{}"))], now).updated, vec![5]);
        // unknown client with null state is nothing
        assert!(a.apply(vec![e(9, 0, None)], now).is_empty());
    }

    #[test]
    fn remove_keeps_clock_and_encodes_null() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(vec![e(501, 3, Some(r#"{"name":"alice"}"#))], now);
        let c = a.remove([501, 77], now);
        assert_eq!(c.removed, vec![501]);
        // trace: 01 f5 03 03 04 "null"
        assert_eq!(
            a.encode([501]),
            vec![1, 0xf5, 0x03, 3, 4, b'n', b'u', b'l', b'l']
        );
        assert_eq!(a.encode_all(), None);
    }

    #[test]
    fn expire_removes_stale_states() {
        let mut a = Awareness::new();
        let t0 = Instant::now();
        a.apply(vec![e(1, 1, Some("{}")), e(2, 1, Some("{}"))], t0);
        a.apply(vec![e(2, 2, Some("{}"))], t0 + Duration::from_secs(20));
        let c = a.expire(t0 + Duration::from_secs(31), Duration::from_secs(30));
        assert_eq!(c.removed, vec![1]);
        a.gc(t0 + Duration::from_secs(100), Duration::from_secs(60));
        assert_eq!(a.encode([1]), vec![0], "gc dropped the meta");
    }

    #[test]
    fn decode_validates_json_size_and_bounds() {
        let good = encode_update([(1, 2, Some(r#"{"a":[1,2]}"#)), (3, 4, None)]);
        let entries = decode_update(Bytes::from(good), 1024).unwrap();
        assert_eq!(
            entries,
            vec![e(1, 2, Some(r#"{"a":[1,2]}"#)), e(3, 4, None)]
        );
        let bad = encode_update([(1, 2, Some("{not json"))]);
        assert_eq!(
            decode_update(Bytes::from(bad), 1024),
            Err(AwarenessError::InvalidJson)
        );
        let big = encode_update([(1, 2, Some(r#""0123456789""#))]);
        assert_eq!(
            decode_update(Bytes::from(big), 4),
            Err(AwarenessError::TooLarge(12))
        );
        // declared 2^27 entries in 4 bytes: error, no allocation
        let bomb = Bytes::from_static(&[0x80, 0x80, 0x80, 0x40]);
        assert!(decode_update(bomb, 1024).is_err());
    }
}
