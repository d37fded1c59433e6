//! [`LockClient`]: acquire leases and look up holders.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::KeysInterface;
use fred::types::{Expiration, SetOptions, Value};
use tokio::time::{Instant, timeout};
use tracing::{debug, warn};

use crate::guard::LockGuard;
use crate::key::{lock_key, validate_prefix};
use crate::observer::{AcquireOutcome, LockObserver, NoopObserver};
use crate::scripts::Scripts;
use crate::{HolderId, LockError, LockTiming};

/// How many `SET NX` / `GET` rounds an acquire makes when the key vanishes in between.
const MAX_ACQUIRE_ROUNDS: usize = 3;

/// Acquires leases for one holder identity and looks up who holds a resource.
///
/// Cheap to clone (it shares the fred connection). Every Redis call it makes is bounded by
/// [`LockTiming::validity`]; the fred client should be built with a `ReconnectPolicy`, or it
/// will not reconnect after Redis restarts.
#[derive(Clone)]
pub struct LockClient {
    pub(crate) client: Client,
    prefix: Arc<str>,
    pub(crate) holder: HolderId,
    pub(crate) timing: LockTiming,
    pub(crate) observer: Arc<dyn LockObserver>,
    pub(crate) scripts: Arc<Scripts>,
}

/// The result of [`LockClient::try_acquire`].
#[derive(Debug)]
#[must_use = "dropping an acquired guard stops refreshing the lease"]
pub enum Acquire {
    /// The lease is ours; it is refreshed until the guard is released, dropped or lost.
    Acquired(LockGuard),
    /// Someone else holds it. This can be our own [`HolderId`] if this process already holds
    /// the resource through another guard, or still has a lease that was lost locally but has
    /// not yet expired in Redis; compare with [`LockClient::holder_id`].
    HeldBy(HolderId),
}

/// What a refresh found.
#[derive(Debug)]
pub(crate) enum RefreshReply {
    Refreshed,
    Missing,
    Taken(String),
}

impl LockClient {
    /// A lock client for `holder`, storing keys as `<prefix>:lock:{<hash>}`.
    ///
    /// `client` must be a connected (or connecting) fred client, ideally with a
    /// `ReconnectPolicy`. The prefix must be non-empty and free of braces, whitespace and
    /// control characters ([`LockError::InvalidPrefix`] otherwise).
    pub fn new(
        client: Client,
        prefix: impl Into<String>,
        holder: HolderId,
        timing: LockTiming,
    ) -> Result<Self, LockError> {
        let prefix = prefix.into();
        validate_prefix(&prefix).map_err(LockError::InvalidPrefix)?;
        Ok(Self {
            client,
            prefix: prefix.into(),
            holder,
            timing,
            observer: Arc::new(NoopObserver),
            scripts: Arc::new(Scripts::new()),
        })
    }

    /// Replaces the (no-op) observer that receives latency and loss events.
    pub fn with_observer(mut self, observer: Arc<dyn LockObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// This client's holder identity.
    pub fn holder_id(&self) -> &HolderId {
        &self.holder
    }

    /// This client's timing.
    pub fn timing(&self) -> LockTiming {
        self.timing
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key used for `resource` (see [`lock_key`]).
    pub fn key_for(&self, resource: &str) -> String {
        lock_key(&self.prefix, resource)
    }

    /// Tries once to take the lease on `resource` with `SET key value NX PX ttl`.
    ///
    /// On success the returned guard is valid until `send time of the SET + ttl − margin` and a
    /// task refreshes it every [`LockTiming::refresh_every`]. If the key exists, a `GET` reports
    /// the current holder. Never waits for the lease to become free.
    ///
    /// Errors: [`LockError::Redis`], [`LockError::Timeout`] (after [`LockTiming::validity`]),
    /// [`LockError::MalformedValue`] if the key holds something this crate did not write.
    pub async fn try_acquire(&self, resource: &str) -> Result<Acquire, LockError> {
        let started = Instant::now();
        let key = self.key_for(resource);
        let value = self.holder.lease_value(rand::random());
        let result = self.acquire_rounds(resource, &key, &value).await;
        let latency = started.elapsed();
        match result {
            Ok(Some(sent)) => {
                debug!(resource = ?resource, key = %key, holder = %self.holder, ?latency, "lock acquired");
                Ok(self.acquired(resource, key, value, sent, latency))
            }
            Ok(None) => {
                // Unreachable in practice: `acquire_rounds` returns Ok(None) only after the key
                // vanished between SET and GET on every round.
                self.observer.on_acquire(latency, AcquireOutcome::Failed);
                Err(LockError::Contended {
                    resource: resource.to_owned(),
                })
            }
            Err(AcquireError::HeldBy(holder)) => {
                self.observer
                    .on_acquire(latency, AcquireOutcome::HeldByOther);
                debug!(resource = ?resource, key = %key, holder = %self.holder, current = %holder, "lock held by another holder");
                Ok(Acquire::HeldBy(holder))
            }
            Err(AcquireError::Failed { error, maybe_set }) => {
                self.observer.on_acquire(latency, AcquireOutcome::Failed);
                warn!(resource = ?resource, key = %key, holder = %self.holder, %error, "lock acquire failed");
                if maybe_set {
                    self.spawn_cleanup(key, value);
                }
                Err(error)
            }
        }
    }

    /// `Ok(Some(send time))` when acquired, `Ok(None)` when every round raced with an expiry.
    async fn acquire_rounds(
        &self,
        resource: &str,
        key: &str,
        value: &str,
    ) -> Result<Option<Instant>, AcquireError> {
        let limit = self.timing.validity();
        for _ in 0..MAX_ACQUIRE_ROUNDS {
            let sent = Instant::now();
            let set = timeout(
                limit,
                self.client.set::<Option<String>, _, _>(
                    key,
                    value,
                    Some(Expiration::PX(self.timing.ttl_ms())),
                    Some(SetOptions::NX),
                    false,
                ),
            )
            .await;
            match set {
                Ok(Ok(Some(reply))) if reply == "OK" => return Ok(Some(sent)),
                Ok(Ok(Some(reply))) => {
                    return Err(AcquireError::Failed {
                        error: LockError::UnexpectedReply {
                            op: "acquire",
                            reply,
                        },
                        maybe_set: true,
                    });
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    return Err(AcquireError::Failed {
                        error: e.into(),
                        maybe_set: true,
                    });
                }
                Err(_) => {
                    return Err(AcquireError::Failed {
                        error: LockError::Timeout {
                            op: "acquire",
                            timeout: limit,
                        },
                        maybe_set: true,
                    });
                }
            }

            match self.get_value(key, "acquire").await {
                // Expired between SET and GET: try again.
                Ok(None) => {}
                // A retried SET after a reconnect can find the key its first attempt created.
                Ok(Some(current)) if current == value => return Ok(Some(sent)),
                Ok(Some(current)) => {
                    return Err(match HolderId::from_lease_value(&current) {
                        Some(holder) => AcquireError::HeldBy(holder),
                        None => AcquireError::Failed {
                            error: LockError::MalformedValue {
                                key: key.to_owned(),
                                value: current,
                            },
                            maybe_set: false,
                        },
                    });
                }
                Err(error) => {
                    return Err(AcquireError::Failed {
                        error,
                        maybe_set: false,
                    });
                }
            }
            debug!(resource = ?resource, key = %key, "lock key vanished between SET NX and GET; retrying");
        }
        Ok(None)
    }

    /// Takes the lease on `resource` from `dead`, a holder the caller has evidence is gone
    /// (its process exited), without waiting for its lease to expire.
    ///
    /// Atomically (one Lua script): if the key holds a lease of `dead`, or nothing, it becomes
    /// ours with a full TTL and the guard is returned as by [`LockClient::try_acquire`];
    /// otherwise the key is untouched and its current holder is returned. It can never take a
    /// lease from a holder other than `dead`.
    ///
    /// **Safety rests on the evidence and on fencing.** If `dead` is in fact alive (frozen,
    /// partitioned), it keeps writing until its own refresh finds the key `Taken` or its local
    /// deadline passes, exactly as after an expiry; the store's fencing must reject those
    /// writes. Taking over early shortens the window in which nobody owns the resource; it does
    /// not widen the one in which two processes believe they do beyond what an expiry allows.
    ///
    /// Errors as [`LockClient::try_acquire`].
    pub async fn try_take_over(
        &self,
        resource: &str,
        dead: &HolderId,
    ) -> Result<Acquire, LockError> {
        let started = Instant::now();
        let key = self.key_for(resource);
        let value = self.holder.lease_value(rand::random());
        let limit = self.timing.validity();
        let sent = Instant::now();
        let reply = timeout(
            limit,
            self.scripts.take_over.evalsha_with_reload::<Value, _, _>(
                &self.client,
                key.as_str(),
                vec![
                    dead.lease_prefix(),
                    value.clone(),
                    self.timing.ttl_ms().to_string(),
                ],
            ),
        )
        .await;
        let latency = started.elapsed();
        let reply = match reply {
            Ok(Ok(r)) => parse_take_over_reply(r),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(LockError::Timeout {
                op: "take_over",
                timeout: limit,
            }),
        };
        match reply {
            Ok(None) => {
                debug!(resource = ?resource, key = %key, holder = %self.holder, from = %dead, ?latency, "lock taken over from a dead holder");
                Ok(self.acquired(resource, key, value, sent, latency))
            }
            Ok(Some(current)) => {
                self.observer
                    .on_acquire(latency, AcquireOutcome::HeldByOther);
                match HolderId::from_lease_value(&current) {
                    Some(holder) => Ok(Acquire::HeldBy(holder)),
                    None => Err(LockError::MalformedValue {
                        key,
                        value: current,
                    }),
                }
            }
            Err(error) => {
                self.observer.on_acquire(latency, AcquireOutcome::Failed);
                warn!(resource = ?resource, key = %key, holder = %self.holder, %error, "lock take-over failed");
                // the script may have run: delete exactly this attempt's lease if it did
                self.spawn_cleanup(key, value);
                Err(error)
            }
        }
    }

    /// Who holds `resource` right now (a plain `GET`), or `None` if nobody does.
    ///
    /// Errors with [`LockError::MalformedValue`] if the key holds something this crate did not
    /// write.
    pub async fn holder(&self, resource: &str) -> Result<Option<HolderId>, LockError> {
        let key = self.key_for(resource);
        match self.get_value(&key, "holder").await? {
            None => Ok(None),
            Some(value) => match HolderId::from_lease_value(&value) {
                Some(holder) => Ok(Some(holder)),
                None => Err(LockError::MalformedValue { key, value }),
            },
        }
    }

    /// `GET key` as text, bounded by the validity window.
    async fn get_value(&self, key: &str, op: &'static str) -> Result<Option<String>, LockError> {
        let limit = self.timing.validity();
        let reply = timeout(limit, self.client.get::<Value, _>(key))
            .await
            .map_err(|_| LockError::Timeout { op, timeout: limit })??;
        match reply {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.to_string())),
            Value::Bytes(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
            other => Err(LockError::UnexpectedReply {
                op,
                reply: format!("{other:?}"),
            }),
        }
    }

    /// Runs the compare-and-pexpire script once (not time-bounded; the caller bounds it).
    pub(crate) async fn refresh_once(
        &self,
        key: &str,
        value: &str,
    ) -> Result<RefreshReply, LockError> {
        let reply: Value = self
            .scripts
            .refresh
            .evalsha_with_reload(
                &self.client,
                key,
                vec![value.to_owned(), self.timing.ttl_ms().to_string()],
            )
            .await?;
        parse_refresh_reply(reply)
    }

    /// Runs the compare-and-delete script once. `Ok(true)` if our key was deleted.
    pub(crate) async fn release_once(&self, key: &str, value: &str) -> Result<bool, LockError> {
        let deleted: i64 = self
            .scripts
            .release
            .evalsha_with_reload(&self.client, key, vec![value.to_owned()])
            .await?;
        Ok(deleted == 1)
    }

    /// A lease that is now ours (`value` under `key`, its command sent at `sent`): reported to
    /// the observer and handed to a guard that refreshes it.
    fn acquired(
        &self,
        resource: &str,
        key: String,
        value: String,
        sent: Instant,
        latency: Duration,
    ) -> Acquire {
        self.observer.on_acquire(latency, AcquireOutcome::Acquired);
        Acquire::Acquired(LockGuard::start(
            self.clone(),
            resource.to_owned(),
            key,
            value,
            sent,
        ))
    }

    /// After a failed or timed-out acquire whose `SET` may still land, delete that exact lease
    /// value (unique per attempt) so it does not block the resource for a whole TTL.
    fn spawn_cleanup(&self, key: String, value: String) {
        let this = self.clone();
        let limit = self.timing.ttl();
        tokio::spawn(async move {
            match timeout(limit, this.release_once(&key, &value)).await {
                Ok(Ok(deleted)) => {
                    debug!(key = %key, deleted, "cleanup after failed acquire");
                }
                Ok(Err(error)) => {
                    debug!(key = %key, %error, "cleanup after failed acquire failed");
                }
                Err(_) => debug!(key = %key, "cleanup after failed acquire timed out"),
            }
        });
    }
}

impl fmt::Debug for LockClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockClient")
            .field("prefix", &self.prefix)
            .field("holder", &self.holder)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

enum AcquireError {
    HeldBy(HolderId),
    Failed { error: LockError, maybe_set: bool },
}

/// What the refresh and take-over scripts answer: `{code}`, or `{2, value}` when the key holds
/// another lease.
enum ScriptReply {
    Code(i64),
    Holds(String),
}

fn parse_script_reply(op: &'static str, reply: Value) -> Result<ScriptReply, LockError> {
    let unexpected = |reply: &Value| LockError::UnexpectedReply {
        op,
        reply: format!("{reply:?}"),
    };
    let Value::Array(items) = &reply else {
        return Err(unexpected(&reply));
    };
    match items.as_slice() {
        [Value::Integer(n)] => Ok(ScriptReply::Code(*n)),
        [Value::Integer(2), Value::String(s)] => Ok(ScriptReply::Holds(s.to_string())),
        [Value::Integer(2), Value::Bytes(b)] => {
            Ok(ScriptReply::Holds(String::from_utf8_lossy(b).into_owned()))
        }
        _ => Err(unexpected(&reply)),
    }
}

fn parse_refresh_reply(reply: Value) -> Result<RefreshReply, LockError> {
    match parse_script_reply("refresh", reply)? {
        ScriptReply::Code(1) => Ok(RefreshReply::Refreshed),
        ScriptReply::Code(0) => Ok(RefreshReply::Missing),
        ScriptReply::Holds(v) => Ok(RefreshReply::Taken(v)),
        ScriptReply::Code(n) => Err(LockError::UnexpectedReply {
            op: "refresh",
            reply: format!("{{{n}}}"),
        }),
    }
}

/// `None` when the take-over script made the lease ours, else the value it found.
fn parse_take_over_reply(reply: Value) -> Result<Option<String>, LockError> {
    match parse_script_reply("take_over", reply)? {
        ScriptReply::Code(1) => Ok(None),
        ScriptReply::Holds(v) => Ok(Some(v)),
        ScriptReply::Code(n) => Err(LockError::UnexpectedReply {
            op: "take_over",
            reply: format!("{{{n}}}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    #[test]
    fn script_replies_parse_and_nothing_else_does() {
        assert!(matches!(
            parse_refresh_reply(array(vec![Value::Integer(1)])),
            Ok(RefreshReply::Refreshed)
        ));
        assert!(matches!(
            parse_refresh_reply(array(vec![Value::Integer(0)])),
            Ok(RefreshReply::Missing)
        ));
        assert!(matches!(
            parse_refresh_reply(array(vec![Value::Integer(2), Value::String("v".into())])),
            Ok(RefreshReply::Taken(v)) if v == "v"
        ));
        assert_eq!(
            parse_take_over_reply(array(vec![Value::Integer(1)])).unwrap(),
            None
        );
        assert_eq!(
            parse_take_over_reply(array(vec![Value::Integer(2), Value::Bytes("w".into())]))
                .unwrap()
                .as_deref(),
            Some("w")
        );
        for bad in [
            Value::Integer(1),
            array(vec![Value::Integer(7)]),
            array(vec![]),
            array(vec![Value::Integer(2)]),
        ] {
            assert!(parse_refresh_reply(bad.clone()).is_err(), "{bad:?}");
            assert!(parse_take_over_reply(bad.clone()).is_err(), "{bad:?}");
        }
        // a take-over never reports a missing key: the script acquires it
        assert!(parse_take_over_reply(array(vec![Value::Integer(0)])).is_err());
    }
}
