//! Graceful shutdown in-process: every document connection gets `CLOSE("Reset Connection")`,
//! then the socket closes with 4205; every applied edit (acknowledged or not) is stored;
//! `on_destroy` runs and `Server::run` returns.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use hearth::Config;
use hearth::hooks::{Extension, HookResult};

struct DestroyCounter(Arc<AtomicUsize>);

#[async_trait]
impl Extension for DestroyCounter {
    async fn on_destroy(&self) -> HookResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_documents_and_stores_every_edit() {
    let store = FlakyStore::new();
    // slow commits, so some edits are applied but not yet acknowledged at shutdown
    store.set_append_delay(Duration::from_millis(150));
    let destroyed = Arc::new(AtomicUsize::new(0));
    let d = destroyed.clone();
    let config = Config {
        debounce_ms: 60_000,
        max_debounce_ms: 60_000,
        ..test_config()
    };
    let s = start_with(config, store.clone(), move |b| {
        b.extension(DestroyCounter(d))
    })
    .await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    let mut pending = RawClient::connect(s.addr).await;
    a.join("sd1").await;
    a.join("sd2").await;
    b.join("sd1").await;
    pending.send(step1_empty("never-authenticated")).await;

    let y1 = YDoc::new(1);
    let y2 = YDoc::new(2);
    for i in 0..10 {
        a.send(update("sd1", &y1.insert(&format!("a{i} ")))).await;
    }
    for i in 0..5 {
        a.send(update("sd2", &y2.insert(&format!("b{i} ")))).await;
    }
    // wait until all 15 edits are applied (echoed); most acks are still pending
    let mut echoes = 0;
    let mut acks = 0;
    while echoes < 15 {
        match a.recv().await.msg {
            Msg::Update(_) => echoes += 1,
            Msg::SyncStatus(1) => acks += 1,
            m => panic!("unexpected {m:?}"),
        }
    }
    assert!(
        acks < 15,
        "the slow store should leave edits unacknowledged"
    );

    s.handle.shutdown();
    let frames = a.expect_close(4205).await;
    let closes: Vec<_> = frames
        .iter()
        .filter(|f| matches!(f.msg, Msg::Close(_)))
        .collect();
    assert_eq!(closes.len(), 2, "{frames:?}");
    for doc in ["sd1", "sd2"] {
        assert!(
            closes
                .iter()
                .any(|f| f.address == doc && f.msg == Msg::Close("Reset Connection".into())),
            "{frames:?}"
        );
    }
    let frames = b.expect_close(4205).await;
    assert_eq!(
        frames.last(),
        Some(&Frame {
            address: "sd1".into(),
            msg: Msg::Close("Reset Connection".into())
        }),
        "{frames:?}"
    );
    // an unauthenticated socket is closed too, without any frame
    assert!(pending.expect_close(4205).await.is_empty());

    with_timeout(Duration::from_secs(10), "run() returns", s.join)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(destroyed.load(Ordering::SeqCst), 1, "on_destroy ran once");
    assert_eq!(store_text(&store.inner, "sd1").await, y1.text());
    assert_eq!(store_text(&store.inner, "sd2").await, y2.text());
    // nothing listens any more
    assert!(tokio::net::TcpStream::connect(s.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_debounced_compaction_and_unloads() {
    let store = FlakyStore::new();
    let config = Config {
        debounce_ms: 60_000,
        max_debounce_ms: 60_000,
        ..test_config()
    };
    let s = start_with(config, store.clone(), |b| b).await;
    let mut a = RawClient::connect(s.addr).await;
    a.join("compact-at-exit").await;
    let y = YDoc::new(3);
    a.edit("compact-at-exit", &y.insert("kept")).await;
    assert!(
        !store.writes().iter().any(|w| w.op == "compact"),
        "not compacted yet"
    );
    let d = s
        .handle
        .open_direct_connection("direct-at-exit", Default::default())
        .await
        .unwrap();
    d.transact(|doc| {
        use yrs::{Text, Transact};
        let t = doc.get_or_insert_text("t");
        t.push(&mut doc.transact_mut(), "direct");
    })
    .await
    .unwrap();
    let handle = s.handle.clone();
    handle.shutdown();
    a.expect_close(4205).await;
    with_timeout(Duration::from_secs(10), "run() returns", s.join)
        .await
        .unwrap()
        .unwrap();
    assert!(handle.documents().is_empty(), "{:?}", handle.documents());
    let stored = hearth::storage::DocumentStore::load(&store.inner, "compact-at-exit")
        .await
        .unwrap();
    assert!(stored.snapshot.is_some(), "compacted at shutdown");
    assert_eq!(store_text(&store.inner, "compact-at-exit").await, "kept");
    assert_eq!(store_text(&store.inner, "direct-at-exit").await, "direct");
    // the direct connection is closed now
    assert!(d.transact(|_| {}).await.is_err());
}
