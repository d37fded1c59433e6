//! Durable acknowledgements: `SyncStatus(1)` only after the update's group commit, exactly one
//! per update and in order; failed appends withhold acks (and flip `/readyz`) without blocking
//! apply/broadcast; a fenced append drops the document and resets its clients.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use hearth::Config;
use hearth::config::Durability;
use hearth::storage::DocumentStore;

/// No compaction during the test: everything the store holds comes from appends.
fn no_compaction() -> Config {
    Config {
        debounce_ms: 60_000,
        max_debounce_ms: 60_000,
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_update_gets_one_ack_after_its_commit() {
    let store = FlakyStore::new();
    // slow commits: an ack sent on apply would arrive long before the commit
    store.set_append_delay(Duration::from_millis(30));
    let s = start_with(no_compaction(), store.clone(), |b| b).await;
    assert_eq!(s.handle.metrics().pending_acks.get(), 0);
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("dur").await;
    b.join("dur").await;
    let y = YDoc::new(1);
    const N: usize = 30;
    for i in 0..N {
        a.send(update("dur", &y.insert(&format!("{i},")))).await;
    }
    let mut acks = 0;
    let mut echoes = 0;
    while acks < N {
        match a.recv_for("dur").await {
            Msg::SyncStatus(1) => {
                acks += 1;
                let logged = store.inner.load("dur").await.unwrap().updates.len();
                assert!(
                    logged >= acks,
                    "ack #{acks} arrived with only {logged} updates committed"
                );
            }
            Msg::Update(_) => echoes += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    while echoes < N {
        assert!(matches!(a.recv_for("dur").await, Msg::Update(_)));
        echoes += 1;
    }
    a.expect_silence(Duration::from_millis(300)).await;
    // the other client saw every update, never an ack
    let other = YDoc::new(2);
    for _ in 0..N {
        match b.recv_for("dur").await {
            Msg::Update(u) => other.apply(&u),
            m => panic!("unexpected {m:?}"),
        }
    }
    b.expect_silence(Duration::from_millis(50)).await;
    assert_eq!(other.text(), y.text());
    assert_eq!(store_text(&store.inner, "dur").await, y.text());
    assert_eq!(s.handle.metrics().pending_acks.get(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_appends_withhold_acks_until_storage_recovers() {
    let store = FlakyStore::new();
    // not ready as soon as a write fails (the default waits out short outages)
    let config = Config {
        readiness_outage_ms: 0,
        ..no_compaction()
    };
    let s = start_with(config, store.clone(), |b| b).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("flaky").await;
    b.join("flaky").await;
    let y = YDoc::new(3);
    a.edit("flaky", &y.insert("ok;")).await;
    assert_eq!(b.recv_for("flaky").await.name(), "update");

    store.set_failing(true);
    const N: usize = 5;
    for i in 0..N {
        a.send(update("flaky", &y.insert(&format!("{i};")))).await;
    }
    // applied and broadcast at once...
    let other = YDoc::new(4);
    other.apply(&y.state());
    for _ in 0..N {
        assert_eq!(a.recv_for("flaky").await.name(), "update", "echo");
        assert_eq!(b.recv_for("flaky").await.name(), "update", "broadcast");
    }
    // ...but not acknowledged
    a.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(http_get(s.addr, "/readyz").await.0, 503);
    assert_eq!(
        metric(s.operator_addr(), "hearth_pending_acks").await,
        N as f64
    );
    assert!(metric(s.operator_addr(), "hearth_failed_writes_total").await >= 1.0);
    assert!(
        store
            .writes()
            .iter()
            .any(|w| w.outcome == "injected-failure"),
        "the server retried"
    );

    store.set_failing(false);
    for _ in 0..N {
        with_timeout(
            Duration::from_secs(8),
            "ack after recovery",
            a.expect("flaky", Msg::SyncStatus(1)),
        )
        .await;
    }
    a.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(store_text(&store.inner, "flaky").await, y.text());
    assert_eq!(http_get(s.addr, "/readyz").await.0, 200);
    assert_eq!(s.handle.metrics().pending_acks.get(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_document_is_dropped_and_its_clients_reset() {
    let store = FlakyStore::new();
    let s = start_with(no_compaction(), store.clone(), |b| b).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("fence").await;
    a.join("other-doc").await;
    b.join("fence").await;
    let y = YDoc::new(5);
    a.edit("fence", &y.insert("before")).await;
    b.recv_for("fence").await;
    let old = store.inner.current_epoch("fence").await.unwrap().unwrap();

    // another owner takes the document behind the server's back
    let new = store.inner.acquire_epoch("fence").await.unwrap();
    assert!(new > old);
    let writes_before = store.writes().len();
    a.send(update("fence", &y.insert(" after"))).await;

    // both clients: CLOSE "Reset Connection" for the document, then the socket closes 4205
    for c in [&mut a, &mut b] {
        let frames = c.expect_close(4205).await;
        assert!(
            frames
                .iter()
                .any(|f| f.address == "fence" && f.msg == Msg::Close("Reset Connection".into())),
            "{frames:?}"
        );
        assert!(
            !frames.iter().any(|f| f.msg == Msg::SyncStatus(1)),
            "the fenced update must not be acknowledged: {frames:?}"
        );
    }
    wait_until(T, "fenced document dropped", || !s.is_loaded("fence")).await;
    // a durable edit of another document: acknowledged after its commit, which the committer
    // makes after any write the fenced document had handed it
    let mut c = RawClient::connect(s.addr).await;
    c.join("after-fence").await;
    c.edit("after-fence", &YDoc::new(6).insert("x")).await;
    assert!(
        store
            .writes()
            .iter()
            .any(|w| w.name == "after-fence" && w.outcome == "committed")
    );
    let after: Vec<_> = store.writes()[writes_before..]
        .iter()
        .filter(|w| w.name == "fence")
        .cloned()
        .collect();
    assert!(
        after
            .iter()
            .all(|w| w.epoch != old || w.outcome == "fenced"),
        "{after:?}"
    );
    assert!(
        after.iter().filter(|w| w.epoch == old).count() <= 1,
        "the server kept writing with the old epoch: {after:?}"
    );
    assert_eq!(store_text(&store.inner, "fence").await, "before");

    // a reconnecting client loads the stored state under a newer epoch
    let state = c.join("fence").await;
    assert_eq!(text_of([state.as_slice()]), "before");
    assert!(store.inner.current_epoch("fence").await.unwrap().unwrap() > new);
    assert!(s.handle.metrics().fenced_writes.get() >= 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_durability_acks_on_apply_and_stores_by_compaction() {
    let store = FlakyStore::new();
    store.set_append_delay(Duration::from_millis(500));
    let config = Config {
        durability: Durability::Memory,
        ..test_config()
    };
    let s = start_with(config, store.clone(), |b| b).await;
    let mut a = RawClient::connect(s.addr).await;
    a.join("mem").await;
    let y = YDoc::new(6);
    with_timeout(
        Duration::from_millis(400),
        "memory ack without waiting for storage",
        a.edit("mem", &y.insert("fast")),
    )
    .await;
    wait_until(T, "compacted", || {
        store
            .writes()
            .iter()
            .any(|w| w.op == "compact" && w.outcome == "committed")
    })
    .await;
    assert_eq!(store_text(&store.inner, "mem").await, "fast");
    assert!(
        !store.writes().iter().any(|w| w.op == "append"),
        "memory mode does not append"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_compaction_also_drops_the_document() {
    let store = FlakyStore::new();
    let config = Config {
        debounce_ms: 300,
        max_debounce_ms: 300,
        ..test_config()
    };
    let s = start_with(config, store.clone(), |b| b).await;
    let mut a = RawClient::connect(s.addr).await;
    a.join("fence-compact").await;
    a.edit("fence-compact", &YDoc::new(7).insert("logged"))
        .await;
    // the append is committed (acked); take the document away before the compaction runs
    let old = store
        .inner
        .current_epoch("fence-compact")
        .await
        .unwrap()
        .unwrap();
    store.inner.acquire_epoch("fence-compact").await.unwrap();
    let frames = a.expect_close(4205).await;
    assert!(
        frames.contains(&Frame {
            address: "fence-compact".into(),
            msg: Msg::Close("Reset Connection".into())
        }),
        "{frames:?}"
    );
    wait_until(T, "dropped", || !s.is_loaded("fence-compact")).await;
    let compacts: Vec<_> = store
        .writes()
        .into_iter()
        .filter(|w| w.op == "compact" && w.epoch == old)
        .collect();
    assert!(
        compacts.iter().all(|w| w.outcome == "fenced") && compacts.len() == 1,
        "{compacts:?}"
    );
    assert_eq!(store_text(&store.inner, "fence-compact").await, "logged");
    s.stop().await;
}
