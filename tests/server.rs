//! In-process protocol tests: per-address auth state machine, multiplexing and
//! session addresses, awareness, registry single-flight and unload, direct
//! connections and the HTTP front.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use hearth::Config;
use hearth::hooks::{AuthPayload, Extension, HookError, HookResult, HttpAnswer, LoadPayload};
use hearth::request::RequestInfo;
use hearth::storage::DocumentStore;
use yrs::{Text, Transact};

/// Token-driven auth behaviours; documents named `fail-load…` fail to load.
struct AuthExt;

#[async_trait]
impl Extension for AuthExt {
    async fn on_authenticate(&self, p: &mut AuthPayload<'_>) -> HookResult {
        match p.token {
            "ro" => p.read_only = true,
            // a slow authentication backend, for sockets that go away meanwhile
            "slow" => tokio::time::sleep(Duration::from_millis(300)).await,
            "deny" => return Err(HookError::permission_denied()),
            "forbidden" => return Err(HookError::forbidden()),
            "custom" => return Err(HookError::reject("custom reason")),
            _ => {}
        }
        Ok(())
    }

    async fn on_load_document(&self, p: &LoadPayload<'_>) -> Result<Option<Vec<u8>>, HookError> {
        if p.document_name.starts_with("fail-load") {
            return Err(HookError::reject("load-failed"));
        }
        Ok(None)
    }
}

async fn auth_server() -> TestServer {
    start_server(test_config(), |b| b.extension(AuthExt)).await
}

const RW: &str = "read-write";

fn authenticated(scope: &str) -> Msg {
    Msg::Authenticated(scope.into())
}

// ---------------------------------------------------------------------------------------------
// 1. auth state machine
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_frame_is_answered_only_after_auth() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    c.send(step1_empty("a1")).await;
    c.send(awareness("a1", &[(7, 1, Some("{}"))])).await;
    c.expect_silence(Duration::from_millis(300)).await;
    c.send(auth("a1", "")).await;
    c.expect("a1", authenticated(RW)).await;
    // the queued awareness is applied after the step1 reply, in order
    c.expect("a1", Msg::Step1(vec![0])).await;
    c.expect("a1", Msg::Step2(EMPTY_UPDATE.to_vec())).await;
    match c.recv_for("a1").await {
        Msg::Awareness(b) => assert_eq!(parse_awareness(&b), vec![(7, 1, "{}".into())]),
        other => panic!("expected awareness echo, got {other:?}"),
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_queued_before_auth_take_effect_in_order() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    let y = YDoc::new(11);
    let u1 = y.insert("a");
    let u2 = y.insert("b");
    c.send(step1_empty("q")).await;
    c.send(update("q", &u1)).await;
    c.send(update("q", &u2)).await;
    c.send(step1_empty("q")).await;
    c.expect_silence(Duration::from_millis(200)).await;
    c.send(auth("q", "")).await;
    c.expect("q", authenticated(RW)).await;
    c.expect("q", Msg::Step1(vec![0])).await;
    // the first step1 was answered before the updates were applied
    c.expect("q", Msg::Step2(EMPTY_UPDATE.to_vec())).await;
    let mut names = Vec::new();
    let mut echoed = Vec::new();
    let mut last_state = None;
    while last_state.is_none() || names.iter().filter(|n| **n == "sync-status").count() < 2 {
        let m = c.recv_for("q").await;
        names.push(m.name());
        match m {
            Msg::Update(u) => echoed.push(u),
            Msg::SyncStatus(n) => assert_eq!(n, 1),
            Msg::Step2(s) => last_state = Some(s),
            Msg::Step1(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    c.expect_silence(Duration::from_millis(200)).await;
    // exactly one ack per update (durable acks may trail the step1 reply); both updates were
    // applied, in order, before the second step1 was answered
    assert_eq!(names.iter().filter(|n| **n == "sync-status").count(), 2);
    assert_eq!(echoed.len(), 2, "{names:?}");
    let step1_at = names.iter().position(|n| *n == "step1").unwrap();
    assert_eq!(names[step1_at + 1], "step2", "{names:?}");
    assert_eq!(
        names[..step1_at].iter().filter(|n| **n == "update").count(),
        2,
        "{names:?}"
    );
    assert_eq!(text_of(echoed.iter().map(Vec::as_slice)), "ab");
    assert_eq!(text_of([last_state.unwrap().as_slice()]), "ab");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_on_authenticate_answers_nothing_before_authenticated() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    let y = YDoc::new(12);
    let started = Instant::now();
    c.send(auth("slow-doc", "slow")).await;
    c.send(step1_empty("slow-doc")).await;
    c.send(update("slow-doc", &y.insert("x"))).await;
    c.send(stateless("slow-doc", "hi")).await;
    c.expect_silence(Duration::from_millis(200)).await;
    c.expect("slow-doc", authenticated(RW)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(280),
        "Authenticated came before the hook finished"
    );
    c.expect("slow-doc", Msg::Step1(vec![0])).await;
    c.expect("slow-doc", Msg::Step2(EMPTY_UPDATE.to_vec()))
        .await;
    let rest = c
        .recv_until(|f| f.msg == Msg::SyncStatus(1))
        .await
        .into_iter()
        .map(|f| f.msg.name())
        .collect::<Vec<_>>();
    assert!(
        rest[..rest.len() - 1].iter().all(|n| *n == "update"),
        "{rest:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_answer_permission_denied_and_keep_the_socket() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    for (doc, token, reason) in [
        ("d1", "deny", "permission-denied"),
        ("d2", "forbidden", "Forbidden"),
        ("d3", "custom", "custom reason"),
    ] {
        c.send(auth(doc, token)).await;
        c.send(step1_empty(doc)).await;
        c.expect(doc, Msg::PermissionDenied(reason.into())).await;
    }
    // the queued step1s of the rejected addresses are dropped, never answered
    c.expect_silence(Duration::from_millis(300)).await;
    // another document on the same socket still syncs
    c.join("ok").await;
    c.edit("ok", &YDoc::new(13).insert("fine")).await;
    assert!(!s.is_loaded("d1") && !s.is_loaded("d2") && !s.is_loaded("d3"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_address_is_evaluated_again_on_the_next_auth() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth("again", "deny")).await;
    c.send(step1_empty("again")).await;
    c.expect("again", Msg::PermissionDenied("permission-denied".into()))
        .await;
    c.send(auth("again", "deny")).await;
    c.expect("again", Msg::PermissionDenied("permission-denied".into()))
        .await;
    // third try is accepted; only the step1 sent with it is answered (one step1/step2 pair)
    c.join("again").await;
    c.expect_silence(Duration::from_millis(200)).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_scope() {
    let s = auth_server().await;
    let mut w = RawClient::connect(s.addr).await;
    w.join("ro-doc").await;
    let wy = YDoc::new(21);
    let hello = wy.insert("hello");
    w.edit("ro-doc", &hello).await;

    let mut r = RawClient::connect(s.addr).await;
    r.send(auth("ro-doc", "ro")).await;
    r.send(step1_empty("ro-doc")).await;
    r.expect("ro-doc", authenticated("readonly")).await;
    assert!(matches!(r.recv_for("ro-doc").await, Msg::Step1(_)));
    let state = match r.recv_for("ro-doc").await {
        Msg::Step2(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(text_of([state.as_slice()]), "hello");

    // an update is refused, not applied, not broadcast
    let ry = YDoc::new(22);
    ry.apply(&state);
    let evil = ry.insert(" evil");
    r.send(update("ro-doc", &evil)).await;
    r.expect("ro-doc", Msg::SyncStatus(0)).await;
    // a step2 with nothing new is acknowledged, one with new content is not
    r.send(step2("ro-doc", &hello)).await;
    r.expect("ro-doc", Msg::SyncStatus(1)).await;
    r.send(step2("ro-doc", EMPTY_UPDATE)).await;
    r.expect("ro-doc", Msg::SyncStatus(1)).await;
    r.send(step2("ro-doc", &ry.state())).await;
    r.expect("ro-doc", Msg::SyncStatus(0)).await;
    r.expect_silence(Duration::from_millis(200)).await;
    w.expect_silence(Duration::from_millis(100)).await;
    assert_eq!(text_of([w.fetch_state("ro-doc").await.as_slice()]), "hello");

    // read-only connections still publish awareness
    r.send(awareness("ro-doc", &[(22, 1, Some(r#"{"ro":true}"#))]))
        .await;
    match w.recv_for("ro-doc").await {
        Msg::Awareness(b) => assert_eq!(parse_awareness(&b)[0].0, 22),
        other => panic!("{other:?}"),
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_failure_answers_authenticated_then_permission_denied() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    for _ in 0..2 {
        c.send(auth("fail-load-1", "")).await;
        c.send(step1_empty("fail-load-1")).await;
        c.expect("fail-load-1", authenticated(RW)).await;
        c.expect("fail-load-1", Msg::PermissionDenied("load-failed".into()))
            .await;
        c.expect_silence(Duration::from_millis(150)).await;
    }
    assert!(!s.is_loaded("fail-load-1"));
    c.join("loads-fine").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_document_name_is_denied_after_authenticated() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth(" ", "")).await;
    c.expect(" ", authenticated(RW)).await;
    c.expect(" ", Msg::PermissionDenied("permission-denied".into()))
        .await;
    c.join("named").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_answered_and_the_socket_stays_usable() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    let y = YDoc::new(31);
    c.join("c1").await;
    c.join("c2").await;
    c.edit("c1", &y.insert("kept")).await;
    c.send(close("c1")).await;
    c.expect("c1", Msg::Close("provider_initiated".into()))
        .await;
    // frames for c1 after CLOSE open a fresh pending entry: not answered without Auth
    c.send(step1_empty("c1")).await;
    c.expect_silence(Duration::from_millis(200)).await;
    // c2 unaffected
    c.edit("c2", &YDoc::new(32).insert("c2")).await;
    // re-auth on the same address works and sees the earlier edit
    c.send(auth("c1", "")).await;
    c.expect("c1", authenticated(RW)).await;
    assert!(matches!(c.recv_for("c1").await, Msg::Step1(_)));
    match c.recv_for("c1").await {
        Msg::Step2(st) => assert_eq!(text_of([st.as_slice()]), "kept"),
        other => panic!("{other:?}"),
    }
    c.edit("c1", &y.insert("+")).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_aware_addresses_carry_the_full_address() {
    let s = auth_server().await;
    let (a1, a2) = ("sd\0s1", "sd\0s2");
    let mut c = RawClient::connect(s.addr).await;
    c.join(a1).await;
    c.join(a2).await;
    let mut plain = RawClient::connect(s.addr).await;
    plain.join("sd").await;
    let y = YDoc::new(41);
    let u = y.insert("one doc");
    c.send(update(a1, &u)).await;
    // the socket gets the echo for s1, the broadcast for s2, and the ack for s1, each with
    // its own full address
    let mut got: Vec<(String, &'static str)> = Vec::new();
    while got.len() < 3 {
        let f = c.recv().await;
        got.push((f.address, f.msg.name()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (a1.to_string(), "sync-status"),
            (a1.to_string(), "update"),
            (a2.to_string(), "update")
        ]
    );
    assert!(matches!(plain.recv_for("sd").await, Msg::Update(_)));
    assert_eq!(text_of([c.fetch_state(a2).await.as_slice()]), "one doc");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_broadcast_stateless_resets_its_document_connection() {
    let s = auth_server().await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("bs").await;
    b.join("bs").await;
    let mut body = Vec::new();
    hearth::protocol::lib0::Writer::write_var_string(&mut body, "to everyone");
    a.send(raw("bs", 6, &body)).await;
    a.expect("bs", Msg::Close("Reset Connection".into())).await;
    b.expect_silence(Duration::from_millis(300)).await;
    // the socket survives: the document can be joined again
    a.join("bs").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_auth_without_version_and_unknown_types_are_handled() {
    let s = auth_server().await;
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth_v3("v3", "")).await;
    c.send(step1_empty("v3")).await;
    c.expect("v3", authenticated(RW)).await;
    assert!(matches!(c.recv_for("v3").await, Msg::Step1(_)));
    assert!(matches!(c.recv_for("v3").await, Msg::Step2(_)));
    // unknown type and a client SyncStatus are ignored; the connection keeps working
    c.send(raw("v3", 42, &[1, 2, 3])).await;
    c.send(raw("v3", 8, &[1])).await;
    c.expect_silence(Duration::from_millis(200)).await;
    c.edit("v3", &YDoc::new(51).insert("v3")).await;
    // a repeated Auth on an established address is a token refresh: no reply, still works
    c.send(auth("v3", "")).await;
    c.expect_silence(Duration::from_millis(200)).await;
    c.edit("v3", &YDoc::new(52).insert("!")).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. registry: single-flight loads, unload, unload delay
// ---------------------------------------------------------------------------------------------

/// Counts `on_load_document` per document; each load takes `delay`.
#[derive(Clone, Default)]
struct LoadCounter {
    loads: Arc<Mutex<HashMap<String, usize>>>,
    delay: Duration,
    events: Arc<Mutex<Vec<String>>>,
}

impl LoadCounter {
    fn count(&self, name: &str) -> usize {
        self.loads.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

#[async_trait]
impl Extension for LoadCounter {
    async fn on_load_document(&self, p: &LoadPayload<'_>) -> Result<Option<Vec<u8>>, HookError> {
        *self
            .loads
            .lock()
            .unwrap()
            .entry(p.document_name.to_owned())
            .or_default() += 1;
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("load {}", p.document_name));
        tokio::time::sleep(self.delay).await;
        Ok(None)
    }
    async fn before_unload_document(&self, p: &hearth::hooks::DocumentPayload<'_>) -> HookResult {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("before_unload {}", p.document_name));
        Ok(())
    }
    async fn after_unload_document(&self, p: &hearth::hooks::DocumentPayload<'_>) -> HookResult {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("after_unload {}", p.document_name));
        Ok(())
    }
    async fn on_disconnect(&self, p: &hearth::hooks::DisconnectPayload<'_>) -> HookResult {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("disconnect {} {}", p.document_name, p.socket_id));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_load_once_and_converge() {
    let counter = LoadCounter {
        delay: Duration::from_millis(200),
        ..Default::default()
    };
    let ext = counter.clone();
    let s = start_server(test_config(), move |b| b.extension(ext)).await;
    const N: usize = 20;
    let mut tasks = Vec::new();
    for i in 0..N {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            let state = c.join("flight").await;
            (i, c, state)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(with_timeout(T, "join", t).await.unwrap());
    }
    assert_eq!(
        counter.count("flight"),
        1,
        "exactly one load {:?}",
        counter.events.lock().unwrap()
    );
    // every client edits concurrently, then every client converges to all edits
    let mut tasks = Vec::new();
    for (i, mut c, state) in clients {
        tasks.push(tokio::spawn(async move {
            let y = YDoc::new(1000 + i as u64);
            y.apply(&state);
            c.send(update("flight", &y.insert(&format!("[{i:02}]"))))
                .await;
            while y.text().len() < 4 * N {
                match c.recv_for("flight").await {
                    Msg::Update(u) => y.apply(&u),
                    Msg::SyncStatus(n) => assert_eq!(n, 1),
                    other => panic!("{other:?}"),
                }
            }
            y.text()
        }));
    }
    let mut texts = Vec::new();
    for t in tasks {
        texts.push(with_timeout(T, "converge", t).await.unwrap());
    }
    for i in 0..N {
        assert!(texts[0].contains(&format!("[{i:02}]")));
    }
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    assert_eq!(counter.count("flight"), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_direct_connections_load_once() {
    let counter = LoadCounter {
        delay: Duration::from_millis(200),
        ..Default::default()
    };
    let ext = counter.clone();
    let s = start_server(test_config(), move |b| b.extension(ext)).await;
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let h = s.handle.clone();
        tasks.push(tokio::spawn(async move {
            let d = h
                .open_direct_connection("direct-flight", Default::default())
                .await
                .unwrap();
            d.transact(move |doc| {
                let t = doc.get_or_insert_text("t");
                let mut txn = doc.transact_mut();
                t.push(&mut txn, &format!("[{i:02}]"));
            })
            .await
            .unwrap();
            d
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(with_timeout(T, "direct open", t).await.unwrap());
    }
    assert_eq!(
        counter.count("direct-flight"),
        1,
        "{:?}",
        counter.events.lock().unwrap()
    );
    let mut c = RawClient::connect(s.addr).await;
    let state = c.join("direct-flight").await;
    assert_eq!(text_of([state.as_slice()]).len(), 80);
    for d in conns {
        d.disconnect().await;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_unloads_after_the_last_client_and_reloads() {
    let counter = LoadCounter::default();
    let ext = counter.clone();
    let store = Arc::new(hearth::storage::MemoryStore::new());
    let st = store.clone();
    let s = start_server(test_config(), move |b| b.extension(ext).store(st)).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("u1").await;
    b.join("u1").await;
    a.edit("u1", &YDoc::new(61).insert("persisted")).await;
    a.close_socket().await;
    wait_until(T, "the document saw a leave", || {
        s.handle.metrics().doc_connections.get() == 1
    })
    .await;
    // a round trip through the document after the leave: an unload it had started would fail it
    b.fetch_state("u1").await;
    assert!(s.is_loaded("u1"), "one client is still there");
    assert!(
        !counter
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("unload")),
        "{:?}",
        counter.events.lock().unwrap()
    );
    b.close_socket().await;
    wait_until(T, "unloaded", || !s.is_loaded("u1")).await;
    assert_eq!(store_text(&store, "u1").await, "persisted");
    assert_eq!(counter.count("u1"), 1);
    let mut c = RawClient::connect(s.addr).await;
    let state = c.join("u1").await;
    assert_eq!(text_of([state.as_slice()]), "persisted");
    assert_eq!(
        counter.count("u1"),
        2,
        "a reconnect after unload loads again"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_delay_keeps_the_document_loaded() {
    let counter = LoadCounter::default();
    let ext = counter.clone();
    let config = Config {
        unload_delay_ms: 700,
        ..test_config()
    };
    let s = start_server(config, move |b| b.extension(ext)).await;
    let mut a = RawClient::connect(s.addr).await;
    a.join("delayed").await;
    a.close_socket().await;
    wait_until(T, "the document saw its last client leave", || {
        s.handle.metrics().doc_connections.get() == 0
    })
    .await;
    assert!(s.is_loaded("delayed"), "kept for unload_delay_ms");
    // coming back within the delay does not load again (without the delay the document would
    // unload as soon as it saw the leave, and this join would load it again)
    let mut b = RawClient::connect(s.addr).await;
    b.join("delayed").await;
    assert_eq!(counter.count("delayed"), 1);
    let left = Instant::now();
    b.close_socket().await;
    wait_until(T, "unloaded after the delay", || !s.is_loaded("delayed")).await;
    assert!(
        left.elapsed() >= Duration::from_millis(600),
        "unloaded after {:?}",
        left.elapsed()
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. awareness
// ---------------------------------------------------------------------------------------------

async fn expect_awareness(c: &mut RawClient, doc: &str) -> Vec<(u64, u64, String)> {
    match c.recv_for(doc).await {
        Msg::Awareness(b) => parse_awareness(&b),
        other => panic!("expected awareness, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_is_relayed_and_echoed_to_the_sender() {
    let s = start(test_config()).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("aw").await;
    b.join("aw").await;
    let state = r#"{"user":{"name":"alice"}}"#;
    a.send(awareness("aw", &[(100, 1, Some(state))])).await;
    let want = vec![(100, 1, state.to_string())];
    assert_eq!(expect_awareness(&mut a, "aw").await, want, "echo");
    assert_eq!(expect_awareness(&mut b, "aw").await, want, "relay");
    // a renewal with the same state is still broadcast (keeps providers alive)
    a.send(awareness("aw", &[(100, 2, Some(state))])).await;
    assert_eq!(expect_awareness(&mut a, "aw").await[0].1, 2);
    assert_eq!(expect_awareness(&mut b, "aw").await[0].1, 2);
    // an old clock is ignored
    a.send(awareness("aw", &[(100, 1, Some("{}"))])).await;
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(50)).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_first_state_with_clock_zero_is_ignored() {
    let s = start(test_config()).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("aw0").await;
    b.join("aw0").await;
    a.send(awareness("aw0", &[(101, 0, Some("{}"))])).await;
    a.expect_silence(Duration::from_millis(250)).await;
    b.expect_silence(Duration::from_millis(50)).await;
    a.send(awareness("aw0", &[(101, 1, Some("{}"))])).await;
    assert_eq!(
        expect_awareness(&mut b, "aw0").await,
        vec![(101, 1, "{}".into())]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_broadcasts_removal_with_the_same_clock() {
    let s = start(test_config()).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    let mut c = RawClient::connect(s.addr).await;
    a.join("awd").await;
    b.join("awd").await;
    c.join("awd").await;
    a.send(awareness("awd", &[(102, 3, Some(r#"{"a":1}"#))]))
        .await;
    expect_awareness(&mut b, "awd").await;
    expect_awareness(&mut c, "awd").await;
    c.send(awareness("awd", &[(103, 5, Some(r#"{"c":1}"#))]))
        .await;
    expect_awareness(&mut b, "awd").await;
    // socket close
    a.close_socket().await;
    assert_eq!(
        expect_awareness(&mut b, "awd").await,
        vec![(102, 3, "null".into())]
    );
    // provider detach (CLOSE frame)
    c.send(close("awd")).await;
    assert_eq!(
        expect_awareness(&mut b, "awd").await,
        vec![(103, 5, "null".into())]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiner_gets_the_awareness_snapshot_before_sync() {
    let s = start(test_config()).await;
    let mut a = RawClient::connect(s.addr).await;
    a.join("aws").await;
    a.send(awareness("aws", &[(104, 1, Some(r#"{"a":true}"#))]))
        .await;
    expect_awareness(&mut a, "aws").await;
    let mut j = RawClient::connect(s.addr).await;
    j.send(auth("aws", "")).await;
    j.send(step1_empty("aws")).await;
    j.expect("aws", authenticated(RW)).await;
    assert_eq!(
        expect_awareness(&mut j, "aws").await,
        vec![(104, 1, r#"{"a":true}"#.into())]
    );
    assert!(matches!(j.recv_for("aws").await, Msg::Step1(_)));
    assert!(matches!(j.recv_for("aws").await, Msg::Step2(_)));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cannot_touch_client_ids_owned_by_another() {
    let s = start(test_config()).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("awo").await;
    b.join("awo").await;
    let mine = r#"{"owner":"a"}"#;
    a.send(awareness("awo", &[(105, 2, Some(mine))])).await;
    expect_awareness(&mut a, "awo").await;
    expect_awareness(&mut b, "awo").await;
    // overwrite and removal attempts by b
    b.send(awareness("awo", &[(105, 3, Some(r#"{"owner":"b"}"#))]))
        .await;
    b.send(awareness("awo", &[(105, 2, None)])).await;
    b.send(awareness("awo", &[(105, 9, None)])).await;
    a.expect_silence(Duration::from_millis(250)).await;
    b.expect_silence(Duration::from_millis(50)).await;
    b.send(query_awareness("awo")).await;
    assert_eq!(
        expect_awareness(&mut b, "awo").await,
        vec![(105, 2, mine.into())]
    );
    // a can still renew it
    a.send(awareness("awo", &[(105, 3, Some(mine))])).await;
    assert_eq!(expect_awareness(&mut b, "awo").await[0].1, 3);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. direct connections
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_connection_transact_broadcasts_stores_and_unloads() {
    let (s, store) = start_with_store(test_config()).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("dc").await;
    let d = s
        .handle
        .open_direct_connection("dc", Default::default())
        .await
        .unwrap();
    d.transact(|doc| {
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        t.push(&mut txn, "from server");
    })
    .await
    .unwrap();
    match c.recv_for("dc").await {
        Msg::Update(u) => assert_eq!(text_of([u.as_slice()]), "from server"),
        other => panic!("{other:?}"),
    }
    c.close_socket().await;
    wait_until(T, "the document saw the client leave", || {
        s.handle.metrics().doc_connections.get() == 0
    })
    .await;
    // a round trip through the document after the leave: an unload it had started would fail it
    d.transact(|_| {}).await.unwrap();
    assert!(
        s.is_loaded("dc"),
        "an open direct connection keeps the document"
    );
    d.disconnect().await;
    let stored = store.load("dc").await.unwrap();
    assert!(stored.snapshot.is_some(), "disconnect stores a snapshot");
    assert_eq!(store_text(&store, "dc").await, "from server");
    wait_until(T, "unloaded after disconnect", || !s.is_loaded("dc")).await;
    s.stop().await;
}

/// On a paused clock (no client socket here to time out): the wait past the grace a fresh
/// document gets before an idle unload passes at once.
#[tokio::test(start_paused = true)]
async fn direct_connection_alone_keeps_the_document_loaded() {
    let (s, store) = start_with_store(test_config()).await;
    let d = s
        .handle
        .open_direct_connection("dc2", Default::default())
        .await
        .unwrap();
    // a freshly loaded document that no connection holds is unloaded after a 2 s grace
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.is_loaded("dc2"));
    d.transact(|doc| {
        let t = doc.get_or_insert_text("t");
        t.push(&mut doc.transact_mut(), "x");
    })
    .await
    .unwrap();
    d.disconnect().await;
    assert_eq!(store_text(&store, "dc2").await, "x");
    wait_until(T, "unloaded", || !s.is_loaded("dc2")).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. HTTP
// ---------------------------------------------------------------------------------------------

struct HttpExt {
    upgrades: Arc<AtomicUsize>,
}

#[async_trait]
impl Extension for HttpExt {
    async fn on_request(&self, r: &RequestInfo) -> Result<Option<HttpAnswer>, HookError> {
        if r.path() == "/custom" {
            return Ok(Some(HttpAnswer {
                status: 201,
                content_type: "application/json".into(),
                body: Bytes::from_static(br#"{"custom":true}"#),
            }));
        }
        if r.path() == "/denied" {
            return Err(HookError::reject("no"));
        }
        Ok(None)
    }

    async fn on_upgrade(&self, r: &RequestInfo) -> HookResult {
        self.upgrades.fetch_add(1, Ordering::SeqCst);
        if r.path() == "/forbidden" {
            return Err(HookError::forbidden());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_and_hooks() {
    let upgrades = Arc::new(AtomicUsize::new(0));
    let ext = HttpExt {
        upgrades: upgrades.clone(),
    };
    let s = start_server(test_config(), move |b| b.extension(ext)).await;
    assert_eq!(http_get(s.addr, "/healthz").await.0, 200);
    assert_eq!(http_get(s.addr, "/readyz").await.0, 200);
    // metrics are served on the operator listener only
    assert_eq!(http_get(s.addr, "/metrics").await.0, 404);
    let (status, body) = http_get(s.operator_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("hearth_sockets"), "{body}");
    assert!(body.contains("hearth_slow_reader_disconnects_total"));
    assert!(
        body.contains(&format!(
            "hearth_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(body.contains(process), "{process} missing: {body}");
    }
    assert_eq!(http_get(s.addr, "/no-such-path").await.0, 404);
    assert_eq!(
        http_get(s.addr, "/").await,
        (200, "Welcome to Hearth!".to_string())
    );
    assert_eq!(
        http_get(s.addr, "/custom").await,
        (201, r#"{"custom":true}"#.to_string())
    );
    assert_eq!(http_get(s.addr, "/denied").await.0, 403);

    let refused = tokio_tungstenite::connect_async(format!("ws://{}/forbidden", s.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 403)
        }
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    // any other path upgrades to the Hocuspocus protocol
    let mut c = RawClient::connect_path(s.addr, "/any/path?token=1").await;
    c.join("http-doc").await;
    assert_eq!(upgrades.load(Ordering::SeqCst), 2);
    assert!(metric(s.operator_addr(), "hearth_sockets").await >= 1.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_state_is_served_to_a_new_server() {
    // storage round trip: what one server stored, the next one (same store) serves
    let (s, store) = start_with_store(test_config()).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("restart").await;
    c.edit("restart", &YDoc::new(71).insert("survives")).await;
    s.stop().await;
    let st: Arc<dyn DocumentStore> = store.clone();
    let s2 = start_server(test_config(), move |b| b.store(st)).await;
    let mut c = RawClient::connect(s2.addr).await;
    let state = c.join("restart").await;
    assert_eq!(text_of([state.as_slice()]), "survives");
    s2.stop().await;
}

/// With `unload_delay_ms = 0` a freshly loaded document must still wait for the openers that
/// waited on its load to attach; otherwise it unloads at once and is loaded a second time.
/// The race was timing-dependent (the new document task's immediate idle timer against the
/// wake-up of the waiting openers; fixed by the actor's load grace period); several rounds made
/// it show up in most debug runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_document_is_not_unloaded_before_its_openers_attach() {
    let counter = LoadCounter {
        delay: Duration::from_millis(200),
        ..Default::default()
    };
    let ext = counter.clone();
    let s = start_server(test_config(), move |b| b.extension(ext)).await;
    for round in 0..10 {
        let name = format!("race-{round}");
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (h, name) = (s.handle.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                h.open_direct_connection(&name, Default::default())
                    .await
                    .unwrap()
            }));
        }
        let mut conns = Vec::new();
        for t in tasks {
            conns.push(with_timeout(T, "direct open", t).await.unwrap());
        }
        let events: Vec<String> = counter
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.ends_with(&name) && !e.starts_with("disconnect"))
            .cloned()
            .collect();
        assert_eq!(counter.count(&name), 1, "round {round}: {events:?}");
        for d in conns {
            d.disconnect().await;
        }
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// more lifecycle edges
// ---------------------------------------------------------------------------------------------

/// A socket that goes away while its address is still authenticating must not leave a
/// connection (and so a loaded document) behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closed_during_auth_leaves_no_document_behind() {
    let counter = LoadCounter::default();
    let ext = counter.clone();
    let s = start_server(test_config(), move |b| b.extension(AuthExt).extension(ext)).await;
    let mut c = RawClient::connect(s.addr).await;
    c.send(auth("orphan", "slow")).await;
    c.send(step1_empty("orphan")).await;
    c.close_socket().await;
    // the hook finishes 300 ms later and the authentication runs on: the document loads, but
    // must unload again
    wait_until(T, "orphan document loaded", || counter.count("orphan") == 1).await;
    wait_until(T, "orphan document unloaded", || {
        counter
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e == "after_unload orphan")
    })
    .await;
    assert!(!s.is_loaded("orphan"));
    assert_eq!(s.handle.metrics().doc_connections.get(), 0);
    s.stop().await;
}

/// Failed loads are single-flight too: every waiter gets `Authenticated` + the same
/// `PermissionDenied`, and the hook ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_is_shared_by_every_waiter() {
    #[derive(Clone, Default)]
    struct FailingLoad(Arc<AtomicUsize>);
    #[async_trait]
    impl Extension for FailingLoad {
        async fn on_load_document(
            &self,
            _p: &LoadPayload<'_>,
        ) -> Result<Option<Vec<u8>>, HookError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            // a slow load: the other waiters arrive while it runs
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(HookError::reject("load-failed"))
        }
    }
    let ext = FailingLoad::default();
    let calls = ext.0.clone();
    let s = start_server(test_config(), move |b| b.extension(ext)).await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            c.send(auth("doomed", "")).await;
            c.send(step1_empty("doomed")).await;
            c.expect("doomed", authenticated(RW)).await;
            c.expect("doomed", Msg::PermissionDenied("load-failed".into()))
                .await;
            c.expect_silence(Duration::from_millis(100)).await;
        }));
    }
    for t in tasks {
        with_timeout(T, "waiter", t).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!s.is_loaded("doomed"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_and_control_character_names_are_denied() {
    let s = start(Config {
        max_document_name_bytes: 16,
        ..test_config()
    })
    .await;
    let mut c = RawClient::connect(s.addr).await;
    for name in ["n".repeat(17), "a\u{1}b".to_string(), "\t".to_string()] {
        c.send(auth(&name, "")).await;
        c.expect(&name, authenticated(RW)).await;
        c.expect(&name, Msg::PermissionDenied("permission-denied".into()))
            .await;
    }
    assert!(s.handle.documents().is_empty());
    c.join(&"n".repeat(16)).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_close_4408_unless_they_answer_pings() {
    let s = start(Config {
        idle_timeout_ms: 600,
        ..test_config()
    })
    .await;
    let mut idle = RawClient::connect(s.addr).await;
    let mut alive = RawClient::connect(s.addr).await;
    idle.join("idle").await;
    alive.join("idle").await;
    // `alive` keeps reading (its WebSocket layer answers the server's pings), `idle` does not
    let keep = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            match alive.next_event(Duration::from_millis(100)).await {
                Event::Timeout | Event::Frame(_) => {}
                other => panic!("the reading client was closed: {other:?}"),
            }
        }
        alive
    });
    wait_until(T, "idle socket closed with 4408", || {
        s.handle.metrics().closes.with_label_values(&["4408"]).get() == 1
    })
    .await;
    // reading now: the close frame (after `CLOSE "Connection Timeout"` for the document), or a
    // broken pipe when the client's queued pong replies hit the already closed connection
    let mut frames = Vec::new();
    loop {
        match idle.next_event(T).await {
            Event::Frame(f) => frames.push(f),
            Event::Closed(code, _) => {
                assert_eq!(code, Some(4408));
                break;
            }
            Event::Gone(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        frames.is_empty()
            || frames.contains(&Frame {
                address: "idle".into(),
                msg: Msg::Close("Connection Timeout".into())
            }),
        "{frames:?}"
    );
    let mut alive = with_timeout(T, "keepalive", keep).await.unwrap();
    alive
        .edit("idle", &YDoc::new(81).insert("still here"))
        .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_ping_goes_to_v4_providers_only_and_pong_is_accepted() {
    let s = start(Config {
        app_ping_interval_ms: 100,
        ..test_config()
    })
    .await;
    let mut v4 = RawClient::connect(s.addr).await;
    v4.join("ping").await; // Auth carries "4.8.0"
    let mut v3 = RawClient::connect(s.addr).await;
    v3.send(auth_v3("ping", "")).await;
    v3.expect("ping", authenticated(RW)).await;
    let frames = v4.recv_until(|f| f.msg == Msg::Ping).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    v4.send(vec![0x0a]).await;
    v4.recv_until(|f| f.msg == Msg::Ping).await;
    v3.expect_silence(Duration::from_millis(400)).await;
    v4.edit("ping", &YDoc::new(82).insert("pong ok")).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_direct_connection_releases_the_document() {
    let (s, store) = start_with_store(test_config()).await;
    let d = s
        .handle
        .open_direct_connection("dropped", Default::default())
        .await
        .unwrap();
    d.transact(|doc| {
        let t = doc.get_or_insert_text("t");
        t.push(&mut doc.transact_mut(), "dropped");
    })
    .await
    .unwrap();
    drop(d);
    wait_until(T, "unloaded", || !s.is_loaded("dropped")).await;
    assert_eq!(store_text(&store, "dropped").await, "dropped");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_awareness_states_expire_with_a_removal_broadcast() {
    let s = start(Config {
        awareness_timeout_ms: 300,
        ..test_config()
    })
    .await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("stale").await;
    b.join("stale").await;
    a.send(awareness("stale", &[(110, 4, Some("{}"))])).await;
    expect_awareness(&mut b, "stale").await;
    // checked every 3 s (y-protocols), so the removal comes within ~3.3 s
    let removal = match with_timeout(
        Duration::from_secs(5),
        "expiry",
        b.recv_frame(Duration::from_secs(5)),
    )
    .await
    .msg
    {
        Msg::Awareness(body) => parse_awareness(&body),
        other => panic!("{other:?}"),
    };
    assert_eq!(removal, vec![(110, 4, "null".into())]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_connections_resets_document_connections_but_not_sockets() {
    let s = start(test_config()).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("reset-doc").await;
    a.join("kept-doc").await;
    b.join("reset-doc").await;
    s.handle.close_connections(Some("reset-doc"));
    a.expect("reset-doc", Msg::Close("Reset Connection".into()))
        .await;
    b.expect("reset-doc", Msg::Close("Reset Connection".into()))
        .await;
    // the sockets and their other documents are fine; the closed address can be joined again
    a.edit("kept-doc", &YDoc::new(91).insert("ok")).await;
    a.join("reset-doc").await;
    b.join("reset-doc").await;
    s.handle.close_connections(None);
    let mut got = vec![
        a.recv().await.address,
        a.recv().await.address,
        b.recv().await.address,
    ];
    got.sort();
    assert_eq!(got, ["kept-doc", "reset-doc", "reset-doc"]);
    s.stop().await;
}
