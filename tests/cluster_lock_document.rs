//! `ServerHandle::lock_document` and `ServerHandle::emit` between two in-process cluster nodes
//! (docs/cluster.md "Server-side API in a cluster").
//!
//! Two servers, `node-a` and `node-b`, share a private `redis-server` (started by this test on a
//! port no other test is handed) and one SQLite store. A client opens a document on `node-a`, so
//! `node-a` owns it. Then:
//!
//! * `node-b`'s `lock_document` returns `LockDocumentError::Owned { node: "node-a" }` and loads
//!   nothing;
//! * `node-b`'s `emit` runs `node-a`'s `on_custom_event` hook (the reply names `node-a`, and
//!   `node-b`'s own hook never sees the event); a hook error comes back as `EmitError::Handler`
//!   and an unknown event as `EmitError::NoHandler`, not as timeouts;
//! * after `node-a` shuts down gracefully, `node-b`'s `lock_document` succeeds with a newer epoch.
//!   Its direct edit reaches a client connected to `node-b` and is stored, and an append under
//!   `node-a`'s old epoch is fenced;
//! * `node-b`'s `emit` now runs locally.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use common::{
    Msg, RawClient, T, TestServer, YDoc, retry_until, start_server, test_config, text_of,
    with_timeout,
};
use hearth::hooks::CustomEventPayload;
use hearth::storage::{Append, AppendOutcome, DocumentStore, SqlOptions, open_store};
use hearth::{Config, Context, EmitError, Extension, HookError, LockDocumentError};
use yrs::{Text, Transact};

const DOC: &str = "locked-doc";

// A private `redis-server` (no persistence, killed on drop) on a port no other test is handed,
// accepted only once the process answering reports the pid started: the lock crate's helper.
#[path = "../lock/tests/common/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;
use redis_server::RedisServer as Redis;

/// Custom events a node's hook saw: (document, event, payload).
type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// Records custom events and answers `note` with `"<node> got <payload>"`; `boom` fails.
struct Recorder {
    node: String,
    seen: Seen,
}

#[async_trait]
impl Extension for Recorder {
    async fn on_custom_event(
        &self,
        p: &CustomEventPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        self.seen.lock().unwrap().push((
            p.document_name.to_owned(),
            p.name.to_owned(),
            p.payload.to_vec(),
        ));
        match p.name {
            "note" => {
                let mut reply = format!("{} got ", self.node).into_bytes();
                reply.extend_from_slice(p.payload);
                Ok(Some(reply))
            }
            "boom" => Err(HookError::reject("boom")),
            _ => Ok(None),
        }
    }
}

async fn node(
    id: &str,
    redis: &Redis,
    db_url: &str,
    store: Arc<dyn DocumentStore>,
) -> (TestServer, Seen) {
    let config = Config {
        node_id: id.into(),
        redis_url: redis.url(),
        redis_prefix: "lockdoc".into(),
        // a cluster refuses to start without a strong secret; both nodes share this one
        cluster_secret: "Lq7Wm3Xz9Kr1Tb5Vn8Hc2Pd6Jf4Gs0Ye".into(),
        database_url: db_url.into(),
        lock_ttl_ms: 2000,
        custom_event_ttl_ms: 5000,
        ..test_config()
    };
    let seen: Seen = Arc::default();
    let ext = Recorder {
        node: id.into(),
        seen: seen.clone(),
    };
    let server = start_server(config, move |b| b.store(store).extension(ext)).await;
    (server, seen)
}

async fn stored_text(store: &dyn DocumentStore) -> String {
    let stored = store.load(DOC).await.unwrap();
    text_of(
        stored
            .snapshot
            .iter()
            .chain(stored.updates.iter())
            .map(Vec::as_slice),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_document_and_emit_across_two_nodes() {
    let redis = Redis::start();
    let dir = std::env::temp_dir().join(format!("hearth-lockdoc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db_url = format!("sqlite://{}", dir.join("shared.db").display());
    let store = open_store(&db_url, SqlOptions::default()).await.unwrap();
    let (a, seen_a) = node("node-a", &redis, &db_url, store.clone()).await;
    let (b, seen_b) = node("node-b", &redis, &db_url, store.clone()).await;

    // A client on node-a makes node-a the owner and writes "hello".
    let mut on_a = RawClient::connect(a.addr).await;
    on_a.join(DOC).await;
    let writer = YDoc::new(11);
    on_a.edit(DOC, &writer.insert("hello")).await;
    assert!(a.is_loaded(DOC));
    let epoch_a = store.current_epoch(DOC).await.unwrap().expect("a row");

    // node-b may not lock it, and loads nothing trying.
    match b.handle.lock_document(DOC, Context::new()).await {
        Err(LockDocumentError::Owned { node }) => assert_eq!(node, "node-a"),
        other => panic!("lock_document on the non-owner: {other:?}"),
    }
    assert!(!b.is_loaded(DOC), "the non-owner loaded the document");

    // node-b's emit runs on node-a.
    let reply = with_timeout(
        T,
        "emit to the owner",
        b.handle.emit(DOC, "note", b"hi".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(reply, b"node-a got hi");
    assert_eq!(
        seen_a.lock().unwrap().clone(),
        vec![(DOC.to_owned(), "note".to_owned(), b"hi".to_vec())]
    );
    assert!(seen_b.lock().unwrap().is_empty(), "node-b ran the hook");
    let failed = with_timeout(T, "failing emit", b.handle.emit(DOC, "boom", Vec::new())).await;
    assert!(
        matches!(&failed, Err(EmitError::Handler(m)) if m == "boom"),
        "{failed:?}"
    );
    let unknown = with_timeout(T, "unknown emit", b.handle.emit(DOC, "nope", Vec::new())).await;
    assert!(matches!(unknown, Err(EmitError::NoHandler)), "{unknown:?}");
    assert!(!b.is_loaded(DOC), "emitting loaded the document on node-b");

    // node-a leaves gracefully: it stores, releases the lock and tells node-b.
    a.stop().await;
    drop(on_a);

    // node-b's lock_document succeeds once the release has arrived (bounded).
    let conn = retry_until(T, "lock_document on node-b after node-a left", || {
        b.handle.lock_document(DOC, Context::new())
    })
    .await;
    assert!(b.is_loaded(DOC));
    let epoch_b = store.current_epoch(DOC).await.unwrap().expect("a row");
    assert!(
        epoch_b > epoch_a,
        "new owner's epoch {epoch_b} not above {epoch_a}"
    );

    // A client on node-b sees node-a's stored edit, then node-b's direct edit.
    let mut on_b = RawClient::connect(b.addr).await;
    let view = YDoc::new(12);
    view.apply(&on_b.join(DOC).await);
    assert_eq!(view.text(), "hello");
    with_timeout(
        T,
        "direct transact",
        conn.transact(|doc| {
            let t = doc.get_or_insert_text("t");
            let mut txn = doc.transact_mut();
            let len = t.len(&txn);
            t.insert(&mut txn, len, " world");
        }),
    )
    .await
    .unwrap();
    let frames = on_b
        .recv_until(|f| f.address == DOC && matches!(f.msg, Msg::Update(_)))
        .await;
    if let Some(Msg::Update(u)) = frames.last().map(|f| &f.msg) {
        view.apply(u);
    }
    assert_eq!(view.text(), "hello world", "the client on node-b");
    with_timeout(T, "direct disconnect", conn.disconnect()).await;
    assert_eq!(stored_text(store.as_ref()).await, "hello world");

    // The old owner's epoch is fenced: its append commits nothing.
    let stale = Append {
        name: DOC.into(),
        epoch: epoch_a,
        updates: vec![Bytes::from(YDoc::new(13).insert("stale"))],
    };
    assert_eq!(
        store.append(&[stale]).await.unwrap(),
        vec![AppendOutcome::Fenced { current: epoch_b }]
    );
    assert_eq!(stored_text(store.as_ref()).await, "hello world");

    // node-b owns the document now: its emit runs locally.
    let reply = with_timeout(
        T,
        "local emit",
        b.handle.emit(DOC, "note", b"again".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(reply, b"node-b got again");

    drop(on_b);
    b.stop().await;
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
