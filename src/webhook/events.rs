//! Event webhooks: an [`Extension`] that tells the application's endpoint (`webhook_url`) what
//! happens to documents, like Hocuspocus's webhook extension.
//!
//! **Events** (`webhook_events`, comma-separated): `connect` (a document connection is set up),
//! `disconnect`, `create` (a document is loaded on this node), `change` (debounced: sent
//! `webhook_debounce_ms` after the last change of a burst, at the latest `webhook_max_debounce_ms`
//! after its first) and `store` (the document was stored). Each is a signed `POST` (see
//! [`super`]) of `{"event", "id", "sequence", "timestamp", "payload": {"documentName", "node",
//! "context", …}}`: `change` adds `changes` (transactions in the burst), `disconnect` adds
//! `socketId` and `clients`, `store` adds `bytes` and `clients`. `context` is the connection's
//! context (the user a JWT or the authentication webhook put there); for `change` that of the
//! burst's last change.
//!
//! **Order:** events of one document are delivered one at a time, in the order they happened
//! (a pending `change` is sent before a later event of its document); `sequence` increases per
//! node. Documents are spread over [`SHARDS`] delivery tasks, so a slow document delays only
//! its shard.
//!
//! **Never in the way:** hooks only push into bounded queues (`webhook_queue_size` events in
//! all) and never wait; when a queue is full the event is dropped and counted. A failed
//! delivery (no 2xx within `webhook_timeout_ms`) is retried `webhook_retries` times with
//! exponential backoff from 250 ms (at most 30 s between attempts), then dropped and counted.
//! Metrics: `hearth_webhook_events_total{result="queued|delivered|retried|dropped|failed"}` and
//! `hearth_webhook_queue_events`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounterVec, IntGauge};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Endpoint, name_list};
use crate::clock::now_unix_ms;
use crate::config::{Config, ConfigError};
use crate::hooks::{
    ChangePayload, Context, DisconnectPayload, DocumentPayload, Extension, HookResult, StorePayload,
};

/// Delivery tasks; a document always goes to the same one.
pub const SHARDS: usize = 4;
/// How often pending changes are checked for being due.
const DEBOUNCE_TICK: Duration = Duration::from_millis(50);
/// Longest wait between two attempts of one delivery.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The events there are.
const KINDS: [&str; 5] = ["change", "connect", "disconnect", "create", "store"];

/// One event waiting for delivery.
#[derive(Debug)]
struct Event {
    kind: &'static str,
    body: Value,
}

/// A burst of changes of one document not yet sent.
#[derive(Debug)]
struct PendingChange {
    first: Instant,
    last: Instant,
    changes: u64,
    context: Option<Context>,
}

struct Inner {
    endpoint: Endpoint,
    node: String,
    kinds: Vec<&'static str>,
    debounce: Duration,
    max_debounce: Duration,
    timeout: Duration,
    retries: u32,
    sequence: AtomicU64,
    pending: Mutex<HashMap<String, PendingChange>>,
    shards: Vec<mpsc::Sender<Event>>,
    hasher: std::collections::hash_map::RandomState,
    results: IntCounterVec,
    queued: IntGauge,
}

/// The event webhook extension (built from the `webhook_*` settings).
pub struct EventWebhooks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventWebhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWebhooks")
            .field("endpoint", &self.inner.endpoint)
            .field("events", &self.inner.kinds)
            .finish_non_exhaustive()
    }
}

impl EventWebhooks {
    /// The extension for `config`, or `None` when `webhook_url` is empty; starts its delivery
    /// tasks (they end when the extension is dropped). Registers its metrics in `registry`.
    pub fn from_config(
        config: &Config,
        registry: &prometheus::Registry,
    ) -> Result<Option<Self>, ConfigError> {
        if config.webhook_url.is_empty() {
            return Ok(None);
        }
        let invalid = |name, message: String| ConfigError::Invalid { name, message };
        let endpoint = Endpoint::new(
            ("webhook_url", &config.webhook_url),
            ("webhook_secret", &config.webhook_secret),
        )?;
        let mut kinds = Vec::new();
        for name in name_list(&config.webhook_events) {
            match KINDS.iter().find(|k| **k == name) {
                Some(k) if !kinds.contains(k) => kinds.push(*k),
                Some(_) => {}
                None if name == "all" => kinds = KINDS.to_vec(),
                None => {
                    return Err(invalid(
                        "webhook_events",
                        format!(
                            "unknown event {name:?} (expected {} or all)",
                            KINDS.join(", ")
                        ),
                    ));
                }
            }
        }
        if kinds.is_empty() {
            return Err(invalid("webhook_events", "names no event".into()));
        }
        if config.webhook_timeout_ms == 0 {
            return Err(invalid("webhook_timeout_ms", "must be > 0".into()));
        }
        if config.webhook_queue_size < SHARDS {
            return Err(invalid(
                "webhook_queue_size",
                format!("must be at least {SHARDS}"),
            ));
        }
        let register_err =
            |e: prometheus::Error| invalid("webhook_url", format!("cannot register metrics: {e}"));
        let results = IntCounterVec::new(
            prometheus::Opts::new(
                "hearth_webhook_events_total",
                "Event webhook deliveries by result (queued, delivered, retried, dropped, failed)",
            ),
            &["result"],
        )
        .map_err(register_err)?;
        registry
            .register(Box::new(results.clone()))
            .map_err(register_err)?;
        let queued = IntGauge::new(
            "hearth_webhook_queue_events",
            "Event webhook events waiting for delivery",
        )
        .map_err(register_err)?;
        registry
            .register(Box::new(queued.clone()))
            .map_err(register_err)?;
        let per_shard = config.webhook_queue_size / SHARDS;
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..SHARDS).map(|_| mpsc::channel(per_shard)).unzip();
        let inner = Arc::new(Inner {
            endpoint,
            node: config.node_id.clone(),
            kinds,
            debounce: Duration::from_millis(config.webhook_debounce_ms),
            max_debounce: Duration::from_millis(
                config
                    .webhook_max_debounce_ms
                    .max(config.webhook_debounce_ms),
            ),
            timeout: Duration::from_millis(config.webhook_timeout_ms),
            retries: config.webhook_retries.min(20),
            sequence: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            shards: senders,
            hasher: std::collections::hash_map::RandomState::new(),
            results,
            queued,
        });
        for rx in receivers {
            tokio::spawn(deliver(Arc::downgrade(&inner), rx));
        }
        if inner.kinds.contains(&"change") {
            tokio::spawn(debouncer(Arc::downgrade(&inner)));
        }
        Ok(Some(Self { inner }))
    }
}

impl Inner {
    fn wants(&self, kind: &str) -> bool {
        self.kinds.contains(&kind)
    }

    fn shard_of(&self, doc: &str) -> usize {
        (self.hasher.hash_one(doc) as usize) % SHARDS
    }

    /// Queues an event of `doc`, after the document's pending change, if any. Never waits. The
    /// pending changes' lock is held while the two are queued, so no other event of the
    /// document can come between them, and sequence numbers follow queue order.
    fn push(&self, kind: &'static str, doc: &str, context: Option<&Context>, extra: Value) {
        let mut pending = self.lock_pending();
        if let Some(p) = pending.remove(doc) {
            self.enqueue_change(doc, p);
        }
        self.enqueue(kind, doc, context, extra);
        drop(pending);
    }

    /// Queues a burst of changes (the caller holds the pending changes' lock).
    fn enqueue_change(&self, doc: &str, p: PendingChange) {
        self.enqueue(
            "change",
            doc,
            p.context.as_ref(),
            json!({ "changes": p.changes }),
        );
    }

    /// Queues one event (the caller holds the pending changes' lock).
    fn enqueue(&self, kind: &'static str, doc: &str, context: Option<&Context>, extra: Value) {
        let mut payload = json!({
            "documentName": doc,
            "node": self.node,
            "context": context.cloned().map_or(Value::Null, Value::Object),
        });
        if let (Value::Object(p), Value::Object(extra)) = (&mut payload, extra) {
            p.extend(extra);
        }
        let body = json!({
            "event": kind,
            "id": uuid::Uuid::now_v7().to_string(),
            "sequence": self.sequence.fetch_add(1, Ordering::Relaxed),
            "payload": payload,
        });
        match self.shards[self.shard_of(doc)].try_send(Event { kind, body }) {
            Ok(()) => {
                self.queued.inc();
                self.count("queued");
            }
            Err(_) => {
                self.count("dropped");
                debug!(doc, event = kind, "event webhook queue full: event dropped");
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingChange>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, result: &str) {
        self.results.with_label_values(&[result]).inc();
    }
}

/// Sends the changes whose burst is over (or has lasted long enough).
async fn debouncer(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(DEBOUNCE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut pending = inner.lock_pending();
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, p)| now >= p.last + inner.debounce || now >= p.first + inner.max_debounce)
            .map(|(k, _)| k.clone())
            .collect();
        for doc in due {
            if let Some(p) = pending.remove(&doc) {
                inner.enqueue_change(&doc, p);
            }
        }
        drop(pending);
    }
}

/// One shard's delivery task: each event in turn, retried until delivered or given up. It
/// holds the extension only while it sends, so it ends soon after the extension is dropped.
async fn deliver(weak: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<Event>) {
    while let Some(mut event) = rx.recv().await {
        let doc = event.body["payload"]["documentName"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let delivery = event.body["id"].as_str().unwrap_or_default().to_owned();
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 0;
        if let Some(inner) = weak.upgrade() {
            inner.queued.dec();
        }
        loop {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let timestamp = now_unix_ms();
            event.body["timestamp"] = Value::from(timestamp);
            let bytes = event.body.to_string().into_bytes();
            let outcome = inner
                .endpoint
                .post(bytes, timestamp, &delivery, event.kind, inner.timeout)
                .await;
            let why = match outcome {
                Ok(a) if (200..300).contains(&a.status) => {
                    inner.count("delivered");
                    break;
                }
                Ok(a) => format!("answered HTTP {}", a.status),
                Err(e) => e.to_string(),
            };
            if attempt >= inner.retries {
                inner.count("failed");
                warn!(event = event.kind, %doc, endpoint = %inner.endpoint.shown_url(),
                      error = %why, attempts = attempt + 1,
                      "event webhook not delivered: giving up");
                break;
            }
            attempt += 1;
            inner.count("retried");
            debug!(event = event.kind, %doc, error = %why, attempt, "event webhook failed: retrying");
            drop(inner);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[async_trait]
impl Extension for EventWebhooks {
    fn name(&self) -> &str {
        "event-webhooks"
    }

    /// Lowest priority: every other extension's hooks run before an event is reported.
    fn priority(&self) -> i32 {
        i32::MIN
    }

    async fn connected(&self, p: &DocumentPayload<'_>) -> HookResult {
        if self.inner.wants("connect") {
            self.inner
                .push("connect", p.document_name, p.context, json!({}));
        }
        Ok(())
    }

    async fn on_disconnect(&self, p: &DisconnectPayload<'_>) -> HookResult {
        if self.inner.wants("disconnect") {
            self.inner.push(
                "disconnect",
                p.document_name,
                Some(p.context),
                json!({ "socketId": p.socket_id, "clients": p.clients_count }),
            );
        }
        Ok(())
    }

    async fn after_load_document(&self, p: &DocumentPayload<'_>) -> HookResult {
        if self.inner.wants("create") {
            self.inner
                .push("create", p.document_name, p.context, json!({}));
        }
        Ok(())
    }

    async fn on_change(&self, p: &ChangePayload<'_>) -> HookResult {
        if self.inner.wants("change") {
            let now = Instant::now();
            let mut pending = self.inner.lock_pending();
            let entry = pending
                .entry(p.document_name.to_owned())
                .or_insert_with(|| PendingChange {
                    first: now,
                    last: now,
                    changes: 0,
                    context: None,
                });
            entry.last = now;
            entry.changes += 1;
            if let Some(c) = p.context {
                entry.context = Some(c.clone());
            }
        }
        Ok(())
    }

    async fn after_store_document(&self, p: &StorePayload<'_>) -> HookResult {
        if self.inner.wants("store") {
            self.inner.push(
                "store",
                p.document_name,
                p.last_context,
                json!({ "bytes": p.state.len(), "clients": p.clients_count }),
            );
        }
        Ok(())
    }
}
