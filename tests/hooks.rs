//! Extension hooks: lifecycle order for one client, context propagation,
//! rejections and their wire effects, priority order.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use hearth::Config;
use hearth::hooks::{
    AuthPayload, ChangePayload, Context, DisconnectPayload, DocumentPayload, Extension, HookError,
    HookResult, LoadPayload, MessagePayload, StatelessPayload, StorePayload,
};
use serde_json::Value;

/// (hook, the `user` its context carried).
type Seen = Vec<(String, Option<String>)>;

/// Records `hook doc` lines and what context each hook saw.
#[derive(Clone, Default)]
struct Recorder {
    log: Arc<Mutex<Vec<String>>>,
    contexts: Arc<Mutex<Seen>>,
    refuse_unload: Arc<AtomicBool>,
}

impl Recorder {
    fn push(&self, hook: &str, doc: &str) {
        self.log.lock().unwrap().push(format!("{hook} {doc}"));
    }
    fn saw(&self, hook: &str, ctx: Option<&Context>) {
        let user = ctx
            .and_then(|c| c.get("user"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        self.contexts.lock().unwrap().push((hook.into(), user));
    }
    /// The hook names recorded for `doc`, in order.
    fn hooks_of(&self, doc: &str) -> Vec<String> {
        let suffix = format!(" {doc}");
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_suffix(&suffix).map(str::to_owned))
            .collect()
    }
    fn has(&self, line: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l == line)
    }
}

#[async_trait]
impl Extension for Recorder {
    async fn on_connect(&self, p: &mut AuthPayload<'_>) -> HookResult {
        self.push("on_connect", p.document_name);
        if p.token == "refuse-connect" {
            return Err(HookError::reject("connect refused"));
        }
        Ok(())
    }
    async fn on_authenticate(&self, p: &mut AuthPayload<'_>) -> HookResult {
        self.push("on_authenticate", p.document_name);
        p.context.insert("user".into(), Value::from("alice"));
        Ok(())
    }
    async fn on_load_document(&self, p: &LoadPayload<'_>) -> Result<Option<Vec<u8>>, HookError> {
        self.push("on_load_document", p.document_name);
        self.saw("on_load_document", Some(p.context));
        if p.document_name == "seeded" {
            return Ok(Some(YDoc::new(999).insert("seed")));
        }
        Ok(None)
    }
    async fn after_load_document(&self, p: &DocumentPayload<'_>) -> HookResult {
        self.push("after_load_document", p.document_name);
        Ok(())
    }
    async fn connected(&self, p: &DocumentPayload<'_>) -> HookResult {
        self.push("connected", p.document_name);
        self.saw("connected", p.context);
        if p.document_name == "refuse-connected" {
            return Err(HookError::reject("not now"));
        }
        Ok(())
    }
    async fn before_handle_message(&self, p: &MessagePayload<'_>) -> HookResult {
        if p.document_name == "guarded" && p.frame.ends_with(b"forbidden-payload") {
            return Err(HookError::reject("message refused"));
        }
        Ok(())
    }
    async fn on_change(&self, p: &ChangePayload<'_>) -> HookResult {
        self.push("on_change", p.document_name);
        self.saw("on_change", p.context);
        Ok(())
    }
    async fn on_stateless(&self, p: &StatelessPayload<'_>) -> HookResult {
        self.saw("on_stateless", Some(p.context));
        match p.payload.strip_prefix("all:") {
            Some(x) => p.document.broadcast_stateless(x),
            None => p.connection.send_stateless(&format!("re:{}", p.payload)),
        }
        Ok(())
    }
    async fn on_store_document(&self, p: &StorePayload<'_>) -> HookResult {
        self.push("on_store_document", p.document_name);
        self.saw("on_store_document", p.last_context);
        Ok(())
    }
    async fn after_store_document(&self, p: &StorePayload<'_>) -> HookResult {
        self.push("after_store_document", p.document_name);
        Ok(())
    }
    async fn on_disconnect(&self, p: &DisconnectPayload<'_>) -> HookResult {
        self.push("on_disconnect", p.document_name);
        self.saw("on_disconnect", Some(p.context));
        Ok(())
    }
    async fn before_unload_document(&self, p: &DocumentPayload<'_>) -> HookResult {
        self.push("before_unload_document", p.document_name);
        if self.refuse_unload.load(Ordering::SeqCst) {
            return Err(HookError::reject("keep it"));
        }
        Ok(())
    }
    async fn after_unload_document(&self, p: &DocumentPayload<'_>) -> HookResult {
        self.push("after_unload_document", p.document_name);
        Ok(())
    }
}

/// A server with a [`Recorder`].
async fn recorded_server(config: Config) -> (TestServer, Recorder) {
    let r = Recorder::default();
    let ext = r.clone();
    (start_server(config, move |b| b.extension(ext)).await, r)
}

const TRACED_ORDER: [&str; 11] = [
    "on_connect",
    "on_authenticate",
    "on_load_document",
    "after_load_document",
    "connected",
    "on_change",
    "on_store_document",
    "after_store_document",
    "on_disconnect",
    "before_unload_document",
    "after_unload_document",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_order_for_one_client_lifecycle() {
    let (s, r) = recorded_server(test_config()).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("h1").await;
    c.edit("h1", &YDoc::new(1).insert("x")).await;
    // the debounced store runs while the client is still connected
    wait_until(T, "stored", || r.has("after_store_document h1")).await;
    c.close_socket().await;
    wait_until(T, "unloaded", || r.has("after_unload_document h1")).await;
    assert_eq!(r.hooks_of("h1"), TRACED_ORDER);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_pending_at_disconnect_runs_before_unload() {
    let config = Config {
        debounce_ms: 60_000,
        max_debounce_ms: 60_000,
        ..test_config()
    };
    let (s, r) = recorded_server(config).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("h2").await;
    c.edit("h2", &YDoc::new(2).insert("x")).await;
    c.close_socket().await;
    wait_until(T, "unloaded", || r.has("after_unload_document h2")).await;
    assert_eq!(
        r.hooks_of("h2")[5..],
        [
            "on_change",
            "on_disconnect",
            "on_store_document",
            "after_store_document",
            "before_unload_document",
            "after_unload_document"
        ]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_from_on_authenticate_reaches_later_hooks() {
    let (s, r) = recorded_server(test_config()).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("ctx").await;
    c.edit("ctx", &YDoc::new(3).insert("x")).await;
    c.send(stateless("ctx", "ping")).await;
    c.expect("ctx", Msg::Stateless("re:ping".into())).await;
    wait_until(T, "stored", || r.has("after_store_document ctx")).await;
    c.close_socket().await;
    wait_until(T, "unloaded", || r.has("after_unload_document ctx")).await;
    let seen = r.contexts.lock().unwrap().clone();
    for hook in [
        "on_load_document",
        "connected",
        "on_change",
        "on_stateless",
        "on_store_document",
        "on_disconnect",
    ] {
        let got: Vec<_> = seen.iter().filter(|(h, _)| h == hook).collect();
        assert!(!got.is_empty(), "{hook} not called: {seen:?}");
        assert!(
            got.iter().all(|(_, user)| user.as_deref() == Some("alice")),
            "{hook} did not see the context: {seen:?}"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_unload_rejection_keeps_the_document_loaded() {
    let (s, r) = recorded_server(test_config()).await;
    r.refuse_unload.store(true, Ordering::SeqCst);
    let mut c = RawClient::connect(s.addr).await;
    c.join("kept").await;
    c.edit("kept", &YDoc::new(4).insert("x")).await;
    c.close_socket().await;
    wait_until(T, "unload attempted", || {
        r.has("before_unload_document kept")
    })
    .await;
    // a client joins: the document handles its attach only once the unload attempt is over,
    // and an unload that went on would make this join load the document again
    let mut c = RawClient::connect(s.addr).await;
    let state = c.join("kept").await;
    assert_eq!(text_of([state.as_slice()]), "x");
    assert!(s.is_loaded("kept"));
    assert!(!r.has("after_unload_document kept"));
    let loads = r
        .hooks_of("kept")
        .iter()
        .filter(|h| *h == "on_load_document")
        .count();
    assert_eq!(loads, 1, "{:?}", r.hooks_of("kept"));
    // the next time the last client leaves, the unload is tried again
    r.refuse_unload.store(false, Ordering::SeqCst);
    c.close_socket().await;
    wait_until(T, "unloaded", || !s.is_loaded("kept")).await;
    assert!(r.has("after_unload_document kept"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_rejections_have_their_wire_effects() {
    let (s, r) = recorded_server(test_config()).await;
    let mut c = RawClient::connect(s.addr).await;
    // on_connect rejecting: PermissionDenied, on_authenticate never runs
    c.send(auth("nc", "refuse-connect")).await;
    c.expect("nc", Msg::PermissionDenied("connect refused".into()))
        .await;
    assert_eq!(r.hooks_of("nc"), ["on_connect"]);
    // connected rejecting: PermissionDenied after Authenticated (reference quirk)
    c.send(auth("refuse-connected", "")).await;
    c.expect("refuse-connected", Msg::Authenticated("read-write".into()))
        .await;
    c.expect("refuse-connected", Msg::PermissionDenied("not now".into()))
        .await;
    // before_handle_message rejecting: CLOSE(reason) for that document only
    c.join("guarded").await;
    c.send(stateless("guarded", "forbidden-payload")).await;
    c.expect("guarded", Msg::Close("message refused".into()))
        .await;
    c.join("guarded").await;
    // on_load_document returning an update seeds the document
    let state = c.join("seeded").await;
    assert_eq!(text_of([state.as_slice()]), "seed");
    s.stop().await;
}

/// Records its name in every `on_connect`.
struct Named(&'static str, i32, Arc<Mutex<Vec<&'static str>>>);

#[async_trait]
impl Extension for Named {
    fn priority(&self) -> i32 {
        self.1
    }
    async fn on_connect(&self, _p: &mut AuthPayload<'_>) -> HookResult {
        self.2.lock().unwrap().push(self.0);
        if self.0 == "skipper" {
            return Err(HookError::skip());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_run_by_priority_and_skip_stops_the_chain() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let s = start_server(test_config(), move |b| {
        b.extension(Named("low", 10, o.clone()))
            .extension(Named("high", 500, o.clone()))
            .extension(Named("default", 100, o.clone()))
            .extension(Named("skipper", 50, o.clone()))
    })
    .await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("prio").await;
    assert_eq!(
        *order.lock().unwrap(),
        ["high", "default", "skipper"],
        "sorted by priority; skip ends the chain successfully"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_reply_and_broadcast_from_on_stateless() {
    let (s, _r) = recorded_server(test_config()).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("sl").await;
    b.join("sl").await;
    a.send(stateless("sl", "one")).await;
    a.expect("sl", Msg::Stateless("re:one".into())).await;
    b.expect_silence(Duration::from_millis(150)).await;
    b.send(stateless("sl", "all:hello")).await;
    a.expect("sl", Msg::Stateless("hello".into())).await;
    b.expect("sl", Msg::Stateless("hello".into())).await;
    s.stop().await;
}
