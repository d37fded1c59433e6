//! Revocations: a user, a token id or a document that may no longer be opened, until a given
//! time (docs/auth.md, "Revocation").
//!
//! * **What matches.** A document connection matches a revocation of its document name, of
//!   its user (`context.user.id`, else `context.token.sub` — what JWT authentication and the
//!   authentication webhook put in the context) or of its token id (`context.token.jti`).
//! * **Open connections.** Every socket task watches the node's list; when the list
//!   grows it refuses its matching document connections with `PermissionDenied`, as an expired
//!   token is. In a cluster [`ServerHandle::revoke`](crate::ServerHandle::revoke) tells every
//!   live node at once (a node-addressed event), so every attachment on every node closes
//!   within the round trip of one event.
//! * **New connections.** A matching authentication is refused after the hooks accepted it
//!   (and again when the document connection is set up, for one that raced the revocation).
//! * **Store.** With Redis, revocations live in the sorted set `<prefix>:revocations` (member
//!   `kind:value`, score = end in Unix milliseconds; expired members are pruned on each write);
//!   every node loads it at start and every [`SYNC_EVERY`], so a node that missed the event,
//!   or started later, learns it too. Without Redis they live in the node's memory only.
//!
//! **Bounds:** at most [`MAX_ENTRIES`] revocations; a value is at most [`MAX_VALUE_BYTES`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fred::types::Value as RedisValue;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::clock::now_unix_ms;
use crate::config::Config;
use crate::hooks::Context;

/// Most revocations held.
pub const MAX_ENTRIES: usize = 100_000;
/// Longest revoked value (user id, token id or document name).
pub const MAX_VALUE_BYTES: usize = 1024;
/// How often a node reloads the revocations from Redis.
pub const SYNC_EVERY: Duration = Duration::from_secs(5);
/// How long a change made on this node outranks what a reload from Redis says.
const RECENT: Duration = Duration::from_secs(3 * SYNC_EVERY.as_secs());
/// Longest wait for Redis on one revocation call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// `KEYS[1]` = the set; `ARGV` = now ms, end ms, member. Keeps the later end of a member.
const ADD_LUA: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local old = redis.call('ZSCORE', KEYS[1], ARGV[3])
if (not old) or tonumber(old) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
end
local ttl = tonumber(ARGV[2]) - tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
";
/// `KEYS[1]` = the set; `ARGV[1]` = member.
const REMOVE_LUA: &str = "return redis.call('ZREM', KEYS[1], ARGV[1])";
/// `KEYS[1]` = the set; `ARGV[1]` = now ms. Members and scores still in force.
const LOAD_LUA: &str =
    "return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES')";

/// What is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Revocation {
    /// Every connection of this user (`context.user.id` or `context.token.sub`).
    User(String),
    /// Every connection opened with this token id (`context.token.jti`).
    Token(String),
    /// Every connection of this document.
    Document(String),
}

/// Why a revocation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevokeError {
    /// The value is empty or longer than [`MAX_VALUE_BYTES`].
    #[error("the revoked value must be 1 to {MAX_VALUE_BYTES} bytes")]
    BadValue,
    /// The end is not in the future.
    #[error("the revocation would end before it begins")]
    Ended,
    /// [`MAX_ENTRIES`] revocations are in force already.
    #[error("{MAX_ENTRIES} revocations are in force already")]
    Full,
    /// Redis could not store it (the cluster would not learn it).
    #[error("cannot store the revocation: {0}")]
    Store(String),
}

impl Revocation {
    /// `kind:value`, as stored.
    fn member(&self) -> String {
        let (kind, value) = self.parts();
        format!("{kind}:{value}")
    }

    /// The kind (`user`, `token`, `document`) and the value.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Revocation::User(v) => ("user", v),
            Revocation::Token(v) => ("token", v),
            Revocation::Document(v) => ("document", v),
        }
    }

    /// A revocation from its kind and value.
    pub fn from_parts(kind: &str, value: &str) -> Option<Self> {
        let value = value.to_owned();
        match kind {
            "user" => Some(Revocation::User(value)),
            "token" => Some(Revocation::Token(value)),
            "document" => Some(Revocation::Document(value)),
            _ => None,
        }
    }

    fn from_member(member: &str) -> Option<Self> {
        let (kind, value) = member.split_once(':')?;
        Self::from_parts(kind, value)
    }

    fn check(&self) -> Result<(), RevokeError> {
        let (_, v) = self.parts();
        if v.is_empty() || v.len() > MAX_VALUE_BYTES {
            return Err(RevokeError::BadValue);
        }
        Ok(())
    }
}

/// One revocation in force and its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEntry {
    /// What is revoked.
    #[serde(flatten)]
    pub what: Revocation,
    /// When it ends, in Unix milliseconds.
    pub until_ms: u64,
}

/// Which nodes a revocation reached
/// ([`ServerHandle::revoke`](crate::ServerHandle::revoke)).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RevokeReport {
    /// Nodes that applied it (this one first).
    pub nodes: Vec<String>,
    /// Live nodes that did not answer in time; they load it from Redis within seconds.
    pub unreachable: Vec<String>,
}

/// What one node tells another about revocations (the `hearth.node.revoke` payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeChange {
    /// Apply this revocation.
    #[serde(rename = "revoke")]
    Revoke(RevocationEntry),
    /// Lift this one.
    #[serde(rename = "lift")]
    Lift(Revocation),
}

impl NodeChange {
    /// Reads a `hearth.node.revoke` payload (JSON from a peer node), checking the value.
    pub fn parse(payload: &[u8]) -> Result<NodeChange, String> {
        let change: NodeChange = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        let what = match &change {
            NodeChange::Revoke(e) => &e.what,
            NodeChange::Lift(w) => w,
        };
        what.check().map_err(|e| e.to_string())?;
        Ok(change)
    }
}

/// The user id and token id of a connection's context.
pub fn identity(context: &Context) -> (Option<String>, Option<String>) {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let user = text(context.get("user").and_then(|u| u.get("id")))
        .or_else(|| text(context.get("token").and_then(|t| t.get("sub"))));
    let token = text(context.get("token").and_then(|t| t.get("jti")));
    (user, token)
}

/// The node's revocations (see the module docs).
#[derive(Debug)]
pub(crate) struct Revocations {
    entries: Mutex<HashMap<Revocation, u64>>,
    /// Revocations added or lifted here within the last [`RECENT`], and when: a reload from
    /// Redis that began before such a change must not undo it.
    recent: Mutex<HashMap<Revocation, std::time::Instant>>,
    /// False while there is none: the check on every authentication is one atomic load.
    any: AtomicBool,
    generation: watch::Sender<u64>,
    remote: Option<Remote>,
}

struct Remote {
    client: fred::clients::Client,
    key: String,
    add: Script,
    remove: Script,
    load: Script,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("key", &self.key).finish()
    }
}

impl Remote {
    async fn call(&self, script: &Script, args: Vec<String>) -> Result<RedisValue, String> {
        tokio::time::timeout(
            REDIS_TIMEOUT,
            script.evalsha_with_reload(&self.client, vec![self.key.clone()], args),
        )
        .await
        .map_err(|_| format!("no answer within {REDIS_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())
    }
}

impl Revocations {
    /// An empty list without Redis.
    pub(crate) fn local() -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
            any: AtomicBool::new(false),
            generation: watch::channel(0).0,
            remote: None,
        })
    }

    /// The node's list: with Redis in a cluster (`connect` opens the connection), loaded now
    /// and every [`SYNC_EVERY`] after.
    pub(crate) async fn start<F, E>(config: &Config, connect: F) -> Arc<Self>
    where
        F: Future<Output = Result<fred::clients::Client, E>>,
        E: std::fmt::Display,
    {
        if !config.is_cluster() {
            return Self::local();
        }
        let client = match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(error = %e, "revocations: no Redis connection; revocations are per node");
                return Self::local();
            }
            Err(_) => {
                warn!("revocations: no Redis connection within 5 s; revocations are per node");
                return Self::local();
            }
        };
        let me = Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
            any: AtomicBool::new(false),
            generation: watch::channel(0).0,
            remote: Some(Remote {
                client,
                key: format!("{}:revocations", config.redis_prefix),
                add: Script::from_lua(ADD_LUA),
                remove: Script::from_lua(REMOVE_LUA),
                load: Script::from_lua(LOAD_LUA),
            }),
        });
        me.sync().await;
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { break };
                me.sync().await;
            }
        });
        me
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Revocation, u64>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the list with what Redis holds (nothing happens when Redis does not answer).
    async fn sync(&self) {
        let Some(remote) = &self.remote else {
            return;
        };
        let reply = match remote
            .call(&remote.load, vec![now_unix_ms().to_string()])
            .await
        {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "revocations: cannot load from Redis");
                return;
            }
        };
        let RedisValue::Array(items) = reply else {
            return;
        };
        let mut loaded = HashMap::new();
        for pair in items.chunks_exact(2).take(MAX_ENTRIES) {
            let (Some(member), Some(until)) = (pair[0].as_string(), pair[1].as_f64()) else {
                continue;
            };
            if let Some(r) = Revocation::from_member(&member)
                && r.check().is_ok()
                && until.is_finite()
                && until > 0.0
            {
                loaded.insert(r, until as u64);
            }
        }
        let grew = {
            let recent: HashMap<Revocation, std::time::Instant> = {
                let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                r.retain(|_, at| at.elapsed() < RECENT);
                r.clone()
            };
            let mut entries = self.lock();
            let grew = loaded
                .keys()
                .any(|k| !entries.contains_key(k) && !recent.contains_key(k));
            // what changed here lately stays as it is here; the rest follows Redis
            let mut merged: HashMap<Revocation, u64> = loaded
                .into_iter()
                .filter(|(k, _)| !recent.contains_key(k))
                .collect();
            for (k, until) in entries.iter() {
                if recent.contains_key(k) {
                    merged.insert(k.clone(), *until);
                }
            }
            *entries = merged;
            self.any.store(!entries.is_empty(), Ordering::Release);
            grew
        };
        if grew {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Adds a revocation ending at `until_ms`, stored in Redis first when there is one. Sockets
    /// are told at once.
    pub(crate) async fn add(&self, what: Revocation, until_ms: u64) -> Result<(), RevokeError> {
        what.check()?;
        if until_ms <= now_unix_ms() {
            return Err(RevokeError::Ended);
        }
        {
            let entries = self.lock();
            if entries.len() >= MAX_ENTRIES && !entries.contains_key(&what) {
                let now = now_unix_ms();
                if entries.values().filter(|u| **u > now).count() >= MAX_ENTRIES {
                    return Err(RevokeError::Full);
                }
            }
        }
        if let Some(remote) = &self.remote {
            remote
                .call(
                    &remote.add,
                    vec![
                        now_unix_ms().to_string(),
                        until_ms.to_string(),
                        what.member(),
                    ],
                )
                .await
                .map_err(RevokeError::Store)?;
        }
        self.apply(what, until_ms)
    }

    /// Adds a revocation to this node's list only (another node stored it).
    pub(crate) fn apply(&self, what: Revocation, until_ms: u64) -> Result<(), RevokeError> {
        what.check()?;
        {
            let mut entries = self.lock();
            if entries.len() >= MAX_ENTRIES && !entries.contains_key(&what) {
                let now = now_unix_ms();
                entries.retain(|_, until| *until > now);
                if entries.len() >= MAX_ENTRIES {
                    return Err(RevokeError::Full);
                }
            }
            let until = entries.entry(what.clone()).or_insert(0);
            *until = (*until).max(until_ms);
            self.any.store(true, Ordering::Release);
        }
        self.touch(&what);
        info!(
            kind = what.parts().0,
            value = what.parts().1,
            until_ms,
            "revoked"
        );
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Lifts a revocation (in Redis too); `false` when there was none here.
    pub(crate) async fn lift(&self, what: &Revocation) -> Result<bool, RevokeError> {
        if let Some(remote) = &self.remote {
            remote
                .call(&remote.remove, vec![what.member()])
                .await
                .map_err(RevokeError::Store)?;
        }
        Ok(self.lift_here(what))
    }

    /// Lifts a revocation from this node's list only.
    pub(crate) fn lift_here(&self, what: &Revocation) -> bool {
        let was = {
            let mut entries = self.lock();
            let was = entries.remove(what).is_some();
            self.any.store(!entries.is_empty(), Ordering::Release);
            was
        };
        self.touch(what);
        was
    }

    /// Notes a change made on this node (see `recent`).
    fn touch(&self, what: &Revocation) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= MAX_ENTRIES {
            r.retain(|_, at| at.elapsed() < RECENT);
        }
        r.insert(what.clone(), std::time::Instant::now());
    }

    /// The revocations in force.
    pub(crate) fn list(&self) -> Vec<RevocationEntry> {
        let now = now_unix_ms();
        let mut out: Vec<RevocationEntry> = self
            .lock()
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(what, until)| RevocationEntry {
                what: what.clone(),
                until_ms: *until,
            })
            .collect();
        out.sort_by(|a, b| a.what.parts().cmp(&b.what.parts()));
        out
    }

    /// Changes whenever the list grows: sockets then check their connections again.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// True when a connection to `document` with `context` is revoked.
    pub(crate) fn denies(&self, document: &str, context: &Context) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let (user, token) = identity(context);
        let now = now_unix_ms();
        let entries = self.lock();
        let hit = |r: Revocation| entries.get(&r).is_some_and(|until| *until > now);
        hit(Revocation::Document(document.to_owned()))
            || user.is_some_and(|u| hit(Revocation::User(u)))
            || token.is_some_and(|t| hit(Revocation::Token(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(v: Value) -> Context {
        match v {
            Value::Object(m) => m,
            _ => Context::new(),
        }
    }

    #[test]
    fn matches_by_document_user_and_token_id() {
        let r = Revocations::local();
        let far = now_unix_ms() + 60_000;
        let alice = ctx(json!({"user": {"id": "alice"}, "token": {"sub": "alice", "jti": "t1"}}));
        let bob = ctx(json!({"token": {"sub": 42, "jti": "t2"}}));
        assert!(!r.denies("d", &alice));
        r.apply(Revocation::User("alice".into()), far)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.denies("d", &alice));
        assert!(!r.denies("d", &bob));
        r.apply(Revocation::User("42".into()), far)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            r.denies("d", &bob),
            "a numeric sub matches its decimal text"
        );
        assert!(r.lift_here(&Revocation::User("42".into())));
        assert!(!r.denies("d", &bob));
        r.apply(Revocation::Token("t2".into()), far)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.denies("d", &bob));
        r.apply(Revocation::Document("secret".into()), far)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.denies("secret", &Context::new()));
        assert!(!r.denies("public", &Context::new()));
        // an ended revocation no longer matches
        r.apply(Revocation::Document("old".into()), now_unix_ms() - 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!r.denies("old", &Context::new()));
        assert_eq!(r.list().len(), 3);
        assert_eq!(
            r.apply(Revocation::User(String::new()), far),
            Err(RevokeError::BadValue)
        );
    }

    #[test]
    fn members_round_trip() {
        for r in [
            Revocation::User("u:1".into()),
            Revocation::Token("t".into()),
            Revocation::Document("a/b:c".into()),
        ] {
            assert_eq!(Revocation::from_member(&r.member()), Some(r));
        }
        assert_eq!(Revocation::from_member("nope:x"), None);
    }
}
