//! Server-side awareness state with the y-protocols rules applied literally,
//! and the bounds that keep one client from exhausting a node with it.
//!
//! The server's own local state is always null. For every entry of an incoming update: the
//! known clock is the stored one (0 for an unknown client); the entry is accepted iff
//! `clock > known`, or `clock == known` with a `null` state for a client that is present.
//! Meta (clock, last update) is kept after removal, so a removed client cannot be revived with
//! an old clock; a `null` for a client never seen is ignored (nothing to remove, nothing kept).
//! Time is passed in, never read here.
//!
//! Bounds ([`Limits`]), all checked in O(1) per entry:
//! * a connection (an *owner*) speaks for at most `per_owner` client ids; the first entry past
//!   that stops the update with [`Violation::TooManyClients`] (the caller disconnects it);
//! * a document remembers at most `clients` client ids, present or removed: a new id evicts the
//!   longest-removed one, and is refused ([`Refusal::DocumentClients`]) when every remembered id
//!   is present;
//! * the encoded size of every present state (exactly what [`Awareness::encode_all`] returns,
//!   the snapshot a joiner receives) never exceeds `bytes`: a state that would push it over is
//!   refused ([`Refusal::DocumentBytes`]). A refused state is dropped; its connection stays.
//!
//! [`RateLimit`] is the per-connection token bucket for awareness messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::lib0::{DecodeError, Reader, Writer, var_uint_len};

/// Whatever identifies the connection that sent an update (the document's connection id).
pub type Owner = u64;

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

impl AwarenessError {
    /// Metric label (`hearth_awareness_refused_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            AwarenessError::Decode(_) | AwarenessError::InvalidJson => "invalid",
            AwarenessError::TooLarge(_) => "state_bytes",
        }
    }
}

/// A per-connection limit whose breach disconnects the client (socket close 1008,
/// [`Close::Awareness`](super::Close::Awareness)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Violation {
    /// The connection published states for more client ids than `per_owner`.
    TooManyClients,
    /// The connection sent awareness messages faster than its [`RateLimit`].
    Rate,
}

impl Violation {
    /// The close reason the client sees (`CLOSE` frame and WebSocket close).
    pub fn reason(self) -> &'static str {
        match self {
            Violation::TooManyClients => "awareness limit: too many client ids",
            Violation::Rate => "awareness limit: too many updates",
        }
    }

    /// Metric label (`hearth_awareness_refused_total{reason}`).
    pub fn label(self) -> &'static str {
        match self {
            Violation::TooManyClients => "client_ids",
            Violation::Rate => "rate",
        }
    }
}

/// Why a client's state was dropped while its connection stays (the document is full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The document remembers `clients` ids, all of them present.
    DocumentClients,
    /// The state would push the document's awareness over `bytes`.
    DocumentBytes,
}

impl Refusal {
    /// Metric label (`hearth_awareness_refused_total{reason}`).
    pub fn label(self) -> &'static str {
        match self {
            Refusal::DocumentClients => "document_clients",
            Refusal::DocumentBytes => "document_bytes",
        }
    }
}

/// Bounds on one document's awareness (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Client ids one connection may publish states for.
    pub per_owner: usize,
    /// Client ids one document remembers, present or removed.
    pub clients: usize,
    /// Largest encoded size of all present states together.
    pub bytes: usize,
}

impl Limits {
    /// No bounds at all.
    pub const UNLIMITED: Limits = Limits {
        per_owner: usize::MAX,
        clients: usize::MAX,
        bytes: usize::MAX,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::UNLIMITED
    }
}

/// An awareness update whose entries were all checked (decodable, JSON, within the state size
/// limit). Entries are read again lazily, so applying it allocates only for states kept.
#[derive(Debug, Clone)]
pub struct Update {
    bytes: Bytes,
    len: usize,
}

/// One entry of an [`Update`], its state still pointing into the update's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// The Yjs client id.
    pub client: u64,
    /// The entry's clock.
    pub clock: u64,
    /// The JSON text of the state, `None` for `null`.
    pub state: Option<Bytes>,
}

impl RawEntry {
    /// The state as text (`None` for `null`).
    pub fn state_str(&self) -> Option<&str> {
        self.state
            .as_deref()
            .and_then(|s| std::str::from_utf8(s).ok())
    }
}

/// True for the JSON text `null` (surrounding whitespace allowed).
fn is_null(json: &[u8]) -> bool {
    json.trim_ascii() == b"null"
}

/// Reads one entry without looking inside its state.
fn read_raw(r: &mut Reader) -> Result<RawEntry, DecodeError> {
    let client = r.read_var_uint()?;
    let clock = r.read_var_uint()?;
    let json = r.read_var_bytes()?;
    let state = (!is_null(&json)).then_some(json);
    Ok(RawEntry {
        client,
        clock,
        state,
    })
}

impl Update {
    /// Checks every entry of an encoded update: each state must be valid JSON no longer than
    /// `max_state`. Allocates nothing.
    pub fn parse(bytes: Bytes, max_state: usize) -> Result<Self, AwarenessError> {
        let mut r = Reader::new(bytes.clone());
        let n = r.read_var_uint()?;
        for _ in 0..n {
            let _client = r.read_var_uint()?;
            let _clock = r.read_var_uint()?;
            let json = r.read_var_bytes()?;
            if json.len() > max_state {
                return Err(AwarenessError::TooLarge(json.len()));
            }
            let text = std::str::from_utf8(&json).map_err(|_| DecodeError::InvalidUtf8)?;
            if !is_null(&json) {
                serde_json::from_str::<serde::de::IgnoredAny>(text)
                    .map_err(|_| AwarenessError::InvalidJson)?;
            }
        }
        // every entry took at least 3 bytes, so the count fits in usize
        let len = usize::try_from(n).map_err(|_| DecodeError::UnexpectedEnd)?;
        Ok(Self { bytes, len })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the update has no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, in order.
    pub fn entries(&self) -> impl Iterator<Item = RawEntry> + '_ {
        let mut r = Reader::new(self.bytes.clone());
        // checked by `parse`: nothing below fails
        let n = r.read_var_uint().unwrap_or(0);
        (0..n).map_while(move |_| read_raw(&mut r).ok())
    }
}

/// Decodes an awareness update. Every state must be valid JSON no longer than `max_state`.
pub fn decode_update(bytes: Bytes, max_state: usize) -> Result<Vec<Entry>, AwarenessError> {
    let update = Update::parse(bytes, max_state)?;
    Ok(update
        .entries()
        .map(|e| Entry {
            client: e.client,
            clock: e.clock,
            state: e.state_str().map(Arc::from),
        })
        .collect())
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

/// Encoded size of one entry with a state of `state_len` bytes.
fn entry_len(client: u64, clock: u64, state_len: usize) -> usize {
    var_uint_len(client) + var_uint_len(clock) + var_uint_len(state_len as u64) + state_len
}

/// What an application of an update (or a removal) changed. Every client appears once.
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

/// States dropped because the document is full, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused {
    /// Dropped for [`Refusal::DocumentClients`].
    pub document_clients: usize,
    /// Dropped for [`Refusal::DocumentBytes`].
    pub document_bytes: usize,
}

impl Refused {
    /// True when nothing was dropped.
    pub fn is_empty(&self) -> bool {
        self.document_clients == 0 && self.document_bytes == 0
    }

    /// `(reason, count)` for every reason with a non-zero count.
    pub fn iter(&self) -> impl Iterator<Item = (Refusal, usize)> {
        [
            (Refusal::DocumentClients, self.document_clients),
            (Refusal::DocumentBytes, self.document_bytes),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
    }
}

/// The outcome of [`Awareness::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// What changed (to broadcast).
    pub change: Change,
    /// States dropped because the document is full.
    pub refused: Refused,
    /// Set when the owner broke its own limit; the entries before the offending one applied.
    pub violation: Option<Violation>,
}

/// A token bucket for one connection's awareness messages: `per_sec` tokens a second, holding
/// at most two seconds' worth. Every document connection has one, so it is kept small: the
/// burst is derived from the rate, and single precision is ample for a few seconds' tokens.
#[derive(Debug, Clone)]
pub struct RateLimit {
    tokens: f32,
    per_sec: f32,
    last: Instant,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(per_sec: u32, now: Instant) -> Self {
        // exact up to 2^24 a second; larger rates are rounded, far past any useful limit
        let per_sec = per_sec.max(1) as f32;
        Self {
            tokens: per_sec * 2.0,
            per_sec,
            last: now,
        }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec * 2.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The client ids one connection speaks for. Nearly always one (a provider publishes its own
/// state), kept inline: a set is allocated only for a connection that speaks for several.
#[derive(Debug)]
enum OwnedIds {
    One(u64),
    #[allow(
        clippy::box_collection,
        reason = "boxed, the common one-id entry of the owners' map is 16 bytes, not 56"
    )]
    Many(Box<HashSet<u64>>),
}

impl OwnedIds {
    fn contains(&self, id: u64) -> bool {
        match self {
            OwnedIds::One(one) => *one == id,
            OwnedIds::Many(set) => set.contains(&id),
        }
    }

    fn len(&self) -> usize {
        match self {
            OwnedIds::One(_) => 1,
            OwnedIds::Many(set) => set.len(),
        }
    }

    fn insert(&mut self, id: u64) {
        match self {
            OwnedIds::One(one) => {
                if *one != id {
                    *self = OwnedIds::Many(Box::new(HashSet::from([*one, id])));
                }
            }
            OwnedIds::Many(set) => {
                set.insert(id);
            }
        }
    }

    fn into_iter(self) -> impl Iterator<Item = u64> {
        let (one, many) = match self {
            OwnedIds::One(one) => (Some(one), None),
            OwnedIds::Many(set) => (None, Some(*set)),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[derive(Debug, Clone)]
struct Meta {
    clock: u64,
    last_updated: Instant,
    state: Option<Arc<str>>,
    /// The connection that speaks for this client (only it may change the entry).
    owner: Option<Owner>,
}

/// Why [`Awareness::set`] did not store a state.
enum Denied {
    Violation(Violation),
    Refused(Refusal),
}

/// Awareness of one document, with the bookkeeping that bounds it (see the module
/// documentation). Every operation on one entry is O(1); only [`Awareness::expire`] and
/// [`Awareness::gc`] (periodic) walk the remembered clients, at most `limits.clients` of them.
#[derive(Debug, Default)]
pub struct Awareness {
    limits: Limits,
    meta: HashMap<u64, Meta>,
    /// Client ids each connection published (or tried to publish) a state for.
    owners: HashMap<Owner, OwnedIds>,
    /// Clients in the order their state went away, with that time; an entry whose client
    /// changed since (or is forgotten) is stale and skipped. Used to evict the longest-absent
    /// client when the document is full.
    absent: VecDeque<(u64, Instant)>,
    /// Clients with a state.
    present: usize,
    /// Encoded size of the present entries (everything `encode_all` writes but the count).
    bytes: usize,
}

impl Awareness {
    /// An empty awareness without limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty awareness with `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Number of clients with a non-null state.
    pub fn len(&self) -> usize {
        self.present
    }

    /// True when no client has a state.
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    /// Number of remembered clients, present or removed (bounded by `limits.clients`).
    pub fn clients(&self) -> usize {
        self.meta.len()
    }

    /// Size of what [`Awareness::encode_all`] returns (0 when it returns `None`); never more
    /// than `limits.bytes`.
    pub fn encoded_len(&self) -> usize {
        Self::total(self.present, self.bytes)
    }

    fn total(present: usize, bytes: usize) -> usize {
        if present == 0 {
            0
        } else {
            var_uint_len(present as u64) + bytes
        }
    }

    /// Applies an update sent by `owner` with the y-protocols acceptance rule, within the
    /// limits. Entries for clients another owner speaks for are ignored.
    pub fn apply(&mut self, owner: Owner, update: &Update, now: Instant) -> Applied {
        let mut out = Applied::default();
        // changed clients in first-change order, with whether they were known before
        let mut changed: Vec<(u64, bool)> = Vec::new();
        let mut seen: HashSet<u64> = HashSet::new();
        for e in update.entries() {
            let (known_clock, present, was_known) = match self.meta.get(&e.client) {
                Some(m) if m.owner.is_some_and(|o| o != owner) => continue,
                Some(m) => (m.clock, m.state.is_some(), true),
                None => (0, false, false),
            };
            let accept =
                known_clock < e.clock || (known_clock == e.clock && e.state.is_none() && present);
            if !accept {
                continue;
            }
            let stored = match &e.state {
                None => self.clear(owner, e.client, e.clock, now),
                Some(json) => {
                    let Ok(text) = std::str::from_utf8(json) else {
                        continue;
                    };
                    match self.set(owner, e.client, e.clock, text, now) {
                        Ok(()) => true,
                        Err(Denied::Violation(v)) => {
                            out.violation = Some(v);
                            break;
                        }
                        Err(Denied::Refused(Refusal::DocumentClients)) => {
                            out.refused.document_clients += 1;
                            false
                        }
                        Err(Denied::Refused(Refusal::DocumentBytes)) => {
                            out.refused.document_bytes += 1;
                            false
                        }
                    }
                }
            };
            if stored && seen.insert(e.client) {
                changed.push((e.client, was_known));
            }
        }
        for (client, was_known) in changed {
            match self.meta.get(&client) {
                Some(m) if m.state.is_some() && was_known => out.change.updated.push(client),
                Some(m) if m.state.is_some() => out.change.added.push(client),
                _ => out.change.removed.push(client),
            }
        }
        out
    }

    /// A `null` entry: the client's state goes, its clock stays. False for a client never seen.
    fn clear(&mut self, owner: Owner, client: u64, clock: u64, now: Instant) -> bool {
        let Some(m) = self.meta.get_mut(&client) else {
            return false;
        };
        if let Some(old) = m.state.take() {
            self.present -= 1;
            self.bytes -= entry_len(client, m.clock, old.len());
        }
        m.clock = clock;
        m.last_updated = now;
        if m.owner == Some(owner) {
            // the connection gave the id up: another one may speak for it now
            m.owner = None;
        }
        self.absent.push_back((client, now));
        self.compact_absent();
        true
    }

    /// A state entry, within the limits. The id counts against the owner's limit even when
    /// the document is full and the state is dropped.
    fn set(
        &mut self,
        owner: Owner,
        client: u64,
        clock: u64,
        text: &str,
        now: Instant,
    ) -> Result<(), Denied> {
        match self.owners.entry(owner) {
            std::collections::hash_map::Entry::Vacant(v) => {
                if self.limits.per_owner == 0 {
                    return Err(Denied::Violation(Violation::TooManyClients));
                }
                v.insert(OwnedIds::One(client));
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                let ids = o.into_mut();
                if !ids.contains(client) {
                    if ids.len() >= self.limits.per_owner {
                        return Err(Denied::Violation(Violation::TooManyClients));
                    }
                    ids.insert(client);
                }
            }
        }
        let (was_known, old_len) = match self.meta.get(&client) {
            Some(m) => (
                true,
                m.state
                    .as_ref()
                    .map(|s| entry_len(client, m.clock, s.len())),
            ),
            None => (false, None),
        };
        let present = self.present + usize::from(old_len.is_none());
        let bytes = self.bytes - old_len.unwrap_or(0) + entry_len(client, clock, text.len());
        let total = Self::total(present, bytes);
        if total > self.limits.bytes && total > self.encoded_len() {
            return Err(Denied::Refused(Refusal::DocumentBytes));
        }
        if !was_known && self.meta.len() >= self.limits.clients && !self.evict_absent(now) {
            return Err(Denied::Refused(Refusal::DocumentClients));
        }
        self.meta.insert(
            client,
            Meta {
                clock,
                last_updated: now,
                state: Some(Arc::from(text)),
                owner: Some(owner),
            },
        );
        self.present = present;
        self.bytes = bytes;
        Ok(())
    }

    /// Forgets the client that has been absent longest, unless it went away at `now` (its
    /// removal may not have been broadcast yet). False when there is none.
    fn evict_absent(&mut self, now: Instant) -> bool {
        while let Some(&(client, at)) = self.absent.front() {
            if !is_absent_since(&self.meta, client, at) {
                self.absent.pop_front();
                continue;
            }
            if at >= now {
                return false;
            }
            self.absent.pop_front();
            self.meta.remove(&client);
            return true;
        }
        false
    }

    /// Drops stale entries of the absent queue once they outnumber the live ones.
    fn compact_absent(&mut self) {
        let live = self.meta.len() - self.present;
        if self.absent.len() > 2 * live + 32 {
            let meta = &self.meta;
            self.absent
                .retain(|&(client, at)| is_absent_since(meta, client, at));
        }
    }

    /// Removes the state of `client` (keeping its clock and owner). True if it had one.
    fn take_state(&mut self, client: u64, now: Instant) -> bool {
        let Some(m) = self.meta.get_mut(&client) else {
            return false;
        };
        let Some(old) = m.state.take() else {
            return false;
        };
        self.present -= 1;
        self.bytes -= entry_len(client, m.clock, old.len());
        m.last_updated = now;
        self.absent.push_back((client, now));
        true
    }

    /// The connection `owner` left: removes the states it speaks for, keeping their clocks;
    /// the removal is broadcast as `[id, same clock, null]`.
    pub fn remove_owner(&mut self, owner: Owner, now: Instant) -> Change {
        let mut change = Change::default();
        let Some(ids) = self.owners.remove(&owner) else {
            return change;
        };
        for client in ids.into_iter() {
            let Some(m) = self.meta.get_mut(&client) else {
                continue;
            };
            if m.owner != Some(owner) {
                continue;
            }
            m.owner = None;
            if self.take_state(client, now) {
                change.removed.push(client);
            }
        }
        self.compact_absent();
        change
    }

    /// Removes states not renewed within `timeout` (their owners keep speaking for them).
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Change {
        let stale: Vec<u64> = self
            .meta
            .iter()
            .filter(|(_, m)| {
                m.state.is_some() && now.saturating_duration_since(m.last_updated) >= timeout
            })
            .map(|(c, _)| *c)
            .collect();
        let mut change = Change::default();
        for client in stale {
            if self.take_state(client, now) {
                change.removed.push(client);
            }
        }
        self.compact_absent();
        change
    }

    /// Encodes the current entries of `clients` (removed ones as `null`).
    pub fn encode(&self, clients: impl IntoIterator<Item = u64>) -> Vec<u8> {
        encode_update(
            clients
                .into_iter()
                .filter_map(|c| self.meta.get(&c).map(|m| (c, m.clock, m.state.as_deref()))),
        )
    }

    /// Encodes every present state, or `None` when there is none. The result is exactly
    /// [`Awareness::encoded_len`] bytes, so never larger than `limits.bytes`.
    pub fn encode_all(&self) -> Option<Vec<u8>> {
        if self.present == 0 {
            return None;
        }
        let mut b = Vec::with_capacity(self.encoded_len());
        b.write_var_uint(self.present as u64);
        for (client, m) in &self.meta {
            if let Some(state) = &m.state {
                b.write_var_uint(*client);
                b.write_var_uint(m.clock);
                b.write_var_string(state);
            }
        }
        debug_assert_eq!(b.len(), self.encoded_len());
        Some(b)
    }

    /// Drops the meta of clients that are absent and were last touched before `horizon` ago,
    /// so the map does not grow forever.
    pub fn gc(&mut self, now: Instant, horizon: Duration) {
        self.meta.retain(|_, m| {
            m.state.is_some() || now.saturating_duration_since(m.last_updated) < horizon
        });
        let meta = &self.meta;
        self.absent
            .retain(|&(client, at)| is_absent_since(meta, client, at));
    }
}

/// True when `client` is remembered without a state since `at` (a live absent-queue entry).
fn is_absent_since(meta: &HashMap<u64, Meta>, client: u64, at: Instant) -> bool {
    meta.get(&client)
        .is_some_and(|m| m.state.is_none() && m.last_updated == at)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: Owner = 1;
    const B: Owner = 2;

    fn e(client: u64, clock: u64, state: Option<&str>) -> Entry {
        Entry {
            client,
            clock,
            state: state.map(Arc::from),
        }
    }

    fn upd(entries: &[(u64, u64, Option<&str>)]) -> Update {
        Update::parse(
            Bytes::from(encode_update(entries.iter().copied())),
            usize::MAX,
        )
        .unwrap()
    }

    fn limits(per_owner: usize, clients: usize, bytes: usize) -> Limits {
        Limits {
            per_owner,
            clients,
            bytes,
        }
    }

    /// The invariants every operation keeps.
    fn check(a: &Awareness) {
        let present = a.meta.values().filter(|m| m.state.is_some()).count();
        assert_eq!(a.present, present);
        assert_eq!(
            a.encode_all().map_or(0, |b| b.len()),
            a.encoded_len(),
            "byte total is exact"
        );
        assert!(a.encoded_len() <= a.limits.bytes);
        assert!(a.clients() <= a.limits.clients);
        for ids in a.owners.values() {
            assert!(ids.len() <= a.limits.per_owner);
        }
    }

    #[test]
    fn first_state_with_clock_zero_is_ignored() {
        let mut a = Awareness::new();
        let now = Instant::now();
        assert!(
            a.apply(A, &upd(&[(1, 0, Some("{}"))]), now)
                .change
                .is_empty()
        );
        let c = a.apply(A, &upd(&[(1, 1, Some(r#"{"n":1}"#))]), now).change;
        assert_eq!(c.added, vec![1]);
        assert_eq!(a.len(), 1);
        check(&a);
    }

    #[test]
    fn renewal_is_an_update_and_old_clocks_are_ignored() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(A, &upd(&[(7, 3, Some("{}"))]), now);
        assert_eq!(
            a.apply(A, &upd(&[(7, 4, Some("{}"))]), now).change.updated,
            vec![7]
        );
        assert!(
            a.apply(A, &upd(&[(7, 2, Some("{}"))]), now)
                .change
                .is_empty()
        );
        assert!(
            a.apply(A, &upd(&[(7, 4, Some(r#"{"x":1}"#))]), now)
                .change
                .is_empty(),
            "same clock, non-null"
        );
        check(&a);
    }

    #[test]
    fn equal_clock_null_removes_a_present_client_only() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(A, &upd(&[(5, 3, Some("{}"))]), now);
        assert_eq!(
            a.apply(A, &upd(&[(5, 3, None)]), now).change.removed,
            vec![5]
        );
        assert_eq!(a.len(), 0);
        assert!(
            a.apply(A, &upd(&[(5, 3, None)]), now).change.is_empty(),
            "already absent"
        );
        // reappearing with a higher clock is "updated", not "added" (reference quirk)
        assert_eq!(
            a.apply(A, &upd(&[(5, 4, Some("{}"))]), now).change.updated,
            vec![5]
        );
        // unknown client with null state is nothing, and is not remembered
        assert!(a.apply(A, &upd(&[(9, 0, None)]), now).change.is_empty());
        assert!(a.apply(A, &upd(&[(9, 7, None)]), now).change.is_empty());
        assert_eq!(a.clients(), 1);
        check(&a);
    }

    #[test]
    fn a_client_appears_once_per_change() {
        let mut a = Awareness::new();
        let now = Instant::now();
        let entries: Vec<_> = (1..=1000).map(|clock| (3, clock, Some("{}"))).collect();
        let c = a.apply(A, &upd(&entries), now).change;
        assert_eq!(c.added, vec![3]);
        assert_eq!(c.all().count(), 1);
        assert_eq!(a.encode(c.all()).len(), 1 + 1 + 2 + 1 + 2);
        check(&a);
    }

    #[test]
    fn only_the_owner_speaks_for_its_clients() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(A, &upd(&[(10, 1, Some(r#"{"a":1}"#))]), now);
        // another connection can neither change nor remove it
        assert!(
            a.apply(B, &upd(&[(10, 2, Some("{}"))]), now)
                .change
                .is_empty()
        );
        assert!(a.apply(B, &upd(&[(10, 9, None)]), now).change.is_empty());
        assert_eq!(a.encode([10]), encode_update([(10, 1, Some(r#"{"a":1}"#))]));
        // once the owner gives it up, it may
        a.apply(A, &upd(&[(10, 2, None)]), now);
        assert_eq!(
            a.apply(B, &upd(&[(10, 3, Some("{}"))]), now).change.updated,
            vec![10]
        );
        check(&a);
    }

    #[test]
    fn remove_owner_keeps_clock_and_encodes_null() {
        let mut a = Awareness::new();
        let now = Instant::now();
        a.apply(A, &upd(&[(501, 3, Some(r#"{"name":"alice"}"#))]), now);
        a.apply(B, &upd(&[(502, 1, Some("{}"))]), now);
        let c = a.remove_owner(A, now);
        assert_eq!(c.removed, vec![501]);
        assert!(a.remove_owner(A, now).is_empty(), "idempotent");
        // trace: 01 f5 03 03 04 "null"
        assert_eq!(
            a.encode([501]),
            vec![1, 0xf5, 0x03, 3, 4, b'n', b'u', b'l', b'l']
        );
        assert_eq!(a.len(), 1, "the other owner's state stays");
        assert_eq!(a.remove_owner(B, now).removed, vec![502]);
        assert_eq!(a.encode_all(), None);
        assert_eq!(a.encoded_len(), 0);
        assert!(a.owners.is_empty());
        check(&a);
    }

    #[test]
    fn expire_removes_stale_states() {
        let mut a = Awareness::new();
        let t0 = Instant::now();
        a.apply(A, &upd(&[(1, 1, Some("{}")), (2, 1, Some("{}"))]), t0);
        a.apply(A, &upd(&[(2, 2, Some("{}"))]), t0 + Duration::from_secs(20));
        let c = a.expire(t0 + Duration::from_secs(31), Duration::from_secs(30));
        assert_eq!(c.removed, vec![1]);
        check(&a);
        a.gc(t0 + Duration::from_secs(100), Duration::from_secs(60));
        assert_eq!(a.encode([1]), vec![0], "gc dropped the meta");
        assert_eq!(a.clients(), 1);
        assert!(a.absent.is_empty(), "gc dropped the queue entry too");
        check(&a);
    }

    #[test]
    fn byte_total_follows_every_change() {
        let mut a = Awareness::new();
        let now = Instant::now();
        assert_eq!(a.encoded_len(), 0);
        a.apply(A, &upd(&[(1, 1, Some(r#"{"n":"x"}"#))]), now);
        check(&a);
        // growing state, clock crossing a varint boundary
        a.apply(A, &upd(&[(1, 200, Some(r#"{"n":"xxxxxxxx"}"#))]), now);
        check(&a);
        a.apply(A, &upd(&[(300, 1, Some("[]")), (1, 201, Some("1"))]), now);
        check(&a);
        a.apply(A, &upd(&[(300, 1, None)]), now);
        check(&a);
        a.expire(now + Duration::from_secs(60), Duration::from_secs(30));
        check(&a);
        assert_eq!(a.encoded_len(), 0);
        a.apply(
            A,
            &upd(&[(1, 202, Some("{}"))]),
            now + Duration::from_secs(61),
        );
        check(&a);
        a.remove_owner(A, now + Duration::from_secs(62));
        check(&a);
        assert_eq!(a.encoded_len(), 0);
    }

    #[test]
    fn an_owner_past_its_client_limit_is_a_violation() {
        let mut a = Awareness::with_limits(limits(3, 100, 1 << 20));
        let now = Instant::now();
        let flood: Vec<_> = (100..200_100).map(|c| (c, 1, Some("{}"))).collect();
        let r = a.apply(A, &upd(&flood), now);
        assert_eq!(r.violation, Some(Violation::TooManyClients));
        assert_eq!(
            r.change.added,
            vec![100, 101, 102],
            "entries before it applied"
        );
        assert_eq!(a.len(), 3);
        check(&a);
        // its own ids still renew; a removed one still counts
        let r = a.apply(A, &upd(&[(100, 2, Some("{}")), (101, 2, None)]), now);
        assert_eq!(r.violation, None);
        assert_eq!(
            a.apply(A, &upd(&[(7, 1, Some("{}"))]), now).violation,
            Some(Violation::TooManyClients)
        );
        // the limit is per owner
        let r = a.apply(B, &upd(&[(1, 1, Some("{}")), (2, 1, Some("{}"))]), now);
        assert_eq!((r.violation, r.change.added.len()), (None, 2));
        // nulls for other clients do not count
        let r = a.apply(B, &upd(&[(101, 3, None), (999, 3, None)]), now);
        assert_eq!(r.violation, None);
        check(&a);
    }

    #[test]
    fn a_set_is_kept_only_for_a_connection_of_several_clients() {
        let mut a = Awareness::with_limits(limits(3, 100, 1 << 20));
        let now = Instant::now();
        a.apply(A, &upd(&[(1, 1, Some("{}"))]), now);
        a.apply(A, &upd(&[(1, 2, Some("{}"))]), now);
        assert!(matches!(a.owners[&A], OwnedIds::One(1)));
        a.apply(A, &upd(&[(2, 1, Some("{}"))]), now);
        assert!(matches!(&a.owners[&A], OwnedIds::Many(set) if set.len() == 2));
        let change = a.remove_owner(A, now);
        let mut removed = change.removed.clone();
        removed.sort_unstable();
        assert_eq!(removed, vec![1, 2]);
        // no client at all for a connection that may speak for none
        let mut none = Awareness::with_limits(limits(0, 100, 1 << 20));
        let r = none.apply(B, &upd(&[(5, 1, Some("{}"))]), now);
        assert_eq!(r.violation, Some(Violation::TooManyClients));
        assert!(none.owners.is_empty());
        check(&none);
    }

    #[test]
    fn a_full_document_refuses_new_clients_but_keeps_known_ones() {
        let mut a = Awareness::with_limits(limits(8, 4, 1 << 20));
        let t0 = Instant::now();
        a.apply(A, &upd(&[(1, 1, Some("{}")), (2, 1, Some("{}"))]), t0);
        a.apply(B, &upd(&[(3, 1, Some("{}")), (4, 1, Some("{}"))]), t0);
        let r = a.apply(3, &upd(&[(5, 1, Some(r#"{"new":1}"#))]), t0);
        assert_eq!(r.refused.document_clients, 1);
        assert!(r.change.is_empty());
        assert_eq!(r.violation, None, "a newcomer is not disconnected");
        // known clients still update and remove
        let r = a.apply(A, &upd(&[(1, 2, Some(r#"{"x":2}"#)), (2, 2, None)]), t0);
        assert_eq!((r.change.updated, r.change.removed), (vec![1], vec![2]));
        // removed in this very update: not evicted before its removal is broadcast
        let r = a.apply(3, &upd(&[(5, 2, Some("{}"))]), t0);
        assert_eq!(r.refused.document_clients, 1);
        // later, the longest-absent client makes room
        let t1 = t0 + Duration::from_secs(1);
        let r = a.apply(3, &upd(&[(5, 3, Some("{}"))]), t1);
        assert_eq!(r.change.added, vec![5]);
        assert_eq!(a.encode([2]), vec![0], "client 2 was forgotten");
        assert_eq!(a.clients(), 4);
        check(&a);
    }

    #[test]
    fn remembered_clients_count_and_the_oldest_is_evicted_first() {
        let mut a = Awareness::with_limits(limits(1, 3, 1 << 20));
        let t0 = Instant::now();
        for (i, owner) in (10..13).enumerate() {
            let t = t0 + Duration::from_secs(i as u64);
            a.apply(owner, &upd(&[(owner, 1, Some("{}"))]), t);
            a.remove_owner(owner, t);
        }
        assert_eq!((a.len(), a.clients()), (0, 3));
        let t = t0 + Duration::from_secs(10);
        a.apply(20, &upd(&[(20, 1, Some("{}"))]), t);
        assert_eq!(a.clients(), 3);
        assert_eq!(
            a.encode([10]),
            vec![0],
            "the oldest removed client went first"
        );
        assert_eq!(a.encode([11]).len(), 1 + 1 + 1 + 1 + 4);
        check(&a);
    }

    #[test]
    fn churn_keeps_the_removal_queue_bounded() {
        let mut a = Awareness::with_limits(limits(2, 10, 1 << 20));
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            let t = t0 + Duration::from_millis(i);
            a.apply(A, &upd(&[(1, 2 * i + 1, Some("{}"))]), t);
            a.apply(A, &upd(&[(1, 2 * i + 2, None)]), t);
        }
        assert!(a.absent.len() <= 2 * a.clients() + 33, "{}", a.absent.len());
        check(&a);
    }

    #[test]
    fn the_byte_limit_bounds_the_snapshot() {
        let cap = 200;
        let mut a = Awareness::with_limits(limits(100, 1000, cap));
        let now = Instant::now();
        let state = format!(r#""{}""#, "x".repeat(40));
        let mut refused = 0;
        for c in 1..=20 {
            let r = a.apply(A, &upd(&[(c, 1, Some(&state))]), now);
            refused += r.refused.document_bytes;
            check(&a);
        }
        assert!(refused > 0);
        assert_eq!(a.len() + refused, 20);
        assert!(a.encode_all().unwrap().len() <= cap);
        // a known client may not grow past the limit either, but may shrink or keep its size
        let big = format!(r#""{}""#, "y".repeat(80));
        assert_eq!(
            a.apply(A, &upd(&[(1, 2, Some(&big))]), now)
                .refused
                .document_bytes,
            1
        );
        let r = a.apply(A, &upd(&[(1, 3, Some(&state))]), now);
        assert_eq!(r.change.updated, vec![1]);
        let r = a.apply(A, &upd(&[(1, 4, Some("{}"))]), now);
        assert_eq!(r.change.updated, vec![1]);
        check(&a);
        // one state larger than the whole limit is never stored
        let mut b = Awareness::with_limits(limits(8, 8, 16));
        let r = b.apply(A, &upd(&[(1, 1, Some(&state))]), now);
        assert_eq!(r.refused.document_bytes, 1);
        assert!(b.is_empty());
    }

    #[test]
    fn a_rate_limit_is_small() {
        // a document keeps one per connection
        assert!(std::mem::size_of::<RateLimit>() <= 24);
    }

    #[test]
    fn rate_limit_allows_two_seconds_of_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0);
        for i in 0..20 {
            assert!(r.take(t0), "burst token {i}");
        }
        assert!(!r.take(t0), "bucket empty");
        assert!(r.take(t0 + Duration::from_millis(100)), "refilled one");
        assert!(!r.take(t0 + Duration::from_millis(100)));
        // a long pause refills to the burst, not beyond
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..20 {
            assert!(r.take(t1));
        }
        assert!(!r.take(t1));
        // a steady rate at the limit is fine
        let mut t = t1;
        for _ in 0..100 {
            t += Duration::from_millis(100);
            assert!(r.take(t));
        }
    }

    #[test]
    fn violations_name_their_limit() {
        for v in [Violation::TooManyClients, Violation::Rate] {
            assert!(v.reason().starts_with("awareness limit: "));
            assert!(v.reason().len() <= 123, "fits a WebSocket close reason");
        }
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
        // " null " is null
        let u = Update::parse(Bytes::from(encode_update([(1, 2, Some(" null "))])), 16).unwrap();
        assert_eq!(u.entries().next().unwrap().state, None);
    }
}
