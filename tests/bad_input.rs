//! Bad input: garbage bytes, truncated sync frames, an oversized frame, a
//! text frame, floods before auth, invalid Yjs payloads, length bombs, a seeded fuzz loop and a
//! slow reader. In every case the server stays up and a well-behaved client on another socket
//! (the "witness") keeps syncing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use hearth::Config;
use hearth::protocol::lib0::Writer;
use hearth::storage::DocumentStore;

/// A client that joined `witness` before the bad input started.
struct Witness {
    c: RawClient,
    y: YDoc,
    n: usize,
}

impl Witness {
    async fn new(addr: std::net::SocketAddr) -> Self {
        let mut c = RawClient::connect(addr).await;
        c.join("witness").await;
        Self {
            c,
            y: YDoc::new(4242),
            n: 0,
        }
    }

    /// Edits, gets ack + echo, and a fresh client on another socket also syncs.
    async fn check(&mut self, addr: std::net::SocketAddr) {
        self.n += 1;
        let u = self.y.insert(&format!("w{} ", self.n));
        // skip whatever arrived meanwhile (awareness from fuzzing, etc.)
        self.c.send(update("witness", &u)).await;
        let frames = self
            .c
            .recv_until(|f| f.address == "witness" && f.msg == Msg::SyncStatus(1))
            .await;
        assert!(frames.iter().all(|f| f.msg != Msg::SyncStatus(0)));
        let state = self.c.fetch_state("witness").await;
        assert_eq!(text_of([state.as_slice()]), self.y.text());
        assert_syncs(addr, "liveness").await;
    }
}

fn small_limits() -> Config {
    Config {
        max_message_bytes: 64 << 10,
        outbound_queue_bytes: 256 << 10,
        preauth_max_messages: 20,
        preauth_max_bytes: 16 << 10,
        preauth_max_documents: 5,
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_frames_close_the_socket_with_4401() {
    let s = start(test_config()).await;
    let mut w = Witness::new(s.addr).await;
    for bad in [
        vec![0xff],                   // lone 0xff: a varString length that never ends
        vec![],                       // empty frame
        vec![0x05, b'a'],             // address shorter than declared
        vec![0xff, 0xff, 0xff, 0x7f], // address length bomb
        vec![0x02, 0xc3, 0x28, 0x00], // address is not UTF-8
        vec![0x01, b'a'],             // address without a type
        vec![0x01, b'a', 0xff],       // truncated type varint
    ] {
        let mut c = RawClient::connect(s.addr).await;
        c.send(bad.clone()).await;
        let frames = c.expect_close(4401).await;
        assert!(frames.is_empty(), "{bad:02x?}: {frames:?}");
    }
    // also after an address authenticated on that socket
    let mut c = RawClient::connect(s.addr).await;
    c.join("x").await;
    c.send(vec![0xff]).await;
    c.expect_close(4401).await;
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_frame_closes_1003_and_oversized_frame_closes_1009() {
    let s = start(small_limits()).await;
    let mut w = Witness::new(s.addr).await;

    let mut c = RawClient::connect(s.addr).await;
    c.send_text("ping").await;
    c.expect_close(1003).await;

    // a frame just under the limit is fine
    let mut c = RawClient::connect(s.addr).await;
    c.join("big").await;
    let y = YDoc::new(1);
    let u = y.insert(&"x".repeat(60 << 10));
    assert!(update("big", &u).len() < 64 << 10);
    c.edit("big", &u).await;
    // one byte over the limit is not
    let mut frame = update("big", &[]);
    frame.resize((64 << 10) + 1, 0);
    let _ = c.try_send(frame).await;
    c.expect_close(1009).await;
    // pre-auth too
    let mut c = RawClient::connect(s.addr).await;
    let _ = c.try_send(vec![0u8; 200 << 10]).await;
    c.expect_close(1009).await;
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_malformed_bodies_reset_only_that_document() {
    let s = start(test_config()).await;
    let mut w = Witness::new(s.addr).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("other").await;
    let y = YDoc::new(2);
    let full = update("tr", &y.insert("hello world"));
    let header = 1 + "tr".len() + 1; // address + type
    let mut bodies: Vec<Vec<u8>> = (header..full.len())
        .step_by(3)
        .map(|cut| full[..cut].to_vec())
        .collect();
    bodies.push(raw("tr", 0, &[7, 0])); // unknown sync sub-type
    bodies.push(raw("tr", 0, &[0, 5, 1])); // payload shorter than declared
    bodies.push(raw("tr", 1, &[0x80])); // truncated awareness length
    bodies.push(raw("tr", 5, &[3, b'a'])); // truncated stateless string
    bodies.push(raw("tr", 5, &[2, 0xc3, 0x28])); // stateless not UTF-8
    for bad in bodies {
        c.join("tr").await;
        c.send(bad.clone()).await;
        let f = c.recv().await;
        assert_eq!(
            f,
            Frame {
                address: "tr".into(),
                msg: Msg::Close("Reset Connection".into())
            },
            "{bad:02x?}"
        );
    }
    // the socket and its other document are fine
    c.edit("other", &YDoc::new(20).insert("!")).await;

    // a truncated frame queued before auth: Authenticated, then the reset
    c.send(full[..full.len() - 2].to_vec()).await;
    c.send(auth("tr", "")).await;
    c.expect("tr", Msg::Authenticated("read-write".into()))
        .await;
    c.expect("tr", Msg::Close("Reset Connection".into())).await;

    // an Auth frame that cannot be decoded closes the socket with 4205
    let mut bad_auth = RawClient::connect(s.addr).await;
    bad_auth.send(raw("a", 2, &[0, 9, b'x'])).await;
    bad_auth.expect_close(4205).await;
    let mut bad_auth = RawClient::connect(s.addr).await;
    bad_auth.send(raw("a", 2, &[1])).await;
    bad_auth.expect_close(4205).await;
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_yjs_payloads_are_refused_and_the_document_is_unaffected() {
    let s = start(test_config()).await;
    let mut w = Witness::new(s.addr).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("inv").await;
    let y = YDoc::new(3);
    c.edit("inv", &y.insert("good")).await;
    let valid = YDoc::new(4).insert("never applied");
    let bad_updates: Vec<Vec<u8>> = vec![
        vec![0xff, 0xff, 0xff],
        vec![0x01],
        valid[..valid.len() - 3].to_vec(),
        vec![0x01, 0x01, 0x05, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    ];
    for bad in &bad_updates {
        c.send(update("inv", bad)).await;
        c.expect("inv", Msg::SyncStatus(0)).await;
        c.send(step2("inv", bad)).await;
        c.expect("inv", Msg::SyncStatus(0)).await;
    }
    c.expect_silence(Duration::from_millis(100)).await;
    assert_eq!(text_of([c.fetch_state("inv").await.as_slice()]), "good");
    c.edit("inv", &y.insert("+")).await;
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_bombs_do_not_crash() {
    let s = start(test_config()).await;
    let mut w = Witness::new(s.addr).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("bomb").await;
    let y = YDoc::new(5);
    c.edit("bomb", &y.insert("intact")).await;
    let bomb = [0x80, 0x80, 0x80, 0x40]; // varint 2^27
    let big = [0xff, 0xff, 0xff, 0x7a]; // varint ~2^28
    let updates: Vec<Vec<u8>> = vec![
        bomb.to_vec(),                                        // 2^27 client groups
        [&[0x01][..], &bomb, &[0x05, 0x00]].concat(),         // 2^27 blocks for client 5
        [&[0x00][..], &bomb].concat(),                        // delete set: 2^27 clients
        [&[0x00, 0x01, 0x05][..], &bomb].concat(),            // delete set: 2^27 ranges
        [&[0x01, 0x01, 0x05, 0x00, 0x04][..], &big].concat(), // string length bomb
        big.to_vec(),
    ];
    for u in &updates {
        c.send(update("bomb", u)).await;
        c.expect("bomb", Msg::SyncStatus(0)).await;
    }
    // state vector bombs in step1: refused without an answer (or answered), never a crash
    for sv in [bomb.to_vec(), big.to_vec(), [&[0x01][..], &bomb].concat()] {
        c.send(step1("bomb", &sv)).await;
    }
    // awareness bombs: ignored
    for body in [bomb.to_vec(), [&[0x01, 0x01, 0x01][..], &bomb].concat()] {
        c.send(awareness_raw("bomb", &body)).await;
    }
    // the document connection still works and is unaffected
    let state = c.fetch_state("bomb").await;
    assert_eq!(text_of([state.as_slice()]), "intact");
    c.edit("bomb", &y.insert("!")).await;
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_garbage_is_ignored() {
    let s = start(Config {
        max_awareness_state_bytes: 1024,
        ..test_config()
    })
    .await;
    let mut w = Witness::new(s.addr).await;
    let mut a = RawClient::connect(s.addr).await;
    let mut b = RawClient::connect(s.addr).await;
    a.join("awg").await;
    b.join("awg").await;
    let huge = format!("\"{}\"", "x".repeat(2000));
    for entries in [
        vec![(1u64, 1u64, Some("{not json"))],
        vec![(2, 1, Some(huge.as_str()))],
        vec![(3, 1, Some(""))],
        vec![(u64::MAX, 1, Some("{}")), (4, 1, Some("{oops"))],
    ] {
        a.send(awareness("awg", &entries)).await;
    }
    a.send(awareness_raw("awg", &[0x02, 0x01, 0x01, 0x02, b'{', b'}']))
        .await; // declares 2 entries, has 1
    a.expect_silence(Duration::from_millis(200)).await;
    b.expect_silence(Duration::from_millis(50)).await;
    // valid awareness still flows on the same connection
    a.send(awareness("awg", &[(9, 1, Some("{}"))])).await;
    assert!(matches!(b.recv_for("awg").await, Msg::Awareness(_)));
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preauth_floods_close_4205() {
    let s = start(small_limits()).await;
    let mut w = Witness::new(s.addr).await;

    // > preauth_max_messages (20) queued frames
    let mut c = RawClient::connect(s.addr).await;
    for _ in 0..20 {
        c.send(step1_empty("flood")).await;
    }
    c.expect_silence(Duration::from_millis(200)).await;
    let _ = c.try_send(step1_empty("flood")).await;
    assert!(c.expect_close(4205).await.is_empty());

    // > preauth_max_bytes (16 KiB) queued
    let mut c = RawClient::connect(s.addr).await;
    let chunk = stateless("flood", &"y".repeat(6 << 10));
    c.send(chunk.clone()).await;
    c.send(chunk.clone()).await;
    c.expect_silence(Duration::from_millis(200)).await;
    let _ = c.try_send(chunk).await;
    assert!(c.expect_close(4205).await.is_empty());

    // > preauth_max_documents (5) pending addresses
    let mut c = RawClient::connect(s.addr).await;
    for i in 0..5 {
        c.send(step1_empty(&format!("doc{i}"))).await;
    }
    c.expect_silence(Duration::from_millis(200)).await;
    let _ = c.try_send(step1_empty("doc5")).await;
    assert!(c.expect_close(4205).await.is_empty());

    // frames for authenticated addresses do not count
    let mut c = RawClient::connect(s.addr).await;
    c.join("fine").await;
    let y = YDoc::new(6);
    for i in 0..40 {
        c.send(update("fine", &y.insert(&i.to_string()))).await;
    }
    let acks = c
        .recv_until({
            let mut n = 0;
            move |f| {
                n += usize::from(f.msg == Msg::SyncStatus(1));
                n == 40
            }
        })
        .await;
    assert!(acks.iter().all(|f| f.msg != Msg::SyncStatus(0)));
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_authenticating_closes_4408_despite_traffic() {
    let s = start(Config {
        auth_timeout_ms: 400,
        ..test_config()
    })
    .await;
    let mut w = Witness::new(s.addr).await;
    let started = Instant::now();
    let mut c = RawClient::connect(s.addr).await;
    // trickle frames: traffic does not extend the deadline
    let closed = loop {
        if c.try_send(stateless("idle", "tick")).await.is_err() {
            break None;
        }
        match c.next_event(Duration::from_millis(50)).await {
            Event::Timeout => {}
            Event::Closed(code, _) => break code,
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3), "not closed");
    };
    if let Some(code) = closed {
        assert_eq!(code, 4408);
    } else {
        assert_eq!(c.expect_end(T).await, Some(4408));
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(380) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // a socket that authenticated a document is not subject to the deadline: the witness
    // opened before `c`, so its own deadline had passed when `c` was closed at its deadline
    w.check(s.addr).await;
    s.stop().await;
}

/// yrs client ids are 53-bit; larger ids trip a `debug_assert` inside yrs's decoder (caught:
/// `SyncStatus(0)`) and alias a lower id in release builds (`SyncStatus(1)`). Either way the
/// document keeps working and the server does not reset it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_beyond_53_bits_are_harmless() {
    let s = start(test_config()).await;
    let mut w = Witness::new(s.addr).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("ids").await;
    let base = YDoc::new(5).insert("x");
    assert_eq!(base[2], 5, "client id byte of {base:02x?}");
    for id in [1u64 << 53, (1 << 60) + 5, u64::MAX] {
        let mut u = base[..2].to_vec();
        u.write_var_uint(id);
        u.extend_from_slice(&base[3..]);
        c.send(update("ids", &u)).await;
        let frames = c
            .recv_until(|f| matches!(f.msg, Msg::SyncStatus(_) | Msg::Close(_)))
            .await;
        assert!(
            matches!(frames.last().unwrap().msg, Msg::SyncStatus(_)),
            "{frames:?}"
        );
        let mut sv = vec![1];
        sv.write_var_uint(id);
        sv.push(3);
        c.send(step1("ids", &sv)).await;
        // answered (release) or refused (debug: yrs's debug_assert, caught)
        let replies = c.drain(Duration::from_millis(150)).await;
        assert!(
            replies
                .iter()
                .all(|f| matches!(f.msg, Msg::Step1(_) | Msg::Step2(_) | Msg::Update(_))),
            "{replies:?}"
        );
    }
    c.fetch_state("ids").await;
    c.edit("ids", &YDoc::new(6).insert("still fine")).await;
    w.check(s.addr).await;
    s.stop().await;
}

/// Random frames on fresh, unauthenticated sockets: each socket is either left open or closed
/// with 4401 (unparsable) / 4205 (bad Auth, pre-auth limits); never anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_before_auth() {
    let s = start(small_limits()).await;
    let mut w = Witness::new(s.addr).await;
    let mut rng = Rng::new(0xbad_5eed);
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let mut c = RawClient::connect(s.addr).await;
        let mut closed = None;
        for _ in 0..20 {
            let len = rng.below(40) as usize;
            let mut frame = rng.bytes(len);
            if rng.below(2) == 0 && !frame.is_empty() {
                frame[0] %= 8; // a short, often valid address length
            }
            if c.try_send(frame).await.is_err() {
                break;
            }
            match c.next_event(Duration::from_millis(5)).await {
                Event::Closed(code, _) => {
                    closed = code;
                    break;
                }
                Event::Gone(e) => panic!("connection dropped without a close frame: {e}"),
                Event::Timeout | Event::Frame(_) => {}
                Event::Text(t) => panic!("text frame {t}"),
            }
        }
        if closed.is_none() {
            closed = match c.next_event(Duration::from_millis(50)).await {
                Event::Closed(code, _) => code,
                _ => None,
            };
        }
        *codes.entry(closed).or_insert(0) += 1;
        if let Some(code) = closed {
            assert!([4401, 4205].contains(&code), "close code {code}");
        }
    }
    eprintln!("close codes: {codes:?}");
    w.check(s.addr).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// seeded fuzz
// ---------------------------------------------------------------------------------------------

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    match rng.below(4) {
        0 if !v.is_empty() => {
            let i = rng.below(v.len() as u64) as usize;
            v[i] ^= 1 << rng.below(8);
        }
        1 if !v.is_empty() => {
            let cut = rng.below(v.len() as u64) as usize;
            v.truncate(cut);
        }
        2 => {
            let i = rng.below(v.len() as u64 + 1) as usize;
            let n = rng.below(6) as usize + 1;
            let extra = rng.bytes(n);
            v.splice(i..i, extra);
        }
        _ => {
            let i = rng.below(v.len() as u64 + 1) as usize;
            v.insert(i, [0x80, 0xff, 0x7f, 0x00][rng.below(4) as usize]);
        }
    }
    v
}

fn fuzz_frame(rng: &mut Rng, doc: &str, source: &YDoc, counter: &mut u64) -> Vec<u8> {
    *counter += 1;
    match rng.below(10) {
        0 | 1 => {
            let len = rng.below(48) as usize;
            raw(doc, rng.below(12), &rng.bytes(len))
        }
        2 | 3 => {
            let u = source.insert(&format!("{counter} "));
            let u = mutate(rng, u);
            if rng.below(2) == 0 {
                update(doc, &u)
            } else {
                step2(doc, &u)
            }
        }
        4 => {
            let len = rng.below(16) as usize;
            step1(doc, &rng.bytes(len))
        }
        5 => {
            let entries: Vec<(u64, u64, Option<&str>)> = (0..rng.below(3))
                .map(|_| {
                    let state = [Some("{}"), Some(r#"{"a":[1,{"b":null}]}"#), None, Some("[")]
                        [rng.below(4) as usize];
                    (rng.below(1 << 20), rng.below(5), state)
                })
                .collect();
            let body = awareness_body(&entries);
            awareness_raw(doc, &mutate(rng, body))
        }
        6 => update(doc, &source.insert("ok ")),
        7 => mutate(rng, update(doc, &source.insert("m "))),
        8 => {
            let len = rng.below(24) as usize;
            stateless(doc, &String::from_utf8_lossy(&rng.bytes(len)))
        }
        _ => match rng.below(4) {
            0 => close(doc),
            1 => query_awareness(doc),
            2 => auth(doc, "again"),
            _ => {
                let mut b = Vec::new();
                b.write_var_string(doc);
                let n = rng.below(8) as usize;
                b.extend(rng.bytes(n));
                b
            }
        },
    }
}

/// Reads whatever arrived; re-authenticates documents the server closed. Returns false when
/// the socket ended.
async fn drain(c: &mut RawClient, docs: &[String]) -> bool {
    loop {
        match c.next_event(Duration::from_millis(2)).await {
            Event::Timeout => return true,
            Event::Frame(f) => {
                if matches!(f.msg, Msg::Close(_) | Msg::PermissionDenied(_))
                    && docs.contains(&f.address)
                {
                    let _ = c.try_send(auth(&f.address, "")).await;
                }
            }
            Event::Text(t) => panic!("server sent a text frame: {t}"),
            Event::Closed(..) | Event::Gone(_) => return false,
        }
    }
}

async fn fuzz_client(addr: std::net::SocketAddr, docs: &[String]) -> RawClient {
    let mut c = RawClient::connect(addr).await;
    for d in docs {
        c.join(d).await;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fuzz_keeps_the_server_alive() {
    let seed = std::env::var("HEARTH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let frames: usize = std::env::var("HEARTH_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    eprintln!("fuzz seed {seed:#x}, {frames} frames (HEARTH_FUZZ_SEED / HEARTH_FUZZ_FRAMES)");
    let s = start(test_config()).await;
    let mut w = Witness::new(s.addr).await;
    let mut rng = Rng::new(seed);
    let docs: Vec<String> = (0..3).map(|i| format!("fz{i}")).collect();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(fuzz_client(s.addr, &docs[i..i + 1]).await);
    }
    let sources: Vec<YDoc> = (0..3).map(|i| YDoc::new(700 + i)).collect();
    let mut counter = 0;
    let mut reconnects = 0;
    with_timeout(Duration::from_secs(60), "fuzz loop", async {
        for n in 0..frames {
            let i = rng.below(3) as usize;
            let doc = &docs[i];
            let frame = if rng.below(50) == 0 {
                let len = rng.below(32) as usize;
                rng.bytes(len) // raw garbage, may close the socket with 4401
            } else {
                fuzz_frame(&mut rng, doc, &sources[i], &mut counter)
            };
            let sent = clients[i].try_send(frame).await.is_ok();
            if !sent || (n % 8 == 0 && !drain(&mut clients[i], &docs[i..i + 1]).await) {
                reconnects += 1;
                clients[i] = fuzz_client(s.addr, &docs[i..i + 1]).await;
            }
        }
    })
    .await;
    eprintln!(
        "fuzz: {reconnects} reconnects, {} panics caught",
        s.handle.metrics().panics.get()
    );
    for (c, d) in clients.iter_mut().zip(&docs) {
        drain(c, std::slice::from_ref(d)).await;
    }
    // the fuzzed documents and the server are alive
    w.check(s.addr).await;
    for d in &docs {
        assert_syncs(s.addr, d).await;
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// slow reader
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_disconnected_and_fast_clients_are_unaffected() {
    // 1 MiB of queue (20 of the 50 KB updates): the background reader, which shares this test's
    // two runtime threads, must not be mistaken for a slow reader; the slow one never reads.
    let config = Config {
        debounce_ms: 60_000,
        max_debounce_ms: 60_000,
        outbound_queue_bytes: 1 << 20,
        ..small_limits()
    };
    let s = start(config).await;
    // `fast` reads its echo and ack after every edit (a healthy client); `slow` never reads.
    let mut fast = RawClient::connect(s.addr).await;
    let mut slow = RawClient::connect_small_rcvbuf(s.addr).await;
    fast.join("slow").await;
    slow.join("slow").await;
    assert_eq!(s.handle.metrics().sockets.get(), 2);

    let y = YDoc::new(8);
    let chunk = "z".repeat(50 << 10);
    let mut sent = 0;
    let started = Instant::now();
    while sent < 400 && s.handle.metrics().slow_readers.get() == 0 {
        fast.edit("slow", &y.insert(&chunk)).await;
        sent += 1;
    }
    eprintln!(
        "sent {sent} updates ({} MiB) in {:?}",
        sent * 50 / 1024,
        started.elapsed()
    );
    // the server notices within moments, without the slow client reading anything
    wait_until(
        Duration::from_secs(3),
        &format!("the slow reader is disconnected after {sent} updates"),
        || s.handle.metrics().slow_readers.get() > 0,
    )
    .await;
    assert_eq!(
        s.handle.metrics().slow_readers.get(),
        1,
        "the slow reader was not disconnected after {sent} updates"
    );
    wait_until(T, "slow socket task ended", || {
        s.handle.metrics().sockets.get() == 1
    })
    .await;
    assert_eq!(
        metric(s.operator_addr(), "hearth_slow_reader_disconnects_total").await,
        1.0
    );
    // the slow client finally reads: its connection ends (close frame or reset)
    slow.expect_end(Duration::from_secs(20)).await;
    // the fast client is unaffected: still connected, editing, and the server has every edit
    fast.edit("slow", &y.insert("after")).await;
    let state = fast.fetch_state("slow").await;
    assert_eq!(text_of([state.as_slice()]).len(), y.text().len());
    s.stop().await;
}

/// A frame larger than `outbound_queue_bytes` (here: the step2 answering a joiner of a
/// document whose state is larger than the queue) must still be delivered to a client that
/// reads promptly; it is not a slow reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_larger_than_the_outbound_queue_can_still_be_joined() {
    let config = Config {
        max_message_bytes: 64 << 10,
        outbound_queue_bytes: 128 << 10,
        ..test_config()
    };
    let s = start(config).await;
    let d = s
        .handle
        .open_direct_connection("large", Default::default())
        .await
        .unwrap();
    for _ in 0..4 {
        d.transact(|doc| {
            use yrs::{Text, Transact};
            let t = doc.get_or_insert_text("t");
            t.push(&mut doc.transact_mut(), &"q".repeat(60 << 10));
        })
        .await
        .unwrap();
    }
    let mut c = RawClient::connect(s.addr).await;
    let state = c.join("large").await;
    assert_eq!(text_of([state.as_slice()]).len(), 4 * (60 << 10));
    assert_eq!(s.handle.metrics().slow_readers.get(), 0);
    d.disconnect().await;
    s.stop().await;
}

/// An update whose one value nests `depth` arrays (about 2 bytes per level).
fn nested_array_update(depth: usize) -> Vec<u8> {
    // one client (7), one block: root type "t", content: one `Any` value
    let mut b = vec![1, 1, 7, 0, 0x08, 1, 1, b't', 1];
    b.extend(std::iter::repeat_n([117u8, 1], depth).flatten());
    b.push(126); // null at the bottom
    b.push(0); // empty delete set
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_values_are_refused_before_decoding() {
    // 10,000 and 1,000,000 levels: recursive decoding of either would overflow the stack
    let s = start(Config {
        auth_tokens: "ro=read-only,*=read-write".into(),
        ..test_config()
    })
    .await;
    let mut w = Witness::new(s.addr).await;
    let mut ro = RawClient::connect(s.addr).await;
    ro.send(auth("deep", "ro")).await;
    ro.expect("deep", Msg::Authenticated("readonly".into()))
        .await;
    let mut rw = RawClient::connect(s.addr).await;
    rw.join("deep").await;
    for depth in [10_000, 1_000_000] {
        let bomb = nested_array_update(depth);
        ro.send(update("deep", &bomb)).await;
        ro.expect("deep", Msg::SyncStatus(0)).await;
        ro.send(step2("deep", &bomb)).await;
        ro.expect("deep", Msg::SyncStatus(0)).await;
        rw.send(update("deep", &bomb)).await;
        rw.expect("deep", Msg::SyncStatus(0)).await;
    }
    // a modest nesting is an ordinary value
    rw.send(update("deep", &nested_array_update(20))).await;
    let frames = rw
        .recv_until(|f| f.address == "deep" && f.msg == Msg::SyncStatus(1))
        .await;
    assert!(frames.iter().all(|f| f.msg != Msg::SyncStatus(0)));
    w.check(s.addr).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_with_missing_dependencies_are_refused_and_resynced() {
    let (s, store) = start_with_store(test_config()).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("gap").await;
    let y = YDoc::new(11);
    let first = y.insert("ab");
    let second = y.insert("cd");
    // the second depends on the first, which the server has not seen: refused, and the
    // server asks for what it lacks with a step1
    c.send(update("gap", &second)).await;
    c.expect("gap", Msg::SyncStatus(0)).await;
    let sv = match c.recv_for("gap").await {
        Msg::Step1(sv) => sv,
        other => panic!("expected step1, got {other:?}"),
    };
    assert_eq!(sv, YDoc::new(99).sv(), "the server has nothing yet");
    // the client answers with everything it has: accepted whole
    c.send(step2("gap", &y.state())).await;
    let frames = c
        .recv_until(|f| f.address == "gap" && f.msg == Msg::SyncStatus(1))
        .await;
    assert!(frames.iter().all(|f| f.msg != Msg::SyncStatus(0)));
    assert_eq!(text_of([c.fetch_state("gap").await.as_slice()]), "abcd");
    // a refused step2 is not answered with another step1
    let z = YDoc::new(12);
    let _ = z.insert("x");
    let dangling = z.insert("y");
    c.send(step2("gap", &dangling)).await;
    c.expect("gap", Msg::SyncStatus(0)).await;
    c.expect_silence(Duration::from_millis(200)).await;
    drop(first);
    assert_eq!(store_text(&store, "gap").await, "abcd");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_caps_hold_and_empty_documents_are_not_stored() {
    let (s, store) = start_with_store(Config {
        max_documents_per_connection: 4,
        max_documents: 6,
        max_document_bytes: 4096,
        ..test_config()
    })
    .await;
    // per connection: the fifth document is refused, the socket and the first four stay
    let mut c = RawClient::connect(s.addr).await;
    for i in 0..4 {
        c.join(&format!("cap-{i}")).await;
    }
    c.send(auth("cap-4", "")).await;
    c.expect(
        "cap-4",
        Msg::PermissionDenied("too many documents on this connection".into()),
    )
    .await;
    let y = YDoc::new(5);
    c.edit("cap-0", &y.insert("still here")).await;
    // per node: two more fit, the next is refused
    let mut d = RawClient::connect(s.addr).await;
    d.join("cap-5").await;
    d.join("cap-6").await;
    d.send(auth("cap-7", "")).await;
    // authentication succeeds; the load is what is refused
    d.expect("cap-7", Msg::Authenticated("read-write".into()))
        .await;
    d.expect(
        "cap-7",
        Msg::PermissionDenied("server at document capacity".into()),
    )
    .await;
    // documents opened but never edited leave nothing in the database
    for name in ["cap-1", "cap-2", "cap-3", "cap-5", "cap-6"] {
        assert_eq!(store.current_epoch(name).await.unwrap(), None, "{name}");
    }
    assert_eq!(store_text(&store, "cap-0").await, "still here");
    // size: an update that would grow the document past 4 KiB is refused, smaller ones apply
    let big = y.insert(&"x".repeat(5000));
    c.send(update("cap-0", &big)).await;
    c.expect("cap-0", Msg::SyncStatus(0)).await;
    let z = YDoc::new(6);
    c.edit("cap-0", &z.insert("ok")).await;
    s.stop().await;
}
