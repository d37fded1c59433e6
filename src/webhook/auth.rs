//! Authentication by webhook: an [`Extension`] that asks the application's endpoint
//! (`auth_webhook_url`) whether a token may open a document.
//!
//! **Request** (a signed `POST`, see [`super`]):
//! `{"event": "authenticate" | "token_sync", "documentName", "token", "socketId", "node",
//! "readOnly" (token_sync only), "requestHeaders": {…}, "requestParameters": {…},
//! "timestamp"}`. Only the headers named in `auth_webhook_headers` and the query parameters
//! named in `auth_webhook_query` are sent.
//!
//! **Answer:** a 2xx with `{"access": "read-write" | "read-only" | "deny", "context"?: {…},
//! "reason"?: "…", "expiresAt"?: <unix seconds>}`. A 401 or 403 is a denial too. `context` is
//! merged into the connection's context (hooks and event webhooks see it; `context.user.id`
//! makes the user revocable); `expiresAt` ends the document connection then, as a token's
//! expiry does, unless a token sync extends it. A denial's `reason` (at most 200 characters
//! of text) is what the client's `onAuthenticationFailed` receives; without one it is
//! `permission-denied`.
//!
//! **Failures** (no answer within `auth_webhook_timeout_ms`, a connection error, a 5xx or 429,
//! an answer that is not the JSON above) are retried `auth_webhook_retries` times with a short
//! backoff, then the client is refused — fail closed — with `authentication unavailable`. Such a
//! refusal does not count towards the failed-authentication ban of the client's address.
//!
//! **Cache:** an answer (allow, read-only or deny, never a failure) is reused for
//! `auth_webhook_cache_ms` for the same token, document, headers and parameters, and never past
//! its `expiresAt`; at most [`MAX_CACHED`] answers are kept. **Concurrency:** at most
//! [`MAX_IN_FLIGHT`] calls at once; a client beyond that is refused as unavailable instead of
//! queueing without bound, and that refusal counts towards its address's ban, so a client that
//! floods authentications to fill the calls is banned while the others get through.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use prometheus::IntCounterVec;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{Endpoint, name_list};
use crate::clock::now_unix_ms;
use crate::config::{Config, ConfigError};
use crate::hooks::{AuthPayload, Context, Extension, HookError, HookResult};

/// Most answers kept in the cache.
pub const MAX_CACHED: usize = 10_000;
/// Most calls to the endpoint at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// The reason a client is refused with when the endpoint could not be asked.
pub const UNAVAILABLE: &str = "authentication unavailable";
/// Longest denial reason passed on to the client.
const MAX_REASON_CHARS: usize = 200;
/// Longest token sent to the endpoint; a longer one is refused without a call.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why the endpoint gave no decision.
#[derive(Debug)]
enum Failure {
    /// It could not be asked, or answered nothing usable.
    Endpoint(String),
    /// [`MAX_IN_FLIGHT`] calls were running: the client is refused at once, and the refusal
    /// counts towards its address's ban (a client flooding authentications fills the calls).
    Busy,
}

impl Failure {
    /// The refusal the client gets: the same reason either way; only a busy node charges it
    /// to the client's address.
    fn refusal(&self, reason: &str) -> HookError {
        match self {
            Failure::Endpoint(_) => HookError::unavailable(reason),
            Failure::Busy => HookError::reject(reason),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Endpoint(e) => f.write_str(e),
            Failure::Busy => write!(f, "{MAX_IN_FLIGHT} calls already in flight"),
        }
    }
}

/// What the endpoint decided.
#[derive(Debug, Clone)]
struct Decision {
    access: Access,
    context: Map<String, Value>,
    reason: Option<String>,
    expires_at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    ReadOnly,
    Deny,
}

#[derive(Deserialize)]
struct AnswerBody {
    access: String,
    #[serde(default)]
    context: Option<Map<String, Value>>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, rename = "expiresAt")]
    expires_at: Option<f64>,
}

/// The webhook authentication extension (built from the `auth_webhook_*` settings).
pub struct WebhookAuth {
    endpoint: Endpoint,
    node: String,
    timeout: Duration,
    retries: u32,
    cache_for: Duration,
    headers: Vec<String>,
    query: Vec<String>,
    cache: Mutex<HashMap<[u8; 32], (Instant, Decision)>>,
    in_flight: Semaphore,
    calls: IntCounterVec,
}

impl std::fmt::Debug for WebhookAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAuth")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl WebhookAuth {
    /// The extension for `config`, or `None` when `auth_webhook_url` is empty. Registers its
    /// metric (`hearth_auth_webhook_calls_total{result}`) in `registry`.
    pub fn from_config(
        config: &Config,
        registry: &prometheus::Registry,
    ) -> Result<Option<Self>, ConfigError> {
        if config.auth_webhook_url.is_empty() {
            return Ok(None);
        }
        let endpoint = Endpoint::new(
            ("auth_webhook_url", &config.auth_webhook_url),
            ("auth_webhook_secret", &config.auth_webhook_secret),
        )?;
        if config.auth_webhook_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                name: "auth_webhook_timeout_ms",
                message: "must be > 0".into(),
            });
        }
        let calls = IntCounterVec::new(
            prometheus::Opts::new(
                "hearth_auth_webhook_calls_total",
                "Calls to the authentication webhook by result (allow, read_only, deny, cached, failed, retried, busy)",
            ),
            &["result"],
        )
        .and_then(|c| registry.register(Box::new(c.clone())).map(|()| c))
        .map_err(|e| ConfigError::Invalid {
            name: "auth_webhook_url",
            message: format!("cannot register its metric: {e}"),
        })?;
        Ok(Some(Self {
            endpoint,
            node: config.node_id.clone(),
            timeout: Duration::from_millis(config.auth_webhook_timeout_ms),
            retries: config.auth_webhook_retries.min(10),
            cache_for: Duration::from_millis(config.auth_webhook_cache_ms),
            headers: name_list(&config.auth_webhook_headers),
            query: name_list(&config.auth_webhook_query),
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            calls,
        }))
    }

    fn count(&self, result: &str) {
        self.calls.with_label_values(&[result]).inc();
    }

    /// The forwarded headers and query parameters of the payload's request.
    fn forwarded(&self, payload: &AuthPayload<'_>) -> (Map<String, Value>, Map<String, Value>) {
        let mut headers = Map::new();
        for (k, v) in payload.request.headers() {
            let k = k.to_ascii_lowercase();
            if self.headers.contains(&k) && !headers.contains_key(&k) {
                headers.insert(k, Value::String(v.to_owned()));
            }
        }
        let mut params = Map::new();
        for (k, v) in payload.request.query_pairs() {
            if self.query.iter().any(|q| q.eq_ignore_ascii_case(&k)) && !params.contains_key(&k) {
                params.insert(k, Value::String(v));
            }
        }
        (headers, params)
    }

    /// The decision for `payload` (`event` = `authenticate` or `token_sync`): from the cache,
    /// or by asking the endpoint. `Err` = the endpoint could not be asked.
    async fn decide(&self, event: &str, payload: &AuthPayload<'_>) -> Result<Decision, Failure> {
        if payload.token.len() > MAX_TOKEN_BYTES {
            return Ok(Decision {
                access: Access::Deny,
                context: Map::new(),
                reason: None,
                expires_at: None,
            });
        }
        let (headers, params) = self.forwarded(payload);
        let key = {
            let mut h = Sha256::new();
            for part in [
                event.as_bytes(),
                payload.token.as_bytes(),
                payload.document_name.as_bytes(),
                Value::Object(headers.clone()).to_string().as_bytes(),
                Value::Object(params.clone()).to_string().as_bytes(),
                &[u8::from(payload.read_only)],
            ] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            <[u8; 32]>::from(h.finalize())
        };
        if !self.cache_for.is_zero()
            && let Some(hit) = self.cached(&key)
        {
            self.count("cached");
            return Ok(hit);
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.count("busy");
            return Err(Failure::Busy);
        };
        let mut body = json!({
            "event": event,
            "documentName": payload.document_name,
            "token": payload.token,
            "socketId": payload.socket_id,
            "node": self.node,
            "requestHeaders": headers,
            "requestParameters": params,
        });
        if event == "token_sync" {
            body["readOnly"] = Value::Bool(payload.read_only);
        }
        let delivery = uuid::Uuid::now_v7().to_string();
        let mut last_error = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                self.count("retried");
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
            }
            let timestamp = now_unix_ms();
            body["timestamp"] = Value::from(timestamp);
            let bytes = body.to_string().into_bytes();
            match self
                .endpoint
                .post(bytes, timestamp, &delivery, event, self.timeout)
                .await
            {
                Ok(answer) => match interpret(answer.status, &answer.body) {
                    Ok(decision) => {
                        self.count(match decision.access {
                            Access::ReadWrite => "allow",
                            Access::ReadOnly => "read_only",
                            Access::Deny => "deny",
                        });
                        self.remember(key, &decision);
                        return Ok(decision);
                    }
                    Err((retry, why)) => {
                        last_error = why;
                        if !retry {
                            break;
                        }
                    }
                },
                Err(e) => last_error = e.to_string(),
            }
        }
        self.count("failed");
        Err(Failure::Endpoint(last_error))
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Decision> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (until, decision) = cache.get(key)?;
        (*until > Instant::now()
            && decision
                .expires_at
                .is_none_or(|t| t > SystemTime::now() + Duration::from_secs(1)))
        .then(|| decision.clone())
    }

    fn remember(&self, key: [u8; 32], decision: &Decision) {
        if self.cache_for.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (now + self.cache_for, decision.clone()));
    }
}

/// Reads an answer. `Err((retry, why))`: not a decision; `retry` when asking again may help.
fn interpret(status: u16, body: &[u8]) -> Result<Decision, (bool, String)> {
    match status {
        401 | 403 => {
            return Ok(Decision {
                access: Access::Deny,
                context: Map::new(),
                reason: None,
                expires_at: None,
            });
        }
        200..=299 => {}
        429 | 500..=599 => return Err((true, format!("answered HTTP {status}"))),
        _ => return Err((false, format!("answered HTTP {status}"))),
    }
    let answer: AnswerBody = serde_json::from_slice(body)
        .map_err(|e| (false, format!("answer is not the expected JSON: {e}")))?;
    let access = match answer.access.as_str() {
        "read-write" | "allow" => Access::ReadWrite,
        "read-only" | "readonly" => Access::ReadOnly,
        "deny" => Access::Deny,
        other => {
            return Err((
                false,
                format!("answer has access {other:?} (expected read-write, read-only or deny)"),
            ));
        }
    };
    let expires_at = match answer.expires_at {
        None => None,
        Some(s) if (0.0..1e11).contains(&s) => {
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s))
        }
        Some(s) => return Err((false, format!("answer has expiresAt {s} (unix seconds)"))),
    };
    let reason = answer.reason.map(|r| {
        r.chars()
            .filter(|c| !c.is_control())
            .take(MAX_REASON_CHARS)
            .collect::<String>()
    });
    Ok(Decision {
        access,
        context: answer.context.unwrap_or_default(),
        reason: reason.filter(|r| !r.trim().is_empty()),
        expires_at,
    })
}

/// Reads an endpoint's answer as the extension does: the access it grants (`read-write`,
/// `read-only`, `deny`), or why it is not a decision. For tools and the fuzzer.
pub fn check_answer(status: u16, body: &[u8]) -> Result<&'static str, String> {
    match interpret(status, body) {
        Ok(d) => Ok(match d.access {
            Access::ReadWrite => "read-write",
            Access::ReadOnly => "read-only",
            Access::Deny => "deny",
        }),
        Err((_, why)) => Err(why),
    }
}

/// Sets `valid_until` to the earlier of its value and `t`.
fn end_by(payload: &mut AuthPayload<'_>, t: Option<SystemTime>) {
    if let Some(t) = t {
        payload.valid_until = Some(payload.valid_until.map_or(t, |v| v.min(t)));
    }
}

fn merge(into: &mut Context, from: Map<String, Value>) {
    for (k, v) in from {
        into.insert(k, v);
    }
}

#[async_trait]
impl Extension for WebhookAuth {
    fn name(&self) -> &str {
        "auth-webhook"
    }

    async fn on_authenticate(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        match self.decide("authenticate", payload).await {
            Err(why) => {
                warn!(doc = payload.document_name, endpoint = %self.endpoint.shown_url(), error = %why,
                      "authentication webhook could not be asked: refusing the client");
                Err(why.refusal(UNAVAILABLE))
            }
            Ok(d) => {
                debug!(doc = payload.document_name, access = ?d.access, "authentication webhook answered");
                match d.access {
                    Access::Deny => Err(HookError::reject(
                        d.reason.unwrap_or_else(|| "permission-denied".into()),
                    )),
                    access => {
                        if access == Access::ReadOnly {
                            payload.read_only = true;
                        }
                        merge(&mut payload.context, d.context);
                        end_by(payload, d.expires_at);
                        Ok(())
                    }
                }
            }
        }
    }

    /// A new token is asked about like a first one: a denial or a failure closes the document
    /// connection, and a read-only answer cannot keep a read-write connection.
    async fn on_token_sync(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        match self.decide("token_sync", payload).await {
            Err(why) => {
                warn!(doc = payload.document_name, error = %why,
                      "authentication webhook could not be asked for a token sync");
                Err(why.refusal("Unauthorized"))
            }
            Ok(d) => match d.access {
                Access::ReadWrite => {
                    end_by(payload, d.expires_at);
                    Ok(())
                }
                Access::ReadOnly if payload.read_only => {
                    end_by(payload, d.expires_at);
                    Ok(())
                }
                Access::ReadOnly | Access::Deny => Err(HookError::reject("Unauthorized")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        let d = interpret(
            200,
            br#"{"access":"read-only","context":{"user":{"id":"u1"}},"expiresAt":2000000000}"#,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(d.access, Access::ReadOnly);
        assert_eq!(d.context["user"]["id"], "u1");
        assert!(d.expires_at.is_some());
        assert!(matches!(
            interpret(403, b""),
            Ok(Decision {
                access: Access::Deny,
                ..
            })
        ));
        assert!(matches!(interpret(500, b""), Err((true, _))));
        assert!(matches!(interpret(429, b""), Err((true, _))));
        assert!(matches!(interpret(404, b""), Err((false, _))));
        assert!(matches!(interpret(200, b"[]"), Err((false, _))));
        assert!(matches!(
            interpret(200, br#"{"access":"maybe"}"#),
            Err((false, _))
        ));
        assert!(matches!(
            interpret(200, br#"{"access":"deny","expiresAt":-1}"#),
            Err((false, _))
        ));
        let d = interpret(
            200,
            "{\"access\":\"deny\",\"reason\":\"no\\u0000pe\"}".as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(d.reason.as_deref(), Some("nope"));
    }
}
