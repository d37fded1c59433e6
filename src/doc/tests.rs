//! The document layer on its own: a registry, document tasks and the committer over an
//! in-memory store, driven through [`DocCommand`]s and read through connection outboxes — no
//! sockets, no Redis, no database. Time is tokio's paused clock: it advances only when every
//! task waits, so backoffs and unload delays take no wall time and no test sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

use super::committer::Committer;
use super::ownership::{Claim, ClaimError, Lost, Ownership};
use super::registry::Registry;
use super::services::DocServices;
use super::*;
use crate::config::Config;
use crate::hooks::{Context, Extensions};
use crate::metrics::Metrics;
use crate::outbox::{OutboxReceiver, Outgoing, outbox};
use crate::protocol::Close;
use crate::protocol::client::{ServerFrame, ServerMsg, decode_server_frame};
use crate::storage::{
    Append, AppendOutcome, DocumentInfo, DocumentStore, Epoch, ListQuery, LogSeq, MemoryStore,
    StoreError, StoredDocument,
};

const NAME: &str = "doc";

/// The in-memory store, with appends that fail while `failing` is set (a database outage).
#[derive(Debug, Default)]
struct Store {
    inner: MemoryStore,
    failing: AtomicBool,
    failed: AtomicUsize,
}

#[async_trait]
impl DocumentStore for Store {
    async fn acquire_epoch(&self, name: &str) -> Result<Epoch, StoreError> {
        self.inner.acquire_epoch(name).await
    }
    async fn current_epoch(&self, name: &str) -> Result<Option<Epoch>, StoreError> {
        self.inner.current_epoch(name).await
    }
    async fn create_epoch(&self, name: &str) -> Result<Option<Epoch>, StoreError> {
        self.inner.create_epoch(name).await
    }
    async fn load(&self, name: &str) -> Result<StoredDocument, StoreError> {
        self.inner.load(name).await
    }
    async fn append(&self, batch: &[Append]) -> Result<Vec<AppendOutcome>, StoreError> {
        if self.failing.load(Ordering::Acquire) {
            self.failed.fetch_add(1, Ordering::AcqRel);
            return Err(StoreError::Database("the database is down".into()));
        }
        self.inner.append(batch).await
    }
    async fn compact(
        &self,
        name: &str,
        epoch: Epoch,
        state: &[u8],
        upto: LogSeq,
    ) -> Result<(), StoreError> {
        self.inner.compact(name, epoch, state, upto).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<DocumentInfo>, StoreError> {
        self.inner.list(query).await
    }
    async fn delete(&self, name: &str, epoch: Epoch) -> Result<bool, StoreError> {
        self.inner.delete(name, epoch).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn backend(&self) -> &'static str {
        "test"
    }
}

/// Ownership whose claims can be taken away (`lose`), as when another node takes the lock.
#[derive(Debug)]
struct Revocable {
    lost: watch::Sender<bool>,
    released: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct RevocableClaim {
    lost: watch::Receiver<bool>,
    released: Arc<AtomicUsize>,
}

#[async_trait]
impl Ownership for Revocable {
    async fn claim(&self, _doc: &str) -> Result<Option<Box<dyn Claim>>, ClaimError> {
        Ok(Some(Box::new(RevocableClaim {
            lost: self.lost.subscribe(),
            released: self.released.clone(),
        })))
    }
}

#[async_trait]
impl Claim for RevocableClaim {
    fn is_valid(&self) -> bool {
        !*self.lost.borrow()
    }
    fn lost(&self) -> Lost {
        let mut rx = self.lost.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|lost| *lost).await;
            "taken"
        })
    }
    async fn release(self: Box<Self>, _epoch: i64) {
        self.released.fetch_add(1, Ordering::AcqRel);
    }
    async fn abandon(self: Box<Self>) {}
}

struct Node {
    svc: Arc<DocServices>,
    store: Arc<Store>,
}

fn node(config: Config, ownership: Option<Arc<dyn Ownership>>) -> Node {
    let store = Arc::new(Store::default());
    let metrics = Metrics::new().unwrap();
    let committer = Committer::spawn(
        store.clone(),
        Duration::from_millis(config.commit_interval_ms),
        metrics.clone(),
    );
    let svc = Arc::new(DocServices {
        config,
        extensions: Extensions::new(Vec::new()),
        store: store.clone(),
        metrics,
        committer,
        registry: Registry::default(),
        ownership,
        burst: None,
    });
    Node { svc, store }
}

/// One client attachment: its id and what the document sends it.
struct Client {
    conn: ConnId,
    rx: OutboxReceiver,
}

impl Client {
    /// The next message for this client (waits, in virtual time, up to a minute).
    async fn next(&mut self) -> ServerMsg {
        loop {
            let out = tokio::time::timeout(Duration::from_secs(60), self.rx.recv())
                .await
                .expect("a message for the client");
            match out {
                Outgoing::Frame(f) => match decode_server_frame(f).unwrap() {
                    ServerFrame::Addressed { msg, .. } => return msg,
                    ServerFrame::Ping => {}
                },
                Outgoing::CloseSocket(c) => return ServerMsg::Other(u64::from(c.code())),
                Outgoing::DocClosed { .. } => {}
            }
        }
    }

    /// The next message that is not awareness (attaching sends the awareness snapshot).
    async fn next_sync(&mut self) -> ServerMsg {
        loop {
            match self.next().await {
                ServerMsg::Awareness(_) => {}
                m => return m,
            }
        }
    }

    /// What is queued for the client (awareness aside) once every task has run; the paused
    /// clock advances only when every task waits, so a short sleep lets everything runnable
    /// finish first.
    async fn queued(&mut self) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut found = Vec::new();
        while let Some(out) = self.rx.try_recv() {
            match out {
                Outgoing::Frame(f) => match decode_server_frame(f).unwrap() {
                    ServerFrame::Addressed {
                        msg: ServerMsg::Awareness(_),
                        ..
                    } => {}
                    other => found.push(format!("{other:?}")),
                },
                other => found.push(format!("{other:?}")),
            }
        }
        found
    }
}

async fn attach(doc: &DocHandle, read_only: bool) -> Client {
    let (out, rx) = outbox(1 << 20);
    let conn = next_conn_id();
    let (tx, done) = oneshot::channel();
    let attach = Attach {
        conn,
        outbox: out,
        framing: Framing::Hocuspocus(Arc::from(NAME)),
        read_only,
        context: Arc::new(Context::new()),
        socket_id: Arc::from("test"),
        conn_ref: None,
    };
    assert!(doc.send(DocCommand::Attach(attach, tx)).await);
    done.await.unwrap().unwrap();
    Client { conn, rx }
}

/// An update inserting `text` at the start of the text `t` (a fresh Yjs client each time).
fn edit(text: &str) -> Bytes {
    let d = Doc::new();
    let t = d.get_or_insert_text("t");
    t.insert(&mut d.transact_mut(), 0, text);
    Bytes::from(d.transact().encode_state_as_update_v1(&Default::default()))
}

async fn send_update(doc: &DocHandle, c: &Client, update: Bytes) {
    let msg = SyncMessage::Update(update);
    assert!(doc.send(DocCommand::Sync { conn: c.conn, msg }).await);
}

/// The text `t` as stored (snapshot and log applied).
async fn stored_text(store: &Store) -> String {
    let stored = store.load(NAME).await.unwrap();
    let d = Doc::new();
    let t = d.get_or_insert_text("t");
    {
        let mut txn = d.transact_mut();
        for part in stored.snapshot.iter().chain(stored.updates.iter()) {
            txn.apply_update(Update::decode_v1(part).unwrap()).unwrap();
        }
    }
    t.get_string(&d.transact())
}

#[tokio::test(start_paused = true)]
async fn an_update_is_broadcast_at_once_and_acknowledged_once_committed() {
    let n = node(Config::default(), None);
    let doc = n.svc.open(NAME, &Context::new()).await.unwrap();
    let mut a = attach(&doc, false).await;
    let mut b = attach(&doc, false).await;
    send_update(&doc, &a, edit("hello")).await;
    assert!(matches!(b.next_sync().await, ServerMsg::Update(_)));
    assert!(matches!(a.next_sync().await, ServerMsg::Update(_)));
    assert_eq!(a.next_sync().await, ServerMsg::SyncStatus(true));
    // durable mode: the acknowledgement means the update is in the store
    assert_eq!(stored_text(&n.store).await, "hello");
}

#[tokio::test(start_paused = true)]
async fn a_failed_commit_withholds_the_acknowledgement_and_retries_with_backoff() {
    let n = node(Config::default(), None);
    let doc = n.svc.open(NAME, &Context::new()).await.unwrap();
    let mut a = attach(&doc, false).await;
    n.store.failing.store(true, Ordering::Release);
    send_update(&doc, &a, edit("kept")).await;
    assert!(matches!(a.next_sync().await, ServerMsg::Update(_)));
    // an outage of ten (virtual) seconds: retries back off, nothing is acknowledged
    tokio::time::sleep(Duration::from_secs(10)).await;
    let queued = a.queued().await;
    assert!(
        queued.is_empty(),
        "sent while the store was down: {queued:?}"
    );
    let tries = n.store.failed.load(Ordering::Acquire);
    assert!(
        (3..=40).contains(&tries),
        "{tries} attempts in 10 s: the retries back off (50 ms doubling up to 5 s)"
    );
    assert_eq!(n.svc.metrics.failed_writes.get() as usize, tries);
    n.store.failing.store(false, Ordering::Release);
    assert_eq!(a.next_sync().await, ServerMsg::SyncStatus(true));
    assert_eq!(stored_text(&n.store).await, "kept");
}

#[tokio::test(start_paused = true)]
async fn a_read_only_connection_cannot_change_the_document() {
    let n = node(Config::default(), None);
    let doc = n.svc.open(NAME, &Context::new()).await.unwrap();
    let mut reader = attach(&doc, true).await;
    let mut writer = attach(&doc, false).await;
    send_update(&doc, &reader, edit("nope")).await;
    assert_eq!(reader.next_sync().await, ServerMsg::SyncStatus(false));
    let queued = writer.queued().await;
    assert!(
        queued.is_empty(),
        "a refused update was broadcast: {queued:?}"
    );
    send_update(&doc, &writer, edit("yes")).await;
    assert!(matches!(reader.next_sync().await, ServerMsg::Update(_)));
    assert!(matches!(writer.next_sync().await, ServerMsg::Update(_)));
    assert_eq!(writer.next_sync().await, ServerMsg::SyncStatus(true));
    assert_eq!(stored_text(&n.store).await, "yes");
}

#[tokio::test(start_paused = true)]
async fn a_document_unloads_after_its_last_client_leaves_and_its_state_is_stored() {
    let config = Config {
        unload_delay_ms: 1000,
        ..Config::default()
    };
    let n = node(config, None);
    let doc = n.svc.open(NAME, &Context::new()).await.unwrap();
    let mut a = attach(&doc, false).await;
    send_update(&doc, &a, edit("stays")).await;
    assert!(matches!(a.next_sync().await, ServerMsg::Update(_)));
    assert_eq!(a.next_sync().await, ServerMsg::SyncStatus(true));
    let detach = DocCommand::Detach {
        conn: a.conn,
        reply: None,
    };
    assert!(doc.send(detach).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        n.svc.registry.get(NAME).is_some(),
        "unloaded before unload_delay_ms"
    );
    // the load grace (2 s) and the delay pass; the task stores, leaves the registry and ends
    tokio::time::timeout(Duration::from_secs(30), doc.closed())
        .await
        .expect("the document task ended");
    assert!(n.svc.registry.get(NAME).is_none());
    assert_eq!(n.svc.registry.len(), 0);
    assert_eq!(stored_text(&n.store).await, "stays");
    // opening it again loads what was stored
    let again = n.svc.open(NAME, &Context::new()).await.unwrap();
    let mut b = attach(&again, false).await;
    let sv = StateVector::default().encode_v1();
    let msg = SyncMessage::Step1(Bytes::from(sv));
    assert!(again.send(DocCommand::Sync { conn: b.conn, msg }).await);
    assert!(matches!(b.next_sync().await, ServerMsg::Step1(_)));
    let ServerMsg::Step2(state) = b.next_sync().await else {
        panic!("a step 2")
    };
    let d = Doc::new();
    let t = d.get_or_insert_text("t");
    d.transact_mut()
        .apply_update(Update::decode_v1(&state).unwrap())
        .unwrap();
    assert_eq!(t.get_string(&d.transact()), "stays");
}

#[tokio::test(start_paused = true)]
async fn a_document_whose_ownership_is_lost_stops_writing_and_resets_its_clients() {
    let (lost, _) = watch::channel(false);
    let released = Arc::new(AtomicUsize::new(0));
    let ownership = Arc::new(Revocable {
        lost,
        released: released.clone(),
    });
    let n = node(Config::default(), Some(ownership.clone()));
    let doc = n.svc.open(NAME, &Context::new()).await.unwrap();
    let mut a = attach(&doc, false).await;
    send_update(&doc, &a, edit("before")).await;
    assert!(matches!(a.next_sync().await, ServerMsg::Update(_)));
    assert_eq!(a.next_sync().await, ServerMsg::SyncStatus(true));
    ownership.lost.send_replace(true);
    // the client is told to go and resync elsewhere, and the task ends without storing
    assert_eq!(
        a.next_sync().await,
        ServerMsg::Close(Close::ResetConnection.reason().into())
    );
    assert_eq!(
        a.next_sync().await,
        ServerMsg::Other(u64::from(Close::ResetConnection.code()))
    );
    tokio::time::timeout(Duration::from_secs(30), doc.closed())
        .await
        .expect("the document task ended");
    assert!(n.svc.registry.get(NAME).is_none());
    assert_eq!(n.svc.metrics.fenced_writes.get(), 1);
    assert_eq!(stored_text(&n.store).await, "before");
    assert_eq!(
        released.load(Ordering::Acquire),
        1,
        "the claim is given back"
    );
}
