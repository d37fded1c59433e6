//! Throttling per client address, cluster-wide: failed authentication, and (when
//! `max_connection_attempts_per_ip` is set) connection attempts, as Hocuspocus's Throttle
//! extension does.
//!
//! * **Failures.** A failure is a client whose token `on_connect` or `on_authenticate` refused:
//!   a Hocuspocus `Auth` frame answered `PermissionDenied`, or a refused y-websocket connection.
//!   `auth_failures_before_ban` failures of one address within `auth_failure_window_ms` (a
//!   window that starts at the first failure) ban it for `auth_ban_ms`. 0 failures = never ban.
//! * **Connection attempts.** With `max_connection_attempts_per_ip` > 0, every WebSocket
//!   upgrade of an address that is not banned is counted in a window of
//!   `connection_attempt_window_ms` (in Redis `<prefix>:connattempt:{<address>}`, the same
//!   script); the attempt over the limit bans the address for `auth_ban_ms`, the same ban as
//!   for failures. A connection closed for exceeding its traffic limits
//!   (`connection::traffic`) counts as a failure.
//! * **A banned address** gets HTTP 429 (with `Retry-After`) for every WebSocket upgrade, and
//!   `PermissionDenied` for every `Auth` frame on a socket it already has open, without any
//!   hook running. Established document connections are not touched.
//! * **Addresses.** The client address of the request (the TCP peer, or the address a trusted
//!   proxy reports, see [`crate::client_ip`]). IPv4-mapped IPv6 addresses count as IPv4; other
//!   IPv6 addresses count per /64 network, which one host usually holds whole.
//! * **Cluster.** With Redis, failures are counted in `<prefix>:authfail:{<address>}` (`INCR`,
//!   `PEXPIRE` window on the first) and a ban is `<prefix>:authban:{<address>}` (`SET PX`), in
//!   one script, so every node's failures add up and a ban made by one node holds on all. Nodes
//!   look the ban key up on an upgrade or `Auth` frame of an address they have not checked
//!   within the last second, so a ban reaches every node within a second. Every Redis call is
//!   bounded by `auth_throttle_redis_timeout_ms`; when Redis is slower, or down, the node's own
//!   table decides (it always counts the node's own failures too).
//! * **Memory.** The table holds at most `auth_throttle_max_addresses` addresses; expired
//!   entries are swept every second. When it is full, an eighth of it is evicted: addresses
//!   without a ban first, those expiring soonest first (only a new failure or ban evicts bans,
//!   a mere look-up never does); so an attacker with more addresses than that can make a single
//!   node forget old bans, never grow its memory (in a cluster the bans stay in Redis).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::interfaces::KeysInterface as _;
use fred::types::Value;
use fred::types::scripts::Script;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tracing::{debug, info, warn};

use crate::client_ip::TrustedProxies;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::request::RequestInfo;

/// How long a node trusts "not banned" from Redis for one address.
const RECHECK: Duration = Duration::from_secs(1);
/// How often expired entries are swept (and the banned-addresses gauge recomputed).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Fewest seconds between two warnings about Redis being unusable for the throttle.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Longest wait for the throttle's own Redis connection at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `KEYS[1]` = failure counter, `KEYS[2]` = ban; `ARGV` = window ms, threshold, ban ms.
/// Returns `{failures, ban_ms_left, newly_banned}`.
const FAILURE_LUA: &str = r"
local left = redis.call('PTTL', KEYS[2])
if left > 0 then
  return {0, left, 0}
end
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return {n, tonumber(ARGV[3]), 1}
end
return {n, 0, 0}
";

/// A client address as the throttle counts it: an IPv4 address, or the /64 network of an IPv6
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key `ip` counts under.
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => ClientKey(IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & !(u128::MAX >> 64),
            ))),
            v4 => ClientKey(v4),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The throttle's settings.
#[derive(Debug, Clone, Copy)]
struct Limits {
    threshold: u32,
    window: Duration,
    ban: Duration,
    max_entries: usize,
}

/// What one node knows about one address.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    /// Failures in the current window.
    failures: u32,
    /// End of the current counting window.
    window_end: Option<Instant>,
    /// Banned until then.
    banned_until: Option<Instant>,
    /// Redis said "not banned"; trusted until then.
    checked_until: Option<Instant>,
}

impl Entry {
    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| t > now)
    }

    /// The last instant this entry means anything.
    fn live_until(&self) -> Option<Instant> {
        let window = self.window_end.filter(|_| self.failures > 0);
        [window, self.banned_until, self.checked_until]
            .into_iter()
            .flatten()
            .max()
    }
}

/// The outcome of one failure in the node's own table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counted {
    /// This failure banned the address.
    newly_banned: bool,
}

/// The node's own table (sans IO: time is passed in).
#[derive(Debug)]
struct Table {
    limits: Limits,
    map: HashMap<ClientKey, Entry>,
    /// Active bans as of the last sweep, plus bans added since.
    bans: usize,
}

impl Table {
    fn new(limits: Limits) -> Self {
        Table {
            limits,
            map: HashMap::new(),
            bans: 0,
        }
    }

    fn ban_remaining(&self, key: ClientKey, now: Instant) -> Option<Duration> {
        self.map
            .get(&key)
            .and_then(|e| e.banned_until)
            .filter(|t| *t > now)
            .map(|t| t - now)
    }

    fn needs_check(&self, key: ClientKey, now: Instant) -> bool {
        self.map
            .get(&key)
            .and_then(|e| e.checked_until)
            .is_none_or(|t| t <= now)
    }

    fn mark_checked(&mut self, key: ClientKey, now: Instant) {
        // only a cache: never worth a ban
        if let Some(e) = self.slot(key, now, false) {
            e.checked_until = Some(now + RECHECK);
        }
    }

    fn record_failure(&mut self, key: ClientKey, now: Instant) -> Counted {
        let Limits {
            threshold,
            window,
            ban,
            ..
        } = self.limits;
        let Some(e) = self.slot(key, now, true) else {
            return Counted {
                newly_banned: false,
            };
        };
        if e.banned(now) {
            return Counted {
                newly_banned: false,
            };
        }
        if e.window_end.is_none_or(|w| w <= now) {
            e.failures = 0;
            e.window_end = Some(now + window);
        }
        e.failures += 1;
        if e.failures < threshold {
            return Counted {
                newly_banned: false,
            };
        }
        e.failures = 0;
        e.window_end = None;
        e.banned_until = Some(now + ban);
        self.bans += 1;
        Counted { newly_banned: true }
    }

    /// A ban learnt from Redis; true when it was not known here.
    fn learn_ban(&mut self, key: ClientKey, until: Instant, now: Instant) -> bool {
        let Some(e) = self.slot(key, now, true) else {
            return false;
        };
        let new = !e.banned(now);
        if e.banned_until.is_none_or(|t| t < until) {
            e.banned_until = Some(until);
        }
        e.checked_until = None;
        if new {
            self.bans += 1;
        }
        new
    }

    /// Drops every entry that no longer means anything; recounts the active bans.
    fn sweep(&mut self, now: Instant) {
        self.map
            .retain(|_, e| e.live_until().is_some_and(|t| t > now));
        self.bans = self.map.values().filter(|e| e.banned(now)).count();
    }

    /// The entry of `key`, making room for it when the table is full (evicting bans too only
    /// when `over_bans`); `None` when there is no room.
    fn slot(&mut self, key: ClientKey, now: Instant, over_bans: bool) -> Option<&mut Entry> {
        if !self.map.contains_key(&key) && self.map.len() >= self.limits.max_entries {
            self.sweep(now);
            if self.map.len() >= self.limits.max_entries {
                self.evict(now, over_bans);
            }
            if self.map.len() >= self.limits.max_entries {
                return None;
            }
        }
        Some(self.map.entry(key).or_default())
    }

    /// Evicts an eighth of the table: entries without a ban first, then (if `over_bans`) bans,
    /// those expiring soonest first.
    fn evict(&mut self, now: Instant, over_bans: bool) {
        let n = (self.limits.max_entries / 8).max(1);
        let mut order: Vec<(bool, Option<Instant>, ClientKey)> = self
            .map
            .iter()
            .map(|(k, e)| (e.banned(now), e.live_until(), *k))
            .filter(|(banned, _, _)| over_bans || !banned)
            .collect();
        order.sort_unstable();
        for (_, _, k) in order.into_iter().take(n) {
            self.map.remove(&k);
        }
        self.bans = self.map.values().filter(|e| e.banned(now)).count();
    }
}

/// What Redis answered for one failure.
#[derive(Debug, Clone, Copy)]
struct RemoteCount {
    ban_left: Option<Duration>,
    newly_banned: bool,
}

/// The cluster-wide counters in Redis.
struct Remote {
    client: fred::clients::Client,
    prefix: String,
    script: Script,
    timeout: Duration,
}

impl Remote {
    fn fail_key(&self, key: ClientKey) -> String {
        format!("{}:authfail:{{{key}}}", self.prefix)
    }

    fn ban_key(&self, key: ClientKey) -> String {
        format!("{}:authban:{{{key}}}", self.prefix)
    }

    async fn count_failure(&self, key: ClientKey, limits: Limits) -> Result<RemoteCount, String> {
        self.count(self.fail_key(key), key, limits).await
    }

    async fn count_attempt(&self, key: ClientKey, limits: Limits) -> Result<RemoteCount, String> {
        self.count(
            format!("{}:connattempt:{{{key}}}", self.prefix),
            key,
            limits,
        )
        .await
    }

    /// Counts one event in `counter` (a window of `limits.window`), banning `key` at
    /// `limits.threshold`.
    async fn count(
        &self,
        counter: String,
        key: ClientKey,
        limits: Limits,
    ) -> Result<RemoteCount, String> {
        let keys = vec![counter, self.ban_key(key)];
        let args = vec![
            limits.window.as_millis().to_string(),
            limits.threshold.to_string(),
            limits.ban.as_millis().to_string(),
        ];
        let reply: Value = tokio::time::timeout(
            self.timeout,
            self.script.evalsha_with_reload(&self.client, keys, args),
        )
        .await
        .map_err(|_| format!("no answer within {:?}", self.timeout))?
        .map_err(|e| e.to_string())?;
        let numbers: Vec<i64> = match reply {
            Value::Array(items) => items.iter().filter_map(Value::as_i64).collect(),
            other => return Err(format!("unexpected reply {other:?}")),
        };
        match numbers[..] {
            [_, left, newly] => Ok(RemoteCount {
                ban_left: (left > 0).then(|| Duration::from_millis(left.unsigned_abs())),
                newly_banned: newly == 1,
            }),
            _ => Err(format!("unexpected reply {numbers:?}")),
        }
    }

    async fn ban_left(&self, key: ClientKey) -> Result<Option<Duration>, String> {
        let left: i64 = tokio::time::timeout(self.timeout, self.client.pttl(self.ban_key(key)))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        Ok((left > 0).then(|| Duration::from_millis(left.unsigned_abs())))
    }
}

/// The metrics the throttle records (registered in [`Metrics`]).
#[derive(Debug, Clone)]
struct Counters {
    failures: IntCounter,
    bans: IntCounter,
    banned: IntGauge,
    refused: IntCounterVec,
}

struct Inner {
    limits: Limits,
    trusted: TrustedProxies,
    table: Mutex<Table>,
    /// Connection attempts per address (`max_connection_attempts_per_ip`), when limited: a
    /// table of its own whose bans are copied into `table`.
    attempts: Option<(Limits, Mutex<Table>)>,
    remote: Option<Remote>,
    counters: Counters,
    last_warning: Mutex<Option<Instant>>,
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, Table> {
        // every critical section is a map operation; nothing awaits under it
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_gauge(&self, bans: usize) {
        self.counters
            .banned
            .set(i64::try_from(bans).unwrap_or(i64::MAX));
    }

    fn redis_trouble(&self, what: &str, error: &str) {
        let now = Instant::now();
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            *last = Some(now);
            warn!(
                op = what,
                %error,
                "auth throttle: Redis unusable, this node's own table decides (warned once a minute)"
            );
        } else {
            debug!(op = what, %error, "auth throttle: Redis unusable");
        }
    }
}

/// The failed-authentication throttle of one server (module docs). Cheap to clone.
#[derive(Clone)]
pub struct AuthThrottle {
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for AuthThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthThrottle")
            .field("enabled", &self.inner.is_some())
            .field(
                "cluster_wide",
                &self.inner.as_ref().is_some_and(|i| i.remote.is_some()),
            )
            .finish()
    }
}

impl AuthThrottle {
    /// A throttle that never bans (`auth_failures_before_ban = 0`).
    pub fn disabled() -> Self {
        AuthThrottle { inner: None }
    }

    /// The throttle `config` asks for, counting in Redis when the server is in a cluster (its
    /// own connection, so a flood of failures never delays lock refreshes), and a task sweeping
    /// its table every second.
    /// `connect` opens that Redis connection (the caller knows how); its error is only logged.
    pub(crate) async fn start<F, E>(config: &Config, metrics: &Metrics, connect: F) -> Self
    where
        F: Future<Output = Result<fred::clients::Client, E>>,
        E: std::fmt::Display,
    {
        if config.auth_failures_before_ban == 0 && config.max_connection_attempts_per_ip == 0 {
            return Self::disabled();
        }
        let attempts = (config.max_connection_attempts_per_ip > 0).then(|| {
            let limits = Limits {
                threshold: config.max_connection_attempts_per_ip.saturating_add(1),
                window: Duration::from_millis(config.connection_attempt_window_ms),
                ban: Duration::from_millis(config.auth_ban_ms),
                max_entries: config.auth_throttle_max_addresses,
            };
            (limits, Mutex::new(Table::new(limits)))
        });
        let limits = Limits {
            threshold: config.auth_failures_before_ban,
            window: Duration::from_millis(config.auth_failure_window_ms),
            ban: Duration::from_millis(config.auth_ban_ms),
            max_entries: config.auth_throttle_max_addresses,
        };
        let remote = if config.is_cluster() {
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(client)) => Some(Remote {
                    client,
                    prefix: config.redis_prefix.clone(),
                    script: Script::from_lua(FAILURE_LUA),
                    timeout: Duration::from_millis(config.auth_throttle_redis_timeout_ms),
                }),
                Ok(Err(e)) => {
                    warn!(error = %e, "auth throttle: no Redis connection; bans are per node");
                    None
                }
                Err(_) => {
                    warn!("auth throttle: no Redis connection within 5 s; bans are per node");
                    None
                }
            }
        } else {
            None
        };
        let redis = remote.as_ref().map(|r| r.client.clone());
        let inner = Arc::new(Inner {
            limits,
            trusted: TrustedProxies::parse(&config.trusted_proxies).unwrap_or_default(),
            table: Mutex::new(Table::new(limits)),
            attempts,
            remote,
            counters: Counters {
                failures: metrics.auth_failures.clone(),
                bans: metrics.auth_bans.clone(),
                banned: metrics.auth_banned.clone(),
                refused: metrics.auth_throttled.clone(),
            },
            last_warning: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let bans = {
                    let mut table = inner.table();
                    table.sweep(Instant::now());
                    table.bans
                };
                if let Some((_, attempts)) = &inner.attempts {
                    attempts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .sweep(Instant::now());
                }
                inner.publish_gauge(bans);
            }
            if let Some(client) = redis {
                use fred::interfaces::ClientLike as _;
                let _ = client.quit().await;
            }
        });
        AuthThrottle { inner: Some(inner) }
    }

    /// The address `request` counts under: its client address (through trusted proxies), or
    /// `None` when unknown or the throttle is off.
    pub fn client_of(&self, request: &RequestInfo) -> Option<IpAddr> {
        let inner = self.inner.as_ref()?;
        let peer = request.remote_addr()?.ip();
        let forwarded = request
            .headers()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|(_, v)| v);
        Some(inner.trusted.client_ip(peer, forwarded))
    }

    /// How long `ip` stays banned, if it is: from this node's table, else (in a cluster, at
    /// most once a second per address) from Redis.
    pub async fn ban_remaining(&self, ip: IpAddr) -> Option<Duration> {
        let inner = self.inner.as_ref()?;
        let key = ClientKey::of(ip);
        let now = Instant::now();
        let remote = {
            let table = inner.table();
            if let Some(left) = table.ban_remaining(key, now) {
                return Some(left);
            }
            match &inner.remote {
                Some(r) if table.needs_check(key, now) => r,
                _ => return None,
            }
        };
        // boxed: the Redis call's future is kilobytes, and every caller (each authentication,
        // each upgrade) would otherwise carry it inline
        match Box::pin(remote.ban_left(key)).await {
            Ok(Some(left)) => {
                let now = Instant::now();
                let bans = {
                    let mut table = inner.table();
                    table.learn_ban(key, now + left, now);
                    table.bans
                };
                inner.publish_gauge(bans);
                Some(left)
            }
            Ok(None) => {
                inner.table().mark_checked(key, Instant::now());
                None
            }
            Err(e) => {
                inner.redis_trouble("check", &e);
                None
            }
        }
    }

    /// True when `ip` is banned ([`AuthThrottle::ban_remaining`]).
    pub async fn is_banned(&self, ip: IpAddr) -> bool {
        self.ban_remaining(ip).await.is_some()
    }

    /// Counts a failed authentication of `ip`; bans it when that makes
    /// `auth_failures_before_ban` within the window (module docs).
    pub async fn record_failure(&self, ip: IpAddr) {
        let Some(inner) = self.inner.as_ref().filter(|i| i.limits.threshold > 0) else {
            return;
        };
        inner.counters.failures.inc();
        let key = ClientKey::of(ip);
        let local = inner.table().record_failure(key, Instant::now());
        let newly_banned = match &inner.remote {
            None => local.newly_banned,
            // boxed, like the look-up above
            Some(remote) => match Box::pin(remote.count_failure(key, inner.limits)).await {
                Ok(r) => {
                    if let Some(left) = r.ban_left {
                        let now = Instant::now();
                        inner.table().learn_ban(key, now + left, now);
                    }
                    r.newly_banned || (local.newly_banned && r.ban_left.is_none())
                }
                Err(e) => {
                    inner.redis_trouble("count", &e);
                    local.newly_banned
                }
            },
        };
        if newly_banned {
            inner.counters.bans.inc();
            info!(
                client = %key,
                failures = inner.limits.threshold,
                ban_ms = inner.limits.ban.as_millis() as u64,
                "client address banned after repeated failed authentication"
            );
        }
        let bans = inner.table().bans;
        inner.publish_gauge(bans);
    }

    /// Counts a WebSocket upgrade of `ip` against `max_connection_attempts_per_ip` (module
    /// docs); the ban's remaining time when this attempt is one too many.
    pub async fn record_attempt(&self, ip: IpAddr) -> Option<Duration> {
        let inner = self.inner.as_ref()?;
        let (limits, attempts) = inner.attempts.as_ref()?;
        let key = ClientKey::of(ip);
        let now = Instant::now();
        let local = attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record_failure(key, now);
        let (banned, newly) = match &inner.remote {
            None => (local.newly_banned.then_some(limits.ban), local.newly_banned),
            Some(remote) => match Box::pin(remote.count_attempt(key, *limits)).await {
                Ok(r) => (r.ban_left, r.newly_banned),
                Err(e) => {
                    inner.redis_trouble("count attempts", &e);
                    (local.newly_banned.then_some(limits.ban), local.newly_banned)
                }
            },
        };
        let left = banned?;
        let bans = {
            let mut table = inner.table();
            table.learn_ban(key, now + left, now);
            table.bans
        };
        inner.publish_gauge(bans);
        if !newly {
            return Some(left);
        }
        inner.counters.bans.inc();
        info!(
            client = %key,
            attempts = limits.threshold - 1,
            window_ms = limits.window.as_millis() as u64,
            ban_ms = left.as_millis() as u64,
            "client address banned after too many connection attempts"
        );
        Some(left)
    }

    /// Counts a refusal because of a ban (`at`: `upgrade` or `auth`).
    pub(crate) fn count_refusal(&self, at: &str) {
        if let Some(inner) = &self.inner {
            inner.counters.refused.with_label_values(&[at]).inc();
        }
    }
}

/// The answer to a WebSocket upgrade from a banned client address: 429 with `Retry-After`
/// (whole seconds, rounded up), closing the connection; `None` when `client` is not banned.
pub(crate) async fn refuse_upgrade(
    throttle: &AuthThrottle,
    client: IpAddr,
) -> Option<Response<Full<Bytes>>> {
    let left = match throttle.ban_remaining(client).await {
        Some(left) => left,
        None => throttle.record_attempt(client).await?,
    };
    throttle.count_refusal("upgrade");
    debug!(client = %client, "upgrade from a banned address: 429");
    let mut r = Response::new(Full::new(Bytes::from_static(
        b"too many failed authentication or connection attempts\n",
    )));
    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
        h.insert(header::RETRY_AFTER, v);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(max_entries: usize) -> Limits {
        Limits {
            threshold: 3,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
            max_entries,
        }
    }

    fn ip(s: &str) -> ClientKey {
        ClientKey::of(s.parse().unwrap())
    }

    #[test]
    fn bans_after_the_threshold_within_the_window_and_expires() {
        let mut t = Table::new(limits(100));
        let t0 = Instant::now();
        let (a, b) = (ip("203.0.113.7"), ip("198.51.100.1"));
        assert!(!t.record_failure(a, t0).newly_banned);
        assert!(
            !t.record_failure(a, t0 + Duration::from_secs(1))
                .newly_banned
        );
        // another address is counted apart
        assert!(!t.record_failure(b, t0).newly_banned);
        assert_eq!(t.ban_remaining(a, t0), None);
        assert!(
            t.record_failure(a, t0 + Duration::from_secs(2))
                .newly_banned
        );
        assert_eq!(
            t.ban_remaining(a, t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(300))
        );
        assert_eq!(t.ban_remaining(b, t0 + Duration::from_secs(2)), None);
        assert_eq!(t.bans, 1);
        // failures while banned change nothing
        assert!(
            !t.record_failure(a, t0 + Duration::from_secs(3))
                .newly_banned
        );
        // the ban ends
        let later = t0 + Duration::from_secs(303);
        assert_eq!(t.ban_remaining(a, later), None);
        t.sweep(later);
        assert_eq!(t.bans, 0);
        assert!(t.map.is_empty(), "everything expired: {:?}", t.map);
    }

    #[test]
    fn failures_outside_the_window_start_a_new_count() {
        let mut t = Table::new(limits(100));
        let t0 = Instant::now();
        let a = ip("203.0.113.7");
        t.record_failure(a, t0);
        t.record_failure(a, t0 + Duration::from_secs(1));
        // the window (60 s from the first failure) is over: this is failure 1 of a new one
        assert!(
            !t.record_failure(a, t0 + Duration::from_secs(61))
                .newly_banned
        );
        assert!(
            !t.record_failure(a, t0 + Duration::from_secs(62))
                .newly_banned
        );
        assert!(
            t.record_failure(a, t0 + Duration::from_secs(63))
                .newly_banned
        );
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:192.0.2.1"), ip("192.0.2.1"));
        assert_eq!(ip("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(ip("192.0.2.1").to_string(), "192.0.2.1");
    }

    #[test]
    fn the_table_is_bounded_and_evicts_unbanned_entries_first() {
        let mut t = Table::new(limits(16));
        let t0 = Instant::now();
        let banned = ip("10.0.0.1");
        for _ in 0..3 {
            t.record_failure(banned, t0);
        }
        for i in 0..10_000u32 {
            let key = ClientKey(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
            t.record_failure(key, t0 + Duration::from_millis(u64::from(i)));
            assert!(t.map.len() <= 16, "grew to {}", t.map.len());
        }
        assert!(
            t.ban_remaining(banned, t0 + Duration::from_secs(20))
                .is_some(),
            "the ban outlived a flood of addresses without one"
        );
        // the newest address is tracked
        let newest = ClientKey(IpAddr::from((0x0b00_0000u32 + 9_999).to_be_bytes()));
        assert!(t.map.contains_key(&newest));
        // a table full of bans still takes new addresses (the soonest-expiring ban goes)
        let mut t = Table::new(limits(4));
        for i in 0..8u32 {
            let key = ClientKey(IpAddr::from((0x0c00_0000 + i).to_be_bytes()));
            let now = t0 + Duration::from_secs(u64::from(i));
            t.learn_ban(key, now + Duration::from_secs(300), now);
            assert!(t.map.len() <= 4);
            assert!(t.ban_remaining(key, now).is_some());
        }
        // ...but a mere "checked, not banned" never pushes a ban out
        let now = t0 + Duration::from_secs(10);
        let before: Vec<ClientKey> = t.map.keys().copied().collect();
        t.mark_checked(ip("192.0.2.99"), now);
        let after: Vec<ClientKey> = t.map.keys().copied().collect();
        assert_eq!(before.len(), after.len());
        assert!(before.iter().all(|k| t.ban_remaining(*k, now).is_some()));
    }

    #[test]
    fn remote_checks_are_cached_for_a_second() {
        let mut t = Table::new(limits(100));
        let t0 = Instant::now();
        let a = ip("203.0.113.7");
        assert!(t.needs_check(a, t0));
        t.mark_checked(a, t0);
        assert!(!t.needs_check(a, t0 + Duration::from_millis(999)));
        assert!(t.needs_check(a, t0 + RECHECK));
        // a ban learnt from Redis counts once
        assert!(t.learn_ban(a, t0 + Duration::from_secs(10), t0));
        assert!(!t.learn_ban(a, t0 + Duration::from_secs(10), t0));
        assert_eq!(t.bans, 1);
        assert_eq!(
            t.ban_remaining(a, t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
    }
}
