//! Awareness limits (configuration.md "Awareness limits"): a client flooding client ids or
//! awareness messages is closed with 1008 and a reason naming the limit, on Hocuspocus and
//! y-websocket alike; a full document ignores newcomers' states without disconnecting anyone;
//! the snapshot a joiner receives never exceeds the per-document byte limit. In every case the
//! other clients, on the same document and on others, keep syncing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hearth::Config;
use hearth::protocol::lib0::Writer;
use tokio_tungstenite::tungstenite::Message;

const TOO_MANY_IDS: &str = "awareness limit: too many client ids";
const TOO_FAST: &str = "awareness limit: too many updates";

/// How a flooding client's connection ended.
#[derive(Debug)]
struct Ended {
    /// Reasons of the `CLOSE` frames received, by address.
    doc_closes: Vec<(String, String)>,
    code: Option<u16>,
    reason: String,
}

/// Sends `frames` one by one, looking for the server's answer between them, until the socket
/// is closed; then waits for the close.
async fn send_until_closed(c: &mut RawClient, frames: impl IntoIterator<Item = Vec<u8>>) -> Ended {
    let mut doc_closes = Vec::new();
    let mut sent = 0usize;
    'sending: for f in frames {
        if c.try_send(f).await.is_err() {
            break;
        }
        sent += 1;
        loop {
            match c.next_event(Duration::from_millis(1)).await {
                Event::Timeout => break,
                Event::Frame(f) => {
                    if let Msg::Close(reason) = f.msg {
                        doc_closes.push((f.address, reason));
                        break 'sending;
                    }
                }
                Event::Closed(code, reason) => {
                    return Ended {
                        doc_closes,
                        code,
                        reason,
                    };
                }
                other => panic!("after {sent} frames: {other:?}"),
            }
        }
    }
    loop {
        match c.next_event(T).await {
            Event::Frame(f) => {
                if let Msg::Close(reason) = f.msg {
                    doc_closes.push((f.address, reason));
                }
            }
            Event::Closed(code, reason) => {
                return Ended {
                    doc_closes,
                    code,
                    reason,
                };
            }
            other => panic!("after {sent} frames, expected the socket to close: {other:?}"),
        }
    }
}

/// `hearth_awareness_refused_total{reason}`.
fn refused(s: &TestServer, reason: &str) -> u64 {
    s.handle
        .metrics()
        .awareness_refused
        .with_label_values(&[reason])
        .get()
}

/// An awareness frame introducing `count` distinct client ids from `first` on.
fn id_flood(address: &str, first: u64, count: u64) -> Vec<u8> {
    let entries: Vec<(u64, u64, Option<&str>)> =
        (first..first + count).map(|c| (c, 1, Some("{}"))).collect();
    awareness(address, &entries)
}

/// The Hocuspocus handshake on a fresh address, returning the awareness snapshot the server
/// sent before its step1 (if any).
async fn join_with_snapshot(c: &mut RawClient, address: &str) -> Option<Vec<u8>> {
    c.send(auth(address, "")).await;
    c.send(step1_empty(address)).await;
    c.expect(address, Msg::Authenticated("read-write".into()))
        .await;
    let mut snapshot = None;
    let mut m = c.recv_for(address).await;
    if let Msg::Awareness(b) = m {
        snapshot = Some(b);
        m = c.recv_for(address).await;
    }
    assert!(matches!(m, Msg::Step1(_)), "expected step1, got {m:?}");
    assert!(matches!(c.recv_for(address).await, Msg::Step2(_)));
    c.send(step2(address, EMPTY_UPDATE)).await;
    // other clients' awareness may arrive before the acknowledgement
    let frames = c.recv_until(|f| !matches!(f.msg, Msg::Awareness(_))).await;
    assert_eq!(frames.last().map(|f| &f.msg), Some(&Msg::SyncStatus(1)));
    snapshot
}

/// A client that joined a document and keeps editing it (edit + ack + echo round trips).
struct Editor {
    c: RawClient,
    doc: &'static str,
    y: YDoc,
    n: usize,
}

impl Editor {
    async fn new(addr: std::net::SocketAddr, doc: &'static str, client: u64) -> Self {
        let mut c = RawClient::connect(addr).await;
        let state = c.join(doc).await;
        let y = YDoc::new(client);
        y.apply(&state);
        Self { c, doc, y, n: 0 }
    }

    /// Sends an edit and waits for its acknowledgement (other clients' frames are skipped).
    async fn edit(&mut self) {
        self.n += 1;
        let u = self.y.insert(&format!("{}{} ", self.doc, self.n));
        self.c.send(update(self.doc, &u)).await;
        let frames = self
            .c
            .recv_until(|f| f.address == self.doc && matches!(f.msg, Msg::SyncStatus(_)))
            .await;
        assert_eq!(frames.last().map(|f| &f.msg), Some(&Msg::SyncStatus(1)));
    }

    /// Edits, then checks the server holds every edit of this client.
    async fn check(&mut self) {
        self.edit().await;
        let state = self.c.fetch_state(self.doc).await;
        let text = text_of([state.as_slice()]);
        for n in 1..=self.n {
            assert!(text.contains(&format!("{}{} ", self.doc, n)), "{text:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_client_ids_closes_the_socket_1008_and_everyone_else_keeps_working() {
    let config = test_config();
    let byte_cap = config.max_awareness_document_bytes;
    let s = start(config).await;
    let mut same = Editor::new(s.addr, "flood", 4001).await;
    let mut other = Editor::new(s.addr, "calm", 4002).await;
    let witness_state = r#"{"user":"witness"}"#;
    same.c
        .send(awareness("flood", &[(4001, 1, Some(witness_state))]))
        .await;
    assert!(matches!(same.c.recv_for("flood").await, Msg::Awareness(_)));

    let mut attacker = RawClient::connect(s.addr).await;
    attacker.join("flood").await;
    attacker.join("flood-side").await;
    // 200,000 distinct client ids in one message, then more in smaller ones until closed
    let flood = std::iter::once(id_flood("flood", 1_000_000, 200_000))
        .chain((0..20u64).map(|i| id_flood("flood", 2_000_000 + i * 10_000, 10_000)));
    let metrics = s.handle.metrics();
    let (ended, ()) = tokio::join!(send_until_closed(&mut attacker, flood), async {
        // the witnesses keep round-tripping edits while the flood is handled, and the
        // document never holds more than the witness's state and the attacker's 8
        for _ in 0..5 {
            same.edit().await;
            other.edit().await;
            assert!(metrics.awareness_states.get() <= 9);
        }
    });
    assert_eq!(
        ended.doc_closes,
        vec![("flood".to_owned(), TOO_MANY_IDS.to_owned())],
        "{ended:?}"
    );
    assert_eq!(
        (ended.code, ended.reason.as_str()),
        (Some(1008), TOO_MANY_IDS)
    );

    // the attacker's states (at most the per-connection limit) are gone again
    wait_until(T, "attacker's awareness removed", || {
        s.handle.metrics().awareness_states.get() == 1
    })
    .await;
    wait_until(T, "attacker's documents detached", || {
        s.handle.metrics().doc_connections.get() == 2
    })
    .await;
    assert_eq!(refused(&s, "client_ids"), 1);
    assert_eq!(
        s.handle.metrics().closes.with_label_values(&["1008"]).get(),
        1
    );
    same.check().await;
    other.check().await;

    // a newcomer gets a snapshot holding only the witness, within the byte limit
    let mut newcomer = RawClient::connect(s.addr).await;
    let snapshot = join_with_snapshot(&mut newcomer, "flood")
        .await
        .expect("an awareness snapshot");
    assert!(snapshot.len() <= byte_cap);
    assert_eq!(
        parse_awareness(&snapshot),
        vec![(4001, 1, witness_state.to_owned())]
    );
    assert_syncs(s.addr, "flood").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_awareness_messages_closes_the_socket_1008() {
    let s = start(Config {
        max_awareness_updates_per_sec: 10,
        ..test_config()
    })
    .await;
    let mut same = Editor::new(s.addr, "chatty", 4101).await;
    let mut other = Editor::new(s.addr, "quiet", 4102).await;
    // a client within the burst (two seconds' worth) is fine
    let mut polite = RawClient::connect(s.addr).await;
    polite.join("chatty").await;
    for clock in 1..=15 {
        polite
            .send(awareness("chatty", &[(4103, clock, Some("{}"))]))
            .await;
    }
    // a provider re-sends every change it receives; repeats that change nothing are free
    let mut mirror = RawClient::connect(s.addr).await;
    mirror.join("chatty").await;
    for _ in 0..300 {
        mirror
            .send(awareness("chatty", &[(4103, 15, Some("{}"))]))
            .await;
    }
    let mut attacker = RawClient::connect(s.addr).await;
    attacker.join("chatty").await;
    let flood = (1..=10_000u64).map(|clock| awareness("chatty", &[(4104, clock, Some("{}"))]));
    let (ended, ()) = tokio::join!(send_until_closed(&mut attacker, flood), async {
        for _ in 0..3 {
            same.edit().await;
            other.edit().await;
        }
    });
    assert_eq!(
        ended.doc_closes,
        vec![("chatty".to_owned(), TOO_FAST.to_owned())],
        "{ended:?}"
    );
    assert_eq!((ended.code, ended.reason.as_str()), (Some(1008), TOO_FAST));
    // QueryAwareness counts too
    let mut querier = RawClient::connect(s.addr).await;
    querier.join("quiet").await;
    let queries = (0..1000).map(|_| query_awareness("quiet"));
    let ended = send_until_closed(&mut querier, queries).await;
    assert_eq!((ended.code, ended.reason.as_str()), (Some(1008), TOO_FAST));
    assert_eq!(refused(&s, "rate"), 2);
    // the polite client was not closed and still syncs; so do the witnesses
    let y = YDoc::new(4103);
    let frames = polite
        .recv_until(|f| matches!(&f.msg, Msg::Awareness(b) if parse_awareness(b).iter().any(|e| e.0 == 4104 && e.2 == "null")))
        .await;
    assert!(frames.iter().all(|f| !matches!(f.msg, Msg::Close(_))));
    polite.drain(Duration::from_millis(100)).await;
    polite.edit("chatty", &y.insert("still here")).await;
    mirror.drain(Duration::from_millis(100)).await;
    mirror
        .edit("chatty", &YDoc::new(4105).insert("mirror"))
        .await;
    assert_eq!(refused(&s, "rate"), 2, "the mirror was not closed");
    same.check().await;
    other.check().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_document_ignores_new_states_without_disconnecting_anyone() {
    let s = start(Config {
        max_awareness_clients_per_document: 20,
        max_awareness_document_bytes: 8192,
        max_awareness_state_bytes: 1024,
        ..test_config()
    })
    .await;
    let mut witness = Editor::new(s.addr, "full", 4201).await;
    witness
        .c
        .send(awareness("full", &[(4201, 1, Some("{}"))]))
        .await;
    // four well-behaved-looking fillers, 8 ids each: 33 ids for 20 places
    let mut fillers = Vec::new();
    for f in 0..4u64 {
        let mut c = RawClient::connect(s.addr).await;
        c.join("full").await;
        c.send(id_flood("full", 10_000 + f * 100, 8)).await;
        fillers.push(c);
    }
    wait_until(T, "every filler's update handled", || {
        refused(&s, "document_clients") >= 13
    })
    .await;
    assert_eq!(s.handle.metrics().awareness_states.get(), 20);
    assert_eq!(refused(&s, "document_clients"), 13);
    // nobody was disconnected: every filler still edits
    for (i, c) in fillers.iter_mut().enumerate() {
        c.drain(Duration::from_millis(50)).await;
        let y = YDoc::new(4300 + i as u64);
        c.edit("full", &y.insert("f")).await;
    }
    witness.check().await;

    // a newcomer: its state is ignored, it stays and edits
    let mut newcomer = RawClient::connect(s.addr).await;
    let snapshot = join_with_snapshot(&mut newcomer, "full").await.unwrap();
    assert_eq!(parse_awareness(&snapshot).len(), 20);
    newcomer
        .send(awareness("full", &[(4299, 1, Some(r#"{"me":1}"#))]))
        .await;
    newcomer.expect_silence(Duration::from_millis(200)).await;
    newcomer.edit("full", &YDoc::new(4299).insert("n")).await;
    // known clients still renew and remove
    witness
        .c
        .send(awareness("full", &[(4201, 2, Some(r#"{"v":2}"#))]))
        .await;
    let renewed = newcomer
        .recv_until(|f| matches!(&f.msg, Msg::Awareness(_)))
        .await;
    match &renewed.last().unwrap().msg {
        Msg::Awareness(b) => assert_eq!(parse_awareness(b), vec![(4201, 2, r#"{"v":2}"#.into())]),
        _ => unreachable!(),
    }
    // once the first filler (all 8 of its states stored) leaves, the places of its removed
    // clients go to new ones
    fillers.remove(0).close_socket().await;
    wait_until(T, "filler's states removed", || {
        s.handle.metrics().awareness_states.get() < 20
    })
    .await;
    newcomer.drain(Duration::from_millis(50)).await;
    newcomer
        .send(awareness("full", &[(4299, 2, Some(r#"{"me":2}"#))]))
        .await;
    let added = newcomer
        .recv_until(|f| matches!(&f.msg, Msg::Awareness(b) if parse_awareness(b).iter().any(|e| e.0 == 4299)))
        .await;
    assert!(!added.is_empty());
    assert!(s.handle.metrics().awareness_states.get() <= 20);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_awareness_snapshot_never_exceeds_the_byte_limit() {
    let cap = 8192;
    let s = start(Config {
        max_awareness_document_bytes: cap,
        max_awareness_state_bytes: 1024,
        ..test_config()
    })
    .await;
    let mut witness = Editor::new(s.addr, "heavy", 4401).await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1000));
    // 5 sockets × 4 states of ~1 KB = 20 KB offered for 8 KB
    let mut fillers = Vec::new();
    for f in 0..5u64 {
        let mut c = RawClient::connect(s.addr).await;
        c.join("heavy").await;
        let entries: Vec<(u64, u64, Option<&str>)> = (0..4)
            .map(|i| (20_000 + f * 10 + i, 1, Some(big.as_str())))
            .collect();
        c.send(awareness("heavy", &entries)).await;
        fillers.push(c);
    }
    wait_until(T, "refusals counted", || refused(&s, "document_bytes") > 0).await;
    let held = s.handle.metrics().awareness_bytes.get();
    assert!(held > 0 && held <= cap as i64, "{held}");
    let mut newcomer = RawClient::connect(s.addr).await;
    let snapshot = join_with_snapshot(&mut newcomer, "heavy").await.unwrap();
    assert!(snapshot.len() <= cap, "{} bytes", snapshot.len());
    assert_eq!(snapshot.len() as i64, held);
    newcomer.send(query_awareness("heavy")).await;
    match newcomer.recv_for("heavy").await {
        Msg::Awareness(b) => assert!(b.len() <= cap),
        other => panic!("expected the awareness snapshot, got {other:?}"),
    }
    for c in &mut fillers {
        c.drain(Duration::from_millis(20)).await;
    }
    witness.check().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_y_websocket_client_flooding_ids_is_closed_1008() {
    let s = start(test_config()).await;
    let mut same = Editor::new(s.addr, "yflood", 4501).await;
    let (mut ws, _) = with_timeout(
        T,
        "y-websocket connect",
        tokio_tungstenite::connect_async(format!("ws://{}/y/yflood", s.addr)),
    )
    .await
    .unwrap();
    let entries: Vec<(u64, u64, Option<&str>)> = (0..200_000u64)
        .map(|c| (3_000_000 + c, 1, Some("{}")))
        .collect();
    let mut frame = Vec::new();
    frame.write_var_uint(1); // y-websocket awareness message
    frame.write_var_bytes(&awareness_body(&entries));
    ws.send(Message::Binary(frame.into())).await.unwrap();
    let close = with_timeout(T, "y-websocket close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => break c,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close code");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1008, TOO_MANY_IDS)
    );
    wait_until(T, "attacker's awareness removed", || {
        s.handle.metrics().awareness_states.get() == 0
    })
    .await;
    same.check().await;
    s.stop().await;
}
